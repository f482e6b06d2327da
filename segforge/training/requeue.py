"""SLURM requeue at a step boundary: the signal only raises a flag; all ranks agree on it after a training step,
save one checkpoint together, the first rank asks SLURM to requeue the job, and training stops cleanly.

Why not Lightning's own handler: it saves the checkpoint inside the signal handler. A rank that receives the
signal between two collectives enters the checkpoint's barrier while another is still inside a gradient all-reduce,
and the job hangs (seen with two gloo ranks on a loaded machine). Here the checkpoint is written where every rank
is at the same point of the step, and the flag is exchanged with one tiny all-reduce every few steps.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("segforge")


def slurm_requeue_wanted() -> bool:
    """Inside a SLURM job (not an interactive `srun bash`) whose requeue Lightning would also handle."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect() and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def next_hpc_path(folder: Path) -> Path:
    numbers = [int(m.group(1)) for p in folder.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class RequeueOnSignal(L.Callback):
    """Installed before ``fit`` (so Lightning keeps its hands off SIGUSR1): on the signal, checkpoint
    ``hpc_ckpt_N.ckpt`` into ``folder`` at the next step boundary, `scontrol requeue`, stop."""

    def __init__(self, folder: Path, signum: int = signal.SIGUSR1, every_n_steps: int = 10):
        self.folder, self.signum, self.every_n_steps = Path(folder), signum, every_n_steps
        self.received = False
        self.requeued = False
        self.previous = signal.signal(signum, self._flag)

    def _flag(self, signum, frame) -> None:
        self.received = True

    def _agreed(self, trainer) -> bool:
        """Whether any rank got the signal. With several ranks they compare every ``every_n_steps`` steps (the same
        steps on every rank), so the all-reduce and its device sync do not come with every step."""
        if trainer.world_size == 1:
            return self.received
        if trainer.global_step % self.every_n_steps:
            return False
        flag = torch.tensor([1.0 if self.received else 0.0], device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max").item() > 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.requeued or not self._agreed(trainer):
            return
        path = next_hpc_path(self.folder)
        trainer.save_checkpoint(path)
        self.requeued = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode == 0:
                log.info("signal %d: saved %s and requeued SLURM job %s", self.signum, path.name, job)
            else:
                log.warning("signal %d: saved %s; `scontrol requeue %s` failed (%s): resubmit the same command",
                            self.signum, path.name, job, done.stderr.strip())

    def teardown(self, trainer, pl_module, stage) -> None:
        signal.signal(self.signum, self.previous if self.previous is not None else signal.SIG_DFL)
