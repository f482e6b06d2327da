"""The measuring pieces of ``scripts/gpu_check.py``: child-process stages and the training step timer.

Imported as ``bench.gpu_stages`` (``scripts/`` on ``sys.path``). The ``stage_*`` functions run in child processes
(``bench.child.run_stage``), so the parent never opens a CUDA context (it would take memory from the card the
plans are sized for). ``StepTimer`` is a Lightning callback that ``segforge train`` loads through
``callbacks.extra=[{_target_:bench.gpu_stages.StepTimer,...}]``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
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
        self.path.write_text(json.dumps(payload, indent=2))


def stage_device_info(timer) -> dict:
    """The CUDA card (name, free and total bytes) or None, from a child process."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        free, total = torch.cuda.mem_get_info()
        info.update(name=torch.cuda.get_device_name(), free_bytes=int(free), total_bytes=int(total))
    return info


def stage_verify_cpu(timer, plans_paths: list[str]) -> dict:
    """``plan --verify`` off a GPU: each planned step really run on the CPU under the planner's own tracker."""
    from segforge.io.artifacts import read_json
    from segforge.planning.memory import measured_peak_bytes, spec_from_plan

    verified = {}
    for path in plans_paths:
        plans = read_json(Path(path), "plans")
        rows = verified.setdefault(path, {})
        for name, conf in plans["configurations"].items():
            predicted = conf["memory"]["predicted_peak_bytes"]
            measured = measured_peak_bytes(spec_from_plan(plans, name))
            rows[name] = {"predicted_peak_bytes": predicted, "measured_peak_bytes": measured, "ratio": measured / predicted}
    return verified


def _predict(model_dir: str, image: str, device: str, accumulate: str, tie_margin: float):
    import torch

    from segforge.inference.predictor import Predictor

    predictor = Predictor.from_model_dir(model_dir, folds=[0], device=device, mirror=True, accumulate=accumulate)
    if predictor.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    probabilities, _ = predictor.probabilities(image)
    mask = predictor.labels(probabilities)
    wall = time.perf_counter() - start
    network = predictor.last_timings["network"]
    top = torch.topk(probabilities, 2, dim=0).values if probabilities.shape[0] > 1 else None
    return mask, {"wall_s": wall, "network_s": network, "non_network_share": 1.0 - network / wall,
                  "nan_voxels": int(torch.isnan(probabilities).sum()), "shape": list(mask.shape),
                  "device": predictor.device.type, "accumulate": accumulate, "mirror": True,
                  "threads": torch.get_num_threads(),
                  # voxels whose two likeliest classes are this close: where float16 sums may flip the label
                  "near_tie_share": float(((top[0] - top[1]) < tie_margin).float().mean()) if top is not None else 0.0,
                  "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if predictor.device.type == "cuda" else None}


def stage_predict(timer, model_dir: str, image: str, device: str, tie_margin: float) -> dict:
    """One volume predicted as ``segforge predict`` would (fold 0, Gaussian windows, mirroring) on ``device`` with
    float16 accumulation (timed: wall, the network's share, NaN, peak GPU memory), then on the CPU in float32 with
    every core: the share of voxels on which the two masks agree."""
    import numpy as np
    import torch

    with timer:
        fast, metrics = _predict(model_dir, image, device, "float16", tie_margin)
    torch.set_num_threads(os.cpu_count() or 1)
    reference, metrics["cpu_float32"] = _predict(model_dir, image, "cpu", "float32", tie_margin)
    metrics["mask_agreement"] = float(np.mean(fast == reference)) if fast.shape == reference.shape else 0.0
    return metrics
