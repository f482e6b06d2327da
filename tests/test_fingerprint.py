"""Fingerprint contents, its reuse while the dataset is unchanged, and `segforge plan` with budget overrides and
hand-edited plans."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import data_identifier_of, write_dataset
from segforge.cli.main import main
from segforge.io.dataset import load_dataset
from segforge.planning.fingerprint import class_summary, compute_fingerprint, intensity_stats


def roots(work: Path) -> list[str]:
    return [f"paths.work_root={work}", f"paths.preprocessed_root={work}", f"paths.results_root={work}"]


def test_class_summary_counts_voxels_and_components():
    label = np.zeros((10, 20, 20), np.int32)
    label[1:3, 1:4, 1:4] = 1
    label[6:8, 10:15, 10:15] = 1     # a second, separate blob of class 1
    label[6:8, 2:4, 14:18] = 2
    label[2, 15, 15] = 2             # diagonal neighbours are not face-connected
    label[3, 16, 16] = 2
    counts, components = class_summary(label, [0, 1, 2, 3])
    assert counts == {"0": int((label == 0).sum()), "1": 18 + 50, "2": 16 + 2, "3": 0}
    assert components == {"1": 2, "2": 3, "3": 0}
    # counted per bounding box: the same as a whole-volume bincount and labelling, in every integer dtype
    rng = np.random.default_rng(0)
    noisy = (rng.random((12, 30, 25)) < 0.3) * rng.integers(1, 5, (12, 30, 25))
    values = [0, 1, 2, 3, 4, 7]  # 7 declared, absent
    from scipy import ndimage
    expected_counts = {str(v): int((noisy == v).sum()) for v in values}
    expected_components = {str(v): int(ndimage.label(noisy == v)[1]) for v in values if v}
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        assert class_summary(noisy.astype(dtype), values) == (expected_counts, expected_components)


def test_intensity_stats():
    values = np.arange(1001, dtype=np.float64)
    stats = intensity_stats(values)
    assert stats["mean"] == 500 and stats["median"] == 500 and stats["min"] == 0 and stats["max"] == 1000
    assert stats["percentile_00_5"] == pytest.approx(5.0) and stats["percentile_99_5"] == pytest.approx(995.0)


def test_fingerprint_of_a_dataset(tiny_dataset):
    spec = load_dataset(tiny_dataset)
    fp = compute_fingerprint(spec, num_workers=2, total_samples=4000)
    assert fp["num_cases"] == 8 and len(fp["cases"]) == 8
    case = fp["cases"][0]
    assert case["spacing"] == pytest.approx([3.0, 0.9, 0.9])
    assert all(a <= b for a, b in zip(case["shape_after_crop"], case["shape_before_crop"]))
    assert 0 < case["relative_size_after_crop"] <= 1
    assert set(case["class_voxels"]) == {"0", "1", "2"} and set(case["class_components"]) == {"1", "2"}
    assert all(v >= 1 for v in case["class_components"].values())
    stats = fp["intensity_foreground"]["0"]
    assert stats["percentile_00_5"] <= stats["median"] <= stats["percentile_99_5"]
    # parallel and serial give the same fingerprint (per-case seeds, ordered results)
    assert compute_fingerprint(spec, num_workers=1, total_samples=4000) == fp


def test_plan_reuses_the_fingerprint_until_the_dataset_changes(tiny_dataset, tmp_path, capsys):
    work = tmp_path / "work"
    args = ["plan", str(tiny_dataset), *roots(work), "plan.configurations=[3d_fullres]", "plan.memory.method=analytic",
            "preprocess.run=false"]
    assert main(args) == 0
    path = work / tiny_dataset.name / "fingerprint.json"
    first = path.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert path.stat().st_mtime_ns == first and "fingerprint: up to date" in capsys.readouterr().err
    # a changed case file (size or mtime) invalidates it
    label = tiny_dataset / "labelsTr" / "case000.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    assert main(args) == 0
    assert path.stat().st_mtime_ns != first
    # so do other fingerprint settings
    second = path.stat().st_mtime_ns
    assert main(args + ["fingerprint.total_samples=5000"]) == 0
    assert path.stat().st_mtime_ns != second


def test_a_replan_of_unchanged_files_reads_no_image_and_a_changed_file_is_checked_again(tiny_dataset, tmp_path,
                                                                                        capsys, caplog):
    """Named plans re-plan one dataset often: files that passed the check and made fingerprint.json are not read
    again; a changed one is, and its problem refused."""
    import logging

    from segforge.io.image import read_image, write_image

    work = tmp_path / "work"
    args = ["plan", str(tiny_dataset), *roots(work), "plan.configurations=[3d_fullres]", "plan.memory.method=analytic",
            "preprocess.run=false"]
    assert main(args) == 0
    with caplog.at_level(logging.INFO, logger="segforge"):
        assert main(args + ["plan.name=second"]) == 0
        assert "images not read again" in caplog.text
        caplog.clear()
        assert main(args + ["plan.name=third", "recheck=true"]) == 0
        assert "images not read again" not in caplog.text
    label_file = tiny_dataset / "labelsTr" / "case001.nii.gz"
    label, geometry = read_image(label_file)
    label[0, 0, 0] = 7  # a value dataset.json does not declare
    write_image(label_file, label, geometry)
    capsys.readouterr()
    assert main(args + ["plan.name=fourth"]) != 0
    err = capsys.readouterr().err
    assert "case001.nii.gz" in err and "[7]" in err
    assert not (work / tiny_dataset.name / "plans_fourth.json").exists()


@pytest.mark.parametrize("change", ["symlink_outside", "dangling_symlink", "mhd_data_file"])
def test_a_replan_after_a_change_the_file_sizes_and_times_keep_is_checked_again(tmp_path, capsys, change):
    """What a passing check vouches for is the files as the file system has them: a case file moved out and linked
    back (same size and mtime), a link whose target is gone, the data file of an .mhd header cut short."""
    import shutil

    from conftest import write_dataset

    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=4, num_test=0,
                            **({"ending": ".mhd"} if change == "mhd_data_file" else {}))
    work = tmp_path / "work"
    args = ["plan", str(dataset), *roots(work), "plan.configurations=[3d_fullres]", "plan.memory.method=analytic",
            "preprocess.run=false"]
    assert main(args) == 0 and (work / dataset.name / "checked.json").is_file()
    if change == "mhd_data_file":
        data = next(p for p in (dataset / "labelsTr").iterdir() if not p.name.endswith(".mhd"))
        stat = data.stat()
        data.write_bytes(data.read_bytes()[: stat.st_size // 2])
        os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        image = dataset / "imagesTr" / "case001_0000.nii.gz"
        outside = tmp_path / "outside"
        outside.mkdir()
        shutil.move(image, outside / image.name)  # keeps size and mtime
        os.symlink(outside / image.name if change == "symlink_outside" else outside / "gone.nii.gz", image)
    capsys.readouterr()
    assert main(args + ["plan.name=second"]) != 0
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" not in err and "fix:" in err.lower()
    assert not (work / dataset.name / "plans_second.json").exists()


def test_plan_for_a_bigger_card_and_one_configuration(tiny_dataset, tmp_path):
    work = tmp_path / "work"
    assert main(["plan", str(tiny_dataset), *roots(work), "plan.gpu_memory_gb=24", "plan.configurations=[3d_fullres]",
                 "preprocess.run=false"]) == 0
    plans = json.loads((work / tiny_dataset.name / "plans_default.json").read_text())
    assert list(plans["configurations"]) == ["3d_fullres"]
    memory = plans["configurations"]["3d_fullres"]["memory"]
    assert memory["gpu_memory_gb"] == 24 and memory["method"] == "traced" and memory["predicted_peak_bytes"] > 0
    saved = yaml.safe_load((work / tiny_dataset.name / "plan_config.yaml").read_text())
    assert saved["plan"]["gpu_memory_gb"] == 24


def test_plan_verify_needs_cuda(tiny_dataset, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --verify runs for real")
    work = tmp_path / "work"
    assert main(["plan", str(tiny_dataset), "--verify", *roots(work)]) != 0
    assert "CUDA" in capsys.readouterr().err
    assert not (work / tiny_dataset.name).exists()  # refused before any work


def test_unknown_gpu_preset_is_a_clear_error(tiny_dataset, tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["plan", str(tiny_dataset), *roots(work), "plan.gpu=rtx9999", "preprocess.run=false"]) != 0
    err = capsys.readouterr().err
    assert "rtx9999" in err and "a100-80gb" in err and "Traceback" not in err
    assert not (work / tiny_dataset.name / "plans_default.json").exists()


def test_hand_edited_plan_is_respected_by_every_later_stage(tmp_path):
    dataset = write_dataset(tmp_path / "Dataset002_Edit", num_train=5, num_test=1)
    work = tmp_path / "work"
    assert main(["plan", str(dataset), *roots(work), "plan.configurations=[3d_fullres]", "plan.features_base=8",
                 "plan.memory.method=analytic", "preprocess.run=false"]) == 0
    plans_path = work / dataset.name / "plans_default.json"
    plans = json.loads(plans_path.read_text())
    conf = plans["configurations"]["3d_fullres"]
    conf["target_spacing"] = [4.0, 1.2, 1.2]
    conf["patch_size"] = [8, 32, 32]
    conf["batch_size"] = 3
    conf["network"]["features_per_stage"] = [6, 12, 24, 24, 24, 24][: len(conf["network"]["strides"])]
    conf["network"]["norm"] = "group"
    plans_path.write_text(json.dumps(plans, indent=2))

    assert main(["preprocess", str(dataset), *roots(work), "configurations=[3d_fullres]"]) == 0
    # planned with preprocess.run=false: the one folder is the edited spacing's (its data_identifier recomputed)
    [folder] = (work / dataset.name / "preprocessed").iterdir()
    assert folder.name != data_identifier_of(work, dataset.name) and folder.name.startswith("3d_fullres_")
    case = json.loads((folder / "case000.json").read_text())
    assert case["spacing_after_resampling"] == [4.0, 1.2, 1.2]
    assert main(["train", str(dataset), *roots(work), "fold=0", "trainer.max_epochs=1", "data.iterations_per_epoch=2",
                 "data.val_iterations=1", "data.num_workers=0", "trainer.accelerator=cpu"]) == 0
    fold = work / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
    network = yaml.safe_load((fold / "network.yaml").read_text())
    assert network["features_per_stage"] == conf["network"]["features_per_stage"] and network["norm"] == "group"
    model_plans = json.loads((fold.parent / "plans.json").read_text())
    assert model_plans["configurations"]["3d_fullres"]["patch_size"] == [8, 32, 32]
    config = yaml.safe_load((fold / "config.yaml").read_text())
    assert config["data"]["patch_size"] is None and config["data"]["batch_size"] is None  # taken from the plan

    out = tmp_path / "pred"
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(fold.parent),
                 *roots(work), "predict.mirror=false"]) == 0
    assert (out / "case005.nii.gz").is_file()


def test_a_case_name_that_is_no_utf8_plans_twice(tmp_path):
    """A file name of bytes that are no UTF-8 is a valid name (the check accepts it): the signatures of the files
    take it as the file system has it, so the fast re-plan works too."""
    from conftest import write_dataset

    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=4, num_test=0)
    new = os.fsdecode(b"case000\xff")
    os.rename(dataset / "imagesTr" / "case000_0000.nii.gz", dataset / "imagesTr" / f"{new}_0000.nii.gz")
    os.rename(dataset / "labelsTr" / "case000.nii.gz", dataset / "labelsTr" / f"{new}.nii.gz")
    work = tmp_path / "work"
    args = ["plan", str(dataset), *roots(work), "plan.configurations=[3d_fullres]", "plan.memory.method=analytic",
            "preprocess.run=false"]
    assert main(args) == 0 and (work / dataset.name / "checked.json").is_file()
    assert main(args + ["plan.name=again"]) == 0


def test_a_work_folder_that_cannot_take_the_check_record_costs_only_the_record(tmp_path, monkeypatch, caplog):
    """preprocess reads plans from the work folder and writes elsewhere: a read-only work folder must not fail it
    after the whole check, only cost the next command a full check."""
    import logging

    from omegaconf import OmegaConf

    import segforge.io.artifacts as artifacts
    from conftest import write_dataset
    from segforge.cli.dataset_args import _checked_dataset
    from segforge.io.storage import StorageError

    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=2, num_test=0)
    cfg = OmegaConf.create({"paths": {"raw_root": None}, "recheck": False})

    def refuse(path, payload, kind=None):
        raise StorageError(f"{path}: read-only file system")

    monkeypatch.setattr(artifacts, "write_json", refuse)
    record = tmp_path / "work" / "checked.json"
    with caplog.at_level(logging.WARNING, logger="segforge"):
        spec = _checked_dataset(str(dataset), cfg, require_labels=True, checked_file=record)
    assert len(spec.cases) == 2 and not record.exists() and "not written" in caplog.text
