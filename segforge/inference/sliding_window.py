"""Sliding-window inference: Gaussian-weighted windows, test-time mirroring per window, batched windows, and an
accumulation buffer of a chosen precision.

Written here rather than taken from MONAI's ``sliding_window_inference`` for three reasons: the window placement
and Gaussian are nnU-Net's (windows evenly spread so the step is at most ``step_size`` of the patch; a Gaussian of
sigma = patch/8 scaled to 10 at the centre: ``predict.gaussian_*``), so an imported nnU-Net model predicts what
nnU-Net predicts; mirroring is applied per window, so one accumulation buffer serves every flip; and the buffer's dtype is a
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

from segforge.configs import packaged_defaults

SLAB = 4  # slices per yielded piece: what the consumer holds at a time, whatever the number of classes
AUTO_HALF_BYTES = 512 * 2**20  # accumulate="auto": float16 once a float32 buffer would pass this


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


def gaussian_settings(sigma: float | None = None, centre_weight: float | None = None) -> tuple[float, float]:
    """``(sigma as a fraction of the patch, value at the window centre)``; None: ``predict.gaussian_sigma`` and
    ``predict.gaussian_centre_weight`` of configs/predict/default.yaml (nnU-Net's 1/8 and 10)."""
    packaged = packaged_defaults("predict")
    return (float(packaged["gaussian_sigma"] if sigma is None else sigma),
            float(packaged["gaussian_centre_weight"] if centre_weight is None else centre_weight))


@lru_cache(maxsize=4)
def _gaussian(patch: tuple[int, ...], sigma_scale: float, centre_weight: float) -> np.ndarray:
    """The window weights, one map for every accumulation precision: ``centre_weight`` at the centre (nnU-Net's
    scaling keeps float16 sums precise), float16 values, none below float16's smallest normal number: the corners
    (~1e-10 of the centre) would flush to 0 in float16, and a voxel only a corner covers would be 0 / 0."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    weights *= centre_weight / weights.max()
    return np.maximum(weights, np.finfo(np.float16).tiny).astype(np.float16).astype(np.float32)


def gaussian_weights(patch, sigma_scale: float | None = None, device=None, dtype=torch.float32,
                     centre_weight: float | None = None) -> torch.Tensor:
    """The importance map of one window (``gaussian_settings`` for the defaults)."""
    sigma_scale, centre_weight = gaussian_settings(sigma_scale, centre_weight)
    return torch.from_numpy(_gaussian(tuple(int(p) for p in patch), sigma_scale, centre_weight)).to(device=device, dtype=dtype)


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


class _Layout:
    """Where the windows of one image go: the padding to at least the patch (constant 0, the extra voxel at the end)
    and how to cut it off again, the window origins, and the groups of windows that share their extent along the
    first axis, ``(start, depth)``, processed in that order (a 2D network: blocks of consecutive slices, enough
    windows for a batch)."""

    def __init__(self, spatial: list[int], patch: list[int], step_size: float, batch_size: int):
        dims = len(patch)
        self.spatial, self.patch, self.dims = spatial, patch, dims
        self.lead = lead = len(spatial) - dims  # 1 for a 2D network on a volume
        self.padded_shape = spatial[:lead] + [max(s, p) for s, p in zip(spatial[lead:], patch)]
        self.pads = []
        for s, p in reversed(list(zip(spatial[lead:], patch))):
            extra = max(p - s, 0)
            self.pads += [extra // 2, extra - extra // 2]
        self.starts = [window_starts(n, p, step_size) for n, p in zip(self.padded_shape[lead:], patch)]
        self.in_plane = list(itertools.product(*self.starts[1 - lead:])) if dims + lead > 1 else [()]
        if lead:
            block = max(1, batch_size // max(1, len(self.in_plane)))
            self.groups = [(z, min(block, self.padded_shape[0] - z)) for z in range(0, self.padded_shape[0], block)]
        else:
            self.groups = [(z, patch[0]) for z in self.starts[0]]
        self.depth = max(d for _, d in self.groups)
        self.first_axis_pad = 0 if lead else self.pads[2 * (dims - 1)]
        pads = self.pads
        self.rest = [slice(pads[2 * (dims - 1 - a)], pads[2 * (dims - 1 - a)] + spatial[lead + a]) for a in range(1 - lead, dims)]
        self.total_windows = sum(d if lead else 1 for _, d in self.groups) * len(self.in_plane)

    def windows(self, z0: int, extent: int) -> list[tuple[int, tuple[int, ...]]]:
        """``(first-axis start, in-plane origin)`` of the windows of one group."""
        if self.lead:
            return [(z, origin) for z in range(z0, z0 + extent) for origin in self.in_plane]
        return [(z0, origin) for origin in itertools.product(*self.starts[1:])]

    def crop(self, padded: torch.Tensor, z: int, origin) -> torch.Tensor:
        if self.lead:
            return padded[(slice(None), z, *[slice(o, o + p) for o, p in zip(origin, self.patch)])]
        return padded[(slice(None), slice(z, z + self.patch[0]), *[slice(o, o + p) for o, p in zip(origin, self.patch[1:])])]


class _RingBuffer:
    """Weighted sums and weights of the windows' outputs, one window deep along the first axis (slice z lives at
    z % depth), made at the first output (its channels) in the ``accumulate`` precision ("auto": float16 where a
    float32 buffer would be large; probabilities sum safely in it)."""

    def __init__(self, layout: _Layout, weights: torch.Tensor, accumulate, device):
        self.layout, self.weights, self.accumulate, self.device = layout, weights, accumulate, device
        self.total = self.counts = None
        self.emitted = 0  # slices of the padded volume below `emitted` were yielded

    def _allocate(self, channels: int) -> None:
        layout, accumulate = self.layout, self.accumulate
        if accumulate == "auto":
            size = channels * layout.depth * math.prod(layout.padded_shape[1:]) * 4
            accumulate = torch.float16 if size > AUTO_HALF_BYTES else torch.float32
        self.weights = self.weights.to(accumulate)
        self.total = torch.zeros((channels, layout.depth, *layout.padded_shape[1:]), dtype=accumulate, device=self.device)
        self.counts = torch.zeros((layout.depth, *layout.padded_shape[1:]), dtype=accumulate, device=self.device)

    def add(self, chunk, out: torch.Tensor) -> None:
        """The outputs ``out`` of the windows ``chunk``, weighted by the Gaussian."""
        if self.total is None:
            self._allocate(out.shape[1])
        layout, weights = self.layout, self.weights
        for (z, origin), o in zip(chunk, out):
            o = o * weights.float()  # the product in float32, the sum in the buffer's precision
            if layout.lead:
                o, w = o[:, None], weights[None]
                length, inner = 1, [slice(s, s + p) for s, p in zip(origin, layout.patch)]
            else:
                w, length, inner = weights, layout.patch[0], [slice(s, s + p) for s, p in zip(origin, layout.patch[1:])]
            for ring, part in _ring(z, length, layout.depth):
                self.total[(slice(None), ring, *inner)] += o[:, part]
                self.counts[(ring, *inner)] += w[part]

    def finished(self, upto: int):
        """The slices [emitted, upto) of the padded volume, divided by their weights and cut to the image, a few at a
        time; their place in the ring buffer is cleared for the windows to come."""
        layout, emitted = self.layout, self.emitted
        lo, hi = max(emitted, layout.first_axis_pad), min(upto, layout.first_axis_pad + layout.spatial[0])
        for z in range(lo, hi, SLAB):
            pieces = [self.total[:, ring] / self.counts[ring] for ring, _ in _ring(z, min(SLAB, hi - z), layout.depth)]
            out = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
            yield z - layout.first_axis_pad, out[(slice(None), slice(None), *layout.rest)].float()
        for ring, _ in _ring(emitted, max(0, upto - emitted), layout.depth):
            self.total[:, ring] = 0
            self.counts[ring] = 0
        self.emitted = max(emitted, upto)


def _forward(network, crops: list[torch.Tensor], batch_size: int, fill: bool, mirror_axes, activation) -> torch.Tensor:
    """The (mirrored, activated) outputs of one chunk of windows. ``fill``: a short last chunk is filled up with
    copies of its last window (outputs dropped): every pass has one shape, and on a CPU a single small window would
    take PyTorch's im2col convolution (3x slower)."""
    batch = torch.stack(crops)
    if fill and len(crops) < batch_size:
        batch = torch.cat([batch, batch[-1:].expand(batch_size - len(crops), *batch.shape[1:])])
    out = _mirrored(network, batch, list(mirror_axes))[:len(crops)]
    return out if activation is None else activation(out)


