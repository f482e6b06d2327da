"""SLURM without a scheduler: two CPU ranks started as `srun` would start them (its environment, one process per
task), Lightning takes the SLURM environment and trains with DDP (gloo); then the requeue path: SIGUSR1 to every
rank, one checkpoint at the next step boundary (segforge/training/requeue.py), `scontrol requeue` (a stand-in that records the call), the job killed, relaunched, resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segforge.cli.main import main
from segforge.training.run import latest_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], rank: int, job_id: int, port: int, fakebin: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": "segforge-test", "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank),
           "SLURM_LOCALID": str(rank), "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",
           "MASTER_PORT": str(port), "PATH": f"{fakebin}{os.pathsep}{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    handle = open(log, "w")
    return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def catches(pid: int, signum: int) -> bool:
    """Whether a process has a handler installed for ``signum`` (bit signum-1 of SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


def wait_for(condition, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out or a rank failed waiting for {what}")


EPOCHS = 40  # ~0.2-0.5 s each here: the signal lands within a second of the first checkpoint, so mid-run


@pytest.mark.slow
def test_slurm_ranks_train_and_a_requeued_job_resumes(tmp_path):
    from conftest import write_dataset

    dataset = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.features_base=4", "plan.configurations=[3d_fullres]"]) == 0
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (fakebin / "scontrol").chmod(0o755)
    command = [sys.executable, "-m", "segforge", "train", str(dataset), f"paths.work_root={work}", "trainer.accelerator=cpu",
               "trainer.devices=2", "trainer.strategy=ddp", f"trainer.max_epochs={EPOCHS}", "data.iterations_per_epoch=4",
               "data.val_iterations=1", "data.num_workers=0", "optim=adamw_cosine", "final_validation.enabled=false",
               "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]
    fold = work / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
    port = free_port()
    ranks = [launch(command, r, 4242, port, fakebin, tmp_path / f"first_{r}.log") for r in range(2)]
    try:
        # Lightning installs its SLURM handler when fit starts; the first checkpoint puts every rank in the loop
        wait_for(lambda: (fold / "checkpoints" / "last.ckpt").is_file() and all(catches(p.pid, signal.SIGUSR1)
                 for p in ranks), 180, "the first epoch's checkpoint and the ranks' SIGUSR1 handlers", ranks)
        for p in ranks:
            os.kill(p.pid, signal.SIGUSR1)  # what SLURM sends every task before the time limit (--signal=SIGUSR1@90)
        wait_for(lambda: list(fold.glob("hpc_ckpt_*.ckpt")) and (tmp_path / "scontrol.log").is_file(), 120,
                 "the requeue checkpoint", ranks)
    finally:
        for p in ranks:  # the scheduler ends the job and starts it again
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    log = (tmp_path / "first_0.log").read_text()
    assert "SLURM auto-requeueing enabled" in log  # Lightning took the SLURM environment
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in log and not (fold / "training_summary.json").exists()  # stopped, unfinished
    hpc = next(fold.glob("hpc_ckpt_*.ckpt"))
    saved = torch.load(hpc, weights_only=True)["global_step"]
    assert 0 < saved < EPOCHS * 4
    newest = latest_checkpoint(fold)
    port = free_port()
    again = [launch(command, r, 4242, port, fakebin, tmp_path / f"second_{r}.log") for r in range(2)]
    for p in again:
        assert p.wait(timeout=600) == 0, (tmp_path / f"second_{again.index(p)}.log").read_text()[-3000:]
    second = (tmp_path / "second_0.log").read_text()
    # the relaunch continues from the newest state: the requeue checkpoint, or an epoch end written after it
    restored = Path(re.search(r"Restoring states from the checkpoint path at (\S+)", second).group(1))
    assert str(restored) == newest
    first_epoch = int(re.search(r"^epoch (\d+)/", second, re.MULTILINE).group(1))
    assert first_epoch > saved // 4  # not from scratch
    summary = json.loads((fold / "training_summary.json").read_text())
    assert summary["global_step"] == EPOCHS * 4
    assert sorted(p.name for p in (work / dataset.name / "results" / "segment" / "3d_fullres").glob("fold_*")) == ["fold_0"]


def test_one_rank_requeues_at_the_next_step_after_the_signal(tmp_path, monkeypatch):
    """Single process: the handler only flags; the next step boundary saves hpc_ckpt_N (numbered after existing
    ones), asks scontrol to requeue this job (array jobs as ARRAY_TASK), and stops training."""
    from types import SimpleNamespace

    from segforge.training.requeue import RequeueOnSignal

    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (fakebin / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fakebin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    saved = []
    before = signal.getsignal(signal.SIGUSR1)
    trainer = SimpleNamespace(world_size=1, global_step=5, is_global_zero=True, should_stop=False,
                              save_checkpoint=lambda path: saved.append(Path(path).name))
    callback = RequeueOnSignal(tmp_path)
    try:
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert not saved and not trainer.should_stop
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: only a flag
        callback.on_train_batch_end(trainer, None, None, None, 1)
        assert saved == ["hpc_ckpt_2.ckpt"] and trainer.should_stop and callback.requeued
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "7_3"]
        callback.on_train_batch_end(trainer, None, None, None, 2)
        assert saved == ["hpc_ckpt_2.ckpt"]  # once
    finally:
        callback.teardown(trainer, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == before  # the previous handler is back
