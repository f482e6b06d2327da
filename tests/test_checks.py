"""check_dataset: a valid dataset is clean; each kind of bad input is reported, naming the offending file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from segforge.io.checks import check_dataset, format_problems
from segforge.io.image import Geometry, read_image, write_image

SHAPE = (6, 8, 8)
GEO = Geometry(spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
LABELS = {"background": 0, "a": 1, "b": 2}


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("SEGFORGE_RAW", raising=False)


def write_json(root: Path, **overrides) -> None:
    data = {"channel_names": {"0": "T1", "1": "T2"}, "labels": LABELS, "numTraining": 2, "file_ending": ".nii.gz"}
    data.update(overrides)
    (root / "dataset.json").write_text(json.dumps(data))


def make_dataset(root: Path, cases=("case_a", "case_b"), ending=".nii.gz") -> Path:
    """A valid 2-case, 2-channel 3D NIfTI dataset with labels {0, 1, 2}."""
    rng = np.random.default_rng(0)
    for case in cases:
        for c in range(2):
            write_image(root / "imagesTr" / f"{case}_{c:04d}{ending}", rng.random(SHAPE).astype(np.float32), GEO)
        label = np.zeros(SHAPE, np.uint8)
        label[1:3, 2:5, 2:5], label[4, 4:7, 4:7] = 1, 2
        write_image(root / "labelsTr" / f"{case}{ending}", label, GEO)
    write_json(root, numTraining=len(cases), file_ending=ending)
    return root


def image(root: Path, case="case_a", channel=0) -> Path:
    return root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"


def label(root: Path, case="case_a") -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


def geo(**changes) -> Geometry:
    return Geometry(**{**GEO.to_json(), **changes})


def names(problems, needle: str) -> bool:
    return any(needle in p.path or needle in p.message for p in problems)


def test_valid_dataset_is_clean(tmp_path):
    root = make_dataset(tmp_path / "Dataset001_Ok")
    assert check_dataset(root) == []
    assert format_problems([], root.name) == "0 problem(s) in Dataset001_Ok"


def test_region_labels_pass(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_json(root, labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    assert check_dataset(root) == []


# --- each bad input: (break the valid dataset, file name the problem must name) --------------------------------

def _missing_json(root):
    (root / "dataset.json").unlink()
    return "dataset.json"


def _malformed_json(root):
    (root / "dataset.json").write_text('{"labels": {"background": 0,')
    return "dataset.json"


def _labels_as_list(root):
    write_json(root, labels=["background", "a", "b"])
    return "dataset.json"


def _num_training_string(root):
    write_json(root, numTraining="2")
    return "dataset.json"


def _missing_channel(root):
    image(root, "case_b", 1).unlink()
    return "case_b_0001.nii.gz"


def _label_without_image(root):
    write_image(label(root, "case_c"), np.zeros(SHAPE, np.uint8), GEO)
    return "case_c.nii.gz"


def _size_mismatch(root):
    write_image(label(root), np.zeros((6, 8, 9), np.uint8), GEO)
    return "case_a.nii.gz"


def _spacing_mismatch(root):
    write_image(label(root), read_image(label(root))[0], geo(spacing=(3.0, 1.0, 1.0)))
    return "case_a.nii.gz"


def _origin_mismatch(root):
    write_image(label(root), read_image(label(root))[0], geo(origin=(0.0, 5.0, 0.0)))
    return "case_a.nii.gz"


def _direction_mismatch(root):
    write_image(label(root), read_image(label(root))[0], geo(direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)))
    return "case_a.nii.gz"


def _channel_geometry(root):
    write_image(image(root, "case_b", 1), read_image(image(root, "case_b", 1))[0], geo(spacing=(2.0, 1.5, 1.0)))
    return "case_b_0001.nii.gz"


def _channel_shape(root):
    write_image(image(root, "case_b", 1), np.zeros((6, 8, 7), np.float32), GEO)
    return "case_b_0001.nii.gz"


def _write_label(root, array):
    write_image(label(root, "case_b"), array, GEO)
    return "case_b.nii.gz"


def _undeclared_value(root):
    lab = read_image(label(root, "case_b"))[0]
    lab[0, 0, 0] = 7
    return _write_label(root, lab)


def _fractional_value(root):
    lab = read_image(label(root, "case_b"))[0].astype(np.float32)
    lab[0, 0, 0] = 0.5
    return _write_label(root, lab)


def _negative_value(root):
    lab = read_image(label(root, "case_b"))[0].astype(np.int16)
    lab[0, 0, 0] = -1
    return _write_label(root, lab)


def _nan_label(root):
    lab = read_image(label(root, "case_b"))[0].astype(np.float32)
    lab[0, 0, 0] = np.nan
    return _write_label(root, lab)


def _set_voxel(value):
    def breaker(root):
        array = read_image(image(root, "case_a", 1))[0]
        array[2, 3, 4] = value
        write_image(image(root, "case_a", 1), array, GEO)
        return "case_a_0001.nii.gz"
    return breaker


def _four_d(root):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, *SHAPE), np.float32), isVector=False),
                    str(image(root, "case_b", 0)))
    return "case_b_0000.nii.gz"


def _two_d_in_3d(root):
    write_image(image(root, "case_b", 0), np.zeros((1, 8, 8), np.float32),
                Geometry(spacing=(999.0, 1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), ndim=2))
    return "case_b_0000.nii.gz"


def _truncated(root):
    path = image(root, "case_a", 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "case_a_0000.nii.gz"


def _truncated_label(root):
    # compressible content: the cut falls inside the voxel data, which SimpleITK would zero-fill silently
    path = label(root, "case_b")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    return "case_b.nii.gz"


def _garbage(root):
    image(root, "case_b", 1).write_bytes(os.urandom(300))
    return "case_b_0001.nii.gz"


def _symlink_outside(root):
    outside = root.parent / "elsewhere" / "ext_0000.nii.gz"
    outside.parent.mkdir()
    image(root, "case_a", 1).replace(outside)
    image(root, "case_a", 1).symlink_to(outside)
    return "case_a_0001.nii.gz"


def _listing_outside(root):
    outside = root.parent / "outside.nii.gz"
    label(root, "case_b").replace(outside)
    listing = {c: {"images": [f"imagesTr/{c}_000{k}.nii.gz" for k in range(2)], "label": f"labelsTr/{c}.nii.gz"}
               for c in ("case_a", "case_b")}
    listing["case_b"]["label"] = "../outside.nii.gz"
    write_json(root, dataset=listing)
    return "outside.nii.gz"


def _listing_case_path(root):
    listing = {c: {"images": [f"imagesTr/{c}_000{k}.nii.gz" for k in range(2)], "label": f"labelsTr/{c}.nii.gz"}
               for c in ("case_a", "case_b")}
    listing["../../../home/u/config"] = listing.pop("case_b")  # would write CASE.json outside the work folders
    write_json(root, dataset=listing)
    return "dataset.json"


def _json(**overrides):
    def breaker(root):
        write_json(root, **overrides)
        return "dataset.json"
    return breaker


def _json_without(key):
    def breaker(root):
        data = json.loads((root / "dataset.json").read_text())
        del data[key]
        (root / "dataset.json").write_text(json.dumps(data))
        return "dataset.json"
    return breaker


def _numtraining_mismatch(root):
    write_json(root, numTraining=5)
    return "dataset.json"


def _no_channel_suffix(root):
    image(root, "case_a", 1).rename(root / "imagesTr" / "case_a.nii.gz")
    return "case_a.nii.gz"


def _missing_folder(name):
    def breaker(root):
        shutil.rmtree(root / name)
        return name
    return breaker


JSON_FIX = "write dataset.json as in datasets/README.md"
GRID_FIX = "export the label on its image's voxel grid"
# (break the valid dataset, returns the file the problem must name), what the message must say, what the fix must say
BREAKERS = {
    "missing dataset.json": (_missing_json, "dataset.json is missing", JSON_FIX),
    "malformed JSON": (_malformed_json, "is not valid JSON", JSON_FIX),
    "labels as a list": (_labels_as_list, '"labels" is missing or not an object', JSON_FIX),
    "numTraining as string": (_num_training_string, "\"numTraining\" is '2'; it must be a non-negative integer",
                              JSON_FIX),
    "channel_names missing": (_json_without("channel_names"), '"channel_names" is missing or not an object', JSON_FIX),
    "channel_names as a list": (_json(channel_names=["T1", "T2"]), '"channel_names" is missing or not an object',
                                JSON_FIX),
    "channel_names key not an index": (_json(channel_names={"0": "T1", "t2": "T2"}),
                                       "\"channel_names\" entry 't2': 'T2' must map a channel index", JSON_FIX),
    "channel_names gap": (_json(channel_names={"0": "T1", "2": "T2"}), '"channel_names" indices must be 0..1, got [0, 2]',
                          JSON_FIX),
    "no background label": (_json(labels={"tumour": 1, "edema": 2}), '"labels" needs "background": 0', JSON_FIX),
    "background not 0": (_json(labels={"background": 1, "a": 2}), '"labels" needs "background": 0', JSON_FIX),
    "label value twice": (_json(labels={"background": 0, "a": 1, "b": 1}), '"labels" uses a value twice: [0, 1, 1]',
                          JSON_FIX),
    "ignore not the highest": (_json(labels={"background": 0, "ignore": 1, "a": 2}),
                               'the "ignore" label must be a single integer above all others, got 1', JSON_FIX),
    "unknown file_ending": (_json(file_ending=".jpg"), "\"file_ending\" is '.jpg'; use one of", JSON_FIX),
    "regions without regions_class_order": (_json(labels={"background": 0, "whole": [1, 2], "core": 2}),
                                            'region-based labels (lists) need "regions_class_order"', JSON_FIX),
    "regions_class_order of the wrong length": (
        _json(labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1]),
        '"regions_class_order" has 1 entries for 2 regions', JSON_FIX),
    "numTraining mismatch": (_numtraining_mismatch, '"numTraining" is 5 but 2 training case(s) were found', ""),
    "file without the channel suffix": (_no_channel_suffix, "name lacks the _XXXX channel suffix",
                                        "rename it CASE_0000.nii.gz (channel 0)"),
    "imagesTr missing": (_missing_folder("imagesTr"), "folder is missing", "imagesTr"),
    "labelsTr missing": (_missing_folder("labelsTr"), "folder is missing", "put one label file per case in labelsTr/"),
    "missing channel file": (_missing_channel, "channel 1 of case case_b is missing",
                             "add the file; dataset.json declares 2 channel(s)"),
    "label without image": (_label_without_image, "label without an image: no imagesTr/case_c_0000.nii.gz",
                            "add the case's images or remove the label"),
    "image/label size mismatch": (_size_mismatch, "label size (6, 8, 9) (z, y, x) differs from case_a_0000.nii.gz",
                                  GRID_FIX),
    "spacing mismatch": (_spacing_mismatch, "spacing (3, 1, 1) vs (2, 1, 1)", GRID_FIX),
    "origin mismatch": (_origin_mismatch, "origin (0, 5, 0) vs (0, 0, 0)", GRID_FIX),
    "direction mismatch": (_direction_mismatch, "direction (-1, 0, 0, 0, 1, 0, 0, 0, -1) vs (1, 0, 0", GRID_FIX),
    "channel geometry mismatch": (_channel_geometry, "channel geometry differs from case_b_0000.nii.gz",
                                  "resample all channels of a case onto one voxel grid"),
    "channel shape mismatch": (_channel_shape, "channel size (6, 8, 7) (z, y, x) differs",
                               "resample all channels of a case onto one voxel grid"),
    "undeclared label value": (_undeclared_value, "holds label values [7] not declared in dataset.json labels",
                               'declare them in dataset.json "labels" or relabel the file'),
    "fractional label value": (_fractional_value, "holds fractional label values [0.5]", "nearest-neighbour"),
    "negative label value": (_negative_value, "holds negative label values [-1]", '"ignore" label above all others'),
    "NaN in label": (_nan_label, "holds 1 NaN and 0 infinite voxel(s)", "replace them with finite values"),
    "NaN in image": (_set_voxel(np.nan), "holds 1 NaN and 0 infinite voxel(s)", "replace them with finite values"),
    "inf in image": (_set_voxel(np.inf), "holds 0 NaN and 1 infinite voxel(s)", "replace them with finite values"),
    "4D image": (_four_d, "is 4D", "split it into one 3D file per volume"),
    "2D file in 3D dataset": (_two_d_in_3d, "is 2D", "resample all channels of a case onto one voxel grid"),
    "truncated .nii.gz": (_truncated, "the file ends early", "re-copy the file"),
    "truncated label .nii.gz": (_truncated_label, "truncated or corrupt gzip stream", "re-copy the file"),
    "garbage bytes": (_garbage, "is not a NIfTI image", "convert the image to NIfTI"),
    "symlink outside the dataset": (_symlink_outside, "outside the dataset folder",
                                    "copy the file into the dataset folder instead of linking it"),
    "dataset listing names a case by a path": (_listing_case_path, "'../../../home/u/config' is not a plain case name",
                                               "name the case with letters, digits"),
    "dataset listing escapes the folder": (_listing_outside, "refers to '../outside.nii.gz', outside the dataset folder",
                                           "use paths relative to the dataset folder"),
}


@pytest.mark.parametrize("breaker,what,fix", BREAKERS.values(), ids=BREAKERS.keys())
def test_bad_input_is_reported_with_what_is_wrong_and_the_fix(tmp_path, breaker, what, fix):
    root = make_dataset(tmp_path / "ds")
    offending = breaker(root)
    problems = check_dataset(root)
    assert problems, "expected a problem"
    assert all(p.message and p.fix for p in problems)
    named = [p for p in problems if offending in p.path or offending in p.message]
    assert any(what in p.message and fix in p.fix for p in named), format_problems(problems, root)


def test_truncated_uncompressed_nifti(tmp_path):
    # SimpleITK reads a cut .nii without an error (zero-filling the rest): the header's size gives it away
    root = make_dataset(tmp_path / "ds", ending=".nii")
    assert check_dataset(root) == []
    path = root / "labelsTr" / "case_b.nii"
    path.write_bytes(path.read_bytes()[:-100])
    (problem,) = check_dataset(root)
    assert problem.path == str(path) and "truncated" in problem.message


def test_two_d_file_is_one_problem_per_file(tmp_path):
    root = make_dataset(tmp_path / "ds")
    _two_d_in_3d(root)
    problems = check_dataset(root)
    assert {Path(p.path).name for p in problems} == {"case_b_0000.nii.gz", "case_b_0001.nii.gz", "case_b.nii.gz"}
    assert len(problems) == 3, format_problems(problems)


def test_reported_values(tmp_path):
    root = make_dataset(tmp_path / "ds")
    _undeclared_value(root)
    (problem,) = check_dataset(root)
    assert "[7]" in problem.message and problem.path.endswith("case_b.nii.gz")
    _fractional_value(root)
    assert any("0.5" in p.message for p in check_dataset(root))
    _negative_value(root)
    assert any("[-1]" in p.message for p in check_dataset(root))


@pytest.mark.parametrize("how", ["argument", "env"])
def test_symlink_under_allowed_root_is_fine(tmp_path, monkeypatch, how):
    root = make_dataset(tmp_path / "ds")
    _symlink_outside(root)
    allowed = tmp_path / "elsewhere"
    if how == "env":
        monkeypatch.setenv("SEGFORGE_RAW", str(allowed))
        assert check_dataset(root) == []
        assert names(check_dataset(root, env_root=False), "case_a_0001.nii.gz")
    else:
        assert check_dataset(root, allowed_roots=[allowed]) == []
        assert names(check_dataset(root, allowed_roots=[tmp_path / "other"]), "case_a_0001.nii.gz")


def test_symlink_inside_the_dataset_is_fine(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "store").mkdir()
    image(root, "case_a", 1).replace(root / "store" / "x.nii.gz")
    image(root, "case_a", 1).symlink_to(root / "store" / "x.nii.gz")
    assert check_dataset(root) == []


def test_every_problem_at_once(tmp_path):
    root = make_dataset(tmp_path / "ds")
    bad = [_garbage(root), _spacing_mismatch(root), _set_voxel(np.nan)(root)]
    problems = check_dataset(root)
    assert len(problems) >= 3
    for name in bad:
        assert names(problems, name), format_problems(problems, root)
    text = format_problems(problems, root.name)
    assert text.splitlines()[0] == f"{len(problems)} problem(s) in ds"
    assert all(str(p) in text for p in problems)


def test_progress_and_no_labels(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    label(root, "case_a").unlink()
    assert check_dataset(root, require_labels=False, progress=True) == []
    assert "checked 2/2 case(s)" in capsys.readouterr().err
    assert names(check_dataset(root), "case_a.nii.gz")


def test_cases_read_in_worker_processes_report_what_one_process_reports(tmp_path, monkeypatch):
    """`plan` and `check` read large datasets in `num_workers` processes: the same problems, in case order, and
    the cross-case 2D/3D check still sees every file."""
    import segforge.io.checks as checks

    root = make_dataset(tmp_path / "ds", cases=("case_a", "case_b", "case_c", "case_d"))
    _undeclared_value(root)
    _two_d_in_3d(root)
    _truncated(root)
    serial = check_dataset(root)
    assert len(serial) >= 3
    monkeypatch.setattr(checks, "PARALLEL_MIN_BYTES", 0)  # this tiny dataset too
    import segforge.parallel as parallel

    seen, original = [], parallel.progress_map

    def recording(function, args, num_workers, desc, **kwargs):
        seen.append(num_workers)
        return original(function, args, num_workers, desc, **kwargs)

    monkeypatch.setattr(parallel, "progress_map", recording)  # imported where it is used: this one is called
    assert [str(p) for p in check_dataset(root, num_workers=2)] == [str(p) for p in serial] and seen == [2]
    monkeypatch.setattr(checks, "PARALLEL_MIN_BYTES", 2**40)  # under the threshold: this process
    assert [str(p) for p in check_dataset(root, num_workers=2)] == [str(p) for p in serial] and seen == [2, 0]
