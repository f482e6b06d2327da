"""Corrupted and unusual inputs to `segforge predict`: each bad case is reported with a specific message naming its
file (and the fix), never a traceback; the other case of the run is still predicted correctly; the bad case leaves
no output and no temporary file; predict_report.json lists it as failed with the reason; the exit code is non-zero.
Unusual but valid inputs (spaces and unicode in names, symlinks, a few NaN voxels...) are predicted.

The models are built in seconds, not trained: `segforge plan` on a tiny dataset, then the planned U-Net with seeded
random weights saved as `train` saves it. Their masks are arbitrary but deterministic, which is all these tests need:
"predicted correctly" means the same mask as the same image under a plain name, predicted alone.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROTATED, make_case
from segforge.cli.main import main
from segforge.io.image import Geometry, read_image, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEOMETRY = Geometry(spacing=(3.0, 0.9, 0.9), origin=(12.5, -40.0, 7.0), direction=ROTATED, ndim=3)
GEOMETRY_2D = Geometry(spacing=(999.0, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2)
CHANNELS_3D = {"0": "T1", "1": "T2"}
FAST = ["predict.mirror=false", "predict.device=cpu"]


def build_model(base: Path, name: str, ending: str, channels: dict, configuration: str, write_case) -> Path:
    """A model folder as `train` leaves it (plans.json, dataset.json, fold_0/model_final.pt), with seeded random
    weights: `plan` on a tiny dataset, then the planned network, untrained."""
    from hydra.utils import instantiate

    from segforge.cli.main import compose_config
    from segforge.io.model_folder import FINAL_WEIGHTS, write_weights
    from segforge.training.run import network_kwargs

    dataset = base / name
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        write_case(dataset, f"case{i:03d}", rng)
    labels = {"background": 0, "ball": 1, "box": 2}
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": labels, "numTraining": 4,
                                                      "file_ending": ending}))
    work = base / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.features_base=4",
                 f"plan.configurations=[{configuration}]", "preprocess.run=false", "preprocess.num_workers=0"]) == 0
    plans = json.loads((work / name / "plans_default.json").read_text())
    plan_config = plans["configurations"][configuration]
    kwargs = network_kwargs(compose_config("train", []), plan_config, len(channels), len(labels))
    torch.manual_seed(0)
    network = instantiate(kwargs, _convert_="all")
    model = base / "model" / configuration
    (model / "fold_0").mkdir(parents=True)
    shutil.copy(work / name / "plans_default.json", model / "plans.json")
    shutil.copy(dataset / "dataset.json", model / "dataset.json")
    write_weights(model / "fold_0" / FINAL_WEIGHTS, network, kwargs, configuration, plan_config)
    return model


def two_channels(rng: np.random.Generator, shape=(12, 32, 32)) -> tuple[list[np.ndarray], np.ndarray]:
    image, label = make_case(rng, shape)
    return [image, (0.6 * image + rng.normal(0, 0.3, shape)).astype(np.float32)], label


def write_3d(dataset: Path, case: str, rng) -> None:
    channels, label = two_channels(rng)
    for c, channel in enumerate(channels):
        write_image(dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz", channel, GEOMETRY)
    write_image(dataset / "labelsTr" / f"{case}.nii.gz", label, GEOMETRY)


def image_2d(rng: np.random.Generator, shape=(48, 48)) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.integers(12, shape[0] - 12, 2)
    label = (((yy - cy) ** 2 + (xx - cx) ** 2) < 64).astype(np.uint8)
    label[4:10, 30:40] = 2
    image = np.clip(60 + 120 * (label == 1) + 60 * (label == 2) + rng.normal(0, 15, shape), 0, 255).astype(np.uint8)
    return image[None], label[None]


def write_2d(dataset: Path, case: str, rng) -> None:
    image, label = image_2d(rng)
    write_image(dataset / "imagesTr" / f"{case}_0000.png", image, GEOMETRY_2D)
    write_image(dataset / "labelsTr" / f"{case}.png", label, GEOMETRY_2D)


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model3d"), "Dataset001_Bad3d", ".nii.gz", CHANNELS_3D, "3d_fullres",
                       write_3d)


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model2d"), "Dataset002_Bad2d", ".png", {"0": "grey"}, "2d", write_2d)


GOOD_3D = two_channels(np.random.default_rng(42))[0]
GOOD_2D = image_2d(np.random.default_rng(42))[0]


def write_good_3d(folder: Path, case: str = "good", channels=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, channel in enumerate(GOOD_3D if channels is None else channels):
        paths.append(folder / f"{case}_{c:04d}.nii.gz")
        write_image(paths[-1], channel, GEOMETRY)
    return paths


def write_good_2d(folder: Path, case: str = "good") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / f"{case}_0000.png", GOOD_2D, GEOMETRY_2D)
    return folder / f"{case}_0000.png"


@pytest.fixture(scope="module")
def reference_3d(model_3d, tmp_path_factory) -> np.ndarray:
    """The good case's mask, predicted alone (the same settings as the CLI runs below)."""
    from segforge.inference.predictor import Predictor

    folder = tmp_path_factory.mktemp("reference3d")
    predictor = Predictor.from_model_dir(model_3d, device="cpu", mirror=False)
    return predictor.predict(write_good_3d(folder))[0]


