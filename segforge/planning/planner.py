"""Plans: pure functions from a fingerprint and the planner's rules to named network/patch configurations.

This is the first, fixed-rule form (target spacing, topology and normalisation follow nnU-Net's rules; patch
size follows a voxel budget per GB). The memory-traced patch search replaces ``fit_patch_to_budget`` later;
the plans.json layout stays.
"""

from __future__ import annotations

import math

import numpy as np

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


def topology(patch_size: list[int], spacing: list[float], min_feature_map: int = 4, max_stages: int = 6) -> dict:
    """Per-stage strides and kernel sizes for ``patch_size`` at ``spacing`` (nnU-Net's pooling rules).

    An axis is pooled while its feature map stays at least ``min_feature_map`` long and its spacing is within 2x
    of the finest axis; its kernel is 1 while it is still much (2x) coarser than the finest axis.
    """
    dims = len(patch_size)
    size, current = list(patch_size), list(spacing)
    kernels = [[3 if current[a] / min(current) < 2 else 1 for a in range(dims)]]
    strides = [[1] * dims]
    for _ in range(1, max_stages):
        finest = min(current)
        pool = [size[a] // 2 >= min_feature_map and current[a] / finest < 2 for a in range(dims)]
        if not any(pool):
            break
        stride = [2 if p else 1 for p in pool]
        size = [s // st for s, st in zip(size, stride)]
        current = [c * st for c, st in zip(current, stride)]
        finest = min(current)
        kernels.append([3 if (current[a] / finest < 2 or kernels[-1][a] == 3) else 1 for a in range(dims)])
        strides.append(stride)
    total = [math.prod(s[a] for s in strides) for a in range(dims)]
    return {"strides": strides, "kernel_sizes": kernels, "total_pooling": total}


def divisible_patch(patch_size: list[int], total_pooling: list[int]) -> list[int]:
    """``patch_size`` rounded to the nearest positive multiple of the total pooling per axis."""
    return [max(t, int(round(p / t)) * t) for p, t in zip(patch_size, total_pooling)]


def fit_patch_to_budget(median_shape: list[float], spacing: list[float], max_voxels: float) -> list[int]:
    """Start from the median shape; shrink the physically longest axis until the patch fits ``max_voxels``."""
    patch = [max(1, int(round(s))) for s in median_shape]
    while math.prod(patch) > max_voxels:
        extents = [p * s for p, s in zip(patch, spacing)]
        axis = int(np.argmax([e if p > 8 else -1 for e, p in zip(extents, patch)]))
        if patch[axis] <= 8:
            break
        patch[axis] = max(8, int(patch[axis] * 0.9))
    return patch


def features_per_stage(num_stages: int, base: int, cap: int) -> list[int]:
    return [min(base * 2**i, cap) for i in range(num_stages)]


def normalization_scheme(channel_name: str) -> str:
    return "ct" if channel_name.strip().lower() in CT_NAMES else "zscore"


def plan_normalization(fingerprint: dict, median_relative_size: float) -> list[dict]:
    """Per channel: CT clip + global z-score, or per-image z-score (inside the nonzero mask when cropping helped)."""
    out = []
    for index, name in sorted(fingerprint["channel_names"].items(), key=lambda kv: int(kv[0])):
        stats = fingerprint["intensity_foreground"][index]
        scheme = normalization_scheme(name)
        entry = {"channel": int(index), "name": name, "scheme": scheme}
        if scheme == "ct":
            entry.update(clip=[stats["percentile_00_5"], stats["percentile_99_5"]], mean=stats["mean"], std=stats["std"])
        else:
            entry["use_nonzero_mask"] = bool(median_relative_size < 0.75)
        out.append(entry)
    return out


def plan_configuration(dims: int, spacing: list[float], median_shape: list[float], rules, dataset_voxels: float) -> dict:
    """One configuration: patch, batch and network topology for 2D (in-plane) or 3D."""
    if dims == 2:
        spacing_used, shape_used = spacing[1:], median_shape[1:]
        max_voxels = rules.patch_voxels_per_gb_2d * rules.gpu_memory_gb * (32 / rules.features_base)
        cap = rules.features_max_2d
    else:
        spacing_used, shape_used = spacing, median_shape
        max_voxels = rules.patch_voxels_per_gb_3d * rules.gpu_memory_gb * (32 / rules.features_base)
        cap = rules.features_max_3d
    # a patch never exceeds the median image; the batch absorbs the rest of the budget
    patch = fit_patch_to_budget(shape_used, spacing_used, max_voxels / rules.batch_size_min)
    topo = topology(patch, spacing_used, rules.min_feature_map, rules.max_stages)
    patch = divisible_patch(patch, topo["total_pooling"])
    # batch: what the budget allows, but no more than covers 5% of the dataset's voxels per step
    batch_cap = int(0.05 * dataset_voxels // math.prod(patch))
    batch = int(max(rules.batch_size_min, min(max_voxels // math.prod(patch), batch_cap)))
    return {
        "dims": dims,
        "target_spacing": [None] + list(spacing_used) if dims == 2 else list(spacing_used),
        "median_shape": [float(s) for s in shape_used],
        "patch_size": patch,
        "batch_size": batch,
        "batch_size_is_per_device": True,
        "mirror_axes": list(range(dims)),
        "network": {
            "features_per_stage": features_per_stage(len(topo["strides"]), rules.features_base, cap),
            "kernel_sizes": topo["kernel_sizes"],
            "strides": topo["strides"],
            "conv_per_stage": rules.conv_per_stage,
        },
    }


def make_plans(fingerprint: dict, rules) -> dict:
    """plans.json's payload from a fingerprint and the ``plan`` config group."""
    cases = fingerprint["cases"]
    spacings = [c["spacing"] for c in cases]
    shapes = [c["shape_after_crop"] for c in cases]
    spacing = list(rules.target_spacing) if rules.target_spacing else target_spacing(spacings, shapes, rules.anisotropy_threshold)
    # shapes at the target spacing (a fake z axis of a 2D dataset keeps its single slice)
    resampled = [[s * sp / t if sp != t else s for s, sp, t in zip(shape, sps, spacing)] for shape, sps in zip(shapes, spacings)]
    median_shape = [float(v) for v in np.median(np.asarray(resampled), axis=0)]
    is_2d_data = all(shape[0] == 1 for shape in shapes)
    dataset_voxels = float(sum(math.prod(shape) for shape in resampled))
    configurations = {}
    for name in rules.configurations:
        if name == "2d":
            configurations[name] = plan_configuration(2, spacing, median_shape, rules, dataset_voxels)
        elif name == "3d_fullres" and not is_2d_data:
            configurations[name] = plan_configuration(3, spacing, median_shape, rules, dataset_voxels)
    if not configurations:
        raise ValueError(f"no configuration of {list(rules.configurations)} applies to this dataset "
                         f"({'2D' if is_2d_data else '3D'} images)")
    median_relative_size = float(np.median([c["relative_size_after_crop"] for c in cases]))
    return {
        "dataset_name": fingerprint["dataset_name"],
        "channel_names": fingerprint["channel_names"],
        "labels": fingerprint["labels"],
        "original_median_spacing": [float(v) for v in np.median(np.asarray(spacings), axis=0)],
        "original_median_shape": [float(v) for v in np.median(np.asarray(shapes), axis=0)],
        "normalization": plan_normalization(fingerprint, median_relative_size),
        "configurations": configurations,
        "rules": {k: (list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else v) for k, v in dict(rules).items()},
    }
