"""Training through the CLI on tiny data: exact resume, wall-clock budget, precision, regions and the ignore
label, fine-tuning, early stopping, grouped splits."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROTATED, make_case
from segforge.cli.main import main
from segforge.io.image import Geometry, read_image, write_image
from segforge.training.splits import case_groups, make_splits

QUICK = ["optim=adamw_cosine", "data.iterations_per_epoch=6", "data.val_iterations=1", "trainer.accelerator=cpu",
         "final_validation.enabled=false", "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]


def roots(work: Path, results: str = "res") -> list[str]:
    return [f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}", f"paths.results_root={work / results}"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from conftest import write_dataset

    base = tmp_path_factory.mktemp("training")
    dataset = write_dataset(base / "Dataset001_Tiny")
    work = base / "work"
    assert main(["plan", str(dataset), *roots(work), "plan.features_base=4", "plan.configurations=[3d_fullres]"]) == 0
    return dataset, work


def fold_dir(work: Path, dataset: Path, results: str = "res") -> Path:
    return work / results / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"


def weights(folder: Path) -> dict:
    return torch.load(folder / "model_final.pt", weights_only=True)["state_dict"]


def assert_resumed_equals_straight(straight: Path, resumed: Path, optimizer_state: str, atol: float) -> None:
    """The resumed fold's weights, step count and optimizer ``optimizer_state`` equal the uninterrupted fold's."""
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=1e-5, atol=1e-6, msg=key)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 18
    states_a, states_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert states_a and all(optimizer_state in state for state in states_a.values())
    for state_a, state_b in zip(states_a.values(), states_b.values()):
        torch.testing.assert_close(state_b[optimizer_state], state_a[optimizer_state], rtol=1e-5, atol=atol)
    # the metric EMA and the best checkpoint's value went on from where the first part left them
    assert a["segforge_dice_ema"] is not None and b["segforge_dice_ema"] == pytest.approx(a["segforge_dice_ema"], abs=1e-4)
    best_a, best_b = (float(c["callbacks"]["BestCheckpoint"]["best_model_score"]) for c in (a, b))
    assert best_b == pytest.approx(best_a, abs=1e-4)


def test_resume_continues_exactly_where_it_stopped(planned):
    """An interrupted run resumed to the end equals the uninterrupted run: weights, step, optimizer moments."""
    dataset, work = planned
    run = ["train", str(dataset), *QUICK, "trainer.max_epochs=3"]
    assert main([*run, *roots(work, "straight")]) == 0
    assert main([*run, *roots(work, "resumed"), "+trainer.max_steps=12"]) == 0  # stopped after 2 of 3 epochs
    interrupted = torch.load(fold_dir(work, dataset, "resumed") / "checkpoints" / "last.ckpt", weights_only=True)
    assert interrupted["global_step"] == 12
    assert main([*run, *roots(work, "resumed")]) == 0
    straight, resumed = fold_dir(work, dataset, "straight"), fold_dir(work, dataset, "resumed")
    assert_resumed_equals_straight(straight, resumed, "exp_avg_sq", atol=1e-9)
    assert len(list((resumed / "logs").glob("version_*"))) == 2  # the first part's logs were kept


def test_resume_is_exact_with_the_default_recipe_loader_workers_and_the_final_validation(planned):
    """The same with nnU-Net's recipe (SGD with momentum, poly decay), augmentation in two loader workers and the
    fold's final validation on: weights, momentum buffers and the validation's scores equal the uninterrupted run's."""
    dataset, work = planned
    run = ["train", str(dataset), "data.iterations_per_epoch=6", "data.val_iterations=1", "trainer.accelerator=cpu",
           "data.num_workers=2", "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null", "trainer.max_epochs=3"]
    assert main([*run, *roots(work, "sgd_straight")]) == 0
    assert main([*run, *roots(work, "sgd_resumed"), "+trainer.max_steps=12"]) == 0  # stopped after 2 of 3 epochs
    assert main([*run, *roots(work, "sgd_resumed")]) == 0
    straight, resumed = fold_dir(work, dataset, "sgd_straight"), fold_dir(work, dataset, "sgd_resumed")
    assert_resumed_equals_straight(straight, resumed, "momentum_buffer", atol=1e-7)
    scores = [json.loads((fold / "validation" / "summary.json").read_text())["mean_dice"] for fold in (straight, resumed)]
    assert scores[0].keys() == scores[1].keys()
    for name in scores[0]:
        assert scores[1][name] == pytest.approx(scores[0][name], abs=1e-4), name


