"""Spatial augmentation as one resampling per patch: rotation, scaling, mirroring and elastic deformation composed
into a single sampling grid, applied to the image (linear) and the label (per-class linear + argmax, or nearest).

The convention, in voxel units of the patch: output voxel ``i`` has centred coordinates ``p = i - (P - 1) / 2``;
it samples the source at ``s = centre + A @ (p + d(p))`` where ``A = R @ diag(scale) @ diag(mirror)`` and ``d`` is
an optional smooth displacement field. ``scale > 1`` samples a larger region (structures look smaller), as in
nnU-Net. ``source_box`` gives the exact box of source voxels a transform reads, so the data loader crops only
that (not a fixed enlarged patch) from the memory-mapped case.

Everything here is torch on whatever device the tensors are on (CPU workers or the training GPU); the random
parameters come from the caller (``augment.draw_sample``), so the same numbers give the same patch anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from segforge.preprocessing.resample import LabelVote, label_values, resample


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation in array axis order: 2D one angle in the (y, x) plane; 3D angles about the z, y and x axes."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    az, ay, ax = angles
    # about z: mixes (y, x); about y: mixes (z, x); about x: mixes (z, y)
    rz = np.array([[1, 0, 0], [0, math.cos(az), -math.sin(az)], [0, math.sin(az), math.cos(az)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rx = np.array([[math.cos(ax), -math.sin(ax), 0], [math.sin(ax), math.cos(ax), 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine_matrix(angles: Sequence[float], scales: Sequence[float], mirror: Sequence[bool]) -> np.ndarray:
    """``A = R @ diag(scale) @ diag(mirror)`` (see module docstring)."""
    signs = np.where(np.asarray(mirror, bool), -1.0, 1.0)
    return rotation_matrix(angles) @ np.diag(np.asarray(scales, float)) @ np.diag(signs)


def source_box(centre: Sequence[float], matrix: np.ndarray, patch: Sequence[int],
               displacement_max: Sequence[float] | None = None) -> tuple[list[int], list[int]]:
    """``(start, size)`` of the smallest integer box of source voxels that sampling reads (linear interpolation
    included) for the patch at ``centre`` under ``matrix`` and displacements up to ``displacement_max``."""
    half = (np.asarray(patch, float) - 1) / 2 + (np.asarray(displacement_max, float) if displacement_max is not None else 0)
    extent = np.abs(matrix) @ half
    # a sample at s reads voxels floor(s) and floor(s) + 1 (weight 0 when s is whole); near-whole counts as whole
    low = np.floor(np.asarray(centre) - extent + 1e-5).astype(int)
    high = np.ceil(np.asarray(centre) + extent - 1e-5).astype(int) + 1
    return [int(v) for v in low], [int(v) for v in np.maximum(high - low, 2)]


@lru_cache(maxsize=16)
def _centred_coordinates(patch: tuple[int, ...]) -> torch.Tensor:
    """``(*patch, dims)`` centred voxel coordinates ``p`` (cached per patch shape; CPU)."""
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in patch]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def smooth_displacement(coarse: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """A ``(*patch, dims)`` field from ``(dims, *control_points)`` values: cubic interpolation over the patch, clamped
    per axis to the control points' largest magnitude (the cubic overshoots it, and ``source_box`` is sized by it)."""
    coarse = coarse.float()
    field = resample(coarse, list(patch), ["cubic"] * len(patch))
    limit = coarse.reshape(coarse.shape[0], -1).abs().amax(1).reshape(-1, *([1] * len(patch)))
    return torch.maximum(torch.minimum(field, limit), -limit).movedim(0, -1)


def sampling_grid(matrix: torch.Tensor, offset: torch.Tensor, patch: Sequence[int], source_shape: Sequence[int],
                  displacement: torch.Tensor | None = None) -> torch.Tensor:
    """``grid_sample`` grid (``align_corners=True``, last axis x, y[, z]) for source voxel coordinates
    ``offset + matrix @ (p + displacement)``, where ``offset`` is the patch centre inside the source box."""
    device, dims = matrix.device, len(patch)
    size = torch.tensor([max(n - 1, 1) for n in source_shape], dtype=torch.float32, device=device)
    matrix = matrix.float() * (2 / size)[:, None]  # straight to grid_sample's [-1, 1] units
    offset = offset.float() * (2 / size) - 1
    if displacement is not None:
        p = _centred_coordinates(tuple(int(n) for n in patch)).to(device) + displacement
        return (p @ matrix.T + offset).flip(-1)
    # without a displacement field each component is a sum of one ramp per axis: no (voxels x dims) product
    axes = [torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2 for n in patch]
    grid = torch.empty((*patch, dims), dtype=torch.float32, device=device)
    for k in range(dims):
        component = offset[k]
        for j in range(dims):
            shape = [1] * dims
            shape[j] = -1
            component = component + (matrix[k, j] * axes[j]).reshape(shape)
        grid[..., dims - 1 - k] = component
    return grid


def warp_image(source: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``(c, *source)`` float image sampled on ``grid`` (linear, zeros outside)."""
    return F.grid_sample(source[None].float(), grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def warp_label(source: torch.Tensor, grid: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """``(1, *source)`` integer label sampled on ``grid``, with no value that is not in ``source``.

    ``linear``: each value's indicator interpolated on the grid, then the vote of ``LabelVote`` (the label
    resampler's, preprocessing/resample.py). ``nearest``: the nearest source voxel. The grid must stay inside the source (``source_box`` sees to that); where the
    source box left the case, the loader padded it with background.
    """
    spatial = grid.shape[:-1]
    if mode == "nearest":
        return F.grid_sample(source[None].float(), grid[None], mode="nearest", padding_mode="zeros",
                             align_corners=True)[0].round().to(source.dtype)
    present, base = label_values(source)
    vote = LabelVote(spatial, base, source.dtype, source.device)
    for value in present:
        if value == base:
            continue
        indicator = (source == value).float()
        score = F.grid_sample(indicator[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
        vote.add(value, score)
    return vote.result()[None]  # the grid stays inside the source box, where the indicators sum to one