@pytest.fixture(scope="module")
def reference_2d(model_2d, tmp_path_factory) -> np.ndarray:
    from segforge.inference.predictor import Predictor

    folder = tmp_path_factory.mktemp("reference2d")
    predictor = Predictor.from_model_dir(model_2d, device="cpu", mirror=False)
    return predictor.predict(write_good_2d(folder))[0]


def predict(model: Path, images: Path, out: Path, capfd) -> tuple[int, str, dict]:
    """`segforge predict` through main(); its exit code, everything it printed (C-level output too), the report."""
    code = main(["predict", "-i", str(images), "-o", str(out), "--model", str(model), *FAST])
    captured = capfd.readouterr()
    report = json.loads((out / "predict_report.json").read_text())
    return code, captured.out + captured.err, {c["case"]: c for c in report["cases"]}


def assert_mask(path: Path, reference: np.ndarray, geometry: Geometry) -> None:
    mask, mask_geometry = read_image(path)
    np.testing.assert_array_equal(mask, reference)
    assert mask_geometry.same_grid(geometry, tol=1e-5) == [] and mask_geometry.ndim == geometry.ndim


def assert_no_output(out: Path, case: str) -> None:
    assert not [p.name for p in out.iterdir() if p.name.split(".")[0] == case], sorted(os.listdir(out))
    assert not [p.name for p in out.rglob(".tmp*")], sorted(os.listdir(out))


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs for the 3D model (2 channels, .nii.gz): each writes case "bad" into the folder, returns the name of the
# offending file and a phrase the message must hold (specific to the problem, not "cannot read")


