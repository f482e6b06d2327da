"""A real-derived 3D brain dataset (grey/white matter of T1 MRI) in nnU-Net's raw layout, from the MNI152 template
that ships with nilearn (no download), written once and reused.

Imported as ``bench.mni_dataset`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``); used by
``scripts/bench_budget.py``. Needs ``nilearn`` (``load_mni152_template``, ``load_mni152_gm_template`` and
``load_mni152_wm_template`` at ``resolution=2``: T1 and tissue probability maps, 99 x 117 x 95 voxels of 2 mm).
To look at a dataset by hand::

    python -c "import sys; sys.path.insert(0, 'scripts'); from bench.mni_dataset import *; \\
               print(ensure_mni_dataset(MniParams(), 'bench_results/data'))"

Each case is the template and its label map under one random smooth deformation, pulled back with the same
coordinates for the image and for the GM/WM probability maps (trilinear, ``map_coordinates(order=1)``; outside
the template: 0):

* a random affine about the volume centre: rotation about each axis U(-10, 10) degrees, scaling U(0.9, 1.1)
  per axis, translation U(-4, 4) mm per axis;
* plus an elastic displacement: three smooth random fields (white noise on a grid of one node per ~8 voxels,
  cubic upsampling) scaled so that the largest displacement is U(1, 3) voxels (2-6 mm).

Labels (0 background, 1 grey matter, 2 white matter): the most probable tissue of each voxel,
``argmax([max(0, 1 - gm - wm), gm, wm])`` on the deformed probability maps. GM + WM never exceeds 1 in the
template, so a tissue wins only where it beats both background and the other tissue, which is nearly the
same as "probability > 0.5" (the two rules disagree on 0.2 % of the template's voxels). On the template: 12.4 %
GM, 7.2 % WM.

Per-case intensities (the template's T1 is in [0, 1]): gamma U(0.8, 1.25) on the deformed image, a smooth
multiplicative bias field ``1 + 0.15 * f`` (``f`` smooth, one node per ~24 voxels, scaled to [-1, 1]),
Gaussian noise of standard deviation U(2, 3) % of the image's range, then times 1000. Images are float32
NIfTI, labels uint8 NIfTI, both with the template's affine (2 mm isotropic, MNI world coordinates).

Layout: ``<bench_root>/datasets/Dataset910_MNIBrain/{imagesTr,labelsTr,imagesTs,labelsTs,dataset.json}``;
training cases ``mni_XXX`` (``imagesTr/mni_XXX_0000.nii.gz``, ``labelsTr/mni_XXX.nii.gz``), held-out cases
``mni_test_XXX`` in ``imagesTs``/``labelsTs``. Deterministic by seed: training case ``i`` comes from
``np.random.default_rng([seed, 0, i])``, held-out case ``k`` from ``default_rng([seed, 1, k])`` (independent
draws; training case ``i`` is the same whatever the number of cases). Built under a hidden temporary folder and
renamed into place when complete (like ``bench.datasets.ensure_dataset``); dataset.json records the parameters
and ``GENERATOR_VERSION``, and a folder made with other ones is rebuilt. Two processes at most; about 1-2 s per
case.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
TRAIN, TEST = 0, 1  # split codes in the per-case seed


@dataclass(frozen=True)
class MniParams:
    """What a dataset is made of (all of it goes to dataset.json; any change rebuilds the folder)."""

    num_train: int = 24
    num_test: int = 8
    seed: int = 0
    dataset_id: int = 910
    name: str = "MNIBrain"
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translation_mm: float = 4.0
    elastic_max_voxels: tuple[float, float] = (1.0, 3.0)   # largest displacement of the elastic field, drawn per case
    elastic_node_voxels: float = 8.0                       # spacing of the random field's grid (smoothness)
    bias_amplitude: float = 0.15                           # multiplicative field within 1 +- this
    bias_node_voxels: float = 24.0
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise_fraction: tuple[float, float] = (0.02, 0.03)     # noise std as a fraction of the image's range
    intensity_scale: float = 1000.0
    crop: tuple[int, int, int] | None = None               # central box of the template (tests); None: all of it

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    def as_json(self) -> dict:
        return json.loads(json.dumps({**asdict(self), "generator_version": GENERATOR_VERSION}))


@dataclass
class Templates:
    """The MNI152 T1 (float32 in [0, 1]) with its GM and WM probability maps, on one grid with ``affine``."""

    image: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def cropped(self, box: tuple[int, int, int] | None) -> "Templates":
        """The central ``box`` of the grid (affine shifted to match); ``None``: unchanged."""
        if box is None:
            return self
        starts = [max(0, (n - b) // 2) for n, b in zip(self.image.shape, box)]
        sl = tuple(slice(s, s + b) for s, b in zip(starts, box))
        affine = self.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.asarray(starts, float)
        return Templates(self.image[sl].copy(), self.gm[sl].copy(), self.wm[sl].copy(), affine)


def load_templates(crop: tuple[int, int, int] | None = None) -> Templates:
    """nilearn's MNI152 2009 templates at 2 mm (bundled with nilearn: nothing is downloaded)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2)
    arrays = [np.asarray(img.get_fdata(), np.float32) for img in (t1, gm, wm)]
    return Templates(*arrays, affine=np.asarray(t1.affine, float)).cropped(crop)


