"""Patch augmentation on CPU workers: mirroring per axis and intensity changes; labels move with the image.

First form: mirroring, intensity scaling and Gaussian noise, each with its probability in ``data.augmentation``.
Labels are only ever flipped (never interpolated), so no new label values can appear.
"""

from __future__ import annotations

import numpy as np


def augment_patch(image: np.ndarray, label: np.ndarray, cfg: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augment ``(c, *spatial)`` ``image`` and ``(*spatial)`` ``label`` together."""
    for axis in cfg.get("mirror_axes") or []:
        if rng.random() < cfg.get("mirror_prob", 0.0):
            image = np.flip(image, axis=axis + 1)
            label = np.flip(label, axis=axis)
    if rng.random() < cfg.get("intensity_scale_prob", 0.0):
        low, high = cfg.get("intensity_scale_range", (0.75, 1.25))
        image = image * np.float32(rng.uniform(low, high))
    if rng.random() < cfg.get("noise_prob", 0.0):
        std = np.float32(rng.uniform(0, cfg.get("noise_std", 0.1)))
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * std
    return np.ascontiguousarray(image), np.ascontiguousarray(label)
