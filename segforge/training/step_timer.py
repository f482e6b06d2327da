"""A callback that times training steps: iterations per second, the time spent waiting for data between steps and
the peak GPU memory, written as JSON when training ends. Add it to any run from the command line:
``segforge train DATASET "+callbacks.step_timer={_target_:segforge.training.step_timer.TrainingStepTimer,path:timing.json}"``
(``scripts/gpu_check.py`` does)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from segforge.io.artifacts import atomic_write_text


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TrainingStepTimer(L.Callback):
    """Iterations per second and loader wait of a training run, written to ``path`` (JSON) when training ends.

    Loader wait: from the end of one step to the start of the next, both synchronised with the GPU (the batch is
    fetched, moved to the device and augmented there in between); its share is the wait over the whole iteration.
    The first ``warmup`` steps (cuDNN autotuning, allocator growth, compilation) are left out."""

    def __init__(self, path: str, warmup: int = 5):
        self.path, self.warmup = Path(path), int(warmup)
        self.waits: list[float] = []
        self.iterations: list[float] = []
        self._last_end = None

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync()
        if self._last_end is not None and batch_idx >= self.warmup:
            self.waits.append(time.perf_counter() - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        now = time.perf_counter()
        if self._last_end is not None and batch_idx >= self.warmup:
            self.iterations.append(now - self._last_end)
        self._last_end = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._last_end = None  # validation runs between epochs: not a loader wait

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        total = sum(self.iterations)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        payload = {"steps_timed": len(self.iterations), "warmup_steps": self.warmup,
                   "iterations_per_s": len(self.iterations) / total if total else None,
                   "loader_wait_share": sum(self.waits) / total if total else None,
                   "loader_wait_s_per_step": sum(self.waits) / len(self.waits) if self.waits else None,
                   "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
                   "precision": str(trainer.precision), "device": str(pl_module.device)}
        atomic_write_text(self.path, json.dumps(payload, indent=2))
