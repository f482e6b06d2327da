"""Full disks, file-size limits and folders that cannot be written: a clear error (exit code 3, the folder and the
fix) before work starts where it can be checked, never a truncated file under a finished name, and the same command
resumes once the cause is gone. File-size limits through RLIMIT_FSIZE (Python ignores SIGXFSZ, so a write past
the limit fails with EFBIG, as a full disk fails with ENOSPC); permissions as a non-root user (CI runs as root)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_identifier_of, write_dataset
from segforge.cli.main import main

QUICK = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "data.iterations_per_epoch=2", "data.val_iterations=1",
         "final_validation.enabled=false", "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null",
         "data.num_workers=0"]


def limited(args: list[str], max_file_bytes: int, **kwargs) -> subprocess.CompletedProcess:
    """``segforge ARGS`` with every file it writes limited to ``max_file_bytes`` (its output goes to a pipe)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "segforge", *args], capture_output=True, text=True, timeout=600,
                          preexec_fn=limit, env={**os.environ, "PYTHONWARNINGS": "ignore"}, **kwargs)


def finished(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    base = tmp_path_factory.mktemp("disk")
    dataset = write_dataset(base / "Dataset001_Tiny", num_train=6, num_test=1)
    work = base / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.features_base=4",
                 "plan.configurations=[3d_fullres]", "preprocess.run=false"]) == 0
    return dataset, work


def test_preprocessing_past_a_file_size_limit_stops_clearly_and_resumes(planned, tmp_path):
    dataset, work = planned
    out_root = tmp_path / "pre"
    command = ["preprocess", str(dataset), f"paths.work_root={work}", f"paths.preprocessed_root={out_root}",
               "preprocess.num_workers=1"]
    done = limited(command, 16 * 1024)  # smaller than one case's image array
    assert done.returncode == 3, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "file-size limit" in done.stderr and "run the same command again" in done.stderr
    out = out_root / dataset.name / "preprocessed" / data_identifier_of(work, dataset.name)
    for path in finished(out):  # whatever was finished reads back whole; nothing is half-written
        if path.suffix == ".npy":
            np.load(path)
    assert not list(out.glob(".tmp-*"))
    assert main(command) == 0
    assert len(list(out.glob("case*_seg.npy"))) == 6


def test_a_full_disk_is_refused_before_preprocessing_starts(planned, tmp_path, monkeypatch, capsys):
    dataset, work = planned
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    out_root = tmp_path / "pre"
    code = main(["preprocess", str(dataset), f"paths.work_root={work}", f"paths.preprocessed_root={out_root}"])
    message = capsys.readouterr().err
    assert code == 3 and "9.8 KB free" in message and "needs about" in message
    assert "paths.preprocessed_root" in message
    assert not finished(out_root)  # not one case written


def test_a_checkpoint_past_a_file_size_limit_leaves_no_corrupt_checkpoint(planned, tmp_path):
    dataset, work = planned
    assert main(["preprocess", str(dataset), f"paths.work_root={work}"]) == 0
    results = tmp_path / "results"
    command = ["train", str(dataset), f"paths.work_root={work}", f"paths.results_root={results}", *QUICK]
    done = limited(command, 200 * 1024)  # the run folder's small files fit, a checkpoint (~1 MB) does not
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and ".ckpt" in done.stderr and "file-size limit" in done.stderr
    fold = results / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
    for path in fold.rglob("*.ckpt"):
        torch.load(path, weights_only=True)
    assert not list(fold.rglob(".tmp-*"))
    assert main(command) == 0  # room again: the same command completes
    assert (fold / "model_final.pt").is_file()


@pytest.fixture(scope="module")
def trained(planned, tmp_path_factory):
    dataset, work = planned
    results = tmp_path_factory.mktemp("trained")
    assert main(["preprocess", str(dataset), f"paths.work_root={work}"]) == 0
    assert main(["train", str(dataset), f"paths.work_root={work}", f"paths.results_root={results}", *QUICK]) == 0
    return dataset, results / dataset.name / "results" / "segment" / "3d_fullres"


