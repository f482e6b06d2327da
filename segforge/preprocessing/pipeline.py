"""Preprocess cases per plans.json into memory-mappable arrays, resumably; the same steps (and their exact inverse)
serve prediction.

Per case and configuration, in ``<preprocessed>/<configuration>/``:
``CASE.npy`` (float32 ``(c, z, y, x)``), ``CASE_seg.npy`` (int16 ``(z, y, x)``), ``CASE_locations.npy`` (int32 rows
``(class, z, y, x)``: a bounded uniform sample of each foreground class's voxels, for oversampling) and ``CASE.json``
(geometry, crop box, shapes, the normalisation and resampling applied: everything needed to invert the steps).
A case without a label (an unlabelled dataset, for ``task=denoise``) has only ``CASE.npy`` and ``CASE.json``
(``"labelled": false``); the manifest says whether every case is labelled.
Uncompressed ``.npy`` on purpose: a random patch is a memory-mapped slice, read without decoding anything else.

The folder is named by the configuration's ``data_identifier`` (``data_identifier``: its name and the first
characters of ``plan_hash``), so two plans whose configurations would write the same arrays share one folder.

``CASE.json`` is written last and carries the preprocessing hash (plan values that change the output, settings,
code version), so a case counts as done only when complete and made the current way: a re-run after a crash
redoes only unfinished cases, and an edited plan invalidates old output. Every file is written under a temporary
name and renamed into place. Cases run in worker processes that return only their id, so memory is a few cases'
worth whatever the dataset's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from segforge.io.artifacts import read_json, save_npy_atomic, write_json
from segforge.io.dataset import Case
from segforge.io.image import Geometry, read_case, read_image
from segforge.io.storage import check_writable
from segforge.parallel import progress_map
from segforge.preprocessing.crop import crop, nonzero_bbox, paste
from segforge.preprocessing.normalize import apply_normalization, invert_normalization, normalization_parameters
from segforge.preprocessing.resample import (resample, resample_image, resample_label, resample_probabilities,
                                             resampling_modes, shape_at_spacing, with_default_rules)

log = logging.getLogger(__name__)

# bump when the same plan and settings would produce different preprocessed files
PREPROCESSING_VERSION = 2
DATA_HASH_CHARS = 8  # hex digits of plan_hash in a data_identifier (4e9 values: no two plans' data collide by chance)


def resampling_settings(plans: dict) -> dict:
    """The plan's resampling rules (plans written before they were recorded get the packaged default)."""
    return with_default_rules(plans.get("resampling"))


def plan_hash(plans: dict, configuration: str) -> str:
    """Hash of everything in the plan (and the code version) that changes preprocessed output."""
    relevant = {"version": PREPROCESSING_VERSION, "normalization": plans["normalization"],
                "target_spacing": plans["configurations"][configuration]["target_spacing"],
                "resampling": resampling_settings(plans)}
    if not plans.get("crop_to_nonzero", True):  # only when off: the hashes of earlier plans stay valid
        relevant["crop_to_nonzero"] = False
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def data_identifier(plans: dict, configuration: str, shares: str | None = None) -> str:
    """The name of a configuration's preprocessed folder: whose data it is (the configuration, or ``shares``, the one
    it reads the data of, e.g. 3d_budget: 3d_fullres) and a short hash of what determines the arrays (``plan_hash``:
    spacing, normalisation scheme and parameters per channel, resampling rules, crop rule, format version)."""
    return f"{shares or configuration}_{plan_hash(plans, configuration)[:DATA_HASH_CHARS]}"


def data_folder_name(plans: dict, configuration: str, source) -> str:
    """The preprocessed folder of one configuration of the plans in ``source``: its ``data_identifier``; after a hand
    edit that changes the data (spacing, normalisation, resampling) the identifier's hash is recomputed, so the edit
    is respected and never written over another plan's folder; a plan from before identifiers: the name it records
    (3d_budget: 3d_fullres) or the configuration's own."""
    recorded = str(plans["configurations"][configuration].get("data_identifier", configuration))
    shares, _, digest = recorded.rpartition("_")
    if not (shares and re.fullmatch(f"[0-9a-f]{{{DATA_HASH_CHARS}}}", digest)):
        return recorded
    current = data_identifier(plans, configuration, shares)
    if current != recorded:
        log.warning("%s: configuration %s records data_identifier %s, but its spacing, normalisation or resampling "
                    "(edited by hand?) make %s: its preprocessed data is %s", source, configuration, recorded, current,
                    current)
    return current


