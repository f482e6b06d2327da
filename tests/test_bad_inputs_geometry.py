"""Hostile files, geometry and labels: damaged MetaIO/NRRD payloads, detached data files outside their header's
folder, invalid voxel spacing, evaluation on another grid, label gaps, file-ending case, misleading messages.

Each is run through the command a user runs (`segforge check`, `plan`, `predict`, `evaluate`): a non-zero exit, a
message naming the file and the fix, and no Python traceback; what is valid (an .mhd dataset with its .raw files, a
data file linked from a configured data root) passes.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from segforge.cli.main import main
from segforge.io.image import Geometry, ImageReadError, read_case, read_image, write_image
from test_bad_inputs import (GEOMETRY, GOOD_3D, assert_mask, assert_no_output, model_3d, predict,  # noqa: F401 (fixtures)
                             reference_3d, write_good_3d)
from test_checks import GEO, SHAPE, make_dataset, write_json


def run(capfd, *args) -> tuple[int, str]:
    """A segforge command through main(): its exit code and everything it printed."""
    code = main([str(a) for a in args])
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    assert "Traceback" not in printed, printed
    return code, printed


def check(root: Path, capfd) -> tuple[int, str]:
    return run(capfd, "check", root)


# ---------------------------------------------------------------------------------------------------------------------
# MetaIO / NRRD payloads: a damaged or cut compressed stream, fewer data bytes than the header promises


def _write_uncompressed(path: Path) -> None:
    """Replace the image at ``path`` by the same image without compression (write_image always compresses)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    for data in path.parent.glob(path.name.split(".")[0] + ".*"):
        data.unlink()
    sitk.WriteImage(image, str(path), useCompression=False)


def _data_file(path: Path) -> Path:
    """The file holding the voxels of ``path`` (itself, or the detached file its header names)."""
    text = path.read_bytes()[:2000].decode("latin-1")
    for key in ("ElementDataFile = ", "data file: "):
        if key in text:
            name = text.split(key, 1)[1].splitlines()[0].strip()
            return path if name == "LOCAL" else path.parent / name
    return path


def damaged(path: Path) -> None:
    data = _data_file(path)
    raw = bytearray(data.read_bytes())
    start = len(raw) - 200  # inside the compressed voxel data, its size and header intact
    raw[start:start + 16] = bytes(b ^ 0x5A for b in raw[start:start + 16])
    data.write_bytes(bytes(raw))


def cut(path: Path) -> None:
    data = _data_file(path)
    data.write_bytes(data.read_bytes()[:-300])


def cut_uncompressed(path: Path) -> None:
    _write_uncompressed(path)
    cut(path)


PAYLOADS = [(".mha", damaged, "corrupt zlib stream"), (".mha", cut, "truncated or corrupt zlib stream"),
            (".mha", cut_uncompressed, "is truncated: it holds 1236 bytes of voxel data of the 1536"),
            (".mhd", damaged, "corrupt zlib stream"), (".mhd", cut_uncompressed, "is truncated: its data file"),
            (".nrrd", damaged, "corrupt gzip stream"), (".nrrd", cut, "truncated or corrupt gzip stream"),
            (".nhdr", cut, "truncated or corrupt gzip stream"), (".nhdr", cut_uncompressed, "is truncated")]


@pytest.mark.parametrize("ending, breaker, phrase", PAYLOADS,
                         ids=[f"{e}-{b.__name__}" for e, b, _ in PAYLOADS])
def test_damaged_metaio_and_nrrd_payloads_are_refused(tmp_path, capfd, ending, breaker, phrase):
    root = make_dataset(tmp_path / "ds", ending=ending)
    image = root / "imagesTr" / f"case_a_0000{ending}"
    breaker(image)
    code, printed = check(root, capfd)
    assert code == 1
    assert phrase in printed and _data_file(image).name in printed and "fix: re-copy" in printed, printed
    assert "No such file" not in printed and "may be truncated" not in printed, printed


# ---------------------------------------------------------------------------------------------------------------------
# detached data files (.mhd ElementDataFile, .nhdr data file) belong to their header, inside its folder


