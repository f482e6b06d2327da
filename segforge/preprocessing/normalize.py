"""Per-channel intensity normalisation as the plan says (CT clip + dataset z-score, per-image z-score, dataset
z-score without clipping ("global", what denoising plans use), rescale, none), as explicit parameters so that the
step can be recorded and inverted.

``normalization_parameters`` turns the plan's scheme and one image into ``{"clip", "shift", "scale",
"mask_outside"}`` per channel (normalised = (clip(x) - shift) / scale); ``apply_normalization`` applies them in
place; ``invert_normalization`` undoes them (up to the clipping).
"""

from __future__ import annotations

import numpy as np


def normalization_parameters(image: np.ndarray, schemes: list[dict]) -> list[dict]:
    """The affine map of each channel of ``(c, *spatial)`` ``image`` under its plan entry (JSON-able floats)."""
    nonzero = None
    applied = []
    for channel, entry in enumerate(schemes):
        scheme = entry["scheme"]
        data = image[channel]
        params = {"scheme": scheme, "clip": None, "shift": 0.0, "scale": 1.0, "mask_outside": False}
        if scheme == "ct":
            params.update(clip=[float(entry["clip"][0]), float(entry["clip"][1])], shift=float(entry["mean"]),
                          scale=float(max(entry["std"], 1e-8)))
        elif scheme == "global":  # the dataset's mean and std: the same map for every image
            params.update(shift=float(entry["mean"]), scale=float(max(entry["std"], 1e-8)))
        elif scheme == "zscore":
            if entry.get("use_nonzero_mask"):
                nonzero = np.any(image != 0, axis=0) if nonzero is None else nonzero
            use_mask = bool(entry.get("use_nonzero_mask")) and nonzero.any()
            values = data[nonzero] if use_mask else data
            params.update(shift=float(values.mean(dtype=np.float64)), scale=float(max(values.std(dtype=np.float64), 1e-8)),
                          mask_outside=use_mask)
        elif scheme == "rescale":  # per image to [0, 1] (nnU-Net's rescale_to_0_1 / rgb_to_0_1)
            low, high = float(data.min()), float(data.max())
            params.update(shift=low, scale=max(high - low, 1e-8))
        elif scheme != "none":
            raise ValueError(f"unknown normalisation scheme {scheme!r} for channel {channel}")
        applied.append(params)
    return applied


def apply_normalization(image: np.ndarray, applied: list[dict]) -> np.ndarray:
    """Normalise float ``(c, *spatial)`` ``image`` in place by ``normalization_parameters``; returns it."""
    outside = None
    if any(p["mask_outside"] for p in applied):
        outside = ~np.any(image != 0, axis=0)  # before any channel changes
    for channel, params in enumerate(applied):
        data = image[channel]
        if params["clip"] is not None:
            np.clip(data, params["clip"][0], params["clip"][1], out=data)
        if params["shift"] != 0.0:
            data -= np.float32(params["shift"])
        if params["scale"] != 1.0:
            data *= np.float32(1.0 / params["scale"])
        if params["mask_outside"]:
            data[outside] = 0
    return image


def invert_normalization(image: np.ndarray, applied: list[dict]) -> np.ndarray:
    """Undo ``apply_normalization`` in place (clipped intensities stay clipped; masked background comes back as the
    channel's mean); returns ``image``."""
    for channel, params in enumerate(applied):
        data = image[channel]
        data *= np.float32(params["scale"])
        data += np.float32(params["shift"])
    return image


def normalize(image: np.ndarray, schemes: list[dict]) -> np.ndarray:
    """Normalise each channel of ``(c, *spatial)`` float32 ``image`` in place by its plan entry; returns it."""
    return apply_normalization(image, normalization_parameters(image, schemes))
