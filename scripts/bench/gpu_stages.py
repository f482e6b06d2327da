"""The measuring pieces of ``scripts/gpu_check.py``: child-process stages and the training step timer.

Imported as ``bench.gpu_stages`` (``scripts/`` on ``sys.path``). The ``stage_*`` functions run in child processes
(``bench.child.run_stage``), so the parent never opens a CUDA context (it would take memory from the card the
plans are sized for). Training is timed by segforge's own ``segforge.training.step_timer.TrainingStepTimer``, loaded through
a ``+callbacks.step_timer`` entry (a command-line ``_target_`` may name only a Lightning or segforge class).
"""

from __future__ import annotations

import os
import time
from pathlib import Path



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

    # TF32 convolutions (cuDNN's default on Ampere and newer, ~1e-3 relative) would make the GPU's float32 network
    # differ from the CPU's on every near-tie voxel: what is checked here is the float16 accumulation, so off
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with timer:
        fast, metrics = _predict(model_dir, image, device, "float16", tie_margin)
    torch.set_num_threads(os.cpu_count() or 1)
    reference, metrics["cpu_float32"] = _predict(model_dir, image, "cpu", "float32", tie_margin)
    metrics["mask_agreement"] = float(np.mean(fast == reference)) if fast.shape == reference.shape else 0.0
    return metrics
