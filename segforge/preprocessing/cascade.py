"""A cascade stage's extra input: the previous stage's mask (on a case's original grid) taken onto the grid the
stage's network sees, the same way in training and in prediction.

The previous stage's label map is cropped to the case's crop box and resampled as a label (the plan's label rule)
to the preprocessed shape, then one-hot encoded over the plan's ``previous_stage_labels`` (background and ignore
get no channel, as in nnU-Net). Training reads the resampled map from the previous stage's
``predicted_next_stage/<configuration>/CASE.npy`` (written by its final validation); prediction makes it from the
previous stage's mask of the same input.
"""

from __future__ import annotations

import numpy as np
import torch

from segforge.preprocessing.crop import crop
from segforge.preprocessing.resample import resample_label

NEXT_STAGE_FOLDER = "predicted_next_stage"  # in the previous stage's model folder, one subfolder per next stage


def previous_stage_on_grid(mask: np.ndarray, properties: dict) -> np.ndarray:
    """``(z, y, x)`` label map on a case's original grid -> int16 map on its preprocessed grid (``properties``: the
    case's preprocessing properties, ``CASE.json`` or ``preprocess_image``'s)."""
    if list(mask.shape) != list(properties["shape_before_crop"]):
        raise ValueError(f"the previous stage's mask has shape {list(mask.shape)}, the image "
                         f"{properties['shape_before_crop']}")
    cropped = crop(np.asarray(mask), properties["crop_bbox"]).astype(np.int16, copy=False)
    return resample_label(cropped, properties["shape_after_resampling"],
                          modes=(properties.get("resampling") or {}).get("label")).astype(np.int16, copy=False)


def one_hot(label: np.ndarray | torch.Tensor, values: list[int]):
    """``(*spatial)`` (or ``(b, 1, *spatial)``) label map -> one float32 channel per value of ``values`` (on the
    channel axis: first for an array, 1 for a batch tensor)."""
    if isinstance(label, torch.Tensor):
        return torch.cat([(label == v).float() for v in values], dim=1)
    return np.stack([(label == v) for v in values]).astype(np.float32)