def _progress_bar(progress: bool, total_windows: int, batch_size: int):
    if progress and sys.stderr.isatty() and total_windows > batch_size:
        from tqdm import tqdm

        return tqdm(total=total_windows, desc="windows", unit="window", leave=False)
    return None


@torch.no_grad()
def sliding_window_slabs(image: torch.Tensor, network, patch: list[int], step_size: float = 0.5, mirror_axes=(),
                         batch_size: int = 2, accumulate=torch.float32, activation=None, progress: bool = True,
                         gaussian_sigma: float | None = None, gaussian_centre_weight: float | None = None):
    """Outputs of ``network`` over the ``(c, *spatial)`` ``image``, yielded as finished slabs along the first spatial
    axis: ``(first_slice, (channels, slices, *rest))``, in order. Windows are processed by their position on that
    axis, and the accumulation buffer only spans one window's depth, so memory does not grow with the volume.

    ``patch`` has one entry per spatial axis (3D networks) or one fewer (2D networks, applied per slice of the first
    axis). ``activation`` (e.g. a softmax over axis 1) is applied to each window's averaged output before weighting.
    ``gaussian_*``: the window weights (``gaussian_settings``). On a terminal a progress bar counts the windows.
    """
    layout = _Layout(list(image.shape[1:]), patch, step_size, batch_size)
    padded = F.pad(image, layout.pads) if any(layout.pads) else image
    # the same values in every precision (_gaussian)
    weights = gaussian_weights(patch, gaussian_sigma, image.device, centre_weight=gaussian_centre_weight)
    buffer = _RingBuffer(layout, weights, accumulate, image.device)
    bar = _progress_bar(progress, layout.total_windows, batch_size)
    for index, (z0, extent) in enumerate(layout.groups):
        windows = layout.windows(z0, extent)
        for first in range(0, len(windows), batch_size):
            chunk = windows[first:first + batch_size]
            crops = [layout.crop(padded, z, origin) for z, origin in chunk]
            buffer.add(chunk, _forward(network, crops, batch_size, batch_size <= len(windows), mirror_axes, activation))
            if bar is not None:
                bar.update(len(chunk))
        yield from buffer.finished(layout.groups[index + 1][0] if index + 1 < len(layout.groups) else layout.padded_shape[0])
    if bar is not None:
        bar.close()


def sliding_window(image: torch.Tensor, network, patch: list[int], step_size: float = 0.5, mirror_axes=(),
                   batch_size: int = 2, accumulate=torch.float32, activation=None, progress: bool = True,
                   gaussian_sigma: float | None = None, gaussian_centre_weight: float | None = None) -> torch.Tensor:
    """The whole ``(channels, *spatial)`` output of ``sliding_window_slabs`` in one tensor."""
    slabs = [slab for _, slab in sliding_window_slabs(image, network, patch, step_size, mirror_axes, batch_size,
                                                       accumulate, activation, progress, gaussian_sigma,
                                                       gaussian_centre_weight)]
    return torch.cat(slabs, 1)
