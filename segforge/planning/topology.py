"""nnU-Net's geometry rules as pure functions: target spacing, the U-Net topology a patch and spacing allow
(per-axis pooling and kernels), patch candidates shrunk along the axis nnU-Net shrinks, features per stage."""

from __future__ import annotations

import math

import numpy as np


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
