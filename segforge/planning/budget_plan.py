"""The budget configuration (``3d_budget``/``2d_budget``): patch, width and precision sized for a training time on
the device at hand, from measured (or stated) step times (``compute.py``), within the memory fit of the
full-resolution configuration whose preprocessed data it shares.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from omegaconf import OmegaConf

from segforge.planning.budget import Fit, PeakOracle
from segforge.planning.fitting import configuration_entry, memory_budget, stage_cap, step_spec
from segforge.planning.topology import features_per_stage, patch_candidates


def budget_configuration(spacing: list[float], median_shape: list[float], full: Fit, rules, in_channels: int,
                         num_classes: int, num_cases: int, budget_s: float, slices_per_case: float = 1.0,
                         gpu_precision: tuple[str, str] = ("16-mixed", "")) -> dict:
    """A configuration sized for ``budget_s`` seconds of training on the device at hand (``compute.py``), at the
    full-resolution spacing (it shares that configuration's preprocessed data) and within its memory fit;
    ``gpu_precision``: (precision, why) of the GPU a stated throughput (``compute.tflops``) is for."""
    from segforge.inference.sliding_window import window_starts
    from segforge.planning.compute import (
        Candidate,
        ComputeBudget,
        StepTimer,
        choose_for_budget,
        choose_precision,
        measure_step_seconds,
        step_flops,
    )

    compute = rules.compute
    device = torch.device("cuda" if str(compute.device) == "auto" and torch.cuda.is_available()
                          else "cpu" if str(compute.device) == "auto" else str(compute.device))
    dims = len(spacing)
    target_voxels = float(rules.initial_patch_voxels_2d if dims == 2 else rules.initial_patch_voxels_3d)
    max_stages = stage_cap(rules, dims)
    patches = [(p, t) for p, t in patch_candidates(spacing, median_shape, target_voxels, int(rules.min_feature_map), max_stages)
               if math.prod(p) <= math.prod(full.spec.patch_size)
               and math.prod(p) > math.prod(t["total_pooling"]) and len(t["strides"]) >= 3]  # a U-Net, normable
    if not patches:
        raise ValueError(f"no patch of at least 3 U-Net stages fits the median image {median_shape} for a budget configuration")
    # a patch floor (plan.compute.min_coverage_2d/_3d): below it a patch sees too little context to learn from,
    # however many steps it buys; the largest patch stays when none reaches the floor
    floor = float(compute.min_coverage_2d if dims == 2 else compute.min_coverage_3d) * math.prod(median_shape)
    patches = [pt for pt in patches if math.prod(pt[0]) >= floor] or patches[:1]
    measure = (lambda spec, **kwargs: measure_step_seconds(spec, device, **kwargs)) if not compute.tflops else None
    # precision is measured on a mid-sized step (plan.compute.precision_probe)
    sizes = compute.precision_probe
    probe_voxels = float(sizes.voxels_3d if dims == 3 else sizes.voxels_2d)
    probe_patch, probe_topo = min(patches, key=lambda pt: abs(math.log(math.prod(pt[0]) / probe_voxels)))
    probe = replace(step_spec(probe_patch, probe_topo, rules, in_channels, num_classes, int(compute.batch_size)),
                    features_per_stage=tuple(features_per_stage(len(probe_topo["strides"]), int(sizes.features_base),
                                                                int(sizes.features_max))),
                    optimizer=str(compute.optimizer))
    if compute.tflops:
        precision, why = gpu_precision if str(compute.precision) == "auto" else (str(compute.precision), "plan.compute.precision")
        precision_reason = f"stated throughput (plan.compute.tflops): {why}"
    else:
        precision, precision_reason = choose_precision(probe, device, measure, str(compute.precision))
    cap = int(rules.features_max_2d if dims == 2 else rules.features_max_3d)
    candidates = []
    for width in compute.features_base:
        for patch, topo in patches:
            spec = replace(step_spec(patch, topo, rules, in_channels, num_classes, int(compute.batch_size)),
                           features_per_stage=tuple(features_per_stage(len(topo["strides"]), int(width),
                                                                       max(int(width), cap * int(width) // int(rules.features_base)))),
                           precision=precision, optimizer=str(compute.optimizer))
            # a 2D configuration of 3D data validates every slice of a case
            windows = round(slices_per_case) * math.prod(len(window_starts(round(m), p, 0.5))
                                                         for m, p in zip(median_shape, patch))
            candidates.append(Candidate(spec, min(1.0, math.prod(patch) / max(math.prod(median_shape), 1.0)), windows))
    budget = ComputeBudget(float(budget_s), int(compute.target_iterations), float(compute.coverage_goal),
                           float(compute.setup_s), max(1, math.ceil(num_cases / int(compute.num_folds))), device.type,
                           float(compute.loop_overhead[device.type]))
    timer = StepTimer(measure, float(compute.tflops) if compute.tflops else None)
    chosen = choose_for_budget(candidates, budget, timer)
    spec = chosen["candidate"].spec
    memory_rules = OmegaConf.merge(rules, {"memory": {"precision": precision, "optimizer": str(compute.optimizer)}})
    oracle = PeakOracle(str(rules.memory.method), timeline=bool(rules.memory.timeline))
    fit = Fit(0, spec, oracle(spec), memory_budget(rules).fits(oracle(spec)))
    entry = configuration_entry(fit, spacing, median_shape, memory_rules, oracle)
    entry["data_identifier"] = "3d_fullres" if dims == 3 else "2d"
    entry["precision"], entry["precision_reason"] = precision, precision_reason
    entry["sized_for"] = {
        "device": device.type, "budget_s": float(budget_s), "throughput": "stated" if compute.tflops else "measured",
        "tflops": float(compute.tflops) if compute.tflops else round(step_flops(spec) / chosen["step_s"] / 1e12, 4),
        "step_s": round(chosen["step_s"], 4), "expected_iterations": chosen["expected_iterations"],
        "target_iterations": budget.target_iterations, "final_validation_s": round(chosen["validation_s"], 1),
        "setup_s": budget.setup_s, "loop_overhead": budget.loop_overhead, "torch_threads": torch.get_num_threads(), "precision_reason": precision_reason,
        "reason": chosen["reason"], "steps_measured": len(timer.measured), "candidates": len(candidates),
    }
    return entry
