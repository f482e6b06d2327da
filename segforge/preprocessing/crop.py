"""Crop a case to the nonzero region of all its channels, and paste a result back (pure array functions)."""

from __future__ import annotations

import numpy as np


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` per spatial axis of the region where any channel of ``(c, *spatial)`` is nonzero.

    An image with no nonzero voxel keeps its full extent (nothing to crop to).
    """
    mask = np.any(image != 0, axis=0)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, mask.shape[axis]])
    return bbox


def crop(array: np.ndarray, bbox: list[list[int]]) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` to ``bbox`` (leading axes such as channels are kept)."""
    lead = array.ndim - len(bbox)
    return array[(slice(None),) * lead + tuple(slice(a, b) for a, b in bbox)]


def paste(cropped: np.ndarray, bbox: list[list[int]], full_shape: tuple[int, ...], fill=0) -> np.ndarray:
    """Inverse of ``crop``: place ``cropped`` into an array of ``full_shape`` (spatial) filled with ``fill``."""
    lead = cropped.shape[: cropped.ndim - len(bbox)]
    out = np.full(tuple(lead) + tuple(full_shape), fill, dtype=cropped.dtype)
    out[(slice(None),) * len(lead) + tuple(slice(a, b) for a, b in bbox)] = cropped
    return out