def _rename_data_file(header: Path, new: str) -> None:
    text = header.read_text("latin-1")
    old = _data_file(header).name
    key = "ElementDataFile = " if header.suffix == ".mhd" else "data file: "
    header.write_text(text.replace(key + old, key + new), "latin-1")


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
def test_a_dataset_of_header_and_data_files_is_checked_and_planned(tmp_path, capfd, ending):
    root = make_dataset(tmp_path / "ds", ending=ending)
    assert check(root, capfd)[0] == 0
    code, printed = run(capfd, "plan", root, f"paths.work_root={tmp_path / 'work'}", "preprocess.run=false",
                        "plan.configurations=[3d_fullres]", "plan.features_base=4")
    assert code == 0, printed
    (root / "imagesTr" / "stray.raw").write_bytes(b"\0" * 8)  # a data file no header names is still stray
    code, printed = check(root, capfd)
    assert code == 1 and "stray.raw: does not end in the dataset's file_ending" in printed, printed


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_data_file_outside_its_header_folder_is_refused(tmp_path, capfd, ending, how):
    root = make_dataset(tmp_path / "ds", ending=ending)
    header = root / "imagesTr" / f"case_a_0000{ending}"
    data = _data_file(header)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / data.name
    os.replace(data, moved)
    if how == "dotdot":
        _rename_data_file(header, f"../../elsewhere/{data.name}")
    elif how == "absolute":
        _rename_data_file(header, str(moved))
    else:
        data.symlink_to(moved)
    code, printed = check(root, capfd)
    assert code == 1
    assert str(header) in printed and str(moved if how != "dotdot" else "elsewhere") in printed, printed
    assert "outside the header's folder" in printed, printed
    with pytest.raises(ImageReadError, match="outside the header's folder"):  # as `predict` reads it
        read_image(header)


def test_a_data_file_linked_from_a_configured_data_root_is_read(tmp_path, capfd, monkeypatch):
    root = make_dataset(tmp_path / "ds", ending=".mhd")
    header = root / "imagesTr" / "case_a_0000.mhd"
    data, raw_root = _data_file(header), tmp_path / "raw_root"
    raw_root.mkdir()
    os.replace(data, raw_root / data.name)
    data.symlink_to(raw_root / data.name)
    monkeypatch.setenv("SEGFORGE_RAW", str(raw_root))
    assert check(root, capfd)[0] == 0
    assert read_image(header)[0].shape == SHAPE


# ---------------------------------------------------------------------------------------------------------------------
# voxel spacing: a NIfTI pixdim of 0, NaN or inf (SimpleITK reads 1 mm), a negative one (a long ITK error)


