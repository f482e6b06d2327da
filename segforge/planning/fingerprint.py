"""Dataset fingerprint: per-case geometry and sizes, per-channel foreground intensities, per-class voxel counts.

Written as ``<work>/<dataset>/fingerprint.json``. Intensities are a bounded sample of voxels inside the labels,
spread evenly over cases, so memory stays bounded whatever the dataset size.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from segforge.io.dataset import Case, DatasetSpec
from segforge.io.image import read_case, read_image
from segforge.preprocessing.crop import crop, nonzero_bbox

log = logging.getLogger(__name__)


def fingerprint_case(case: Case, label_values: list[int], samples_per_case: int, seed: int) -> dict:
    image, geometry = read_case(case.image_files)
    bbox = nonzero_bbox(image)
    cropped = crop(image, bbox)
    result = {
        "case_id": case.case_id,
        "spacing": list(geometry.spacing),
        "shape_before_crop": list(image.shape[1:]),
        "shape_after_crop": list(cropped.shape[1:]),
        "relative_size_after_crop": float(np.prod(cropped.shape[1:]) / max(1, np.prod(image.shape[1:]))),
    }
    if case.label_file is not None:
        label, _ = read_image(case.label_file)
        label = crop(label[None], bbox)[0]
        foreground = label > 0
        values = cropped[:, foreground]
        rng = np.random.default_rng(seed)
        if values.shape[1] > samples_per_case:
            values = values[:, rng.choice(values.shape[1], samples_per_case, replace=False)]
        result["foreground_samples"] = values.tolist()
        counts = np.bincount(label.reshape(-1).astype(np.int64), minlength=max(label_values) + 1)
        result["class_voxels"] = {str(v): int(counts[v]) for v in label_values}
    return result


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {k: 0.0 for k in ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "percentile_00_5": float(np.percentile(values, 0.5)),
        "percentile_99_5": float(np.percentile(values, 99.5)),
    }


def compute_fingerprint(spec: DatasetSpec, num_workers: int = 2, total_samples: int = 100_000, seed: int = 0) -> dict:
    """The fingerprint of every training case (parallel over cases), as a JSON-ready dict."""
    per_case_samples = max(1, total_samples // max(1, len(spec.cases)))
    args = [(case, spec.label_values, per_case_samples, seed + i) for i, case in enumerate(spec.cases)]
    if num_workers > 1 and len(args) > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            results = list(pool.map(fingerprint_case, *zip(*args)))
    else:
        results = [fingerprint_case(*a) for a in args]
    samples = [np.asarray(r.pop("foreground_samples"), dtype=np.float64).reshape(spec.num_channels, -1)
               for r in results if "foreground_samples" in r]
    pooled = np.concatenate(samples, axis=1) if samples else np.zeros((spec.num_channels, 0))
    return {
        "dataset_name": spec.name,
        "num_cases": len(results),
        "channel_names": {str(k): v for k, v in spec.channel_names.items()},
        "labels": spec.labels,
        "intensity_foreground": {str(c): _stats(pooled[c]) for c in range(spec.num_channels)},
        "cases": results,
    }
