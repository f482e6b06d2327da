"""Postprocessing chosen on cross-validation: keep only the largest connected component (of all foreground, then
per class) where, and only where, that raises the cross-validation Dice; saved as ``postprocessing.json`` in the
model folder and applied by ``predict``.

The search follows nnU-Net's: compare the mean foreground Dice with and without removing all but the largest
foreground component; on top of the better of the two, try each class alone and keep the step for the classes
whose Dice improves. Components are face-connected (scipy's default structure).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from segforge.evaluation.metrics import label_classes, metrics_per_class, nan_mean
from segforge.io.artifacts import read_json, write_json
from segforge.io.image import read_image

log = logging.getLogger("segforge")

FILE = "postprocessing.json"


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of boolean ``mask`` (empty stays empty)."""
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def apply_postprocessing(mask: np.ndarray, rules: dict) -> np.ndarray:
    """``mask`` with the rules of ``postprocessing.json`` applied (a new array)."""
    out = mask.copy()
    if rules.get("foreground_largest_component"):
        out[~largest_component(out > 0)] = 0
    for value in rules.get("classes_largest_component", []):
        selected = out == value
        out[selected & ~largest_component(selected)] = 0
    return out


def load_rules(model_dir: Path) -> dict | None:
    path = Path(model_dir) / FILE
    return read_json(path) if path.is_file() else None


def search_postprocessing(pairs: list[tuple[Path, Path]], labels: dict) -> dict:
    """The rules that raise the mean cross-validation Dice, from (prediction, reference) file pairs.

    Every case is read once; the candidates are scored on masks held in memory (cases are usually small after
    cropping; for very large ones this holds one case's masks at a time per candidate).
    """
    classes = {v: k for k, v in label_classes(labels).items() if not isinstance(v, tuple)}
    ignore = labels.get("ignore") if isinstance(labels.get("ignore"), int) else None

    def score(rules: dict) -> dict:
        per_class = {v: [] for v in classes}
        for pred_path, ref_path in pairs:
            prediction, reference = read_image(pred_path)[0], read_image(ref_path)[0]
            values = metrics_per_class(apply_postprocessing(prediction, rules), reference, list(classes), ignore, surface=False)
            for v in classes:
                per_class[v].append(values[v]["dice"])
        return {v: nan_mean(d) for v, d in per_class.items()}

    rules = {"foreground_largest_component": False, "classes_largest_component": []}
    baseline = score(rules)
    foreground = score({**rules, "foreground_largest_component": True})
    trace = {"baseline": baseline, "foreground_largest_component": foreground}
    if nan_mean(foreground.values()) > nan_mean(baseline.values()):
        rules["foreground_largest_component"], baseline = True, foreground
    for value in classes:
        trial = score({**rules, "classes_largest_component": rules["classes_largest_component"] + [value]})
        trace[f"class_{value}_largest_component"] = trial
        if trial[value] > baseline[value]:
            rules["classes_largest_component"].append(value)
            baseline = trial
    log.info("postprocessing: %s (cross-validation Dice %.4f -> %.4f)", rules, nan_mean(trace["baseline"].values()),
             nan_mean(baseline.values()))
    return {**rules, "cross_validation_dice": {"before": trace["baseline"], "after": baseline}, "trials": trace,
            "num_cases": len(pairs)}


def save_rules(model_dir: Path, result: dict) -> Path:
    path = Path(model_dir) / FILE
    write_json(path, result)
    return path
