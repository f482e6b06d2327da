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


SLAB = 4  # slices per yielded piece: what the consumer holds at a time, whatever the number of classes
AUTO_HALF_BYTES = 512 * 2**20  # accumulate="auto": float16 once a float32 buffer would pass this
CENTRE_WEIGHT = 10.0  # the Gaussian's weight at the window centre (nnU-Net's; it keeps float16 sums precise)


def check_step_size(step_size, setting: str = "predict.step_size") -> float:
    """``step_size`` as a float in (0, 1]; else a SegforgeError naming ``setting``. Above 1 windows would leave gaps
    (voxels no window covers, predicted as background without a word); 0 or less never advances."""
    from segforge.errors import SegforgeError

    try:
        value = float(step_size)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(step_size, bool) or not 0 < value <= 1:
        raise SegforgeError(f"{setting}={step_size}: the sliding-window step must be a fraction of the patch in (0, 1] "
                            f"(1: windows touch, 0.5: they overlap by half). Fix: {setting}=0.5")
    return value


def window_starts(size: int, patch: int, step_size: float) -> list[int]:
    """Window origins along one axis: evenly spread from 0 to ``size - patch``, at most ``step_size * patch`` apart."""
    step_size = check_step_size(step_size, "step_size")
    if size <= patch:
        return [0]
    steps = int(math.ceil((size - patch) / (patch * step_size))) + 1
    spacing = (size - patch) / (steps - 1)
    return [int(np.round(spacing * i)) for i in range(steps)]


