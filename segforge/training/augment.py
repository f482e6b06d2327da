"""Augmentation: settings from ``data.augmentation``, per-sample random parameters, and the batch-level ``Augmenter``.

Why our own and not batchgeneratorsv2 or MONAI's transforms: the work is split so that each part runs where it
is cheapest. ``draw_sample`` draws every random number of a sample up front (on the loader side, from the sample's
own seed); the data loader then crops only the source box the spatial transform reads from the memory-mapped case
(patches without a spatial transform are plain crops, mirrored for free by the copy); ``Augmenter`` turns the
collated crops into the final batch with one resampling per warped patch and the intensity transforms, in torch
on whichever device the batch is on: the training GPU when there is one, else the CPU loader workers. The same
seed gives the same patch in either place (noise aside, whose generator is the device's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from segforge.configs import packaged_defaults
from segforge.training import intensity
from segforge.training.spatial import affine_matrix, sampling_grid, smooth_displacement, warp_image, warp_label


@dataclass(frozen=True)
class AugmentationSettings:
    """``data.augmentation``; its defaults (nnU-Net's set and ranges) live only in configs/data/default.yaml, which
    ``from_config`` merges under the given values."""

    rotation_prob: float
    rotation_deg: float | None
    scale_prob: float
    scale_range: tuple[float, float]
    elastic_prob: float
    elastic_spacing: tuple[float, float]
    elastic_magnitude: tuple[float, float]
    pseudo_2d: bool | str
    label_interpolation: str
    noise_prob: float
    noise_std: tuple[float, float]
    blur_prob: float
    blur_prob_per_channel: float
    blur_sigma: tuple[float, float]
    brightness_prob: float
    brightness_range: tuple[float, float]
    contrast_prob: float
    contrast_range: tuple[float, float]
    lowres_prob: float
    lowres_prob_per_channel: float
    lowres_scale: tuple[float, float]
    gamma_inverted_prob: float
    gamma_prob: float
    gamma_range: tuple[float, float]
    mirror_prob: float
    mirror_axes: tuple[int, ...] | None
    previous_stage_morphology_prob: float
    previous_stage_morphology_radius: tuple[float, float]
    previous_stage_component_removal_prob: float
    previous_stage_component_max_fraction: float

    @classmethod
    def from_config(cls, cfg=None) -> "AugmentationSettings":
        """From a plain dict (``OmegaConf.to_container`` of ``data.augmentation``) over the packaged defaults;
        unknown keys are refused, and None keeps the default of a key whose default is not None itself."""
        values = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data.augmentation key(s) {unknown}; known: {sorted(known)}")
        defaults = packaged_defaults("data")["augmentation"]
        values = {**defaults, **{k: v for k, v in values.items() if v is not None or defaults[k] is None}}
        settings = cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})
        if settings.label_interpolation not in ("linear", "nearest"):
            raise ValueError(f"data.augmentation.label_interpolation={settings.label_interpolation!r}; use linear or nearest")
        return settings


@dataclass(frozen=True)
class PatchGeometry:
    """What the spatial transforms of one configuration look like (resolved from the settings and the patch)."""

    dims: int
    patch_size: tuple[int, ...]
    pseudo_2d: bool          # 3D patches of thin slabs: rotate and scale in-plane only
    rotation_rad: float
    mirror_axes: tuple[int, ...]

    @classmethod
    def resolve(cls, settings: AugmentationSettings, patch_size, plan_mirror_axes=None) -> "PatchGeometry":
        patch = tuple(int(p) for p in patch_size)
        dims = len(patch)
        pseudo = settings.pseudo_2d
        if pseudo == "auto":  # nnU-Net's rule: a 3D patch whose in-plane size exceeds 3x its slice count
            pseudo = dims == 3 and max(patch) / patch[0] > 3
        pseudo = bool(pseudo) and dims == 3
        if settings.rotation_deg is not None:
            degrees = float(settings.rotation_deg)
        elif dims == 2:
            degrees = 15.0 if max(patch) / min(patch) > 1.5 else 180.0
        else:
            degrees = 180.0 if pseudo else 30.0
        axes = settings.mirror_axes if settings.mirror_axes is not None else plan_mirror_axes
        axes = tuple(range(dims)) if axes is None else tuple(int(a) for a in axes)
        if any(not 0 <= a < dims for a in axes):
            raise ValueError(f"mirror axes {list(axes)} do not fit {dims}D patches")
        return cls(dims, patch, pseudo, math.radians(degrees), axes)


def _bg_range(rng: np.random.Generator, low: float, high: float) -> float:
    """batchgenerators' contrast-style draw: half the time below 1, half above (when the range straddles 1)."""
    if low < 1 < high and rng.random() < 0.5:
        return float(rng.uniform(low, 1))
    return float(rng.uniform(max(low, 1.0) if low < 1 < high else low, high))


def draw_spatial(rng: np.random.Generator, settings: AugmentationSettings, geometry: PatchGeometry) -> dict:
    """Spatial parameters of one sample: ``matrix`` (A, or None for a plain crop), ``mirror`` flags, ``elastic``
    coarse displacements (``(dims, *control)`` in voxels, or None) and their largest magnitude per axis."""
    dims = geometry.dims
    mirror = [a in geometry.mirror_axes and rng.random() < settings.mirror_prob for a in range(dims)]
    rotate = rng.random() < settings.rotation_prob
    scale = rng.random() < settings.scale_prob
    elastic = rng.random() < settings.elastic_prob
    if not (rotate or scale or elastic):
        return {"matrix": None, "mirror": mirror, "elastic": None, "elastic_max": None}
    if dims == 2:
        angles = [rng.uniform(-geometry.rotation_rad, geometry.rotation_rad) if rotate else 0.0]
    elif geometry.pseudo_2d:
        angles = [rng.uniform(-geometry.rotation_rad, geometry.rotation_rad) if rotate else 0.0, 0.0, 0.0]
    else:
        angles = [rng.uniform(-geometry.rotation_rad, geometry.rotation_rad) if rotate else 0.0 for _ in range(3)]
    factor = float(rng.uniform(*settings.scale_range)) if scale else 1.0
    scales = [1.0 if geometry.pseudo_2d and a == 0 else factor for a in range(dims)]
    coarse, largest = None, None
    if elastic:
        patch = np.asarray(geometry.patch_size, float)
        spacing = rng.uniform(*settings.elastic_spacing)
        magnitude = rng.uniform(*settings.elastic_magnitude) * patch
        if geometry.pseudo_2d:
            magnitude[0] = 0.0
        control = [max(2, int(round(1 / spacing)) + 1) for _ in range(dims)]
        coarse = rng.standard_normal((dims, *control)).astype(np.float32)
        coarse /= max(float(np.abs(coarse).max()), 1e-6)
        coarse *= magnitude.reshape(-1, *([1] * dims)).astype(np.float32)
        largest = magnitude
    return {"matrix": affine_matrix(angles, scales, mirror), "mirror": mirror, "elastic": coarse, "elastic_max": largest}


def draw_intensity(rng: np.random.Generator, settings: AugmentationSettings, channels: int, dims: int) -> dict:
    """Intensity parameters of one sample, neutral where a transform is not applied (see ``intensity``)."""
    def per_channel(prob_sample: float, prob_channel: float, draw) -> np.ndarray:
        out = np.ones(channels, np.float32)
        if rng.random() < prob_sample:
            for c in range(channels):
                if rng.random() < prob_channel:
                    out[c] = draw()
        return out

    noise = float(rng.uniform(*settings.noise_std)) if rng.random() < settings.noise_prob else 0.0
    blur = np.zeros((channels, dims), np.float32)
    if rng.random() < settings.blur_prob:
        for c in range(channels):
            if rng.random() < settings.blur_prob_per_channel:
                blur[c] = rng.uniform(*settings.blur_sigma, size=dims)
    return {
        "noise_std": np.float32(noise),
        "blur_sigma": blur,
        "brightness": per_channel(settings.brightness_prob, 1.0, lambda: _bg_range(rng, *settings.brightness_range)),
        "contrast": per_channel(settings.contrast_prob, 1.0, lambda: _bg_range(rng, *settings.contrast_range)),
        "lowres": per_channel(settings.lowres_prob, settings.lowres_prob_per_channel, lambda: rng.uniform(*settings.lowres_scale)),
        "gamma_inverted": per_channel(settings.gamma_inverted_prob, 1.0, lambda: _bg_range(rng, *settings.gamma_range)),
        "gamma": per_channel(settings.gamma_prob, 1.0, lambda: _bg_range(rng, *settings.gamma_range)),
    }


class Augmenter:
    """Collated crops -> ``(image (b, c, *patch) float32, label (b, 1, *patch) int16)`` on the batch's device.

    Warped samples (with a ``matrix``) are resampled once each from their source box; plain samples are already
    the patch. Then the intensity transforms run on the whole batch in nnU-Net's order. ``settings=None``
    (validation) only stacks. Samples without labels (``label`` None) give ``(image, None)``.
    """

    def __init__(self, settings: AugmentationSettings | None, geometry: PatchGeometry,
                 previous_labels: list[int] | None = None):
        """``previous_labels``: a cascade stage's (the batches carry the previous stage's maps): the maps are
        warped as labels, one-hot encoded over these values, perturbed (``morphology``) and appended to the image
        channels after the intensity transforms, which never touch them."""
        self.settings, self.geometry, self.previous_labels = settings, geometry, previous_labels

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        patch = list(self.geometry.patch_size)
        images, labels, priors = [], [], []
        interpolation = self.settings.label_interpolation if self.settings else "linear"
        previous = batch.get("previous") or [None] * len(batch["image"])
        for b, (image, label, prior) in enumerate(zip(batch["image"], batch["label"], previous)):
            matrix = batch["matrix"][b]
            if matrix.numel():
                displacement = None
                if batch["elastic"][b].numel():
                    displacement = smooth_displacement(batch["elastic"][b], patch)
                grid = sampling_grid(matrix, batch["offset"][b], patch, image.shape[1:], displacement)
                image = warp_image(image, grid)
                if label is not None:
                    label = warp_label(label, grid, interpolation)
                if prior is not None:
                    prior = warp_label(prior, grid, interpolation)
            images.append(image)
            labels.append(label)
            priors.append(prior)
        image = torch.stack(images).float()
        label = torch.stack(labels) if labels[0] is not None else None
        if self.settings is not None and "params" in batch:
            self._intensity(image, batch["params"], batch["seed"])
        if self.previous_labels is not None:
            image = torch.cat([image, self._previous_channels(torch.stack(priors), batch)], dim=1)
        return image, label

    def _previous_channels(self, priors: torch.Tensor, batch: dict) -> torch.Tensor:
        from segforge.preprocessing.cascade import one_hot
        from segforge.training.morphology import perturb_one_hot

        channels = one_hot(priors.to(torch.int16), self.previous_labels)
        if self.settings is not None and "params" in batch:  # training patches only
            for b in range(channels.shape[0]):
                perturb_one_hot(channels[b], np.random.default_rng([int(batch["seed"][b]), 1]), self.settings)
        return channels

    def _intensity(self, x: torch.Tensor, params: dict, seeds: torch.Tensor) -> None:
        keep = (0,) if self.geometry.pseudo_2d else ()
        intensity.add_noise(x, params["noise_std"], seeds)
        intensity.gaussian_blur(x, params["blur_sigma"])
        intensity.multiply_brightness(x, params["brightness"])
        intensity.adjust_contrast(x, params["contrast"])
        intensity.simulate_low_resolution(x, params["lowres"], keep)
        intensity.gamma(x, params["gamma_inverted"], invert=True)
        intensity.gamma(x, params["gamma"], invert=False)
