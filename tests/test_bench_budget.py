"""The budget benchmark's pure parts (scripts/bench_budget.py and scripts/bench/budget_*.py, mni_dataset.py):
nnU-Net's budget schedule, window counts, the CLI arm's parsing, the shared Dice scorer, the verdicts, and the
MNI-derived dataset (needs nilearn, the bench extra: skipped without it). Nothing here trains a network.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench.budget_eval import dice, dice_folder  # noqa: E402
from bench.budget_schedule import plan_schedule, sliding_window_tiles, validation_seconds_estimate  # noqa: E402
from bench.budget_segforge import budget_token, parse_folders, run_command, CommandError  # noqa: E402
from bench.mni_dataset import label_from_probabilities  # noqa: E402

import bench_budget  # noqa: E402


# ----------------------------------------------------------------------------------------- nnU-Net's schedule
def test_schedule_fills_the_time_it_is_given():
    schedule = plan_schedule(600.0, seconds_per_iteration=1.0, seconds_per_val_iteration=0.3)
    assert schedule.predicted_seconds <= 600.0
    assert schedule.predicted_seconds > 600.0 - (schedule.iterations_per_epoch * 1.1 + 1.0)  # less than an epoch left
    assert schedule.train_iterations == schedule.epochs * schedule.iterations_per_epoch
    assert schedule.epochs >= 10  # short epochs so that the poly schedule still decays in steps


def test_schedule_keeps_nnunets_epoch_length_when_the_budget_allows():
    schedule = plan_schedule(1e6, seconds_per_iteration=0.1, seconds_per_val_iteration=0.05)
    assert schedule.iterations_per_epoch == 250 and schedule.epochs > 20


def test_schedule_always_trains_at_least_one_short_epoch():
    schedule = plan_schedule(5.0, seconds_per_iteration=2.0, seconds_per_val_iteration=1.0)
    assert schedule.epochs == 1 and schedule.iterations_per_epoch >= 1
    with pytest.raises(ValueError):
        plan_schedule(100.0, 0.0, 1.0)


def test_sliding_window_tiles_match_nnunets_step_rule():
    assert sliding_window_tiles([64, 64, 64], [64, 64, 64]) == 1
    assert sliding_window_tiles([50, 64, 64], [64, 64, 64]) == 1          # shorter than the patch: padded, one window
    assert sliding_window_tiles([96, 128, 112], [64, 64, 64]) == 2 * 3 * 3  # ceil((96-64)/32)+1 = 2, (128-64)/32+1 = 3
    assert validation_seconds_estimate(2, 4, 1, 0.5, per_case_seconds=1.0, fixed_seconds=10.0) == 2 * (4 * 0.5 + 1) + 10


# ----------------------------------------------------------------------------------------------- segforge arms
def test_budget_token_and_printed_folders(tmp_path):
    assert budget_token(15) == "15m" and budget_token(2.5) == "150s"
    output = "x\nmodel folder: /a/b/model\nrun folder: /a/b/model/fold_0\nmodel folder: /c/model\n"
    model, run = parse_folders(output)
    assert model == Path("/c/model") and run == Path("/a/b/model/fold_0")
    assert parse_folders("nothing") == (None, None)


def test_run_command_reports_failure_and_timeout(tmp_path):
    done = run_command([sys.executable, "-c", "print('hello')"], tmp_path / "ok.log", env={})
    assert "hello" in done["output"] and done["seconds"] > 0
    with pytest.raises(CommandError, match="exit code 3"):
        run_command([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "bad.log", env={})
    with pytest.raises(CommandError, match="timed out"):
        run_command([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.log", env={}, timeout=1)


# -------------------------------------------------------------------------------------------------- scoring
def _write(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_dice_folder_scores_every_reference_and_refuses_a_missing_prediction(tmp_path):
    ref = np.zeros((4, 6, 6), np.uint8)
    ref[1:3, 1:5, 1:5] = 1
    ref[1:3, 2:4, 2:4] = 2
    pred = ref.copy()
    pred[1, 1, 1] = 0  # one grey-matter voxel missed
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    _write(tmp_path / "ref" / "a.nii.gz", ref)
    _write(tmp_path / "pred" / "a.nii.gz", pred)
    scores = dice_folder(tmp_path / "pred", tmp_path / "ref", {"background": 0, "grey_matter": 1, "white_matter": 2})
    gm = 2 * 23 / (24 + 23)
    assert scores["mean"]["white_matter"] == 1.0 and scores["mean"]["grey_matter"] == pytest.approx(gm)
    assert scores["foreground_mean"] == pytest.approx((1 + gm) / 2)
    assert dice(ref, ref, 7) == 1.0  # absent from both
    _write(tmp_path / "ref" / "b.nii.gz", ref)
    with pytest.raises(FileNotFoundError, match="no prediction"):
        dice_folder(tmp_path / "pred", tmp_path / "ref", {"grey_matter": 1})


def test_verdicts_name_the_best_arm_and_the_15_minute_target():
    runs = {5.0: {"segforge_budget": {"foreground_dice": 0.70}, "nnunet": {"foreground_dice": 0.72}},
            15.0: {"segforge_budget": {"foreground_dice": 0.80}, "nnunet": {"foreground_dice": 0.75},
                   "segforge_full_nnunet_recipe": None}}
    lines = bench_budget.verdicts(runs)
    assert "MISSED" in lines[0] and "best nnunet" in lines[0]
    assert "ok" in lines[1] and "+0.0500" in lines[1]
    assert lines[2].endswith("ok")


# ------------------------------------------------------------------------------------------------ the dataset
def test_labels_are_the_most_probable_tissue():
    gm = np.array([0.6, 0.2, 0.3, 0.0], np.float32)
    wm = np.array([0.3, 0.7, 0.3, 0.0], np.float32)
    assert label_from_probabilities(gm, wm).tolist() == [1, 2, 0, 0]  # 0.3/0.3/0.4: background wins


@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="needs nilearn (pip install -e .[bench])")
def test_mni_dataset_is_deterministic_complete_and_rebuilt_for_new_parameters(tmp_path):
    from bench.mni_dataset import MniParams, ensure_mni_dataset, is_complete, load_templates, make_case

    params = MniParams(num_train=2, num_test=1, crop=(24, 28, 24))
    root = ensure_mni_dataset(params, tmp_path, workers=1, log=lambda *_: None)
    assert is_complete(root, params)
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["mni_000_0000.nii.gz", "mni_001_0000.nii.gz"]
    assert (root / "labelsTs" / "mni_test_000.nii.gz").is_file()
    templates = load_templates(params.crop)
    image_a, label_a, _ = make_case(templates, params, 0, 1)
    image_b, label_b, _ = make_case(templates, params, 0, 1)
    assert np.array_equal(image_a, image_b) and np.array_equal(label_a, label_b)
    assert set(np.unique(label_a)) <= {0, 1, 2} and (label_a == 1).any() and (label_a == 2).any()
    other = MniParams(num_train=2, num_test=1, crop=(24, 28, 24), seed=1)
    assert not is_complete(root, other)