@lru_cache(maxsize=4)
def _gaussian(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    """The window weights, one map for every accumulation precision: ``CENTRE_WEIGHT`` at the centre (nnU-Net's
    scaling), float16 values, none below float16's smallest normal number: the corners (~1e-10 of the centre) would
    flush to 0 in float16, and a voxel only a corner covers would be 0 / 0."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    weights *= CENTRE_WEIGHT / weights.max()
    return np.maximum(weights, np.finfo(np.float16).tiny).astype(np.float16).astype(np.float32)


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


def _ring(start: int, length: int, size: int) -> list[tuple[slice, slice]]:
    """(buffer slice, slice of the window) pieces of the slices ``[start, start + length)`` in a ring of ``size``."""
    pieces, done = [], 0
    while done < length:
        position = (start + done) % size
        n = min(length - done, size - position)
        pieces.append((slice(position, position + n), slice(done, done + n)))
        done += n
    return pieces


@torch.no_grad()
def sliding_window_slabs(image: torch.Tensor, network, patch: list[int], step_size: float = 0.5, mirror_axes=(),
                         batch_size: int = 2, accumulate=torch.float32, activation=None, progress: bool = True):
    """Outputs of ``network`` over the ``(c, *spatial)`` ``image``, yielded as finished slabs along the first spatial
    axis: ``(first_slice, (channels, slices, *rest))``, in order. Windows are processed by their position on that
    axis, and the accumulation buffer only spans one window's depth, so memory does not grow with the volume.

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
    in_plane = list(itertools.product(*starts[1 - lead:])) if dims + lead > 1 else [()]
    # groups of windows that share their extent along the first axis: (start, depth, window origins)
    if lead:  # 2D network: blocks of consecutive slices, enough windows for a batch
        block = max(1, batch_size // max(1, len(in_plane)))
        groups = [(z, min(block, padded_shape[0] - z)) for z in range(0, padded_shape[0], block)]
    else:
        groups = [(z, patch[0]) for z in starts[0]]
    depth = max(d for _, d in groups)
    weights = gaussian_weights(patch, device=image.device)  # the same values in every precision (_gaussian)
    first_axis_pad = 0 if lead else pads[2 * (dims - 1)]
    rest = [slice(pads[2 * (dims - 1 - a)], pads[2 * (dims - 1 - a)] + spatial[lead + a]) for a in range(1 - lead, dims)]
    total = counts = None
    emitted = 0  # slices of the padded volume below `emitted` were yielded
    total_windows = sum(d if lead else 1 for _, d in groups) * len(in_plane)
    bar = None
    if progress and sys.stderr.isatty() and total_windows > batch_size:
        from tqdm import tqdm

        bar = tqdm(total=total_windows, desc="windows", unit="window", leave=False)

    def finished(upto: int):
        """The slices [emitted, upto) of the padded volume, divided by their weights and cut to the image, a few at a
        time; their place in the ring buffer is cleared for the windows to come."""
        lo, hi = max(emitted, first_axis_pad), min(upto, first_axis_pad + spatial[0])
        for z in range(lo, hi, SLAB):
            pieces = [total[:, ring] / counts[ring] for ring, _ in _ring(z, min(SLAB, hi - z), depth)]
            out = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
            yield z - first_axis_pad, out[(slice(None), slice(None), *rest)].float()
        for ring, _ in _ring(emitted, max(0, upto - emitted), depth):
            total[:, ring] = 0
            counts[ring] = 0

    for index, (z0, extent) in enumerate(groups):
        windows = [(z, origin) for z in range(z0, z0 + extent) for origin in in_plane] if lead else \
            [(z0, origin) for origin in itertools.product(*starts[1:])]
        for first in range(0, len(windows), batch_size):
            chunk = windows[first:first + batch_size]
            if lead:
                crops = [padded[(slice(None), z, *[slice(o, o + p) for o, p in zip(origin, patch)])] for z, origin in chunk]
            else:
                crops = [padded[(slice(None), slice(z, z + patch[0]), *[slice(o, o + p) for o, p in zip(origin, patch[1:])])]
                         for z, origin in chunk]
            batch = torch.stack(crops)
            if len(crops) < batch_size <= len(windows):
                # a short last chunk is filled up with copies of its last window (outputs dropped): every pass has one
                # shape, and on a CPU a single small window would take PyTorch's im2col convolution (3x slower)
                batch = torch.cat([batch, batch[-1:].expand(batch_size - len(crops), *batch.shape[1:])])
            out = _mirrored(network, batch, list(mirror_axes))[:len(crops)]
            if activation is not None:
                out = activation(out)
            if total is None:  # a ring buffer one window deep along the first axis (slice z lives at z % depth)
                if accumulate == "auto":  # float16 where the buffer would be large: probabilities sum safely in it
                    size = out.shape[1] * depth * math.prod(padded_shape[1:]) * 4
                    accumulate = torch.float16 if size > AUTO_HALF_BYTES else torch.float32
                weights = weights.to(accumulate)
                total = torch.zeros((out.shape[1], depth, *padded_shape[1:]), dtype=accumulate, device=image.device)
                counts = torch.zeros((depth, *padded_shape[1:]), dtype=accumulate, device=image.device)
            for (z, origin), o in zip(chunk, out):
                o = o * weights.float()  # the product in float32, the sum in the buffer's precision
                if lead:
                    o, w = o[:, None], weights[None]
                    length, inner = 1, [slice(s, s + p) for s, p in zip(origin, patch)]
                else:
                    w, length, inner = weights, patch[0], [slice(s, s + p) for s, p in zip(origin, patch[1:])]
                for ring, part in _ring(z, length, depth):
                    total[(slice(None), ring, *inner)] += o[:, part]
                    counts[(ring, *inner)] += w[part]
            if bar is not None:
                bar.update(len(chunk))
        upto = groups[index + 1][0] if index + 1 < len(groups) else padded_shape[0]
        yield from finished(upto)
        emitted = max(emitted, upto)
    if bar is not None:
        bar.close()


def sliding_window(image: torch.Tensor, network, patch: list[int], step_size: float = 0.5, mirror_axes=(),
                   batch_size: int = 2, accumulate=torch.float32, activation=None, progress: bool = True) -> torch.Tensor:
    """The whole ``(channels, *spatial)`` output of ``sliding_window_slabs`` in one tensor."""
    slabs = [slab for _, slab in sliding_window_slabs(image, network, patch, step_size, mirror_axes, batch_size,
                                                       accumulate, activation, progress)]
    return torch.cat(slabs, 1)