def nifti_bytes(channel: np.ndarray) -> bytes:
    """The uncompressed NIfTI file of a (z, y, x) array, as segforge writes it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_image(Path(tmp) / "x.nii.gz", channel, GEOMETRY)
        return gzip.decompress((Path(tmp) / "x.nii.gz").read_bytes())


def _truncated_gz(folder: Path):
    path = write_good_3d(folder, "bad")[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut the gzip stream in half
    return path.name, "truncated or corrupt gzip stream: the file ends early"


def _corrupt_gz(folder: Path):
    path = write_good_3d(folder, "bad")[1]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])  # damaged in the middle, size intact
    path.write_bytes(bytes(data))
    return path.name, "corrupt gzip stream"


def _text_file(folder: Path):
    write_good_3d(folder, "bad")
    (folder / "bad_0000.nii.gz").write_text("patient list\nid,age\n1,42\n")
    return "bad_0000.nii.gz", "is not a NIfTI image: it starts with text 'patient list'"


def _random_bytes(folder: Path):
    write_good_3d(folder, "bad")
    (folder / "bad_0001.nii.gz").write_bytes(np.random.default_rng(5).bytes(20000))
    return "bad_0001.nii.gz", "is not a NIfTI image"


def _gzip_of_no_nifti(folder: Path):
    write_good_3d(folder, "bad")
    (folder / "bad_0000.nii.gz").write_bytes(gzip.compress(b"DICM" + bytes(4000)))
    return "bad_0000.nii.gz", "is gzip-compressed but holds no NIfTI image"


def _empty_file(folder: Path):
    write_good_3d(folder, "bad")
    (folder / "bad_0001.nii.gz").write_bytes(b"")
    return "bad_0001.nii.gz", "is empty (0 bytes)"


def _header_claims_more_voxels(folder: Path):
    write_good_3d(folder, "bad")
    data = bytearray(nifti_bytes(GOOD_3D[0]))
    (z,) = struct.unpack_from("<h", data, 46)  # dim[3]: the number of slices
    struct.pack_into("<h", data, 46, 2 * z)
    (folder / "bad_0000.nii.gz").write_bytes(gzip.compress(bytes(data)))
    return "bad_0000.nii.gz", "its NIfTI header promises"


def _many_nan(folder: Path):
    channel = GOOD_3D[1].copy()
    channel[:, :8] = np.nan  # a missing region: a quarter of the image
    write_good_3d(folder, "bad", [GOOD_3D[0], channel])
    return "bad_0001.nii.gz", "non-finite voxel(s) (3072 NaN, 0 inf; 25 %"


def _many_inf(folder: Path):
    channel = GOOD_3D[0].copy()
    channel[5] = np.inf
    channel[6] = -np.inf
    write_good_3d(folder, "bad", [channel, GOOD_3D[1]])
    return "bad_0000.nii.gz", "non-finite voxel(s) (0 NaN, 2048 inf"


def _four_d(folder: Path):
    import nibabel as nib

    write_good_3d(folder, "bad")
    volume = np.stack([GOOD_3D[0].transpose(2, 1, 0)] * 3, axis=-1)  # (x, y, z, t): 3 volumes in one file
    nib.save(nib.Nifti1Image(volume, np.diag([0.9, 0.9, 3.0, 1.0])), folder / "bad_0000.nii.gz")
    return "bad_0000.nii.gz", "is 4D (32 x 32 x 12 x 3)"


def _missing_channel(folder: Path):
    write_good_3d(folder, "bad")
    (folder / "bad_0001.nii.gz").unlink()
    return "bad_0001.nii.gz", "is missing: channel 1 (T2) of case bad"


def _extra_channel(folder: Path):
    write_good_3d(folder, "bad", [*GOOD_3D, GOOD_3D[0]])
    return "bad_0002.nii.gz", "channel 2 is not a channel of the model"


def _channel_gap(folder: Path):
    write_good_3d(folder, "bad", [GOOD_3D[0], GOOD_3D[1], GOOD_3D[1]])
    (folder / "bad_0001.nii.gz").unlink()  # 0000 and 0002: the count matches, the channels do not
    return "bad_0002.nii.gz", "bad_0001.nii.gz: is missing: channel 1 (T2) of case bad"


def _zero_size_axis(folder: Path):
    write_good_3d(folder, "bad")
    data = bytearray(nifti_bytes(GOOD_3D[0]))
    struct.pack_into("<h", data, 46, 0)  # dim[3] = 0: no slices
    (folder / "bad_0000.nii.gz").write_bytes(gzip.compress(bytes(data[:352])))
    return "bad_0000.nii.gz", "has a zero-size axis (shape 32 x 32 x 0"


def _other_size(folder: Path):
    write_good_3d(folder, "bad", [GOOD_3D[0], GOOD_3D[1][:, :30]])
    return "bad_0001.nii.gz", ("its grid differs from bad_0000.nii.gz, another channel of the case "
                               "(size (z, y, x) 12 x 30 x 32 vs 12 x 32 x 32")


def _other_grid(name: str, geometry: Geometry, phrase: str):
    def breaker(folder: Path):
        write_good_3d(folder, "bad")
        write_image(folder / "bad_0001.nii.gz", GOOD_3D[1], geometry)
        return "bad_0001.nii.gz", phrase

    breaker.__name__ = name
    return breaker


def _dangling_symlink(folder: Path):
    write_good_3d(folder, "bad")
    (folder / "bad_0000.nii.gz").unlink()
    os.symlink(folder.parent / "moved_away_0000.nii.gz", folder / "bad_0000.nii.gz")
    return "bad_0000.nii.gz", "is a dangling symbolic link: it points to"


def _folder_named_like_an_image(folder: Path):
    write_good_3d(folder, "bad")
    (folder / "bad_0001.nii.gz").unlink()
    (folder / "bad_0001.nii.gz").mkdir()
    return "bad_0001.nii.gz", "is a folder, not an image file"


def _two_d_for_3d_model(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(2):
        write_image(folder / f"bad_{c:04d}.nii.gz", GOOD_3D[c][5:6], Geometry((999.0, 0.9, 0.9), (0.0, 0.0),
                                                                              (1.0, 0.0, 0.0, 1.0), 2))
    return "bad_0000.nii.gz", "is a 2D image, but the model (3d_fullres) is 3D"


BAD_3D = [_truncated_gz, _corrupt_gz, _text_file, _random_bytes, _gzip_of_no_nifti, _empty_file,
          _header_claims_more_voxels, _many_nan, _many_inf, _four_d, _missing_channel, _extra_channel, _channel_gap,
          _zero_size_axis, _other_size,
          _other_grid("other_spacing", Geometry((3.0, 1.2, 0.9), GEOMETRY.origin, GEOMETRY.direction),
                      "spacing (3, 1.2, 0.9) vs (3, 0.9, 0.9)"),
          _other_grid("other_origin", Geometry(GEOMETRY.spacing, (12.5, -30.0, 7.0), GEOMETRY.direction),
                      "origin (12.5, -30, 7) vs (12.5, -40, 7)"),
          _other_grid("other_direction", Geometry(GEOMETRY.spacing, GEOMETRY.origin, (1.0, 0, 0, 0, 1, 0, 0, 0, 1)),
                      "direction (1, 0, 0, 0, 1, 0, 0, 0, 1) vs (0.9553, -0.2955"),
          _dangling_symlink, _folder_named_like_an_image, _two_d_for_3d_model]


@pytest.mark.parametrize("breaker", BAD_3D, ids=[b.__name__.strip("_") for b in BAD_3D])
def test_bad_3d_input_is_reported_and_the_other_case_predicted(model_3d, reference_3d, tmp_path, capfd, breaker):
    images, out = tmp_path / "in", tmp_path / "out"
    write_good_3d(images)
    bad_file, phrase = breaker(images)
    code, printed, report = predict(model_3d, images, out, capfd)
    assert code != 0
    assert "Traceback" not in printed, printed
    assert_mask(out / "good.nii.gz", reference_3d, GEOMETRY)
    assert_no_output(out, "bad")
    assert report["good"]["status"] == "written" and report["bad"]["status"] == "failed"
    error = report["bad"]["error"]
    assert bad_file in error and phrase in error, error
    assert "Fix: " in error, error
    assert f"failed: bad: {error}" in printed, printed  # the CLI's summary names the case, the file and the reason


# ---------------------------------------------------------------------------------------------------------------------
# unusual inputs that must work


def test_spaces_unicode_and_symlinks_are_predicted(model_3d, reference_3d, tmp_path, capfd):
    images, out = tmp_path / "in put", tmp_path / "out"
    # a name whose bytes are not UTF-8 (Latin-1 from an old archive) used to abort the process inside SimpleITK
    names = ["case 01", "patiënt_ü", "患者 2", "emoji😀", os.fsdecode(b"caf\xe9 latin-1")]
    for name in names:
        write_good_3d(images, name)
    elsewhere = write_good_3d(tmp_path / "elsewhere", "original")
    for c, target in enumerate(elsewhere):  # a case whose files are symlinks (absolute and relative)
        link = images / f"linked_{c:04d}.nii.gz"
        link.symlink_to(target if c == 0 else os.path.relpath(target, images))
    code, printed, report = predict(model_3d, images, out, capfd)
    assert code == 0, printed
    assert "Traceback" not in printed and "warning" not in printed.lower(), printed
    for name in [*names, "linked"]:
        assert report[name]["status"] == "written"
        assert_mask(out / f"{name}.nii.gz", reference_3d, GEOMETRY)
    assert not (out / "linked.nii.gz").is_symlink()
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{n}.nii.gz" for n in [*names, "linked"])


def test_a_few_nan_voxels_are_replaced_with_a_warning(model_3d, reference_3d, tmp_path, capfd):
    """Isolated non-finite voxels (below 0.01 %) are set to the image's minimum: the case is predicted, the warning
    names the file and is in the report; the mask differs from the clean image's at most near those voxels."""
    images, out = tmp_path / "in", tmp_path / "out"
    channel = GOOD_3D[0].copy()
    channel[6, 16, 16] = np.nan  # 1 of 12288 voxels
    write_good_3d(images, "spotty", [channel, GOOD_3D[1]])
    code, printed, report = predict(model_3d, images, out, capfd)
    assert code == 0 and "Traceback" not in printed, printed
    (warning,) = report["spotty"]["warnings"]
    assert "spotty_0000.nii.gz: 1 non-finite voxel(s) (1 NaN, 0 inf" in warning
    assert "replaced by the image's minimum" in warning
    assert warning in printed
    mask, _ = read_image(out / "spotty.nii.gz")
    changed = np.argwhere(mask != reference_3d)
    assert len(changed) < 0.01 * mask.size


