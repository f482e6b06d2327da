"""Schedules as functions of training progress, so epoch-based and time-budgeted runs share one mechanism.

Progress is a fraction in [0, 1]: the further of ``step / total_steps`` and ``elapsed / max_time``. A learning-rate
schedule maps progress to a factor of the base rate; the ``ScheduleCallback`` applies it before every step and
keeps its clock in the checkpoint, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
import time

import lightning as L



def training_progress(step: int, total_steps: int | None, elapsed_s: float = 0.0, max_time_s: float | None = None) -> float:
    fractions = [0.0]
    if total_steps:
        fractions.append(step / total_steps)
    if max_time_s:
        fractions.append(elapsed_s / max_time_s)
    return min(1.0, max(fractions))


def lr_factor(progress: float, schedule: str = "poly", poly_exponent: float = 0.9, warmup_fraction: float = 0.0) -> float:
    """Factor of the base learning rate at ``progress`` (linear warm-up first, when asked)."""
    if warmup_fraction > 0 and progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    p = (progress - warmup_fraction) / (1 - warmup_fraction) if warmup_fraction > 0 else progress
    p = min(max(p, 0.0), 1.0)
    if schedule == "poly":
        return (1 - p) ** poly_exponent
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; use poly, cosine or constant")


class ScheduleCallback(L.Callback):
    """Sets every parameter group's learning rate from training progress before each optimizer step."""

    def __init__(self, schedule: str, poly_exponent: float, warmup_fraction: float, total_steps: int | None,
                 max_time_s: float | None):
        self.schedule, self.poly_exponent, self.warmup_fraction = schedule, poly_exponent, warmup_fraction
        self.total_steps, self.max_time_s = total_steps, max_time_s
        self.elapsed_before = 0.0  # seconds trained before this process (restored on resume)
        self._started = None

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._started if self._started else 0.0)

    def progress(self, step: int) -> float:
        return training_progress(step, self.total_steps, self.elapsed(), self.max_time_s)

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.monotonic()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        elapsed = self.elapsed()
        if self.max_time_s and trainer.world_size > 1:  # rank 0's clock: the ranks' weights stay the same
            elapsed = float(trainer.strategy.broadcast(elapsed, src=0))
        progress = training_progress(trainer.global_step, self.total_steps, elapsed, self.max_time_s)
        factor = lr_factor(progress, self.schedule, self.poly_exponent, self.warmup_fraction)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
        pl_module.log("lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False, prog_bar=False)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.elapsed_before = float(state_dict.get("elapsed_s", 0.0))
