"""Plans: pure functions from a fingerprint and the planner's rules (``plan`` config) to named configurations.

Target spacing, topology, patch candidates, lowres spacing and normalisation follow nnU-Net's rules (written
as small functions so each can be tested and changed from the config: ``topology.py``, ``normalization.py``).
Where nnU-Net guesses, segforge measures: the patch and batch size come from the traced peak memory of the real
training step (``fitting.py``, ``budget.py``, ``memory.py``), recorded in each configuration's ``memory`` entry.
A configuration sized for a training time is ``budget_plan.py``'s, the cascade stage ``cascade.py``'s.
"""

from __future__ import annotations

import math

import numpy as np
from omegaconf import DictConfig, OmegaConf

from segforge.io.dataset import count_outputs
from segforge.planning.budget import PeakOracle
from segforge.planning.budget_plan import budget_configuration
from segforge.planning.cascade import add_cascade
from segforge.planning.fitting import configuration_entry, fit_configuration, lowres_spacing
from segforge.planning.normalization import plan_normalization
from segforge.planning.precision import planned_precision
from segforge.planning.topology import target_spacing
from segforge.preprocessing.pipeline import data_identifier
from segforge.preprocessing.resample import resampling_modes, with_default_rules


def resampling_rules(rules) -> dict:
    """The ``resampling`` entry of plans.json: the plan config's rules (over the packaged ones), checked."""
    settings = with_default_rules(OmegaConf.to_container(rules) if isinstance(rules, DictConfig) else dict(rules or {}))
    resampling_modes([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], settings)  # raises on an unknown mode
    return settings


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