def test_a_case_failing_at_its_last_write_leaves_none_of_its_outputs(model_3d, tmp_path, capfd, monkeypatch):
    """--save-probabilities writes CASE.npz and CASE.probabilities.json before the mask: a failure after them removes them too."""
    import segforge.inference.folder as folder

    images, out = tmp_path / "in", tmp_path / "out"
    write_good_3d(images)
    write_good_3d(images, "late")
    real = folder.write_image

    def disk_full_for_late(path, *args, **kwargs):
        if Path(path).name.startswith("late"):
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folder, "write_image", disk_full_for_late)
    code = main(["predict", "-i", str(images), "-o", str(out), "--model", str(model_3d), "--save-probabilities", *FAST])
    printed = "".join(capfd.readouterr())
    # a full disk is no case's fault: the run stops with a storage error (exit 3) instead of failing every case
    assert code == 3 and "Traceback" not in printed and "No space left on device" in printed, printed
    assert all((out / f"good{suffix}").is_file() for suffix in (".nii.gz", ".npz", ".probabilities.json"))
    assert_no_output(out, "late")


def test_nan_in_nifti_is_not_read_as_zero(tmp_path):
    """SimpleITK's NIfTI reader turns NaN/inf into 0 silently; read_image gives them back (also big-endian, scaled)."""
    import nibabel as nib

    array = GOOD_3D[0].copy()
    array[3, 4, 5], array[7, 8, 9] = np.nan, -np.inf
    write_image(tmp_path / "a.nii.gz", array, GEOMETRY)
    back, _ = read_image(tmp_path / "a.nii.gz")
    assert np.isnan(back[3, 4, 5]) and back[7, 8, 9] == -np.inf and np.isfinite(back).sum() == array.size - 2
    image = nib.Nifti1Image(array.transpose(2, 1, 0).astype(">f8"), np.eye(4))
    image.header.set_slope_inter(2.0, 1.0)
    nib.save(image, tmp_path / "b.nii")
    back, _ = read_image(tmp_path / "b.nii")
    assert np.isnan(back[3, 4, 5]) and np.isinf(back[7, 8, 9]) and np.isfinite(back).sum() == array.size - 2


