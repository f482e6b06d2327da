"""Oracle intensity-window baseline: the best Dice any ``lo <= intensity <= hi`` rule reaches per class, on arrays or
on a dataset's held-out cases (``threshold_baseline``, what the demo reports beside segforge's Dice).

This is an *oracle*: the window is chosen on the very cases it is scored on, so it is an upper bound for every
intensity-threshold rule, not a fair competitor. A model that beats it must be using shape and context. Images
are z-scored per case first (as the segmentation pipeline does), so per-case intensity scaling does not handicap
the baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def zscore(image: np.ndarray) -> np.ndarray:
    """``image`` as float64 with zero mean and unit standard deviation."""
    image = np.asarray(image, dtype=np.float64)
    return (image - image.mean()) / max(float(image.std()), 1e-8)


def best_threshold_dice(images: list[np.ndarray], labels: list[np.ndarray], classes: list[int],
                        num_quantiles: int = 40) -> dict[int, float]:
    """Per class, the best Dice pooled over all cases of predicting it where ``lo <= z-scored intensity <= hi``.

    ``lo`` and ``hi`` range over ``num_quantiles`` quantiles of the pooled z-scored intensities (all pairs with
    ``lo < hi``). Counts for every pair come from sorted values (``searchsorted``), so the search is vectorised.
    A class absent from every label gets ``nan``.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for image, label in zip(images, labels):
        if np.shape(image) != np.shape(label):
            raise ValueError(f"image shape {np.shape(image)} differs from label shape {np.shape(label)}")
    values = np.concatenate([zscore(image).ravel() for image in images])
    classes_of = np.concatenate([np.asarray(label).ravel() for label in labels])
    edges = np.unique(np.quantile(values, np.linspace(0, 1, num_quantiles)))
    ordered = np.sort(values)
    # predicted[i, j] = #voxels with edges[i] <= v <= edges[j]
    predicted = np.searchsorted(ordered, edges, "right")[None, :] - np.searchsorted(ordered, edges, "left")[:, None]
    valid = np.triu(np.ones((edges.size, edges.size), bool), k=1)
    result = {}
    for value in classes:
        inside = np.sort(values[classes_of == value])
        if inside.size == 0:
            result[int(value)] = float("nan")
            continue
        hits = np.searchsorted(inside, edges, "right")[None, :] - np.searchsorted(inside, edges, "left")[:, None]
        dice = np.where(valid, 2 * hits / np.maximum(predicted + inside.size, 1), 0.0)
        result[int(value)] = float(dice.max())
    return result


def threshold_baseline(dataset: Path, labels: dict) -> dict:
    """Per class name of ``labels`` (dataset.json's), the oracle window's Dice on ``imagesTs``/``labelsTs``."""
    from segforge.io.image import read_image

    ending = json.loads((dataset / "dataset.json").read_text())["file_ending"]
    images, refs = [], []
    for ref in sorted((dataset / "labelsTs").glob(f"*{ending}")):
        case = ref.name[: -len(ending)]
        images.append(read_image(dataset / "imagesTs" / f"{case}_0000{ending}")[0].astype(np.float32))
        refs.append(read_image(ref)[0])
    classes = {name: v for name, v in labels.items() if isinstance(v, int) and v != 0 and name != "ignore"}
    scores = best_threshold_dice(images, refs, list(classes.values()))
    return {name: float(scores[v]) for name, v in classes.items()}
