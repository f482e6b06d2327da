"""The synthetic demo dataset: deterministic, in the raw layout, geometry kept, atomic, and not thresholdable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segforge.demo.baseline import best_threshold_dice
from segforge.demo.synthetic import LABELS_2D, LABELS_3D, case_rng, generate_dataset, make_case_3d
from segforge.errors import SegforgeError
from segforge.io.dataset import load_dataset
from segforge.io.image import read_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data3d(tmp_path_factory) -> Path:
    """2 training cases and the 6 held-out cases of the default seed-0 dataset (cases do not depend on counts)."""
    return generate_dataset(tmp_path_factory.mktemp("demo3d") / "Dataset900_Synth", dim=3, num_train=2, num_test=6)


def read_split(root: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, labels = [], []
    for path in sorted((root / f"images{split}").iterdir()):
        case = path.name[: -len("_0000.nii.gz")]
        images.append(read_image(path)[0])
        labels.append(read_image(root / f"labels{split}" / f"{case}.nii.gz")[0])
    return images, labels


def test_layout_and_dataset_json(data3d):
    assert sorted(p.name for p in data3d.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs"]
    meta = json.loads((data3d / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"}
    assert meta["labels"] == LABELS_3D and len(LABELS_3D) == 4 and LABELS_3D["background"] == 0
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (data3d / "imagesTr").iterdir()) == ["synth_tr000_0000.nii.gz", "synth_tr001_0000.nii.gz"]
    assert sorted(p.name for p in (data3d / "labelsTr").iterdir()) == ["synth_tr000.nii.gz", "synth_tr001.nii.gz"]
    assert len(list((data3d / "imagesTs").iterdir())) == len(list((data3d / "labelsTs").iterdir())) == 6
    spec = load_dataset(data3d)  # the project's own reader accepts it
    assert len(spec.cases) == 2 and len(spec.test_cases) == 6 and spec.foreground_classes == {"liver": 1, "aorta": 2, "lesion": 3}
    assert not [p for p in data3d.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_files_keep_geometry_and_every_class(data3d):
    images, labels = read_split(data3d, "Ts")
    rotated = 0
    for index, (image, label) in enumerate(zip(images, labels)):
        expected_image, expected_label, geometry = make_case_3d(case_rng(0, 3, 1, index))
        _, read_geometry = read_image(sorted((data3d / "imagesTs").iterdir())[index])
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(label, expected_label)
        assert read_geometry.same_grid(geometry) == [] and read_geometry.ndim == 3
        assert 20 <= image.shape[0] <= 28 and all(56 <= n <= 72 for n in image.shape[1:])
        assert 2.5 <= read_geometry.spacing[0] <= 3.0 and 0.8 <= read_geometry.spacing[1] == read_geometry.spacing[2] <= 1.0
        assert any(abs(o) > 1 for o in read_geometry.origin)
        rotated += not np.allclose(read_geometry.direction, np.eye(3).ravel())
        assert set(np.unique(label)) == {0, 1, 2, 3}
        assert all(np.count_nonzero(label == c) >= 150 for c in (1, 2, 3))
    assert rotated >= 1, "some cases should have a non-identity direction"


def test_deterministic_for_a_seed(tmp_path):
    a = generate_dataset(tmp_path / "a", num_train=1, num_test=1, seed=3)
    b = generate_dataset(tmp_path / "b", num_train=1, num_test=1, seed=3)
    c = generate_dataset(tmp_path / "c", num_train=1, num_test=1, seed=4)
    for split in ("Tr", "Ts"):
        (ia, la), (ib, lb), (ic, _) = read_split(a, split), read_split(b, split), read_split(c, split)
        for u, v in zip(ia + la, ib + lb):
            assert u.dtype == v.dtype and u.tobytes() == v.tobytes()
        assert ia[0].shape != ic[0].shape or ia[0].tobytes() != ic[0].tobytes()
    assert (a / "dataset.json").read_text() == (b / "dataset.json").read_text()


def test_refuses_non_empty_out_dir_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SegforgeError, match="not empty"):
        generate_dataset(out, num_train=1, num_test=0)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "nothing else may be left behind"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SegforgeError):
        generate_dataset(tmp_path / "file", num_train=1, num_test=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_dataset(empty, num_train=1, num_test=0) / "dataset.json").is_file()  # an empty folder is fine


def test_2d_variant_writes_readable_pngs(tmp_path):
    root = generate_dataset(tmp_path / "d2", dim=2, num_train=2, num_test=1, seed=0)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["file_ending"] == ".png" and meta["labels"] == LABELS_2D and meta["numTraining"] == 2
    assert len(load_dataset(root).cases) == 2
    for split in ("Tr", "Ts"):
        for path in sorted((root / f"images{split}").iterdir()):
            image, geometry = read_image(path)
            label, _ = read_image(root / f"labels{split}" / path.name.replace("_0000.png", ".png"))
            assert path.suffix == ".png" and image.dtype == np.uint16 and label.dtype == np.uint8
            assert geometry.ndim == 2 and image.shape == label.shape and image.shape[0] == 1
            assert 110 <= image.shape[1] <= 140 and 110 <= image.shape[2] <= 140
            assert image.max() > 20000, "uint16 range should be used"
            assert set(np.unique(label)) == {0, 1, 2, 3}


def test_best_threshold_dice_toy_is_perfect():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 3, size=(4, 10, 10)) for _ in range(3)]
    images = [(lab * 10.0 + rng.normal(0, 0.5, lab.shape)) * scale for lab, scale in zip(labels, (1, 3, 50))]
    dice = best_threshold_dice(images, labels, [1, 2])
    assert dice[1] > 0.95 and dice[2] > 0.95  # a 40-quantile grid is ~2.5 % of the voxels coarse
    fine = best_threshold_dice(images, labels, [1, 2], num_quantiles=400)
    assert fine[1] > 0.99 and fine[2] > 0.99
    assert np.isnan(best_threshold_dice(images, labels, [7])[7])


def test_threshold_baseline_fails_on_held_out_3d_cases(data3d):
    images, labels = read_split(data3d, "Ts")
    dice = best_threshold_dice(images, labels, [1, 2, 3])
    assert float(np.mean(list(dice.values()))) <= 0.5, dice


def test_script_refuses_and_reports(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("x")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_dataset.py"), str(out), "--num-train", "1",
                          "--num-test", "0"], capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and "not empty" in run.stderr and "Traceback" not in run.stderr