def smooth_field(rng: np.random.Generator, shape, node_voxels: float) -> np.ndarray:
    """Smooth random field scaled to [-1, 1]: white noise on a coarse grid (one node per ``node_voxels``), cubic
    upsampling to ``shape``."""
    from scipy import ndimage

    coarse = rng.standard_normal([max(3, int(np.ceil(n / node_voxels)) + 1) for n in shape]).astype(np.float32)
    field = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse.shape)], order=3, mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1], : shape[2]]
    if field.shape != tuple(shape):  # rounding in zoom: pad with edge values (never seen in practice)
        field = np.pad(field, [(0, n - f) for n, f in zip(shape, field.shape)], mode="edge")
    return field / max(float(np.abs(field).max()), 1e-6)


def _rotation(angles_rad) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def sample_coordinates(rng: np.random.Generator, shape, spacing, params: MniParams) -> tuple[np.ndarray, dict]:
    """Source voxel coordinates ``(3, *shape)`` of every output voxel: affine about the centre plus elastic field."""
    angles = np.deg2rad(rng.uniform(-params.max_rotation_deg, params.max_rotation_deg, 3))
    scales = rng.uniform(*params.scale_range, 3)
    shift_vox = rng.uniform(-params.max_translation_mm, params.max_translation_mm, 3) / np.asarray(spacing)
    matrix = _rotation(angles) @ np.diag(scales)
    elastic_max = rng.uniform(*params.elastic_max_voxels)
    fields = np.stack([smooth_field(rng, shape, params.elastic_node_voxels) for _ in range(3)])
    norm = float(np.sqrt((fields**2).sum(0)).max())
    fields *= elastic_max / max(norm, 1e-6)
    centre = (np.asarray(shape, float) - 1) / 2
    grids = [(np.arange(n, dtype=np.float32) - c).reshape([-1 if a == k else 1 for a in range(3)])
             for k, (n, c) in enumerate(zip(shape, centre))]
    coords = fields  # in place: (3, *shape) float32
    for i in range(3):
        coords[i] += centre[i] + shift_vox[i]
        for j in range(3):
            coords[i] += np.float32(matrix[i, j]) * grids[j]
    info = {"rotation_deg": np.rad2deg(angles).round(3).tolist(), "scale": scales.round(4).tolist(),
            "translation_mm": (shift_vox * np.asarray(spacing)).round(3).tolist(), "elastic_max_voxels": round(elastic_max, 3)}
    return coords, info


def label_from_probabilities(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0/1/2 = the most probable of background (``1 - gm - wm``, at least 0), grey matter, white matter."""
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)


def make_case(templates: Templates, params: MniParams, split: int, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Case ``index`` of ``split`` (``TRAIN``/``TEST``): float32 image, uint8 label (template grid), draw info."""
    from scipy import ndimage

    rng = np.random.default_rng([params.seed, split, index])
    shape = templates.image.shape
    coords, info = sample_coordinates(rng, shape, templates.spacing, params)

    def warp(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, output=np.float32)

    image, gm, wm = warp(templates.image), warp(templates.gm), warp(templates.wm)
    del coords
    label = label_from_probabilities(gm, wm)
    gamma = rng.uniform(*params.gamma_range)
    image = np.clip(image, 0.0, None) ** np.float32(gamma)
    image *= 1.0 + np.float32(params.bias_amplitude) * smooth_field(rng, shape, params.bias_node_voxels)
    noise = rng.uniform(*params.noise_fraction) * float(image.max() - image.min())
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise)
    image *= np.float32(params.intensity_scale)
    info.update(gamma=round(gamma, 4), noise_std=round(noise * params.intensity_scale, 3))
    return image.astype(np.float32, copy=False), label, info


