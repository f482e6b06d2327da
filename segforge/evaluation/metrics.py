"""Per-case, per-class Dice between predicted and reference masks, and the folder summary (summary.json).

A class absent from both prediction and reference has no Dice (NaN) and is left out of means, as in nnU-Net;
the ignore label's voxels are excluded from every count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError
from segforge.io.artifacts import write_json
from segforge.io.image import file_ending, read_image, strip_ending


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes: list, ignore: int | None = None) -> dict:
    """Dice per class value, or per region (a list of values, given as a tuple) of label maps."""
    valid = reference != ignore if ignore is not None else np.ones(reference.shape, bool)
    out = {}
    for c in classes:
        if isinstance(c, tuple):
            p, r = np.isin(prediction, c) & valid, np.isin(reference, c) & valid
        else:
            p, r = (prediction == c) & valid, (reference == c) & valid
        denominator = int(p.sum()) + int(r.sum())
        out[c] = 2.0 * int((p & r).sum()) / denominator if denominator else math.nan
    return out


def nan_mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def evaluate_folders(pred_dir: Path, ref_dir, labels: dict, output: Path | None = None) -> dict:
    """Dice per case and class (or region) for every reference that has a prediction; writes ``summary.json``.

    ``ref_dir``: a folder of reference masks, or a mapping of case id to reference file.
    """
    has_regions = any(isinstance(v, list) for v in labels.values())
    classes = {name: (tuple(v) if isinstance(v, list) else v) for name, v in labels.items()
               if name not in ("background", "ignore") and (isinstance(v, list) or v != 0)} if has_regions else \
        {name: v for name, v in labels.items() if isinstance(v, int) and v != 0 and name != "ignore"}
    ignore = labels.get("ignore") if isinstance(labels.get("ignore"), int) else None
    if isinstance(ref_dir, dict):
        references = [Path(p) for _, p in sorted(ref_dir.items())]
    else:
        references = sorted(p for p in Path(ref_dir).iterdir() if file_ending(p) and not p.name.startswith("."))
    if not references:
        raise SegforgeError(f"{ref_dir}: no reference masks found")
    per_case, missing = [], []
    for ref_path in references:
        candidates = [p for p in Path(pred_dir).glob(strip_ending(ref_path) + ".*") if strip_ending(p) == strip_ending(ref_path)]
        if not candidates:
            missing.append(ref_path.name)
            continue
        prediction, pred_geo = read_image(candidates[0])
        reference, ref_geo = read_image(ref_path)
        if prediction.shape != reference.shape:
            raise SegforgeError(f"{candidates[0]}: shape {prediction.shape} differs from reference {ref_path} {reference.shape}")
        dice = dice_per_class(prediction, reference, list(classes.values()), ignore)
        per_case.append({"case": strip_ending(ref_path), "prediction": str(candidates[0]), "reference": str(ref_path),
                         "dice": {name: dice[v] for name, v in classes.items()}})
    if not per_case:
        raise SegforgeError(f"{pred_dir}: no prediction matches a reference in {ref_dir} (by file name)")
    mean = {name: nan_mean([c["dice"][name] for c in per_case]) for name in classes}
    summary = {"classes": {k: list(v) if isinstance(v, tuple) else v for k, v in classes.items()}, "num_cases": len(per_case), "missing_predictions": missing,
               "mean_dice": mean, "foreground_mean_dice": nan_mean(list(mean.values())), "cases": per_case}
    if output is not None:
        write_json(output, summary, kind="summary")
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"Dice over {summary['num_cases']} case(s):"]
    for name, value in summary["mean_dice"].items():
        lines.append(f"  {name:<20} {value:.4f}")
    lines.append(f"  {'mean foreground':<20} {summary['foreground_mean_dice']:.4f}")
    return "\n".join(lines)
