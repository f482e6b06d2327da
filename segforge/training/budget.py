"""A training run inside a wall-clock budget (``budget=15m``): what the budget pays for, and when to stop.

The whole ``segforge train`` command fits the budget, counted from the start of the process: set-up (imports, data,
network), training, and the final sliding-window validation of the fold. Before training starts, the final
validation is estimated from timed forward passes of one window and the number of windows the validation cases
need (mirroring included), times ``budgeting.validation_margin``; training gets the rest (Lightning's ``max_time``),
and the learning-rate schedule spans exactly that time. Validations during training (and ``last.ckpt``, written with
each) are paced by time: each epoch gets ``training_s / budgeting.validations`` seconds' worth of steps at the step
time measured in the epoch before. A resumed run keeps its training clock (Lightning's timer and the schedule restore it), so the budget
counts training time across restarts; each restart pays its own set-up and final validation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import lightning as L
import psutil
import torch

from segforge.configs import packaged_config
from segforge.errors import SegforgeError
from segforge.inference.sliding_window import window_starts


def elapsed_since(started_at: float | None) -> float:
    """Seconds since ``started_at`` (the command's start, epoch seconds), else since this process started."""
    start = started_at if started_at is not None else psutil.Process().create_time()
    return max(0.0, time.time() - start)


@torch.no_grad()
def forward_seconds(network: torch.nn.Module, in_channels: int, patch_size: list[int], batch: int = 1,
                    device: torch.device | str = "cpu", repeats: int | None = None, windows_per_pass: int | None = None,
                    enough_s: float | None = None) -> float:
    """Seconds the sliding window spends on ``batch`` windows: the fastest of ``repeats`` inference passes (after a
    warm-up) of ``windows_per_pass`` windows at a time, as the sliding window runs them (``sw_batch_size``). A
    warm-up pass longer than ``enough_s`` is the measurement (the budget pays for timing: three passes of a full-size
    3D network took a minute on a CPU, and first-call overheads are small beside such a pass). None: configs/train.yaml's
    ``budgeting.forward_repeats``, ``final_validation.sw_batch_size`` and ``budgeting.forward_enough_s``.

    Not timed one window at a time: for a single small input PyTorch takes its im2col convolution on a CPU instead
    of oneDNN's (3-5x slower for a 24x32x28 window with 8 features; the sliding window never runs that path)."""
    packaged = packaged_config("train")
    repeats = int(packaged["budgeting"]["forward_repeats"] if repeats is None else repeats)
    windows_per_pass = packaged["final_validation"]["sw_batch_size"] if windows_per_pass is None else windows_per_pass
    enough_s = float(packaged["budgeting"]["forward_enough_s"] if enough_s is None else enough_s)
    was_training = network.training
    network.eval()
    per_pass = max(int(batch), int(windows_per_pass))
    x = torch.randn(per_pass, in_channels, *patch_size, device=device)
    times = []
    try:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            network(x)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            if times[0] > enough_s:
                break
    finally:
        network.train(was_training)
    return min(times[1:] or times) * batch / per_pass


def validation_windows(shapes: list[list[int]], patch_size: list[int], step_size: float) -> int:
    """Sliding-window positions over the validation cases (at the configuration's grid); a 2D configuration of 3D
    data slides over every slice."""
    total = 0
    for shape in shapes:
        slices, spatial = math.prod(shape[:-len(patch_size)]), shape[-len(patch_size):]
        total += slices * math.prod(len(window_starts(int(s), int(p), step_size)) for s, p in zip(spatial, patch_size))
    return total


@dataclass
class BudgetSplit:
    """How one run spends its budget (seconds); written to training_summary.json beside what it really took."""

    budget_s: float
    setup_s: float                 # spent before training starts
    final_validation_s: float      # reserved: estimate x margin
    finish_s: float                # final checkpoint, exported weights, summary
    training_s: float              # Lightning's max_time; the schedule spans it
    epoch_s: float                 # an epoch (one validation + last.ckpt) every this many seconds
    forward_s: float               # measured: one window forward
    windows: int                   # windows of the final validation (mirrored ones included)
    validation_share: float = 0.1  # validations during training take at most this share of an epoch's time

    def to_json(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def split_budget(budget_s: float, setup_s: float, forward_s: float, windows: int, cases: int, rules) -> BudgetSplit:
    """Training time = budget - set-up so far - final validation (estimated x margin) - finishing."""
    validation = float(rules.validation_margin) * (windows * forward_s + cases * float(rules.seconds_per_case))
    finish = float(rules.finish_s)
    training = budget_s - setup_s - validation - finish
    if training < float(rules.min_training_fraction) * budget_s:
        raise SegforgeError(
            f"budget={budget_s:.0f}s leaves {max(training, 0):.0f} s for training after {setup_s:.0f} s of set-up and "
            f"{validation:.0f} s for the final validation of {cases} case(s). Fix: a larger budget, a budget "
            "configuration planned for it (`segforge plan DATASET budget=...`), or final_validation.enabled=false")
    return BudgetSplit(budget_s, setup_s, validation, finish, training, training / max(1, int(rules.validations)),
                       forward_s, windows, float(rules.validation_share))


class BudgetPacer(L.Callback):
    """Agrees on the training time across ranks (rank 0's split), sets the schedule's clock to it, stops training
    when that clock (restored on resume) reaches it, and paces epochs by time: after each epoch the next one gets
    ``epoch_s`` worth of steps at the step time just measured (rank 0's figure, so every rank agrees; the loaders
    are rebuilt per epoch with ``reload_dataloaders_every_n_epochs=1``). An epoch is not cut short when its steps
    turn out slower than measured: Lightning skips the validation of an epoch ended from ``on_train_batch_start``
    (2.6), so the pace is corrected at the next epoch.

    Validation batches are capped so that a validation takes at most ``validation_share`` of an epoch: first from
    the planned window forward (a batch costs about ``batch_size`` of them), then from the validation batches just
    timed. Lightning validates once more when training stops, and nnU-Net's 25 batches of a full-size 3D patch
    take minutes on a CPU. Training stops when the clock would pass the training time within half of the last
    step, so that a slow step ends the budget on time on average.

    Every number that comes from a clock is rank 0's, broadcast (``setup``: the split each rank timed for itself and
    the first epoch's steps; then the training time, the step counts, the validation cap and the stop): ranks that ran different numbers of steps or validation batches would wait for each other in a
    collective for ever, or drift apart."""

    def __init__(self, split: BudgetSplit, schedule, datamodule, first_epoch_steps: int):
        self.split, self.schedule, self.datamodule = split, schedule, datamodule
        self._val_cap = int(self.datamodule.cfg["val_iterations"])
        self._size_first_epoch(int(first_epoch_steps))
        self._last_end: float | None = None
        self._last_step_s = 0.0
        self._seconds, self._steps = 0.0, 0
        self._validation_start: float | None = None
        self._validation_batches = 0
        self._created = time.monotonic()  # set-up goes on after the split: the trainer, loaders, sanity checks

    def validation_batches(self, batch_s: float | None = None) -> int:
        """Validation batches of ``batch_s`` seconds (default: the planned forward x batch size) that fit the share."""
        if batch_s is None:
            batch_s = self.split.forward_s * int(self.datamodule.batch_size)
        if batch_s <= 0:
            return self._val_cap
        return int(min(self._val_cap, max(1, self.split.validation_share * self.split.epoch_s // batch_s)))

    def _size_first_epoch(self, first_epoch_steps: int) -> None:
        self.datamodule.cfg["iterations_per_epoch"] = first_epoch_steps
        self.datamodule.cfg["val_iterations"] = self.validation_batches()

    def setup(self, trainer, pl_module, stage) -> None:
        # before any loader is made (and before a resumed run restores its epoch's steps over the first epoch's)
        split, first_epoch_steps = trainer.strategy.broadcast(
            (asdict(self.split), int(self.datamodule.cfg["iterations_per_epoch"])), src=0)
        for name, value in split.items():
            setattr(self.split, name, value)
        self._size_first_epoch(int(first_epoch_steps))

    def on_train_start(self, trainer, pl_module) -> None:
        late = time.monotonic() - self._created  # set-up after the budget was split comes out of training time
        self.split.setup_s += late
        self.split.training_s = float(trainer.strategy.broadcast(self.split.training_s - late, src=0))
        self.schedule.max_time_s = self.split.training_s

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last_end, self._seconds, self._steps = None, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self._last_end is not None:  # step + loading + augmentation, the first step of an epoch left out
            self._last_step_s = now - self._last_end
            self._seconds, self._steps = self._seconds + self._last_step_s, self._steps + 1
        self._last_end = now
        due = self.schedule.elapsed() + 0.5 * self._last_step_s >= self.split.training_s
        if trainer.strategy.broadcast(due, src=0):
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        steps = int(self.datamodule.cfg["iterations_per_epoch"])
        if self._steps:
            steps = max(1, round(self.split.epoch_s / (self._seconds / self._steps)))
        # every rank broadcasts, whatever its own count: a collective only some ranks reach never returns
        self.datamodule.cfg["iterations_per_epoch"] = int(trainer.strategy.broadcast(steps, src=0))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._validation_start, self._validation_batches = time.monotonic(), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._validation_batches += 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:  # every rank alike: no collective
            return
        cap = int(self.datamodule.cfg["val_iterations"])
        if self._validation_batches and self._validation_start is not None:
            # the whole validation per batch: reading, transfer and augmentation hooks come before a batch's own hooks
            cap = self.validation_batches((time.monotonic() - self._validation_start) / self._validation_batches)
        self.datamodule.cfg["val_iterations"] = int(trainer.strategy.broadcast(cap, src=0))

    def state_dict(self) -> dict:
        return {"iterations_per_epoch": int(self.datamodule.cfg["iterations_per_epoch"]),
                "val_iterations": int(self.datamodule.cfg["val_iterations"])}

    def load_state_dict(self, state_dict: dict) -> None:
        self.datamodule.cfg["iterations_per_epoch"] = int(state_dict.get("iterations_per_epoch", 1))
        if "val_iterations" in state_dict:  # never above this run's data.val_iterations
            self.datamodule.cfg["val_iterations"] = min(self._val_cap, int(state_dict["val_iterations"]))