def test_a_crashed_run_resumes_from_its_last_finished_epoch(planned, monkeypatch):
    """A run killed in its third epoch left last.ckpt of the second (written every epoch, not only at the end), and
    resume=auto goes on from there."""
    from segforge.training.callbacks import EpochProgress

    dataset, work = planned
    finish = EpochProgress.on_train_epoch_end

    def crash_in_third_epoch(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("node lost")
        finish(self, trainer, pl_module)

    monkeypatch.setattr(EpochProgress, "on_train_epoch_end", crash_in_third_epoch)
    run = ["train", str(dataset), *QUICK, *roots(work, "crashed"), "trainer.max_epochs=4"]
    with pytest.raises(RuntimeError, match="node lost"):
        main(run)
    fold = fold_dir(work, dataset, "crashed")
    assert torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    monkeypatch.undo()
    assert main(run) == 0
    assert json.loads((fold / "training_summary.json").read_text())["global_step"] == 24


def test_max_time_ends_the_run_cleanly_with_a_checkpoint(planned):
    dataset, work = planned
    assert main(["train", str(dataset), *roots(work, "timed"), *QUICK, "trainer.max_epochs=100000",
                 "trainer.max_time=00:00:00:04", "trainer.log_every_n_steps=1"]) == 0
    fold = fold_dir(work, dataset, "timed")
    summary = json.loads((fold / "training_summary.json").read_text())
    assert 0 < summary["global_step"] < 100000 * 6
    checkpoint = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == summary["global_step"]  # the final state, not the last epoch end
    with open(next((fold / "logs").glob("version_*/metrics.csv"))) as handle:
        rates = [float(r["lr"]) for r in csv.DictReader(handle) if r.get("lr")]
    assert rates[-1] < 0.2 * max(rates)  # the schedule ran over the time budget, not the epoch count


@pytest.mark.slow
def test_ddp_ranks_under_a_budget_agree_although_one_rank_is_slow(planned, tmp_path):
    """Two gloo ranks, the second sleeping in every step (tests/ddp_rank_probe.py): the time-paced epochs, the
    validation batches, the stop and the time-based learning rate are rank 0's, so both ranks run the same steps with
    the same rates and end with the same weights (each rank's own clock made them differ, or could hang the run)."""
    import os
    import signal
    import subprocess
    import sys
    from collections import Counter

    dataset, work = planned
    probe = Path(__file__).parent / "ddp_rank_probe.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PROBE_DIR": str(tmp_path), "PROBE_SLEEP_S": "0.1"}
    command = [sys.executable, str(probe), "train", str(dataset), *roots(work, "ddp_budget"), "budget=45s",
               "configuration=3d_fullres", "budgeting.first_epoch_steps=4", "budgeting.finish_s=2",
               "final_validation.enabled=false", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
               "data.num_workers=0", "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]
    with open(tmp_path / "ranks.log", "w") as log:
        ranks = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = ranks.wait(timeout=300)  # a hung collective fails the test instead of blocking it
        finally:
            if ranks.poll() is None:
                os.killpg(ranks.pid, signal.SIGKILL)  # both ranks: Lightning's second is in the same session
    assert code == 0, (tmp_path / "ranks.log").read_text()[-3000:]
    first, second = (torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in (0, 1))
    assert first["global_step"] == second["global_step"] == len(first["lr"]) == len(second["lr"])
    assert Counter(first["epoch_of_step"]) == Counter(second["epoch_of_step"])  # every epoch's steps
    assert Counter(first["val_batches"]) == Counter(second["val_batches"])
    assert len(set(first["lr"])) > 1 and first["lr"] == second["lr"]  # the schedule moved with time, on both alike
    assert first["weights"].keys() == second["weights"].keys()
    assert all(torch.equal(first["weights"][k], second["weights"][k]) for k in first["weights"])


def run_two_ranks(command: list[str], cwd: Path, log: Path) -> None:
    """A 2-rank gloo run of ``command`` (Lightning starts the second rank); killed with its ranks if it hangs."""
    import os
    import signal
    import subprocess

    with open(log, "w") as handle:
        ranks = subprocess.Popen(command, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=cwd, stdout=handle,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = ranks.wait(timeout=300)  # a hung collective fails the test instead of blocking it
        finally:
            if ranks.poll() is None:
                os.killpg(ranks.pid, signal.SIGKILL)  # both ranks: Lightning's second is in the same session
    assert code == 0, log.read_text()[-3000:]


DDP = ["trainer.devices=2", "trainer.strategy=ddp", "data.num_workers=0"]


@pytest.mark.slow
def test_a_two_rank_ddp_run_resumed_ends_with_the_uninterrupted_runs_weights(planned, tmp_path):
    """Two gloo ranks, stopped after 2 of 3 epochs and resumed, end where the uninterrupted 2-rank run ends: every
    weight (rtol 1e-5, atol 1e-6), the step and every Adam second moment (atol 1e-9), not only the step count."""
    import sys

    dataset, work = planned
    run = [sys.executable, "-m", "segforge", "train", str(dataset), *QUICK, *DDP, "trainer.max_epochs=3"]
    run_two_ranks([*run, *roots(work, "ddp_straight")], tmp_path, tmp_path / "straight.log")
    run_two_ranks([*run, *roots(work, "ddp_resumed"), "+trainer.max_steps=12"], tmp_path, tmp_path / "first.log")
    resumed = fold_dir(work, dataset, "ddp_resumed")
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    run_two_ranks([*run, *roots(work, "ddp_resumed")], tmp_path, tmp_path / "second.log")
    assert "Restoring states from the checkpoint" in (tmp_path / "second.log").read_text()
    assert_resumed_equals_straight(fold_dir(work, dataset, "ddp_straight"), resumed, "exp_avg_sq", atol=1e-9)


@pytest.mark.slow
def test_no_ranks_stale_temporary_clean_up_deletes_another_ranks_live_temporary(planned, tmp_path):
    """Two gloo ranks (tests/ddp_cleanup_probe.py): each starts a temporary of its own right after the clean-up of a
    killed run's ``.tmp-*`` files returns to it, the second rank 2 s late; both finish (rename) theirs, and the
    killed run's leftovers are gone."""
    import sys

    dataset, work = planned
    fold = fold_dir(work, dataset, "ddp_cleanup")
    (fold / "checkpoints").mkdir(parents=True)
    leftovers = [fold / "checkpoints" / ".tmp-4242-last.ckpt", fold / ".tmp-progress.png-x"]
    for path in leftovers:
        path.write_bytes(b"half written by a killed run")
    probe = Path(__file__).parent / "ddp_cleanup_probe.py"
    run_two_ranks([sys.executable, str(probe), "train", str(dataset), *roots(work, "ddp_cleanup"), *QUICK, *DDP,
                   "trainer.max_epochs=1", "data.iterations_per_epoch=2"], tmp_path, tmp_path / "ranks.log")
    assert (fold / "live-rank0").is_file() and (fold / "live-rank1").is_file()
    assert not any(path.exists() for path in leftovers) and not list(fold.rglob(".tmp-*"))


def test_bf16_mixed_trains_on_cpu_and_16_mixed_is_refused(planned, capsys):
    dataset, work = planned
    assert main(["train", str(dataset), *roots(work, "bf16"), *QUICK, "trainer.max_epochs=1",
                 "trainer.precision=bf16-mixed"]) == 0
    summary = json.loads((fold_dir(work, dataset, "bf16") / "training_summary.json").read_text())
    assert np.isfinite(summary["final_metrics"]["train_loss_epoch"]) and summary["precision"] == "bf16-mixed"
    assert main(["train", str(dataset), *roots(work, "fp16"), *QUICK, "trainer.precision=16-mixed"]) == 2
    assert "bf16-mixed" in capsys.readouterr().err
    assert not (work / "fp16").exists()


def write_region_dataset(root: Path, num_train: int = 10) -> Path:
    """BraTS-like nested regions (whole = {1, 2}, core = {2}) and an ignore label (3) over part of each case."""
    rng = np.random.default_rng(4)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for i in range(num_train):
        image, label = make_case(rng)
        label[:, :, :4] = 3  # unannotated strip
        geometry = Geometry(spacing=(3.0, 0.9, 0.9), origin=(0.0, 0.0, 0.0), direction=ROTATED, ndim=3)
        write_image(root / "imagesTr" / f"case{i:03d}_0000.nii.gz", image, geometry)
        write_image(root / "labelsTr" / f"case{i:03d}.nii.gz", label, geometry)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "whole": [1, 2], "core": [2], "ignore": 3},
        "regions_class_order": [1, 2], "numTraining": num_train, "file_ending": ".nii.gz"}))
    return root