def test_masks_past_a_file_size_limit_stop_the_run_and_none_is_corrupt(trained, tmp_path):
    """SimpleITK writes a cut-short NIfTI without an error (and reads it back zero-filled): each mask is checked
    before it takes its name, and a storage failure stops the run instead of failing every case alike."""
    dataset, model = trained
    images = tmp_path / "images"
    images.mkdir()
    for i, source in enumerate(sorted((dataset / "imagesTr").glob("*.nii.gz"))[:3]):
        shutil.copy(source, images / f"scan{i}_0000.nii.gz")
    out = tmp_path / "masks"
    command = ["predict", "-i", str(images), "-o", str(out), "--model", str(model), "predict.mirror=false"]
    done = limited(command, 600)  # a mask of this size takes ~1-2 KB compressed
    assert done.returncode == 3, done.stderr[-2000:]
    assert "could not be written completely" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("could not be written completely") == 1  # stopped at the first, not once per case
    assert not list(out.glob("*.nii.gz")) and not list(out.glob(".tmp-*"))
    assert main([*command, "--continue"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"scan{i}.nii.gz" for i in range(3)]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="runs the commands as uid 65534 through setpriv, which needs root (CI runs as root)")
def test_folders_a_user_cannot_write_are_refused_before_work_starts():
    base = Path(tempfile.mkdtemp(prefix="segforge-readonly-", dir="/tmp"))  # pytest's tmp is root-only (0700)
    try:
        os.chmod(base, 0o755)
        dataset = write_dataset(base / "Dataset001_Tiny", num_train=6, num_test=1)
        work = base / "work"
        assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.features_base=4",
                     "plan.configurations=[3d_fullres]", "preprocess.num_workers=1"]) == 0
        for path in [base, *base.rglob("*")]:
            os.chmod(path, 0o555 if path.is_dir() else 0o444)  # everyone reads, only root writes
        env = {**os.environ, "HOME": "/tmp", "MPLCONFIGDIR": "/tmp/segforge-mpl-nobody", "PYTHONWARNINGS": "ignore"}
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "segforge"]
        cases = {
            "preprocess": ["preprocess", str(dataset), f"paths.work_root={work}",
                           f"paths.preprocessed_root={base / 'elsewhere'}"],
            "train": ["train", str(dataset), f"paths.work_root={work}", *QUICK],
            "predict": ["predict", "-i", str(dataset / "imagesTs"), "-o", str(base / "masks"), "--model",
                        str(work / dataset.name / "results" / "segment" / "3d_fullres")],  # refused before the model is read
        }
        for name, args in cases.items():
            done = subprocess.run([*as_nobody, *args], capture_output=True, text=True, env=env, cwd="/tmp", timeout=300)
            assert done.returncode == 3, (name, done.stderr[-2000:])
            assert "Permission denied" in done.stderr and str(base) in done.stderr, (name, done.stderr)
            assert "Traceback" not in done.stderr, name
        assert not (work / dataset.name / "results").exists()  # train stopped before its run folder
    finally:
        for path in [base, *base.rglob("*")]:
            os.chmod(path, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_stale_temporaries_are_removed_but_another_ranks_write_probe_is_left(tmp_path, monkeypatch):
    """The stale ``.tmp-*`` files of a killed run are removed, write probes (their writer's, e.g. another process
    proving the folder writable) are left alone, and a probe removed by someone else is no write failure. That ranks
    never clean up each other's live temporaries: tests/test_training.py, with 2 real ranks."""
    from segforge.io import storage

    fold = tmp_path / "fold_0"
    (fold / "checkpoints").mkdir(parents=True)
    stale = [fold / "checkpoints" / ".tmp-4242-last.ckpt", fold / ".tmp-progress.png-x"]
    for path in stale:
        path.write_bytes(b"half")
    (fold / ".tmp-dir-x").mkdir()
    probe = fold / f"{storage.PROBE_PREFIX}rank1"
    probe.write_bytes(b"segforge")
    storage.remove_stale_temporaries(fold)
    assert not any(p.exists() for p in stale) and not (fold / ".tmp-dir-x").exists()
    assert probe.exists()

    real_write = os.write

    def write_then_lose_the_probe(fd, data):  # the other rank's clean-up runs between our write and unlink
        for path in fold.glob(f"{storage.PROBE_PREFIX}*"):
            if path != probe:
                path.unlink()
        return real_write(fd, data)

    monkeypatch.setattr(storage.os, "write", write_then_lose_the_probe)
    storage.check_writable(fold, what="this run's checkpoints", setting="paths.results_root=DIR")
