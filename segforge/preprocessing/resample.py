"""Resample images, labels and class probabilities between voxel grids (torch, on CPU or GPU).

Images use linear interpolation; labels go through one-hot channels interpolated linearly and an argmax, which
keeps thin structures that nearest-neighbour resampling would break. A ``None`` target spacing on an axis keeps
that axis as it is (2D configurations keep each case's slice spacing).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def shape_at_spacing(shape: list[int], spacing: list[float], target: list[float | None]) -> list[int]:
    return [s if t is None else max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]


def _interpolate(array: torch.Tensor, new_shape: list[int]) -> torch.Tensor:
    """Linear interpolation of ``(c, *spatial)`` to ``new_shape``; axes of unchanged size are left alone."""
    spatial = list(array.shape[1:])
    if spatial == list(new_shape):
        return array
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    return F.interpolate(array[None], size=list(new_shape), mode=mode, align_corners=False)[0]


def resample_image(image: np.ndarray, new_shape: list[int]) -> np.ndarray:
    """``(c, z, y, x)`` float image to ``new_shape`` (spatial)."""
    if list(image.shape[1:]) == list(new_shape):
        return image.astype(np.float32, copy=False)
    with torch.no_grad():
        return _interpolate(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), new_shape).numpy()


def resample_label(label: np.ndarray, new_shape: list[int], values: list[int]) -> np.ndarray:
    """``(z, y, x)`` integer label to ``new_shape``, one class at a time (memory: two float volumes)."""
    if list(label.shape) == list(new_shape):
        return label
    best = torch.full(list(new_shape), -1.0)
    out = torch.zeros(list(new_shape), dtype=torch.int16)
    with torch.no_grad():
        for value in sorted(values):
            mask = torch.from_numpy((label == value).astype(np.float32))[None]
            score = _interpolate(mask, new_shape)[0]
            better = score >= best  # ties go to the later (higher) value: a thin structure beats background
            out[better] = value
            best = torch.where(better, score, best)
    return out.numpy().astype(label.dtype if label.dtype.kind in "iu" else np.int16)


def resample_probabilities(probabilities: torch.Tensor, new_shape: list[int]) -> torch.Tensor:
    """``(classes, *spatial)`` probabilities or logits to ``new_shape`` (the inverse step at prediction)."""
    with torch.no_grad():
        return _interpolate(probabilities.float(), new_shape)
