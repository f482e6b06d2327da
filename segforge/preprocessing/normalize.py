"""Per-channel intensity normalisation as the plan says: CT clip + global z-score, per-image z-score, rescale, none."""

from __future__ import annotations

import numpy as np


def normalize(image: np.ndarray, schemes: list[dict]) -> np.ndarray:
    """Normalise each channel of ``(c, *spatial)`` float32 ``image`` in place by its plan entry; returns it."""
    nonzero = np.any(image != 0, axis=0)
    for channel, entry in enumerate(schemes):
        data = image[channel]
        scheme = entry["scheme"]
        if scheme == "ct":
            np.clip(data, entry["clip"][0], entry["clip"][1], out=data)
            data -= entry["mean"]
            data /= max(entry["std"], 1e-8)
        elif scheme == "zscore":
            mask = nonzero if entry.get("use_nonzero_mask") and nonzero.any() else None
            values = data[mask] if mask is not None else data
            mean, std = float(values.mean()), float(values.std())
            data -= mean
            data /= max(std, 1e-8)
            if mask is not None:
                data[~mask] = 0
        elif scheme == "rescale":  # per image to [0, 1] (nnU-Net's rescale_to_0_1 / rgb_to_0_1)
            low, high = float(data.min()), float(data.max())
            data -= low
            data /= max(high - low, 1e-8)
        elif scheme != "none":
            raise ValueError(f"unknown normalisation scheme {scheme!r} for channel {channel}")
    return image