def test_an_uncompressed_nifti_named_nii_gz_is_read(tmp_path):
    (tmp_path / "plain_0000.nii.gz").write_bytes(nifti_bytes(GOOD_3D[0]))
    array, geometry = read_image(tmp_path / "plain_0000.nii.gz")
    np.testing.assert_array_equal(array, GOOD_3D[0])
    assert geometry.same_grid(GEOMETRY, tol=1e-5) == []


# ---------------------------------------------------------------------------------------------------------------------
# the 2D model (PNG): a corrupt PNG is handled the same way


def _truncated_png(folder: Path):
    path = write_good_2d(folder, "bad")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name, "truncated PNG (the file ends early, before the PNG end marker IEND"


def _damaged_png(folder: Path):
    path = write_good_2d(folder, "bad")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(8)  # the compressed pixel data damaged, the file complete
    path.write_bytes(bytes(data))
    return path.name, "truncated or corrupt PNG data"


def _not_a_png(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad_0000.png").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(500))  # a JPEG named .png
    return "bad_0000.png", "is not a PNG image: it starts with bytes ff d8 ff e0"


def _rgb_png(folder: Path):
    import skimage.io

    folder.mkdir(parents=True, exist_ok=True)
    skimage.io.imsave(folder / "bad_0000.png", np.repeat(GOOD_2D[0][..., None], 3, axis=-1), check_contrast=False)
    return "bad_0000.png", "is an RGB(A) PNG"


BAD_2D = [_truncated_png, _damaged_png, _not_a_png, _rgb_png]


@pytest.mark.parametrize("breaker", BAD_2D, ids=[b.__name__.strip("_") for b in BAD_2D])
def test_bad_png_is_reported_and_the_other_case_predicted(model_2d, reference_2d, tmp_path, capfd, breaker):
    images, out = tmp_path / "in", tmp_path / "out"
    write_good_2d(images)
    bad_file, phrase = breaker(images)
    code, printed, report = predict(model_2d, images, out, capfd)
    assert code != 0
    assert "Traceback" not in printed, printed
    assert_mask(out / "good.png", reference_2d, GEOMETRY_2D)
    assert_no_output(out, "bad")
    assert report["bad"]["status"] == "failed"
    error = report["bad"]["error"]
    assert bad_file in error and phrase in error and "Fix: " in error, error
    assert f"failed: bad: {error}" in printed, printed


def test_png_with_a_unicode_name_is_predicted(model_2d, reference_2d, tmp_path, capfd):
    images, out = tmp_path / "in", tmp_path / "out"
    write_good_2d(images, "Zelle ü 細胞")
    code, printed, report = predict(model_2d, images, out, capfd)
    assert code == 0 and "Traceback" not in printed, printed
    assert_mask(out / "Zelle ü 細胞.png", reference_2d, GEOMETRY_2D)


@pytest.mark.parametrize("tamper", ["other_callable", "nested_target"])
def test_a_model_folder_from_elsewhere_cannot_run_code(model_3d, tmp_path, capfd, tamper):
    """The network a weights file names is built from an allow-list: neither another callable (here one that would
    write a file anywhere) nor a nested ``_target_`` in its arguments is ever called."""
    import shutil

    import torch

    model = tmp_path / "model"
    shutil.copytree(model_3d, model)
    weights = model / "fold_0" / "model_final.pt"
    payload = torch.load(weights, weights_only=True)
    marker = tmp_path / "pwned"
    if tamper == "other_callable":
        payload["network"] = {"_target_": "segforge.io.artifacts.atomic_write_bytes", "path": str(marker), "data": b"x"}
    else:
        payload["network"]["norm"] = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    torch.save(payload, weights)
    images = tmp_path / "in"
    write_good_3d(images)
    code = main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "--model", str(model), *FAST])
    printed = capfd.readouterr().err
    assert code != 0 and "Traceback" not in printed
    assert ("is not one of segforge's networks" if tamper == "other_callable" else "are not plain values") in printed
    assert not marker.exists() and not (tmp_path / "out" / "good.nii.gz").exists()


