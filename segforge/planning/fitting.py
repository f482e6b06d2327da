"""One configuration fitted to the memory budget: the training step a patch describes, the largest patch and then
batch whose traced peak fits (``budget.py``), its plans.json entry, and the coarser spacing of 3d_lowres."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
from omegaconf import DictConfig, OmegaConf

from segforge.planning.budget import Fit, MemoryBudget, PeakOracle, choose_batch, choose_candidate, describe
from segforge.planning.memory import StepSpec, rules_encoder
from segforge.planning.topology import features_per_stage, patch_candidates

log = logging.getLogger("segforge.planning.planner")  # the planner's messages, whichever module sends them


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
