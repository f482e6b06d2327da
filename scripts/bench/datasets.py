"""Deterministic synthetic CT-like benchmark datasets (named presets) in nnU-Net's raw layout, written once.

Imported as ``bench.datasets`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``).

``ensure_dataset(preset, bench_root)`` returns ``<bench_root>/datasets/DatasetNNN_Name``. The folder is built
under a hidden temporary name and renamed into place when every file is written, so a folder with the final name
is always complete; an interrupted run leaves only a ``.tmp-*`` folder, removed on the next call. dataset.json
records the preset's parameters and the generator version: a folder made by other parameters is rebuilt.

Each case comes from its own generator seeded by ``(seed, index)``, so case ``i`` is the same in every preset
that shares the generator parameters (``plan10`` is the first 10 cases of ``plan100``) and cases can be
written in parallel. Images are int16 HU: air, fat, soft tissue, a spine (unlabelled bone), and three labelled
structures: ``liver`` (deformed ellipsoid), ``kidney`` (two ellipsoids), ``aorta`` (a wobbling tube along z),
with smooth texture and noise. About 30 % of cases have zero-filled slices at both z ends so that cropping to
the nonzero region does something, as in exported scans with padding.
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
LABELS = {"background": 0, "liver": 1, "kidney": 2, "aorta": 3}


@dataclass(frozen=True)
class Preset:
    """Dataset parameters. ``dataset_id`` gives nnU-Net's DatasetNNN prefix (900+: benchmark-owned ids)."""

    name: str
    dataset_id: int
    num_cases: int
    shape: tuple[int, int, int]          # nominal (z, y, x) voxels
    spacing: tuple[float, float, float]  # nominal (z, y, x) mm
    shape_jitter: float = 0.15           # each axis scaled by U(1 - j, 1 + j)
    spacing_jitter: float = 0.08
    seed: int = 0
    dims: int = 3                        # 2: each case is the middle slice of its volume, written as a 2D image

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name.capitalize()}"


