"""Fault injection: preprocess, train and predict are killed (SIGKILL, no chance to clean up) at seeded random points
and re-run with the same command. Each re-run completes, its outputs equal an uninterrupted run's (training resumes
from the last checkpoint and ends with the same weights), and at no time is a truncated file left under a name
where a finished one is expected: every file visible right after a kill is complete (only ``.tmp-*`` names may be
partial, and the re-run removes them)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_identifier_of, write_dataset
from segforge.io.image import read_image

pytestmark = pytest.mark.slow

SEED = 20261125
TRAIN = ["trainer.accelerator=cpu", "trainer.max_epochs=4", "data.iterations_per_epoch=5", "data.val_iterations=1",
         "optim=adamw_cosine", "final_validation.enabled=false", "callbacks.epoch_progress.plot_path=null",
         "logger.tensorboard=null", "data.num_workers=0"]


def segforge(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "segforge", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def run(args: list[str], log: Path) -> None:
    process = segforge(args, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]


def kill_when(args: list[str], log: Path, ready, delay: float) -> bool:
    """Start the command, wait until ``ready()``, ``delay`` seconds more, then SIGKILL its whole process group.
    True when the kill landed while the command was still working."""
    process = segforge(args, log)
    deadline = time.time() + 300
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    alive = process.poll() is None
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    return alive


def finished_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]


def assert_complete(root: Path) -> None:
    """Every file not named as temporary reads back whole."""
    for path in finished_files(root):
        name = path.name
        if name.endswith(".npy"):
            np.load(path, mmap_mode="r")
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith((".ckpt", ".pt")):
            torch.load(path, weights_only=True, map_location="cpu")
        elif name.endswith(".nii.gz"):
            read_image(path)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    dataset = write_dataset(base / "Dataset001_Tiny", num_train=10, num_test=6, seed=3)
    return base, dataset, np.random.default_rng(SEED)


def roots(work: Path) -> list[str]:
    return [f"paths.work_root={work}"]


def test_killed_preprocessing_resumes_to_identical_arrays(setting):
    base, dataset, rng = setting
    plan = ["plan", str(dataset), "plan.features_base=4", "plan.configurations=[3d_fullres]", "preprocess.num_workers=1"]
    run([*plan, *roots(base / "straight")], base / "pre_straight.log")
    killed_work = base / "killed"
    out = killed_work / dataset.name / "preprocessed" / data_identifier_of(base / "straight", dataset.name)
    after = int(rng.integers(1, 6))  # cases finished before the kill
    landed = kill_when([*plan, *roots(killed_work)], base / "pre_killed.log",
                       lambda: len(list(out.glob("case*_seg.npy"))) >= after, float(rng.uniform(0, 0.05)))
    assert landed, "the kill came after preprocessing had finished: nothing was tested"
    assert_complete(killed_work)
    (out / ".tmp-4242-case000.npy").write_bytes(b"\x93NUMPY half")  # as if killed while writing
    run(["preprocess", str(dataset), *roots(killed_work)], base / "pre_again.log")
    reference = base / "straight" / dataset.name / "preprocessed" / data_identifier_of(base / "straight", dataset.name)
    assert not list(out.glob(".tmp-*"))
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(out / name), np.load(reference / name), err_msg=name)
        elif name.startswith("case"):
            assert json.loads((out / name).read_text()) == json.loads((reference / name).read_text()), name


def train_straight(base: Path, dataset: Path) -> list[str]:
    """The uninterrupted training run (planned and preprocessed by the preprocessing test, or now); its command."""
    work = base / "straight"
    if not (work / dataset.name / "plans_default.json").is_file():
        run(["plan", str(dataset), "plan.features_base=4", "plan.configurations=[3d_fullres]", *roots(work)],
            base / "plan.log")
    train = ["train", str(dataset), *roots(work), *TRAIN]
    if not (base / "res_straight" / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
            / "model_final.pt").is_file():
        run([*train, f"paths.results_root={base / 'res_straight'}"], base / "train_straight.log")
    return train


def test_killed_training_resumes_from_its_last_checkpoint_to_the_same_weights(setting):
    base, dataset, rng = setting
    train = train_straight(base, dataset)
    killed = [*train, f"paths.results_root={base / 'res_killed'}"]
    log = base / "train_killed.log"
    epoch = int(rng.integers(1, 3))  # killed in epoch 2 or 3, at a random moment of it
    landed = kill_when(killed, log, lambda: log.is_file() and f"epoch {epoch}/4" in log.read_text(),
                       float(rng.uniform(0, 0.8)))
    assert landed, "the kill came after training had finished: nothing was tested"
    fold = base / "res_killed" / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
    assert_complete(fold)
    saved = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert saved >= epoch * 5 and not (fold / "model_final.pt").exists()
    (fold / "checkpoints" / ".tmp-4242-last.ckpt").write_bytes(b"PK half")  # as if killed while writing
    run(killed, base / "train_again.log")
    again = (base / "train_again.log").read_text()
    assert re.search(r"resuming from \S+last\.ckpt", again)
    assert not list(fold.rglob(".tmp-*"))
    straight = base / "res_straight" / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
    a = torch.load(straight / "model_final.pt", weights_only=True)["state_dict"]
    b = torch.load(fold / "model_final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_killed_prediction_continues_to_identical_masks(setting):
    base, dataset, rng = setting
    train_straight(base, dataset)  # trained by the test above when it ran (this test runs alone too)
    model = base / "res_straight" / dataset.name / "results" / "segment" / "3d_fullres"
    predict = ["predict", "-i", str(dataset / "imagesTs"), "--model", str(model), "predict.mirror=false"]
    run([*predict, "-o", str(base / "masks_straight")], base / "predict_straight.log")
    out = base / "masks_killed"
    after = int(rng.integers(1, 4))
    landed = kill_when([*predict, "-o", str(out)], base / "predict_killed.log",
                       lambda: len(list(out.glob("case*.nii.gz"))) >= after, float(rng.uniform(0, 0.1)))
    assert landed, "the kill came after prediction had finished: nothing was tested"
    assert_complete(out)
    (out / ".tmp-4242-case015.nii.gz").write_bytes(b"\x1f\x8b half")  # as if killed while writing
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")}
    run([*predict, "-o", str(out), "--continue"], base / "predict_again.log")
    assert not list(out.glob(".tmp-*"))
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished cases were not redone
    names = sorted(p.name for p in (base / "masks_straight").glob("case*.nii.gz"))
    assert len(names) == 6 and sorted(p.name for p in out.glob("case*.nii.gz")) == names
    for name in names:
        mask, geometry = read_image(out / name)
        reference, reference_geometry = read_image(base / "masks_straight" / name)
        np.testing.assert_array_equal(mask, reference, err_msg=name)
        assert geometry == reference_geometry