def case_name(split: int, index: int) -> str:
    return f"mni_{index:03d}" if split == TRAIN else f"mni_test_{index:03d}"


_TEMPLATES: Templates | None = None  # per worker process (set by the pool initializer)


def _init_worker(templates: Templates) -> None:
    global _TEMPLATES
    _TEMPLATES = templates


def write_case(params: MniParams, split: int, index: int, folder: str) -> dict:
    import nibabel as nib

    templates = _TEMPLATES if _TEMPLATES is not None else load_templates(params.crop)
    image, label, info = make_case(templates, params, split, index)
    name = case_name(split, index)
    images, labels = ("imagesTr", "labelsTr") if split == TRAIN else ("imagesTs", "labelsTs")
    for array, path in ((image, Path(folder) / images / f"{name}_0000.nii.gz"), (label, Path(folder) / labels / f"{name}.nii.gz")):
        img = nib.Nifti1Image(array, templates.affine)
        img.set_data_dtype(array.dtype)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(path))
    counts = np.bincount(label.ravel(), minlength=3)
    return {"case": name, **info, "label_fractions": (counts / label.size).round(4).tolist()}


def dataset_json(params: MniParams, cases: list[dict] | None = None) -> dict:
    out = {
        "channel_names": {"0": "T1"},
        "labels": dict(LABELS),
        "numTraining": params.num_train,
        "numTest": params.num_test,
        "file_ending": ".nii.gz",
        "name": params.folder_name,
        "description": "MNI152 2009 template (nilearn, 2 mm) under random affine + elastic deformations, bias "
                       "field, gamma and noise; labels = most probable of background/GM/WM (bench.mni_dataset)",
        "bench_mni": params.as_json(),
    }
    if cases is not None:
        try:
            from importlib.metadata import version

            out["nilearn_version"] = version("nilearn")
        except Exception:  # noqa: BLE001  the record is informative only
            pass
        out["cases"] = cases
    return out


def is_complete(folder: Path, params: MniParams) -> bool:
    """True when ``folder`` was made completely (see module docstring) with ``params`` and this generator."""
    try:
        meta = json.loads((Path(folder) / "dataset.json").read_text()).get("bench_mni")
    except (OSError, ValueError):
        return False
    return meta == params.as_json()


def ensure_mni_dataset(params: MniParams, bench_root, workers: int = 2, log=print) -> Path:
    """``<bench_root>/datasets/<params.folder_name>``, generated first unless complete with these parameters."""
    parent = Path(bench_root) / "datasets"
    final = parent / params.folder_name
    if is_complete(final, params):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".tmp-{params.folder_name}-*"):  # left by an interrupted generation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".tmp-{params.folder_name}-{uuid.uuid4().hex[:8]}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp / sub).mkdir(parents=True)
    log(f"generating {params.num_train} training + {params.num_test} held-out MNI152 case(s) in {final} ...")
    jobs = [(TRAIN, i) for i in range(params.num_train)] + [(TEST, k) for k in range(params.num_test)]
    try:
        templates = load_templates(params.crop)
        workers = max(1, min(2, int(workers), len(jobs)))
        if workers > 1:
            import multiprocessing

            # fork: the workers inherit the loaded templates (no nilearn import or pickling per worker)
            context = multiprocessing.get_context("fork") if os.name == "posix" else None
            with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                     initargs=(templates,)) as pool:
                cases = list(pool.map(write_case, *zip(*[(params, s, i, str(tmp)) for s, i in jobs])))
        else:
            _init_worker(templates)
            cases = [write_case(params, s, i, str(tmp)) for s, i in jobs]
        (tmp / "dataset.json").write_text(json.dumps(dataset_json(params, cases), indent=2) + "\n")
        if final.exists():  # made with other parameters (is_complete said no): replace it
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final, params):  # another process may have finished the same dataset first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