def preprocess_image(image: np.ndarray, geometry: Geometry, plans: dict, configuration: str,
                     copy: bool = True) -> tuple[np.ndarray, dict]:
    """Crop, normalise and resample a ``(c, z, y, x)`` image; returns it and the properties to invert the steps.

    ``copy=False`` lets the steps work inside ``image`` (it is then overwritten): for arrays the caller owns. A plan
    with ``"crop_to_nonzero": false`` (denoising: a noisy image has no zero border to crop, so the network must learn
    the background as it is) keeps the whole image.
    """
    bbox = nonzero_bbox(image) if plans.get("crop_to_nonzero", True) else [[0, int(n)] for n in image.shape[1:]]
    data = crop(image, bbox)
    if copy or data.dtype != np.float32:
        data = np.array(data, dtype=np.float32)
    applied = normalization_parameters(data, plans["normalization"])
    apply_normalization(data, applied)
    target = plans["configurations"][configuration]["target_spacing"]
    new_shape = shape_at_spacing(list(data.shape[1:]), list(geometry.spacing), target)
    modes = resampling_modes(geometry.spacing, target, resampling_settings(plans))
    properties = {
        "geometry": geometry.to_json(),
        "shape_before_crop": list(image.shape[1:]),
        "crop_bbox": bbox,
        "shape_after_crop": list(data.shape[1:]),
        "shape_after_resampling": new_shape,
        "spacing_after_resampling": [sp if t is None else t for sp, t in zip(geometry.spacing, target)],
        "normalization_applied": applied,
        "resampling": modes,
    }
    return resample_image(data, new_shape, modes["image"]), properties


def restore_probabilities(probabilities: torch.Tensor, properties: dict) -> torch.Tensor:
    """``(classes, *resampled)`` probabilities or logits back on the cropped original grid (before ``paste``)."""
    modes = (properties.get("resampling") or {}).get("probabilities")
    return resample_probabilities(probabilities, properties["shape_after_crop"], modes)


def restore_image(data: np.ndarray, properties: dict) -> np.ndarray:
    """Invert ``preprocess_image``: resample back, undo the normalisation, paste into the original extent."""
    modes = properties["resampling"]["image"]
    with torch.no_grad():
        back = resample(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), properties["shape_after_crop"],
                        modes).numpy()
    invert_normalization(back, properties["normalization_applied"])
    return paste(back, properties["crop_bbox"], tuple(properties["shape_before_crop"]), fill=0)