def test_a_failed_rewrite_keeps_the_finished_mask_from_before(model_3d, tmp_path, capfd, monkeypatch):
    import segforge.inference.folder as folder

    images, out = tmp_path / "in", tmp_path / "out"
    write_good_3d(images)
    assert main(["predict", "-i", str(images), "-o", str(out), "--model", str(model_3d), *FAST]) == 0
    before = (out / "good.nii.gz").read_bytes()

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder, "write_image", disk_full)
    assert main(["predict", "-i", str(images), "-o", str(out), "--model", str(model_3d), *FAST]) == 3
    assert (out / "good.nii.gz").read_bytes() == before  # the complete mask of the first run is still there


@pytest.mark.parametrize("tamper", ["folds_disagree", "patch_of_another_dimension"])
def test_weights_recording_windows_that_cannot_be_predicted_together_are_refused(model_3d, tmp_path, capfd, tamper):
    """Folds trained with different patches are not predicted in step (one would be silently cut to the other's);
    a recorded patch that does not fit the configuration's dimensions is refused too, naming the file."""
    import shutil

    import torch

    model = tmp_path / "model"
    shutil.copytree(model_3d, model)
    payload = torch.load(model / "fold_0" / "model_final.pt", weights_only=True)
    if tamper == "folds_disagree":
        (model / "fold_1").mkdir()
        payload["patch_size"] = [p // 2 for p in payload["patch_size"]]
        torch.save(payload, model / "fold_1" / "model_final.pt")
    else:
        payload["patch_size"] = payload["patch_size"][1:]
        torch.save(payload, model / "fold_0" / "model_final.pt")
    images = tmp_path / "in"
    write_good_3d(images)
    code = main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "--model", str(model), *FAST])
    printed = capfd.readouterr().err
    assert code == 2 and "Traceback" not in printed
    assert ("fold_0: patch" in printed and "predict.folds" in printed) if tamper == "folds_disagree" else \
        ("model_final.pt: records patch_size" in printed)
    assert not (tmp_path / "out" / "good.nii.gz").exists()


def test_predict_on_cuda_without_a_gpu_is_refused_before_any_case(model_3d, tmp_path, capfd, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    images = tmp_path / "in"
    write_good_3d(images)
    code = main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "--model", str(model_3d),
                 "predict.mirror=false", "predict.device=cuda"])
    printed = capfd.readouterr().err
    assert code == 2 and "Traceback" not in printed and "Fix: device=cpu or device=auto" in printed
    assert not (tmp_path / "out" / "good.nii.gz").exists()