def set_pixdim(path: Path, axis: int, value: float) -> None:
    """Set the NIfTI header's pixdim[axis] (1: x, 3: z) of a .nii.gz file."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, 76 + 4 * axis, value)
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -3.0])
def test_invalid_nifti_spacing_is_refused_by_check_and_predict(tmp_path, capfd, value):
    root = make_dataset(tmp_path / "ds")
    set_pixdim(root / "imagesTr" / "case_a_0001.nii.gz", 3, value)
    code, printed = check(root, capfd)
    assert code == 1 and "case_a_0001.nii.gz: has an invalid voxel spacing in its NIfTI header, pixdim" in printed
    assert f"{value:g}" in printed and "ITK ERROR" not in printed, printed
    with pytest.raises(ImageReadError, match=r"invalid voxel spacing .* Fix: write the true voxel size"):
        read_case([root / "imagesTr" / "case_a_0000.nii.gz", root / "imagesTr" / "case_a_0001.nii.gz"])


def test_a_zero_pixdim_on_a_singleton_axis_is_no_error(tmp_path):
    """A 2D slice stored as a 3D NIfTI often has pixdim 0 on its one-voxel axis: it scales nothing (nnU-Net reads it)."""
    path = tmp_path / "slice_0000.nii.gz"
    write_image(path, np.ones((1, 8, 8), np.float32), Geometry((2.0, 0.5, 0.5), (0.0, 0.0, 0.0),
                                                              (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)))
    set_pixdim(path, 3, 0.0)
    image, geometry = read_image(path)
    assert image.shape == (1, 8, 8) and geometry.spacing[1:] == (0.5, 0.5)
    set_pixdim(path, 1, 0.0)  # an axis with extent still is an error
    with pytest.raises(ImageReadError, match="invalid voxel spacing"):
        read_image(path)


def _pixdim(value: float):
    def breaker(folder: Path):
        set_pixdim(write_good_3d(folder, "bad")[0], 3, value)
        return "bad_0000.nii.gz", f"has an invalid voxel spacing in its NIfTI header, pixdim (0.9, 0.9, {value:g})"
    breaker.__name__ = f"pixdim_{value:g}"
    return breaker


def _float64_beyond_float32_case(folder: Path):
    channel = GOOD_3D[1].astype(np.float64)
    channel[3, 4, 5] = 1e300
    write_good_3d(folder, "bad", [GOOD_3D[0], channel])
    return "bad_0001.nii.gz", "holds finite values up to 1e+300, beyond the float32 range"


BAD_PREDICT = [_pixdim(0.0), _pixdim(float("nan")), _pixdim(-3.0), _float64_beyond_float32_case]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("breaker", BAD_PREDICT, ids=[b.__name__.strip("_") for b in BAD_PREDICT])
def test_bad_spacing_and_values_are_refused_by_predict(model_3d, reference_3d, tmp_path, capfd, breaker):
    images, out = tmp_path / "in", tmp_path / "out"
    write_good_3d(images)
    bad_file, phrase = breaker(images)
    code, printed, report = predict(model_3d, images, out, capfd)
    assert code != 0 and "Traceback" not in printed and "RuntimeWarning" not in printed, printed
    assert_mask(out / "good.nii.gz", reference_3d, GEOMETRY)
    assert_no_output(out, "bad")
    error = report["bad"]["error"]
    assert bad_file in error and phrase in error and "Fix: " in error, error


@pytest.mark.parametrize("ending, before, after", [(".mha", "ElementSpacing = 1 1 2", "ElementSpacing = 1 0 2"),
                                                   (".nrrd", "(1,0,0)", "(0,0,0)")])
def test_zero_spacing_in_metaio_and_nrrd_is_refused(tmp_path, capfd, ending, before, after):
    path = tmp_path / f"x{ending}"
    write_image(path, np.zeros(SHAPE, np.float32), GEO)
    raw = path.read_bytes()
    assert before.encode() in raw
    path.write_bytes(raw.replace(before.encode(), after.encode(), 1))
    with pytest.raises(ImageReadError, match="has an invalid voxel spacing in its header") as caught:
        read_image(path)
    assert "ITK ERROR" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------------
# evaluate: the prediction must lie on the reference's grid; names match literally


def _evaluate_folders(tmp_path: Path, name: str, prediction_geometry: Geometry) -> tuple[Path, Path]:
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 2:5, 2:5] = 1
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    write_image(ref / name, label, GEO)
    write_image(pred / name, label[:, ::-1].copy() if prediction_geometry != GEO else label, prediction_geometry)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    return pred, ref


def test_evaluate_refuses_a_prediction_on_another_grid(tmp_path, capfd):
    flipped = Geometry(GEO.spacing, (0.0, 7.0, 0.0), (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # the same voxels in space
    pred, ref = _evaluate_folders(tmp_path, "case.nii.gz", flipped)
    code, printed = run(capfd, "evaluate", pred, ref, "--dataset-json", tmp_path / "dataset.json")
    assert code != 0 and not (pred / "summary.json").exists()
    assert f"{pred / 'case.nii.gz'}: its geometry differs from the reference" in printed, printed
    assert "direction (1, 0, 0, 0, -1, 0, 0, 0, 1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1)" in printed and "Fix: " in printed


def test_evaluate_matches_names_literally(tmp_path, capfd):
    pred, ref = _evaluate_folders(tmp_path, "case[1].nii.gz", GEO)
    code, printed = run(capfd, "evaluate", pred, ref, "--dataset-json", tmp_path / "dataset.json",
                        "surface_metrics=false")
    summary = json.loads((pred / "summary.json").read_text())
    assert code == 0 and summary["missing_predictions"] == [] and summary["num_cases"] == 1, printed
    assert summary["mean_dice"]["a"] == 1.0


def test_evaluate_never_replaces_a_summary_json_it_did_not_write(tmp_path, capfd):
    pred, ref = _evaluate_folders(tmp_path, "case.nii.gz", GEO)
    foreign = '{"foreground_mean": {"Dice": 0.9}, "metric_per_case": []}'  # e.g. nnU-Net's validation summary
    (pred / "summary.json").write_text(foreign)
    args = ("evaluate", pred, ref, "--dataset-json", tmp_path / "dataset.json", "surface_metrics=false")
    code, printed = run(capfd, *args)
    assert code == 2 and "exists and was not written by `segforge evaluate`" in printed, printed
    assert (pred / "summary.json").read_text() == foreign
    (pred / "summary.json").unlink()
    assert run(capfd, *args)[0] == 0
    assert run(capfd, *args)[0] == 0  # its own summary is replaced by a re-run


# ---------------------------------------------------------------------------------------------------------------------
# dataset.json and names: label gaps, file-ending case, duplicate channel keys, control characters


def _label_gap(root: Path) -> str:
    write_json(root, labels={"background": 0, "a": 1, "b": 5})
    return '"labels" values must be consecutive 0, 1, ..., 2; got {"background": 0, "a": 1, "b": 5}'


def _upper_case_ending(root: Path) -> str:
    write_json(root, file_ending=".NII.GZ")
    return '"file_ending" is \'.NII.GZ\'; file endings are lower case'


def _upper_case_files(root: Path) -> str:
    for path in sorted(root.rglob("case_a*.nii.gz")):
        path.rename(path.with_name(path.name.replace(".nii.gz", ".NII.GZ")))
    return "case_a.NII.GZ: ends in '.NII.GZ', not in the dataset's file_ending '.nii.gz'"


def _duplicate_channel_keys(root: Path) -> str:
    (root / "dataset.json").write_text('{"channel_names": {"0": "T1", "1": "T2", "00": "FLAIR"}, "labels": '
                                       '{"background": 0, "a": 1, "b": 2}, "numTraining": 2, "file_ending": ".nii.gz"}')
    return "\"channel_names\" has the keys '0' and '00' for the same channel 0"


def _newline_in_name(root: Path) -> str:
    path = root / "imagesTr" / "case_b_0001.nii.gz"
    path.rename(path.with_name("case_b\n_0001.nii.gz"))
    return "file name 'case_b\\n_0001.nii.gz' holds a control character"


def _float64_beyond_float32(root: Path) -> str:
    _float64_beyond_float32_at(root / "imagesTr" / "case_a_0000.nii.gz")
    return "case_a_0000.nii.gz: holds finite values up to 1e+300, beyond the float32 range"


DATASET_BREAKERS = [_label_gap, _upper_case_ending, _upper_case_files, _duplicate_channel_keys, _newline_in_name,
                    _float64_beyond_float32]


@pytest.mark.parametrize("breaker", DATASET_BREAKERS, ids=[b.__name__.strip("_") for b in DATASET_BREAKERS])
def test_bad_dataset_json_and_names_are_refused_by_check(tmp_path, capfd, breaker):
    root = make_dataset(tmp_path / "ds")
    phrase = breaker(root)
    code, printed = check(root, capfd)
    assert code == 1 and phrase in printed, printed
    assert "label of case" not in printed and "lacks the _XXXX channel suffix" not in printed, printed


def test_float64_beyond_float32_is_refused_in_predict_without_a_warning(tmp_path):
    path = tmp_path / "big_0000.nii.gz"
    _float64_beyond_float32_at(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning used to leak, then the value read as inf
        with pytest.raises(ImageReadError, match="holds finite values up to 1e\\+300"):
            read_case([path])


def _float64_beyond_float32_at(path: Path) -> None:
    image = np.ones(SHAPE)
    image[2, 3, 4] = 1e300
    write_image(path, image, GEO)


# ---------------------------------------------------------------------------------------------------------------------
# messages that named the wrong cause


def test_an_unreadable_file_is_called_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "x_0000.nii.gz"
    write_image(path, np.zeros(SHAPE, np.float32), GEO)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: fail the open as the kernel does for another user
        import builtins

        def refuse(name, *args, **kwargs):
            if Path(name) == path:
                raise PermissionError(13, "Permission denied", str(name))
            return builtins.open(name, *args, **kwargs)

        monkeypatch.setattr("segforge.io.file_checks.open", refuse, raising=False)
    with pytest.raises(ImageReadError, match="cannot be opened: permission denied") as caught:
        read_image(path)
    assert "truncated" not in str(caught.value)


def test_a_palette_png_is_called_a_palette_png(tmp_path):
    from PIL import Image

    path = tmp_path / "x_0000.png"
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 3, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.save(path)
    with pytest.raises(ImageReadError, match="is a palette \\(indexed-colour\\) PNG") as caught:
        read_image(path)
    assert "RGB" not in str(caught.value)