def test_regions_and_ignore_label_train(tmp_path):
    dataset = write_region_dataset(tmp_path / "Dataset002_Regions")
    work = tmp_path / "work"
    assert main(["plan", str(dataset), *roots(work), "plan.features_base=8", "plan.configurations=[3d_fullres]"]) == 0
    assert main(["train", str(dataset), *roots(work), "optim=adamw_cosine", "trainer.max_epochs=14",
                 "data.iterations_per_epoch=12", "data.val_iterations=2", "trainer.accelerator=cpu", "num_folds=5",
                 "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]) == 0
    fold = fold_dir(work, dataset)
    validation = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(validation["classes"]) == {"whole", "core"}
    assert validation["mean_dice"]["whole"] > 0.6 and validation["mean_dice"]["core"] > 0.5, validation["mean_dice"]
    for case in validation["cases"]:
        mask, _ = read_image(case["prediction"])
        reference, _ = read_image(case["reference"])
        annotated = reference != 3
        # painted back in regions_class_order: whole as 1, then core as 2 over it (the other order would leave no 2)
        assert set(np.unique(mask)) == {0, 1, 2}, case["case"]
        assert (mask[annotated] == reference[annotated]).mean() > 0.9, case["case"]
    network = json.loads(json.dumps(torch.load(fold / "model_final.pt", weights_only=True)["network"]))
    assert network["out_channels"] == 2  # one sigmoid output per region


def test_fine_tuning_starts_from_another_model(planned, tmp_path, capsys):
    dataset, work = planned
    source = work / "res" / dataset.name / "results" / "segment" / "3d_fullres"
    if not (source / "fold_0" / "model_final.pt").is_file():
        assert main(["train", str(dataset), *roots(work), *QUICK, "trainer.max_epochs=1"]) == 0
    # the same images with one class less: the heads differ, the rest is the source's
    other = tmp_path / "Dataset003_Ball"
    shutil.copytree(dataset, other)
    spec = json.loads((other / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "ball": 1}
    (other / "dataset.json").write_text(json.dumps(spec))
    for path in (other / "labelsTr").iterdir():
        label, geometry = read_image(path)
        write_image(path, np.where(label == 1, 1, 0).astype(np.uint8), geometry)
    other_work = tmp_path / "work"
    assert main(["plan", str(other), *roots(other_work), "plan.features_base=4", "plan.configurations=[3d_fullres]"]) == 0
    assert main(["train", str(other), *roots(other_work), *QUICK, "trainer.max_epochs=1", "optim.optimizer.lr=0",
                 "optim.optimizer.weight_decay=0", f"init_from={source}"]) == 0
    tuned, original = weights(fold_dir(other_work, other)), weights(source / "fold_0")
    for key, value in original.items():
        if key.startswith("heads."):
            assert tuned[key].shape[0] == 2 and value.shape[0] == 3
        else:
            torch.testing.assert_close(tuned[key], value, msg=key)  # learning rate 0: still the source's
    assert main(["train", str(other), *roots(other_work, "bad"), *QUICK, f"init_from={source}",
                 "model.features_per_stage=[4,8,16,24]"]) == 2
    assert "architecture differs" in capsys.readouterr().err
    assert main(["train", str(other), *roots(other_work, "bad_norm"), *QUICK, f"init_from={source}", "model.norm=group"]) == 2
    assert "norm" in capsys.readouterr().err  # same shapes, other layers: refused all the same


def test_early_stopping_on_the_ema_dice(planned):
    dataset, work = planned
    assert main(["train", str(dataset), *roots(work, "early"), *QUICK, "trainer.max_epochs=20", "optim.optimizer.lr=0",
                 "optim.optimizer.weight_decay=0", "callbacks=early_stopping", "callbacks.early_stopping.patience=1"]) == 0
    summary = json.loads((fold_dir(work, dataset, "early") / "training_summary.json").read_text())
    assert summary["global_step"] == 2 * 6  # nothing learns at lr 0: no better EMA after the first validation


def test_best_checkpoint_resumes_its_value_from_a_moved_folder_and_from_the_former_state(tmp_path):
    """The best value a resumed run compares against: kept when the run folder moved since (the score belongs to this
    run's best.ckpt), and read from checkpoints written by the former callback (``{"best": value}``)."""
    from segforge.training.callbacks import BestCheckpoint

    saved = BestCheckpoint(tmp_path / "old" / "checkpoints" / "best.ckpt", "val_dice_ema")
    saved.load_state_dict({"best": 0.25})
    state = saved.state_dict()
    moved = BestCheckpoint(tmp_path / "new" / "checkpoints" / "best.ckpt", "val_dice_ema")
    moved.load_state_dict(state)
    assert float(moved.best_model_score) == 0.25
    assert moved.best_model_path == str((tmp_path / "new" / "checkpoints" / "best.ckpt").resolve())
    assert list(moved.best_k_models) == [moved.best_model_path]
    fresh = BestCheckpoint(tmp_path / "new" / "checkpoints" / "best.ckpt", "val_dice_ema")
    fresh.load_state_dict(BestCheckpoint(tmp_path / "x.ckpt", "val_dice_ema").state_dict())  # nothing saved yet
    assert fresh.best_model_score is None and not fresh.best_k_models


def test_grouped_splits_keep_a_patient_on_one_side():
    ids = [f"patient{p:02d}_scan{s}" for p in range(9) for s in range(p % 3 + 1)] + ["loner"]
    groups = case_groups(ids, r"^(patient\d+)_")
    assert groups["patient04"] == ["patient04_scan0", "patient04_scan1"] and groups["loner"] == ["loner"]
    splits = make_splits(ids, 5, seed=1, group_pattern=r"^(patient\d+)_")
    assert sorted(c for s in splits for c in s["val"]) == sorted(ids)
    for fold in splits:
        val_groups = {c.split("_")[0] for c in fold["val"]}
        assert not any(c.split("_")[0] in val_groups for c in fold["train"])
    sizes = [len(f["val"]) for f in splits]
    assert max(sizes) - min(sizes) <= 3
    assert splits == make_splits(list(reversed(ids)), 5, seed=1, group_pattern=r"^(patient\d+)_")
    with pytest.raises(ValueError, match="group"):
        make_splits(ids, 11, seed=1, group_pattern=r"^(patient\d+)_")


def test_a_model_folder_never_mixes_plans(planned, capsys):
    """Folds of one model folder share plans.json: training another fold after a re-plan is refused, clearly."""
    dataset, work = planned
    results = "mixed"
    assert main(["train", str(dataset), *roots(work, results), *QUICK, "trainer.max_epochs=1"]) == 0
    model_dir = fold_dir(work, dataset, results).parent
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["batch_size"] = 3  # as if the dataset had been planned again since
    (model_dir / "plans.json").write_text(json.dumps(plans))
    assert main(["train", str(dataset), *roots(work, results), *QUICK, "trainer.max_epochs=1", "fold=1"]) == 2
    assert "another plans.json" in capsys.readouterr().err
    assert not (model_dir / "fold_1").exists()


def test_the_patch_and_mirror_axes_trained_with_are_what_validation_and_prediction_use(planned, monkeypatch):
    """data.patch_size and data.augmentation.mirror_axes overrides reach model_final.pt, the final validation and
    predict; a weights file from before they were recorded predicts with the plan's."""
    from segforge.inference import predictor as predictor_module
    from segforge.inference.predictor import Predictor

    windows = []
    sliding_window = predictor_module.sliding_window

    def recording(image, network, patch, step_size, mirror_axes, *args, **kwargs):
        windows.append((list(patch), list(mirror_axes)))
        return sliding_window(image, network, patch, step_size, mirror_axes, *args, **kwargs)

    monkeypatch.setattr(predictor_module, "sliding_window", recording)
    dataset, work = planned  # the plan: patch [12, 32, 32], mirror axes [0, 1, 2]
    assert main(["train", str(dataset), *roots(work, "overridden"), *QUICK, "trainer.max_epochs=1",
                 "final_validation.enabled=true", "final_validation.mirror=true", "data.patch_size=[8,16,16]",
                 "data.augmentation.mirror_axes=[2]"]) == 0
    fold = fold_dir(work, dataset, "overridden")
    payload = torch.load(fold / "model_final.pt", weights_only=True)
    assert payload["patch_size"] == [8, 16, 16] and payload["mirror_axes"] == [2]
    assert windows and set(map(str, windows)) == {str(([8, 16, 16], [2]))}  # every validation case
    model = Predictor.from_model_dir(fold.parent, device="cpu")
    assert (model.patch_size, model.mirror_axes) == ([8, 16, 16], [2])

    for key in ("patch_size", "mirror_axes"):  # an older weights file
        del payload[key]
    torch.save(payload, fold / "model_final.pt")
    model = Predictor.from_model_dir(fold.parent, device="cpu")
    assert (model.patch_size, model.mirror_axes) == ([12, 32, 32], [0, 1, 2])


def test_no_mirroring_in_training_means_none_at_test_time(tmp_path):
    from segforge.training.data import SegmentationDataModule

    def mirrored(augmentation):
        module = SegmentationDataModule(tmp_path, ["a"], [], [8, 16, 16], 3, 2, {"augmentation": augmentation}, 0, [0, 1, 2])
        return module.trained_mirror_axes

    assert mirrored({"mirror_axes": [1, 2]}) == [1, 2] and mirrored({"mirror_prob": 0.5}) == [0, 1, 2]
    assert mirrored(None) == [] and mirrored({"mirror_prob": 0.0}) == []


def test_logger_mlflow_writes_a_run_with_metrics_inside_the_fold(planned):
    """logger=mlflow: the default loggers and an MLflow run in a local file store, <fold>/mlruns, read back through
    mlflow's own client."""
    mlflow = pytest.importorskip("mlflow")
    dataset, work = planned
    assert main(["train", str(dataset), *roots(work, "mlflow"), *QUICK, "trainer.max_epochs=2", "logger=mlflow"]) == 0
    fold = fold_dir(work, dataset, "mlflow")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{fold / 'mlruns'}")
    experiment = client.get_experiment_by_name("segforge")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"{dataset.name}/segment/3d_fullres/fold_0"
    assert {"train_loss_epoch", "val_loss", "val_dice", "val_dice_ema"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_dice")) == 2  # one per epoch
    assert next((fold / "logs").glob("version_*/metrics.csv")).is_file()  # the CSV logger still writes
