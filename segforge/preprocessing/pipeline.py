"""Preprocess cases per plans.json into memory-mappable arrays, resumably; the same steps serve prediction.

Per case and configuration, in ``<preprocessed>/<configuration>/``:
``CASE.npy`` (float32 ``(c, z, y, x)``), ``CASE_seg.npy`` (int16 ``(z, y, x)``), ``CASE_locations.npy`` (int32 rows
``(class, z, y, x)``: a bounded sample of foreground voxels for oversampling) and ``CASE.json`` (geometry, crop box,
shapes: everything needed to invert the steps). ``CASE.json`` is written last and carries the plan's hash, so a
case counts as done only when complete and made from the current plan: a re-run after a crash redoes only
unfinished cases, and an edited plan invalidates old output.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from segforge.io.artifacts import read_json, save_npy_atomic, write_json
from segforge.io.dataset import Case
from segforge.io.image import Geometry, read_case, read_image
from segforge.preprocessing.crop import crop, nonzero_bbox
from segforge.preprocessing.normalize import normalize
from segforge.parallel import progress_map
from segforge.preprocessing.resample import resample_image, resample_label, shape_at_spacing

log = logging.getLogger(__name__)


def plan_hash(plans: dict, configuration: str) -> str:
    """Hash of everything in the plan that changes preprocessed output."""
    relevant = {"normalization": plans["normalization"], "target_spacing": plans["configurations"][configuration]["target_spacing"]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def preprocess_image(image: np.ndarray, geometry: Geometry, plans: dict, configuration: str) -> tuple[np.ndarray, dict]:
    """Crop, normalise and resample a ``(c, z, y, x)`` image; returns it and the properties to invert the steps."""
    bbox = nonzero_bbox(image)
    data = np.array(crop(image, bbox), dtype=np.float32)
    normalize(data, plans["normalization"])
    target = plans["configurations"][configuration]["target_spacing"]
    new_shape = shape_at_spacing(list(data.shape[1:]), list(geometry.spacing), target)
    properties = {
        "geometry": geometry.to_json(),
        "shape_before_crop": list(image.shape[1:]),
        "crop_bbox": bbox,
        "shape_after_crop": list(data.shape[1:]),
        "shape_after_resampling": new_shape,
        "spacing_after_resampling": [sp if t is None else t for sp, t in zip(geometry.spacing, target)],
    }
    return resample_image(data, new_shape), properties


def foreground_locations(seg: np.ndarray, values: list[int], per_class: int, seed: int) -> np.ndarray:
    """Up to ``per_class`` random voxel coordinates of each class present, as int32 rows (class, z, y, x)."""
    rng = np.random.default_rng(seed)
    rows = []
    for value in values:
        coords = np.argwhere(seg == value)
        if len(coords) > per_class:
            coords = coords[rng.choice(len(coords), per_class, replace=False)]
        if len(coords):
            rows.append(np.concatenate([np.full((len(coords), 1), value), coords], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def case_done(out_dir: Path, case_id: str, digest: str) -> bool:
    props = out_dir / f"{case_id}.json"
    if not props.is_file() or not all((out_dir / f"{case_id}{s}.npy").is_file() for s in ("", "_seg", "_locations")):
        return False
    try:
        return read_json(props, "case_properties").get("plan_hash") == digest
    except Exception:  # an unreadable leftover is simply redone
        return False


def preprocess_case(case: Case, plans: dict, configuration: str, out_dir: Path, label_values: list[int],
                    per_class: int, digest: str) -> str:
    image, geometry = read_case(case.image_files)
    data, properties = preprocess_image(image, geometry, plans, configuration)
    label, _ = read_image(case.label_file)
    seg = crop(label[None], properties["crop_bbox"])[0]
    seg = resample_label(seg.astype(np.int16), properties["shape_after_resampling"], label_values)
    seed = int(hashlib.sha256(case.case_id.encode()).hexdigest()[:8], 16)
    foreground = [v for v in label_values if v != 0]
    save_npy_atomic(out_dir / f"{case.case_id}.npy", data)
    save_npy_atomic(out_dir / f"{case.case_id}_seg.npy", seg.astype(np.int16))
    save_npy_atomic(out_dir / f"{case.case_id}_locations.npy", foreground_locations(seg, foreground, per_class, seed))
    properties.update(case_id=case.case_id, plan_hash=digest, classes_present=[int(v) for v in np.unique(seg)])
    write_json(out_dir / f"{case.case_id}.json", properties, kind="case_properties")
    return case.case_id


def run_preprocessing(cases: list[Case], plans: dict, configuration: str, out_dir: Path, label_values: list[int],
                      num_workers: int = 2, per_class: int = 10000) -> dict:
    """Preprocess every unfinished case of one configuration; returns counts of done and skipped cases."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = plan_hash(plans, configuration)
    todo = [c for c in cases if not case_done(out_dir, c.case_id, digest)]
    log.info("preprocess %s: %d case(s) to do, %d already done", configuration, len(todo), len(cases) - len(todo))
    args = [(c, plans, configuration, out_dir, label_values, per_class, digest) for c in todo]
    for _ in progress_map(preprocess_case, args, num_workers, f"preprocess {configuration}"):
        pass
    write_json(out_dir / "manifest.json", {"configuration": configuration, "plan_hash": digest,
                                          "cases": [c.case_id for c in cases]}, kind="preprocessing_manifest")
    return {"done": len(todo), "skipped": len(cases) - len(todo)}