PRESETS = {
    "plan100": Preset("plan100", 901, 100, (64, 192, 192), (2.5, 0.8, 0.8)),
    "plan10": Preset("plan10", 902, 10, (64, 192, 192), (2.5, 0.8, 0.8)),  # first 10 cases of plan100 (profiling)
    "tiny": Preset("tiny", 903, 6, (16, 32, 32), (2.5, 0.8, 0.8)),
    # small CT-like volumes: nnU-Net's own plan for them is a network a CPU can step in seconds (training benchmark)
    "train30": Preset("train30", 905, 30, (32, 80, 80), (2.5, 0.8, 0.8)),
    # one CT-shaped volume of 512x512x100 (prediction benchmark)
    "ct100": Preset("ct100", 906, 1, (100, 512, 512), (2.5, 0.7, 0.7), shape_jitter=0.0, spacing_jitter=0.0),
    # a folder of 8 CT-shaped volumes of 512x512x100 (overlapped vs sequential prediction); case 0 is ct100's
    "ct100x8": Preset("ct100x8", 907, 8, (100, 512, 512), (2.5, 0.7, 0.7), shape_jitter=0.0, spacing_jitter=0.0),
    # one real-size CT (512x512x300): peak memory of preprocessing one case
    "ct512": Preset("ct512", 904, 1, (300, 512, 512), (1.0, 0.7, 0.7), shape_jitter=0.0, spacing_jitter=0.0),
    # scripts/gpu_check.py: CT series at half the in-plane resolution (256x256 at 1.4 mm, 100 slices), so that a
    # CPU float32 reference of the 512x512x100 ct100 volume with the network planned for a large card fits minutes
    "gpu3d": Preset("gpu3d", 911, 12, (100, 256, 256), (2.5, 1.4, 1.4)),
    # scripts/gpu_check.py --quick: the one volume it predicts
    "tinyct": Preset("tinyct", 908, 1, (16, 32, 32), (2.5, 0.8, 0.8), shape_jitter=0.0, spacing_jitter=0.0),
    # scripts/gpu_check.py: 2D CT slices of 512x512 at 0.7 mm (the 2d configuration planned for a large card)
    "gpu2d": Preset("gpu2d", 909, 24, (8, 512, 512), (2.5, 0.7, 0.7), dims=2),
    "tiny2d": Preset("tiny2d", 910, 6, (8, 48, 48), (2.5, 0.8, 0.8), dims=2),  # gpu_check.py --quick
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown dataset preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def _smooth_field(rng: np.random.Generator, shape, factor=(4, 8, 8)) -> np.ndarray:
    """Unit-ish smooth noise: white noise on a coarse grid, trilinearly upsampled (much faster than a Gaussian)."""
    from scipy import ndimage

    coarse = rng.standard_normal([max(2, n // f + 2) for n, f in zip(shape, factor)]).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse.shape)]
    field = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    return field[: shape[0], : shape[1], : shape[2]]


def make_case(preset: Preset, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Case ``index``: int16 HU image ``(z, y, x)``, uint8 label, spacing ``(z, y, x)`` mm."""
    rng = np.random.default_rng([preset.seed, index])
    j, sj = preset.shape_jitter, preset.spacing_jitter
    shape = tuple(max(8, int(round(n * rng.uniform(1 - j, 1 + j)))) for n in preset.shape)
    sz = round(preset.spacing[0] * rng.uniform(1 - sj, 1 + sj), 4)
    sxy = round(preset.spacing[1] * rng.uniform(1 - sj, 1 + sj), 4)
    spacing = (sz, sxy, sxy)
    # world coordinates (mm) around the volume centre, as broadcastable 1-D grids (no full 3-D coordinate arrays)
    z, y, x = (((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    zhalf, yhalf, xhalf = (n * s / 2 for n, s in zip(shape, spacing))
    wobble = _smooth_field(rng, shape)  # deforms organ borders and textures tissue

    # body: an elliptic cylinder (fat rim around soft tissue), slightly varying along z
    a, b = xhalf * rng.uniform(0.85, 0.95), yhalf * rng.uniform(0.7, 0.85)
    body_r = (x / a) ** 2 + (y / b) ** 2 * (1 + 0.05 * np.sin(z / zhalf * np.pi)) + 0.03 * wobble
    hu = np.full(shape, -1000.0, np.float32)
    hu[body_r < 1] = -100.0
    hu[body_r < 0.8] = 40.0
    label = np.zeros(shape, np.uint8)

    def ellipsoid(center, semi, amp=0.15):
        d = sum(((c - m) / s) ** 2 for c, m, s in zip((z, y, x), center, semi))
        return d < 1 + amp * wobble

    # liver on one side, two kidneys posterior, aorta in front of the spine
    side = rng.choice([-1.0, 1.0])
    liver = ellipsoid((rng.uniform(-0.2, 0.2) * zhalf, -0.15 * b, side * 0.35 * a),
                      (zhalf * rng.uniform(0.7, 1.0), b * rng.uniform(0.5, 0.65), a * rng.uniform(0.45, 0.6)))
    kidneys = np.zeros(shape, bool)
    for s in (-1.0, 1.0):
        kidneys |= ellipsoid((rng.uniform(-0.3, 0.3) * zhalf, 0.35 * b, s * 0.45 * a),
                             (zhalf * rng.uniform(0.25, 0.4), b * 0.18, a * 0.12))
    spine_y, spine_r = 0.6 * b, 0.12 * a
    cy = spine_y - spine_r - 12 + 3 * np.sin(z / zhalf * rng.uniform(1, 3) + rng.uniform(0, 6))
    cx = rng.normal(0, 3) + 3 * np.sin(z / zhalf * rng.uniform(1, 3) + rng.uniform(0, 6))
    aorta = (y - cy) ** 2 + (x - cx) ** 2 < rng.uniform(7, 11) ** 2
    spine = np.broadcast_to((y - spine_y) ** 2 + x**2 < spine_r**2, shape)
    # vertebrae and discs alternate along z; bone is not labelled
    hu[spine] = np.broadcast_to(np.where(np.sin(z / 14.0 * np.pi) > -0.6, 700.0, 90.0), shape)[spine]
    for mask, value, lab in ((liver, 60.0, 1), (kidneys, 150.0, 2), (aorta, 250.0, 3)):
        mask &= body_r < 0.8
        hu[mask] = value * rng.uniform(0.9, 1.1)
        label[mask] = lab

    hu += 12.0 * _smooth_field(rng, shape, (2, 4, 4)) + 8.0 * wobble  # tissue texture
    hu += rng.uniform(10, 25) * rng.standard_normal(shape, dtype=np.float32)  # scanner noise
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    if rng.random() < 0.3:  # zero-filled padding slices (exported scans often have them)
        pad = int(rng.integers(2, max(3, shape[0] // 8)))
        image[:pad], image[-pad:], label[:pad], label[-pad:] = 0, 0, 0, 0
    return image, label, spacing


def _write(path: Path, array: np.ndarray, spacing) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK wants (x, y, z)
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_slice(path: Path, plane, spacing) -> None:
    from segforge.io.image import FAKE_Z_SPACING, Geometry, write_image

    geometry = Geometry(spacing=(FAKE_Z_SPACING, *map(float, spacing[1:])), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0),
                        ndim=2)
    write_image(path, plane[None], geometry)


def write_case(preset: Preset, index: int, folder: str) -> None:
    image, label, spacing = make_case(preset, index)
    case = f"case_{index:04d}"
    if preset.dims == 2:
        middle = image.shape[0] // 2
        _write_slice(Path(folder) / "imagesTr" / f"{case}_0000.nii.gz", image[middle], spacing)
        _write_slice(Path(folder) / "labelsTr" / f"{case}.nii.gz", label[middle], spacing)
        return
    _write(Path(folder) / "imagesTr" / f"{case}_0000.nii.gz", image, spacing)
    _write(Path(folder) / "labelsTr" / f"{case}.nii.gz", label, spacing)


def dataset_json(preset: Preset) -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": LABELS,
        "numTraining": preset.num_cases,
        "file_ending": ".nii.gz",
        "name": preset.folder_name,
        # dims only when 2D: the folders of the 3D presets made before that field existed stay valid
        "bench_preset": {**{k: v for k, v in asdict(preset).items() if k != "dims" or v != 3},
                         "generator_version": GENERATOR_VERSION},
    }


def is_complete(folder: Path, preset: Preset) -> bool:
    """True when ``folder`` was made (completely: see module docstring) by this preset and generator."""
    try:
        meta = json.loads((folder / "dataset.json").read_text()).get("bench_preset")
    except (OSError, ValueError):
        return False
    return meta == json.loads(json.dumps(dataset_json(preset)["bench_preset"]))  # tuples compare as lists


def ensure_dataset(preset: Preset | str, bench_root: Path, workers: int = 2, log=print) -> Path:
    """The preset's dataset folder under ``<bench_root>/datasets``, generated first unless already complete."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    parent = Path(bench_root) / "datasets"
    final = parent / preset.folder_name
    if is_complete(final, preset):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".tmp-{preset.folder_name}-*"):  # left by an interrupted generation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".tmp-{preset.folder_name}-{uuid.uuid4().hex[:8]}"
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    log(f"generating {preset.num_cases} case(s) of preset {preset.name!r} in {final} ...")
    try:
        indices = range(preset.num_cases)
        if workers > 1 and preset.num_cases > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(write_case, [preset] * len(indices), indices, [str(tmp)] * len(indices)))
        else:
            for i in indices:
                write_case(preset, i, str(tmp))
        (tmp / "dataset.json").write_text(json.dumps(dataset_json(preset), indent=2) + "\n")
        if final.exists():  # made by other parameters (is_complete said no): replace it
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final, preset):  # another process may have finished the same preset first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
