"""nnU-Net's random perturbations of a cascade stage's one-hot previous-stage channels, so the network learns to
correct the previous stage rather than copy it: per sample, a random binary operator (dilation, erosion, opening or
closing with a ball of random radius) on each channel (``ApplyRandomBinaryOperatorTransform``), and the removal of
one random small connected component per channel (``RemoveRandomConnectedComponentFromOneHotEncodingTransform``).
Probabilities and sizes: ``data.augmentation.previous_stage_*``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def ball(radius: int, dims: int, device: torch.device) -> torch.Tensor:
    """A ``(1, 1, *[2r+1]*dims)`` ball (disk in 2D) of ``radius`` voxels, as a convolution kernel."""
    axis = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    grids = torch.meshgrid(*[axis] * dims, indexing="ij")
    return (sum(g ** 2 for g in grids) <= radius ** 2).float()[None, None]


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a ``(*spatial)`` 0/1 map by a ball of ``radius`` (outside the patch counts as empty).

    On a GPU a convolution with the ball; on a CPU the same ball through the Euclidean distance transform (a voxel
    is in the dilation when its distance to the mask is at most ``radius``), because a convolution with a 17^3 ball
    took 3 s per 64x96x96 channel there, the transform 0.1 s."""
    if mask.device.type == "cpu":
        inside = mask.numpy() > 0.5
        if not inside.any():
            return torch.zeros_like(mask)
        return torch.from_numpy(ndimage.distance_transform_edt(~inside) <= radius).to(mask.dtype)
    kernel = ball(radius, mask.ndim, mask.device)
    conv = F.conv3d if mask.ndim == 3 else F.conv2d
    return (conv(mask[None, None], kernel, padding=radius)[0, 0] > 0.5).float()


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return 1.0 - dilate(1.0 - mask, radius)


OPERATORS = {"dilation": lambda m, r: dilate(m, r), "erosion": lambda m, r: erode(m, r),
             "opening": lambda m, r: dilate(erode(m, r), r), "closing": lambda m, r: erode(dilate(m, r), r)}


def perturb_one_hot(channels: torch.Tensor, rng: np.random.Generator, settings) -> None:
    """Perturb one sample's ``(c, *spatial)`` one-hot channels in place (``settings``: AugmentationSettings)."""
    count = channels.shape[0]
    if rng.random() < settings.previous_stage_morphology_prob:
        for c in rng.permutation(count):
            name = list(OPERATORS)[int(rng.integers(len(OPERATORS)))]
            low, high = settings.previous_stage_morphology_radius
            radius = int(round(rng.uniform(low, high)))
            before = channels[c].clone()
            channels[c] = OPERATORS[name](before, radius)
            added = (channels[c] - before) > 0
            for other in range(count):  # one-hot stays one-hot: what a channel gained, the others lose
                if other != c:
                    channels[other][added] = 0.0
    if rng.random() < settings.previous_stage_component_removal_prob:
        largest = settings.previous_stage_component_max_fraction * float(np.prod(channels.shape[1:]))
        for c in range(count):
            components, found = ndimage.label(channels[c].cpu().numpy() > 0.5)
            if not found:
                continue
            sizes = np.bincount(components.ravel())[1:]
            small = [i + 1 for i, size in enumerate(sizes) if size < largest]
            if small:
                chosen = torch.from_numpy(components == small[int(rng.integers(len(small)))]).to(channels.device)
                channels[c][chosen] = 0.0
