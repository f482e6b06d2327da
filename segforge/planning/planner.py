"""Plans: pure functions from a fingerprint and the planner's rules (``plan`` config) to named configurations.

Target spacing, topology, patch candidates, lowres spacing and normalisation follow nnU-Net's rules (written
here as small functions so each can be tested and changed from the config). Where nnU-Net guesses, segforge
measures: the patch and batch size come from the traced peak memory of the real training step (``budget.py``,
``memory.py``), recorded in each configuration's ``memory`` entry.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segforge.configs import packaged_defaults
from segforge.io.dataset import count_outputs
from segforge.planning.budget import (
    Fit,
    MemoryBudget,
    PeakOracle,
    choose_batch,
    choose_candidate,
    describe,
)
from segforge.planning.fingerprint import clip_keys
from segforge.planning.memory import StepSpec, rules_encoder
from segforge.planning.precision import planned_precision
from segforge.preprocessing.pipeline import data_identifier
from segforge.preprocessing.resample import resampling_modes, with_default_rules

log = logging.getLogger(__name__)

CT_NAMES = ("ct", "computed tomography")


def target_spacing(spacings: list[list[float]], shapes: list[list[int]], anisotropy_threshold: float = 3.0) -> list[float]:
    """Per-axis median spacing; on a very anisotropic, short axis the 10th percentile (never finer than the rest)."""
    spacings_arr, shapes_arr = np.asarray(spacings, float), np.asarray(shapes, float)
    target = np.median(spacings_arr, axis=0)
    median_shape = np.median(shapes_arr, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    if others and target[worst] > anisotropy_threshold * max(target[others]) and \
            median_shape[worst] * anisotropy_threshold < min(median_shape[others]):
        target[worst] = max(np.percentile(spacings_arr[:, worst], 10), max(target[others]))
    return [float(v) for v in target]


def topology(patch_size: list[int], spacing: list[float], min_feature_map: int = 4, max_stages: int | None = None) -> dict:
    """Per-stage strides and kernel sizes for ``patch_size`` at ``spacing``: nnU-Net v2's ``get_pool_and_conv_props``.

    Each stage pools the axes whose feature map is at least 2x ``min_feature_map`` long and whose spacing is within
    2x of the finest of those axes; a single such axis pools only while at least 3x ``min_feature_map`` long (its
    rule), and sizes round up (``ceil``) as nnU-Net's do. An axis's kernel is 1 until its spacing comes within 2x of
    the finest axis, then 3 for good; the bottleneck's kernel is always 3. ``max_stages`` (nnU-Net has none)
    optionally caps the number of stages.
    """
    dims = len(patch_size)
    size, current = [float(s) for s in patch_size], [float(c) for c in spacing]
    kernel, kernels, strides = [1] * dims, [], [[1] * dims]
    while max_stages is None or len(strides) < max_stages:
        poolable = [a for a in range(dims) if size[a] >= 2 * min_feature_map]
        if not poolable:
            break
        finest = min(current[a] for a in poolable)
        pool = [a for a in poolable if current[a] / finest < 2]
        if len(pool) == 1 and size[pool[0]] < 3 * min_feature_map:
            break
        kernel = [3 if kernel[a] == 3 or current[a] / min(current) < 2 else 1 for a in range(dims)]
        kernels.append(kernel)
        stride = [2 if a in pool else 1 for a in range(dims)]
        size = [math.ceil(s / st) for s, st in zip(size, stride)]
        current = [c * st for c, st in zip(current, stride)]
        strides.append(stride)
    kernels.append([3] * dims)  # the bottleneck
    total = [math.prod(s[a] for s in strides) for a in range(dims)]
    return {"strides": strides, "kernel_sizes": kernels, "total_pooling": total}


def divisible_patch(patch_size: list[int], total_pooling: list[int]) -> list[int]:
    """``patch_size`` padded up to the next multiple of the total pooling per axis (nnU-Net's rule)."""
    return [max(t, math.ceil(p / t) * t) for p, t in zip(patch_size, total_pooling)]


def initial_patch(spacing: list[float], median_shape: list[float], target_voxels: float) -> list[int]:
    """An isotropic-in-millimetres patch of ``target_voxels`` voxels, clipped to the median image."""
    inverse = 1.0 / np.asarray(spacing, float)
    patch = inverse * (target_voxels / np.prod(inverse)) ** (1.0 / len(spacing))
    return [max(1, min(int(round(p)), int(round(m)))) for p, m in zip(patch, median_shape)]


def patch_candidates(spacing: list[float], median_shape: list[float], target_voxels: float,
                     min_feature_map: int, max_stages: int | None = None) -> list[tuple[list[int], dict]]:
    """nnU-Net's shrinking sequence, largest first: each step takes the total pooling off the axis with the
    largest patch-to-median ratio, re-derives the topology and pads the patch to be divisible again."""
    def settle(patch):
        topo = topology(patch, spacing, min_feature_map, max_stages)
        return divisible_patch(patch, topo["total_pooling"]), topo

    patch, topo = settle(initial_patch(spacing, median_shape, target_voxels))
    candidates = [(patch, topo)]
    while True:
        ratios = [p / max(m, 1.0) for p, m in zip(patch, median_shape)]
        for axis in sorted(range(len(patch)), key=lambda a: -ratios[a]):
            smaller = list(patch)
            smaller[axis] -= topology(smaller, spacing, min_feature_map, max_stages)["total_pooling"][axis]
            if smaller[axis] >= 1:
                smaller_topo = topology(smaller, spacing, min_feature_map, max_stages)
                smaller = list(patch)
                smaller[axis] -= smaller_topo["total_pooling"][axis]
            if smaller[axis] >= 1:
                new_patch, new_topo = settle(smaller)
                if math.prod(new_patch) < math.prod(patch):
                    break
        else:
            return candidates
        patch, topo = new_patch, new_topo
        candidates.append((patch, topo))


def features_per_stage(num_stages: int, base: int, cap: int) -> list[int]:
    return [min(base * 2**i, cap) for i in range(num_stages)]


SCHEMES = ("ct", "zscore", "global", "rescale", "none")
# nnU-Net's channel-name conventions, so its datasets plan the same way
NAME_TO_SCHEME = {"ct": "ct", "computed tomography": "ct", "nonorm": "none", "none": "none",
                  "rescale_to_0_1": "rescale", "rgb_to_0_1": "rescale", "rescale": "rescale", "zscore": "zscore",
                  "global": "global"}


def normalization_scheme(channel_name: str) -> str:
    return NAME_TO_SCHEME.get(channel_name.strip().lower(), "zscore")


def plan_normalization(fingerprint: dict, median_relative_size: float, overrides=None, denoising: bool = False,
                       nonzero_mask_threshold: float | None = None) -> list[dict]:
    """Per channel: CT (clip to the foreground percentiles the fingerprint took, ``fingerprint.clip_percentiles``,
    z-score with the foreground mean/std), per-image z-score (inside the nonzero mask when cropping kept less than
    ``nonzero_mask_threshold`` of the median image, default ``plan.nonzero_mask_threshold``), global (z-score with the dataset's foreground
    mean/std, no clipping), rescale to [0, 1], or none. The scheme follows the channel name in dataset.json;
    ``overrides`` (channel index or name -> scheme) wins. ``denoising`` (``plan DATASET task=denoise``): global
    instead of per-image z-score, since a denoiser's input and output must share one intensity map whatever the
    image's noise and field of view (per-image statistics change with both)."""
    overrides = {str(k): str(v) for k, v in dict(overrides or {}).items()}
    if nonzero_mask_threshold is None:
        nonzero_mask_threshold = packaged_defaults("plan")["nonzero_mask_threshold"]
    low_key, high_key = clip_keys(fingerprint)
    out = []
    for index, name in sorted(fingerprint["channel_names"].items(), key=lambda kv: int(kv[0])):
        stats = fingerprint["intensity_foreground"][index]
        default = normalization_scheme(name)
        scheme = overrides.get(str(index), overrides.get(name, "global" if denoising and default == "zscore" else default))
        if scheme not in SCHEMES:
            raise ValueError(f"plan.normalization for channel {index} ({name}) is {scheme!r}; use one of {list(SCHEMES)}")
        entry = {"channel": int(index), "name": name, "scheme": scheme}
        if scheme == "ct":
            entry.update(clip=[stats[low_key], stats[high_key]], mean=stats["mean"], std=stats["std"])
        elif scheme == "global":
            entry.update(mean=stats["mean"], std=stats["std"])
        elif scheme == "zscore":
            entry["use_nonzero_mask"] = bool(median_relative_size < float(nonzero_mask_threshold))
        out.append(entry)
    return out


def memory_budget(rules) -> MemoryBudget:
    """The budget from ``plan.gpu`` (a preset name) or ``plan.gpu_memory_gb``, with the memory rules."""
    gpu_gb = float(rules.gpu_memory_gb)
    if rules.get("gpu"):
        presets = {str(k).lower(): v for k, v in dict(rules.gpu_presets).items()}
        name = str(rules.gpu).lower()
        if name not in presets:
            raise ValueError(f"unknown plan.gpu={rules.gpu!r}; presets: {', '.join(sorted(presets))} "
                             "(or set plan.gpu_memory_gb to any value)")
        gpu_gb = float(presets[name])
    if gpu_gb <= float(rules.memory.reserved_gb):
        raise ValueError(f"plan.gpu_memory_gb={gpu_gb} leaves nothing after plan.memory.reserved_gb={rules.memory.reserved_gb}")
    return MemoryBudget(gpu_gb, float(rules.memory.reserved_gb), float(rules.memory.margin))


def step_spec(patch: list[int], topo: dict, rules, in_channels: int, num_classes: int, batch_size: int) -> StepSpec:
    """The training step a candidate patch and topology describe; ``rules.denoiser_step`` (``plan DATASET
    task=denoise``) makes it the denoising task's step (``Denoiser``, its norm, attention and conditioning)."""
    dims = len(patch)
    cap = rules.features_max_2d if dims == 2 else rules.features_max_3d
    denoiser = rules.get("denoiser_step") if hasattr(rules, "get") else None
    spec = StepSpec(
        spatial_dims=dims, in_channels=in_channels, num_classes=num_classes, patch_size=tuple(patch),
        batch_size=batch_size,
        features_per_stage=tuple(features_per_stage(len(topo["strides"]), int(rules.features_base), int(cap))),
        kernel_sizes=tuple(tuple(k) for k in topo["kernel_sizes"]), strides=tuple(tuple(s) for s in topo["strides"]),
        conv_per_stage=int(rules.conv_per_stage), norm=str(rules.norm), deep_supervision=bool(rules.deep_supervision),
        precision=str(rules.memory.precision), optimizer=str(rules.memory.optimizer),
        **rules_encoder(rules, len(topo["strides"])))
    return replace(spec, **(OmegaConf.to_container(denoiser) if isinstance(denoiser, DictConfig) else dict(denoiser))) \
        if denoiser else spec


def stage_cap(rules, dims: int) -> int | None:
    """``plan.max_stages_2d``/``_3d``: None (nnU-Net: no cap, the min feature map limits the depth) or a number."""
    cap = rules.get("max_stages_2d" if dims == 2 else "max_stages_3d")
    return None if cap is None else int(cap)


def fit_configuration(spacing: list[float], median_shape: list[float], rules, in_channels: int, num_classes: int,
                      dataset_voxels: float, oracle: PeakOracle) -> Fit:
    """Patch, topology and batch for one configuration at ``spacing`` (2 or 3 axes), fitted to the budget."""
    dims = len(spacing)
    target_voxels = float(rules.initial_patch_voxels_2d if dims == 2 else rules.initial_patch_voxels_3d)
    max_stages = stage_cap(rules, dims)
    candidates = patch_candidates(spacing, median_shape, target_voxels, int(rules.min_feature_map), max_stages)
    batch_min = int(rules.batch_size_min)
    specs = [step_spec(p, t, rules, in_channels, num_classes, batch_min) for p, t in candidates]
    budget = memory_budget(rules)
    fit = choose_candidate(specs, budget, oracle)
    # no more per step than covers a share of the dataset's voxels (nnU-Net: 5%)
    batch_max = max(batch_min, int(float(rules.max_dataset_coverage) * dataset_voxels // math.prod(fit.spec.patch_size)))
    return choose_batch(fit, budget, oracle, batch_min, batch_max)


def configuration_entry(fit: Fit, spacing: list[float], median_shape: list[float], rules, oracle: PeakOracle) -> dict:
    spec, dims = fit.spec, fit.spec.spatial_dims
    if not fit.fits:
        log.warning("no %dD patch fits plan.gpu_memory_gb=%s; using the smallest candidate %s", dims,
                    rules.gpu_memory_gb, list(spec.patch_size))
    return {
        "dims": dims,
        "target_spacing": [None] + list(spacing) if dims == 2 else list(spacing),
        "median_shape": [float(s) for s in median_shape],
        "patch_size": list(spec.patch_size),
        "batch_size": spec.batch_size,
        "batch_size_is_per_device": True,  # under DDP every device takes a batch this size
        "patch_covers_median_fraction": float(math.prod(spec.patch_size) / max(math.prod(median_shape), 1.0)),
        "mirror_axes": list(range(dims)),
        "network": {
            "features_per_stage": list(spec.features_per_stage),
            "kernel_sizes": [list(k) for k in spec.kernel_sizes],
            "strides": [list(s) for s in spec.strides],
            "conv_per_stage": spec.conv_per_stage,
            "norm": spec.norm,
            "deep_supervision": spec.deep_supervision,
            "encoder": spec.encoder,  # plain | residual: what the memory was traced for (model.encoder=null trains it)
            "blocks_per_stage": list(spec.blocks_per_stage) if spec.blocks_per_stage is not None else None,
        },
        "memory": describe(fit, memory_budget(rules), spec.precision, spec.optimizer, oracle.method),
    }


def lowres_spacing(spacing: list[float], median_shape: list[float], fullres: Fit, rules, in_channels: int,
                   num_classes: int, dataset_voxels: float) -> list[float] | None:
    """nnU-Net's 3d_lowres spacing: coarsen (anisotropic axes first) by ``lowres_spacing_step`` until the patch
    covers ``lowres_threshold`` of the median image; None when that image is not at least 2x smaller.

    The search uses the analytic proxy calibrated on the traced fullres plan (the final lowres plan is traced)."""
    proxy = PeakOracle.calibrated(fullres.spec, fullres.peak_bytes)
    full = np.asarray(spacing, float)
    current = full.copy()
    full_voxels = math.prod(median_shape)
    for _ in range(1000):
        coarse = current.max() / current > 2
        current = current * np.where(coarse, rules.lowres_spacing_step, 1.0) if coarse.any() \
            else current * rules.lowres_spacing_step
        shape = list(full / current * np.asarray(median_shape))
        scale = float(np.prod(full / current))
        fit = fit_configuration(list(current), shape, rules, in_channels, num_classes, dataset_voxels * scale, proxy)
        if math.prod(fit.spec.patch_size) / max(math.prod(shape), 1.0) >= float(rules.lowres_threshold):
            break
    if math.prod(shape) * 2 > full_voxels:
        return None
    return [float(v) for v in current]


def resampling_rules(rules) -> dict:
    """The ``resampling`` entry of plans.json: the plan config's rules (over the packaged ones), checked."""
    settings = with_default_rules(OmegaConf.to_container(rules) if isinstance(rules, DictConfig) else dict(rules or {}))
    resampling_modes([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], settings)  # raises on an unknown mode
    return settings


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


CASCADE = "3d_cascade_fullres"


def previous_stage_labels(labels: dict) -> list[int]:
    """The label values a cascade stage gets as one-hot input channels: every value but background and ignore
    (nnU-Net's foreground labels), in increasing order."""
    ignore = labels.get("ignore")
    values = {int(m) for k, v in labels.items() if k != "ignore" for m in (v if isinstance(v, list) else [v])}
    return sorted(v for v in values if v != 0 and v != ignore)


def add_cascade(configurations: dict, labels: dict) -> None:
    """nnU-Net's cascade: ``3d_cascade_fullres`` is 3d_fullres (its preprocessed data, patch and network) whose input
    also holds the one-hot 3d_lowres prediction (``previous_stage_labels`` channels); 3d_lowres names it as its
    ``next_stage``, so its final validation writes the predictions the cascade trains on. The memory entry is
    3d_fullres' (the extra input channels change only the first convolution)."""
    full = configurations["3d_fullres"]
    configurations[CASCADE] = {**json.loads(json.dumps(full)), "data_identifier": full.get("data_identifier", "3d_fullres"),
                               "previous_stage": "3d_lowres", "previous_stage_labels": previous_stage_labels(labels)}
    configurations["3d_lowres"]["next_stage"] = [CASCADE]


def make_plans(fingerprint: dict, rules, budget_s: float | None = None) -> dict:
    """plans.json's payload from a fingerprint and the ``plan`` config group; with ``budget_s``, also a
    configuration sized for that many seconds of training on this device (``3d_budget``, or ``2d_budget``).
    Each configuration records its precision and why; its memory is traced at it."""
    given = rules
    gpu_precision = planned_precision(rules)
    rules = OmegaConf.merge(rules, {"memory": {"precision": gpu_precision[0]}})
    cases = fingerprint["cases"]
    spacings = [c["spacing"] for c in cases]
    # a denoising plan keeps whole images (no crop to the nonzero box): their shapes are what the network sees
    shapes = [c["shape_before_crop" if rules.get("denoiser_step") else "shape_after_crop"] for c in cases]
    spacing = list(rules.target_spacing) if rules.target_spacing else target_spacing(spacings, shapes, rules.anisotropy_threshold)
    # shapes at the target spacing (a fake z axis of a 2D dataset keeps its single slice)
    resampled = [[s * sp / t if sp != t else s for s, sp, t in zip(shape, sps, spacing)] for shape, sps in zip(shapes, spacings)]
    median_shape = [float(v) for v in np.median(np.asarray(resampled), axis=0)]
    is_2d_data = all(shape[0] == 1 for shape in shapes)
    dataset_voxels = float(sum(math.prod(shape) for shape in resampled))
    in_channels, num_classes = len(fingerprint["channel_names"]), count_outputs(fingerprint["labels"])
    oracle = PeakOracle(str(rules.memory.method), timeline=bool(rules.memory.timeline))
    wanted = list(rules.configurations)
    unknown = [n for n in wanted if n not in ("2d", "3d_fullres", "3d_lowres")]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown} in plan.configurations; use 2d, 3d_fullres, 3d_lowres")
    configurations = {}
    if "2d" in wanted:
        fit = fit_configuration(spacing[1:], median_shape[1:], rules, in_channels, num_classes, dataset_voxels, oracle)
        configurations["2d"] = configuration_entry(fit, spacing[1:], median_shape[1:], rules, oracle)
    if not is_2d_data and ("3d_fullres" in wanted or "3d_lowres" in wanted):
        full = fit_configuration(spacing, median_shape, rules, in_channels, num_classes, dataset_voxels, oracle)
        if "3d_fullres" in wanted:
            configurations["3d_fullres"] = configuration_entry(full, spacing, median_shape, rules, oracle)
        covered = math.prod(full.spec.patch_size) / max(math.prod(median_shape), 1.0)
        if "3d_lowres" in wanted and covered < float(rules.lowres_threshold):
            low = lowres_spacing(spacing, median_shape, full, rules, in_channels, num_classes, dataset_voxels)
            if low is not None:
                low_shape = [m * s / t for m, s, t in zip(median_shape, spacing, low)]
                scale = math.prod(s / t for s, t in zip(spacing, low))
                fit = fit_configuration(low, low_shape, rules, in_channels, num_classes, dataset_voxels * scale, oracle)
                configurations["3d_lowres"] = configuration_entry(fit, low, low_shape, rules, oracle)
                if rules.get("cascade") and "3d_fullres" in configurations:
                    add_cascade(configurations, fingerprint["labels"])
    if budget_s:
        dims_2d = is_2d_data or "3d_fullres" not in configurations
        base = "2d" if dims_2d else "3d_fullres"
        if base not in configurations:
            raise ValueError(f"a budget configuration is sized from {base}; add it to plan.configurations")
        base_spacing, base_shape = (spacing[1:], median_shape[1:]) if dims_2d else (spacing, median_shape)
        base_fit = fit_configuration(base_spacing, base_shape, rules, in_channels, num_classes, dataset_voxels, oracle)
        configurations[f"{'2d' if dims_2d else '3d'}_budget"] = budget_configuration(
            base_spacing, base_shape, base_fit, rules, in_channels, num_classes, len(cases), budget_s,
            slices_per_case=median_shape[0] if dims_2d else 1, gpu_precision=gpu_precision)
    if not configurations:
        raise ValueError(f"no configuration of {wanted} applies to this dataset "
                         f"({'2D' if is_2d_data else '3D'} images; 2D data takes configurations=[2d])")
    for conf in configurations.values():  # the GPU configurations (a budget one has its own)
        conf.setdefault("precision", gpu_precision[0])
        conf.setdefault("precision_reason", gpu_precision[1])
    median_relative_size = float(np.median([c["relative_size_after_crop"] for c in cases]))
    plans = {
        "dataset_name": fingerprint["dataset_name"],
        "channel_names": fingerprint["channel_names"],
        "labels": fingerprint["labels"],
        "original_median_spacing": [float(v) for v in np.median(np.asarray(spacings), axis=0)],
        "original_median_shape": [float(v) for v in np.median(np.asarray(shapes), axis=0)],
        "normalization": plan_normalization(fingerprint, median_relative_size, rules.get("normalization"),
                                            denoising=bool(rules.get("denoiser_step")),
                                            nonzero_mask_threshold=float(rules["nonzero_mask_threshold"])),
        # a denoiser meets noisy images, which have no zero border to crop: it trains on whole images
        **({"crop_to_nonzero": False} if rules.get("denoiser_step") else {}),
        "resampling": resampling_rules(rules.get("resampling")),
        "configurations": configurations,
        "memory_traces": oracle.traces,
        "rules": OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given),
    }
    for name, conf in configurations.items():  # the preprocessed folder: plans that agree on the data share it
        conf["data_identifier"] = data_identifier(plans, name, conf.get("data_identifier"))
    return plans
