"""Intensity augmentations on a batch ``(b, c, *spatial)``, in place, with per-sample parameters drawn beforehand.

The set and the ranges are nnU-Net's (batchgeneratorsv2 as its trainer configures it); the values come from
``augment.draw_sample``. A parameter at its neutral value (std 0, sigma 0, factor 1) means "not applied", so each
transform touches only the samples and channels it was drawn for. Everything is torch on the batch's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-7


def _pairs(mask: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(p) for p in torch.nonzero(mask).tolist()]


def add_noise(x: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor) -> None:
    """Gaussian noise of per-sample ``std`` (b,), the same std for every channel; reproducible from ``seeds``."""
    for b in torch.nonzero(std > 0).flatten().tolist():
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seeds[b]))
        x[b].add_(torch.randn(x[b].shape, generator=generator, device=x.device, dtype=x.dtype), alpha=float(std[b]))


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1D Gaussian kernels ``(n, 2 * radius + 1)``; sigma 0 gives the identity."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    safe = torch.clamp(sigma, min=1e-3)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernels = torch.where(sigma[:, None] > 0, kernels, (offsets[None] == 0).float())
    return kernels / kernels.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, truncate: float = 4.0) -> None:
    """Blur the (sample, channel) pairs with any sigma > 0 by per-axis sigmas ``(b, c, dims)``: separable, each axis a
    sum of shifted copies (several times faster on CPU than a grouped convolution), edges replicated."""
    dims = x.ndim - 2
    for b, c in _pairs((sigma > 0).any(-1)):
        channel = x[b, c]
        for axis in range(dims):
            s = float(sigma[b, c, axis])
            length = channel.shape[axis]
            radius = min(math.ceil(truncate * s), length - 1)
            if s <= 0 or radius < 1:
                continue
            weights = _gaussian_kernels(sigma[b, c, axis:axis + 1], radius)[0].tolist()
            pad = [0, 0] * dims
            pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
            padded = F.pad(channel[None, None], pad, mode="replicate")[0, 0]
            out = padded.narrow(axis, 0, length) * weights[0]
            for k in range(1, 2 * radius + 1):
                out.add_(padded.narrow(axis, k, length), alpha=weights[k])
            channel = out
        x[b, c] = channel


def multiply_brightness(x: torch.Tensor, factor: torch.Tensor) -> None:
    """``x * factor`` for the pairs with a factor other than 1 (``factor`` (b, c))."""
    for b, c in _pairs(factor != 1):
        x[b, c].mul_(float(factor[b, c]))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> None:
    """Scale around the mean by ``factor`` (b, c) and clip to the channel's former range (nnU-Net's
    ``preserve_range``)."""
    for b, c in _pairs(factor != 1):
        channel = x[b, c]
        mean = channel.mean()
        low, high = torch.aminmax(channel)
        channel.sub_(mean).mul_(float(factor[b, c])).add_(mean).clamp_(low, high)


def simulate_low_resolution(x: torch.Tensor, scale: torch.Tensor, keep_axes: tuple[int, ...] = ()) -> None:
    """Downsample by ``scale`` (b, c) (nearest) and upsample back (linear) for the pairs with scale < 1; the spatial
    axes in ``keep_axes`` stay at full resolution (the slice axis of pseudo-2D augmentation)."""
    spatial = x.shape[2:]
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    for b, c in _pairs(scale < 1):
        small = [n if a in keep_axes else max(1, round(n * float(scale[b, c]))) for a, n in enumerate(spatial)]
        down = F.interpolate(x[b, c][None, None], size=small, mode="nearest-exact")
        x[b, c] = F.interpolate(down, size=list(spatial), mode=mode, align_corners=False)[0, 0]


def gamma(x: torch.Tensor, gammas: torch.Tensor, invert: bool) -> None:
    """nnU-Net's gamma transform for the pairs with gamma != 1: rescale to [0, 1], power, rescale back, restore the
    channel's mean and std; ``invert`` applies it to the negated image."""
    for b, c in _pairs(gammas != 1):
        channel = x[b, c]
        if invert:
            channel.neg_()
        mean, std = channel.mean(), channel.std()
        low, high = torch.aminmax(channel)
        span = high - low
        channel.sub_(low).div_(torch.clamp(span, min=EPS)).pow_(float(gammas[b, c])).mul_(span).add_(low)
        channel.sub_(channel.mean()).mul_(std / torch.clamp(channel.std(), min=EPS)).add_(mean)
        if invert:
            channel.neg_()
