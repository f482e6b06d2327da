"""The checks every case meets before a model runs on it (predict, and denoise with a denoising model): the
channels the model takes, voxels present, a 3D model not given a single slice, and few enough NaN/inf voxels."""

from __future__ import annotations

import numpy as np

from segforge.errors import SegforgeError
from segforge.io.image import Geometry, replace_nonfinite


def check_input(model, image: np.ndarray, geometry: Geometry, names: list | None = None,
                copy: bool = True) -> tuple[np.ndarray, list[str]]:
    """Refuse a case that ``model`` (a Predictor or an Ensemble) cannot predict meaningfully, naming the file to fix:
    the wrong number of channels, no voxels, a 2D image for a 3D model, many NaN/inf voxels. A few NaN/inf voxels are
    replaced (``replace_nonfinite``: the rule and why); returns the image to predict and warnings to report.
    ``names``: the channel files (for messages); ``copy=False`` lets the replacement work inside ``image``."""
    expected = len(model.plans["channel_names"])
    if image.ndim != 4 or image.shape[0] != expected:
        raise SegforgeError(f"the model expects {expected} channel(s) of 3D (or single-slice 2D) images, the input has "
                            f"shape {tuple(image.shape)}")
    names = list(names) if names else [f"channel {c}" for c in range(expected)]
    if 0 in image.shape:
        raise SegforgeError(f"{names[0]}: has a zero-size axis (shape {tuple(image.shape[1:])}): it holds no voxels. "
                            "Fix: re-export the image from the original data")
    for member in getattr(model, "predictors", [model]):
        if geometry.ndim == 2 and member.plan_config["dims"] == 3:  # its fake 999 spacing would be resampled 300x
            raise SegforgeError(f"{names[0]}: is a 2D image, but the model ({member.configuration}) is 3D: it was "
                                "trained on volumes and cannot segment a single slice. Fix: give the whole 3D volume, "
                                "or predict with a 2d model")
    return replace_nonfinite(image, names, copy=copy)
