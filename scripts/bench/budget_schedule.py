"""The ``nnunet`` budget arm's schedule arithmetic, pure (no torch, no nnunetv2): epochs x iterations per epoch
that fill the time left (``plan_schedule``), the windows of nnU-Net's sliding window (``sliding_window_tiles``) and
the time of its final validation (``validation_seconds_estimate``). Used by ``bench.budget_nnunet_trainer`` in the
training child; tested in ``tests/test_bench_budget.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Schedule:
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    train_iterations: int          # epochs x iterations per epoch (the probe's steps come on top)
    predicted_seconds: float       # of those epochs

    def as_json(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def plan_schedule(available_seconds: float, seconds_per_iteration: float, seconds_per_val_iteration: float,
                  epoch_overhead_seconds: float = 1.0, target_epochs: int = 20, min_iterations_per_epoch: int = 5,
                  max_iterations_per_epoch: int = 250, val_ratio: float = 0.04) -> Schedule:
    """Epochs x iterations per epoch that fill ``available_seconds`` (the budget minus what was used and what the
    end needs) at the measured step times.

    * nnU-Net's 250 iterations per epoch when the budget buys ``target_epochs`` epochs of them; otherwise fewer
      iterations per epoch (at least ``min_iterations_per_epoch``), so that the poly learning rate (a function
      of the epoch) still decays in about ``target_epochs`` steps instead of staying near 0.01 for 1-2 epochs;
    * validation iterations per epoch (nnU-Net: 50 per 250, only for its pseudo-Dice log and checkpoint_best,
      which the benchmark does not use) cut to ``val_ratio`` of the training iterations, at least 1;
    * ``epoch_overhead_seconds`` per epoch: nnU-Net's logging, progress plot and checkpoint_best;
    * always at least one epoch: if not even ``min_iterations_per_epoch`` fit, one epoch of as many iterations
      as fit (at least 1).
    """
    if seconds_per_iteration <= 0:
        raise ValueError("seconds_per_iteration must be > 0")
    available = max(0.0, float(available_seconds))
    s_it, s_val = float(seconds_per_iteration), max(0.0, float(seconds_per_val_iteration))

    def val_iterations(ipe: int) -> int:
        return max(1, int(round(ipe * val_ratio)))

    def epoch_seconds(ipe: int) -> float:
        return ipe * s_it + val_iterations(ipe) * s_val + epoch_overhead_seconds

    affordable = available / (s_it + val_ratio * s_val)  # steps if all of it went to training
    ipe = int(min(max_iterations_per_epoch, max(min_iterations_per_epoch, affordable // max(1, target_epochs))))
    epochs = int(available // epoch_seconds(ipe))
    if epochs < 1:
        ipe = max(1, int((available - epoch_overhead_seconds - s_val) // s_it))
        epochs = 1
    return Schedule(epochs, ipe, val_iterations(ipe), epochs * ipe, epochs * epoch_seconds(ipe))


def sliding_window_tiles(image_size, patch_size, step_size: float = 0.5) -> int:
    """Windows nnU-Net's sliding window predicts for an image (its ``compute_steps_for_sliding_window``; an axis
    shorter than the patch is padded to it: one window)."""
    tiles = 1
    for image, patch in zip(image_size, patch_size):
        tiles *= 1 if image <= patch else int(math.ceil((image - patch) / (patch * step_size))) + 1
    return tiles


def validation_seconds_estimate(cases: int, tiles_per_case: int, mirror_passes: int, seconds_per_forward: float,
                                per_case_seconds: float = 2.0, fixed_seconds: float = 15.0) -> float:
    """nnU-Net's final validation (``perform_actual_validation``: mirrored sliding window on the fold's validation
    cases, export in a spawned pool, metrics): the forwards plus per-case export and the pool's start-up."""
    return cases * (tiles_per_case * mirror_passes * seconds_per_forward + per_case_seconds) + fixed_seconds