def foreground_locations(seg: np.ndarray, values: list[int], per_class: int, seed: int,
                         chunk_voxels: int = 1 << 22) -> np.ndarray:
    """Up to ``per_class`` voxel coordinates of each class in ``values``, drawn uniformly without replacement, as
    int32 rows (class, z, y, x), sorted by class then position.

    Two streaming passes in chunks of slices (class counts, then the chosen ranks), so memory stays at a chunk's
    worth however large the structures are.
    """
    rng = np.random.default_rng(seed)
    values = sorted(int(v) for v in values)
    flat = seg.reshape(-1)
    rows_per_chunk = max(1, chunk_voxels // max(1, int(np.prod(seg.shape[1:]))))
    step = rows_per_chunk * int(np.prod(seg.shape[1:]))
    counts = {v: 0 for v in values}
    for start in range(0, flat.size, step):
        chunk = flat[start:start + step]
        for v, n in zip(*np.unique(chunk[np.isin(chunk, values)], return_counts=True)):
            counts[int(v)] += int(n)
    # the ranks (order of appearance in the flattened volume) to keep, per class
    wanted = {v: np.sort(rng.choice(n, per_class, replace=False)) if n > per_class else np.arange(n)
              for v, n in counts.items() if n}
    seen = {v: 0 for v in wanted}
    picked = {v: [] for v in wanted}
    for start in range(0, flat.size, step):
        chunk = flat[start:start + step]
        hits = np.flatnonzero(np.isin(chunk, list(wanted)))
        if not hits.size:
            continue
        labels = chunk[hits]
        order = np.argsort(labels, kind="stable")  # grouped by class, in order of appearance within each
        hits, labels = hits[order], labels[order]
        bounds = np.flatnonzero(np.diff(labels)) + 1
        for group in np.split(np.arange(hits.size), bounds):
            v = int(labels[group[0]])
            ranks = wanted[v]
            lo, hi = np.searchsorted(ranks, [seen[v], seen[v] + group.size])
            picked[v].append(start + hits[group[ranks[lo:hi] - seen[v]]])
            seen[v] += group.size
    rows = []
    for v in values:
        if v in picked and picked[v]:
            coords = np.stack(np.unravel_index(np.concatenate(picked[v]), seg.shape), axis=1)
            rows.append(np.concatenate([np.full((len(coords), 1), v), coords], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 1 + seg.ndim), np.int32)


def case_done(out_dir: Path, case_id: str, digest: str, per_class: int | None = None, labelled: bool = True) -> bool:
    props = out_dir / f"{case_id}.json"
    suffixes = ("", "_seg", "_locations") if labelled else ("",)
    if not props.is_file() or not all((out_dir / f"{case_id}{s}.npy").is_file() for s in suffixes):
        return False
    try:
        properties = read_json(props, "case_properties")
    except Exception:  # an unreadable leftover is simply redone
        return False
    # a case preprocessed before its label was added is redone with it
    return properties.get("plan_hash") == digest and properties.get("labelled", True) == labelled and \
        (per_class is None or properties.get("locations_per_class") == per_class)


def preprocess_case(case: Case, plans: dict, configuration: str, out_dir: Path, foreground: list[int],
                    per_class: int, digest: str) -> str:
    image, geometry = read_case(case.image_files)
    data, properties = preprocess_image(image, geometry, plans, configuration, copy=False)
    del image  # the cropped, normalised view lived inside it; `data` is the resampled copy
    save_npy_atomic(out_dir / f"{case.case_id}.npy", data)
    del data
    if case.label_file is None:  # an unlabelled case (task=denoise): the image is all there is
        properties.update(case_id=case.case_id, plan_hash=digest, locations_per_class=per_class, labelled=False,
                          classes_present=[])
        write_json(out_dir / f"{case.case_id}.json", properties, kind="case_properties")
        return case.case_id
    label, _ = read_image(case.label_file)
    seg = crop(label, properties["crop_bbox"])
    seg = resample_label(seg.astype(np.int16, copy=False), properties["shape_after_resampling"],
                         modes=properties["resampling"]["label"]).astype(np.int16, copy=False)
    del label
    seed = int(hashlib.sha256(case.case_id.encode()).hexdigest()[:8], 16)
    save_npy_atomic(out_dir / f"{case.case_id}_seg.npy", seg)
    save_npy_atomic(out_dir / f"{case.case_id}_locations.npy", foreground_locations(seg, foreground, per_class, seed))
    present = np.flatnonzero(np.bincount((seg.astype(np.int64) - int(seg.min())).ravel())) + int(seg.min())
    properties.update(case_id=case.case_id, plan_hash=digest, locations_per_class=per_class, labelled=True,
                      classes_present=[int(v) for v in present])
    write_json(out_dir / f"{case.case_id}.json", properties, kind="case_properties")
    return case.case_id


def run_preprocessing(cases: list[Case], plans: dict, configuration: str, out_dir: Path, label_values: list[int],
                      num_workers: int = 2, per_class: int = 10000, ignore_label: int | None = None) -> dict:
    """Preprocess every unfinished case of one configuration; returns counts of done and skipped cases.

    Oversampling locations are stored for every nonzero label value except the ignore label.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-*"):  # left by a run that was killed while writing
        stale.unlink(missing_ok=True)
    digest = plan_hash(plans, configuration)
    foreground = [v for v in label_values if v != 0 and v != ignore_label]
    todo = [c for c in cases if not case_done(out_dir, c.case_id, digest, per_class, c.label_file is not None)]
    log.info("preprocess %s: %d case(s) to do, %d already done", configuration, len(todo), len(cases) - len(todo))
    if todo:  # float32 image channels + int16 label + locations, at the median shape: fail now, not at case 150
        plan_config = plans["configurations"][configuration]
        voxels = float(np.prod(plan_config["median_shape"]))
        if plan_config["dims"] == 2 and len(plan_config["median_shape"]) == 2:  # per slice: times the slices
            voxels *= float((plans.get("original_median_shape") or [1])[0])
        per_case = voxels * (4 * len(plans["channel_names"]) + 2) + 12 * per_class * max(len(foreground), 1) + 4096
        check_writable(out_dir, int(per_case * len(todo)), what=f"preprocessing {len(todo)} case(s)",
                       setting="paths.preprocessed_root=DIR (or $SEGFORGE_PREPROCESSED)")
    args = [(c, plans, configuration, out_dir, foreground, per_class, digest) for c in todo]
    for _ in progress_map(preprocess_case, args, num_workers, f"preprocess {configuration}"):
        pass
    write_json(out_dir / "manifest.json", {"configuration": configuration, "plan_hash": digest,
                                          "cases": [c.case_id for c in cases],
                                          "labelled": all(c.label_file is not None for c in cases)},
               kind="preprocessing_manifest")
    return {"done": len(todo), "skipped": len(cases) - len(todo)}
