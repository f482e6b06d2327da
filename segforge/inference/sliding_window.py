"""Sliding-window inference: Gaussian-weighted windows, test-time mirroring per window, batched windows, and an
accumulation buffer of a chosen precision.

Written here rather than taken from MONAI's ``sliding_window_inference`` for three reasons: the window placement
and Gaussian are nnU-Net's (windows evenly spread so the step is at most ``step_size`` of the patch; a Gaussian of
sigma = patch/8 normalised to 1 at the centre), so an imported nnU-Net model predicts what nnU-Net predicts;
mirroring is applied per window, so one accumulation buffer serves every flip; and the buffer's dtype is a
choice (float16 halves the largest allocation of a prediction; nnU-Net itself accumulates in float16).
2D networks on volumes take each slice's windows as a batch.
"""

from __future__ import annotations

import itertools
import math
import sys
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def window_starts(size: int, patch: int, step_size: float) -> list[int]:
    """Window origins along one axis: evenly spread from 0 to ``size - patch``, at most ``step_size * patch`` apart."""
    if size <= patch:
        return [0]
    steps = int(math.ceil((size - patch) / (patch * step_size))) + 1
    spacing = (size - patch) / (steps - 1)
    return [int(np.round(spacing * i)) for i in range(steps)]


@lru_cache(maxsize=4)
def _gaussian(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    weights /= weights.max()
    weights[weights == 0] = weights[weights > 0].min()  # never zero: every voxel gets a weight
    return weights.astype(np.float32)


def gaussian_weights(patch, sigma_scale: float = 1 / 8, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(_gaussian(tuple(int(p) for p in patch), sigma_scale)).to(device=device, dtype=dtype)


def _mirrored(network, x: torch.Tensor, mirror_axes: list[int]) -> torch.Tensor:
    """The network's output averaged over all flips of ``mirror_axes`` (spatial axes of ``x``'s windows)."""
    out = network(x).float()
    axes = [a + 2 for a in mirror_axes]
    combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    for combo in combos:
        out += torch.flip(network(torch.flip(x, combo)).float(), combo)
    return out / (len(combos) + 1)


@torch.no_grad()
def sliding_window(image: torch.Tensor, network, patch: list[int], step_size: float = 0.5, mirror_axes=(),
                   batch_size: int = 2, accumulate=torch.float32, activation=None, progress: bool = True) -> torch.Tensor:
    """Outputs ``(channels, *spatial)`` of ``network`` over the ``(c, *spatial)`` ``image`` (on the image's device).

    ``patch`` has one entry per spatial axis (3D networks) or one fewer (2D networks, applied per slice of the first
    axis). ``activation`` (e.g. a softmax over axis 1) is applied to each window's averaged output before weighting.
    On a terminal a progress bar counts the windows of the case.
    """
    dims = len(patch)
    spatial = list(image.shape[1:])
    lead = len(spatial) - dims  # 1 for a 2D network on a volume
    # pad to at least the patch (constant 0, the extra voxel at the end), remember how to cut it off again
    padded_shape = spatial[:lead] + [max(s, p) for s, p in zip(spatial[lead:], patch)]
    pads = []
    for s, p in reversed(list(zip(spatial[lead:], patch))):
        extra = max(p - s, 0)
        pads += [extra // 2, extra - extra // 2]
    padded = F.pad(image, pads) if any(pads) else image
    starts = [window_starts(n, p, step_size) for n, p in zip(padded_shape[lead:], patch)]
    windows = [tuple([slice(None)] + ([slice(z, z + 1)] if lead else []) + [slice(s, s + p) for s, p in zip(origin, patch)])
               for z in range(padded_shape[0] if lead else 1) for origin in itertools.product(*starts)]
    # in float16 the weights are scaled to 10 at the centre, as nnU-Net does, for the precision of the sums
    weights = gaussian_weights(patch, device=image.device, dtype=torch.float32) * (10.0 if accumulate == torch.float16 else 1.0)
    weights = weights.to(accumulate)
    total = counts = None
    bar = None
    if progress and sys.stderr.isatty() and len(windows) > batch_size:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), desc="windows", unit="window", leave=False)
    for first in range(0, len(windows), batch_size):
        chunk = windows[first:first + batch_size]
        crops = [padded[w] for w in chunk]
        x = torch.stack([c[:, 0] if lead else c for c in crops])
        out = _mirrored(network, x, list(mirror_axes))
        if activation is not None:
            out = activation(out)
        if total is None:
            total = torch.zeros((out.shape[1], *padded_shape), dtype=accumulate, device=image.device)
            counts = torch.zeros(padded_shape, dtype=accumulate, device=image.device)
        for w, o in zip(chunk, out):
            target = (slice(None), *w[1:])
            o = o * weights.float()  # the product in float32, the sum in the buffer's precision
            total[target] += o[:, None] if lead else o
            counts[w[1:]] += weights
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    total /= counts
    keep = [slice(None)] * (1 + lead) + [slice(pads[2 * (dims - 1 - a)], pads[2 * (dims - 1 - a)] + spatial[lead + a])
                                           for a in range(dims)]
    return total[tuple(keep)].float()
