"""Per-case, per-class (or per-region) metrics between predicted and reference masks, and the folder summary.

Dice and IoU from voxel counts; the 95th-percentile Hausdorff distance and the normalised surface distance (NSD, at
a tolerance in mm) in physical units from the reference file's spacing, through MONAI's surface-distance metrics,
computed inside the bounding box of prediction and reference (plus a margin) so a small structure in a large
volume costs what the structure costs. A class absent from both prediction and reference has no value (NaN) and is
left out of means, as in nnU-Net; where only one of them has it, Dice/IoU/NSD are 0 and HD95 is NaN. The ignore
label's voxels count nowhere.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError
from segforge.io.artifacts import write_json
from segforge.io.image import GEOMETRY_TOL, file_ending, read_image, strip_ending

METRICS = ("dice", "iou", "hd95", "nsd")


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes: list, ignore: int | None = None) -> dict:
    """Dice per class value, or per region (a list of values, given as a tuple) of label maps."""
    return {c: m["dice"] for c, m in metrics_per_class(prediction, reference, classes, ignore, surface=False).items()}


def _masks(prediction, reference, c, valid):
    if isinstance(c, tuple):
        return np.isin(prediction, c) & valid, np.isin(reference, c) & valid
    return (prediction == c) & valid, (reference == c) & valid


def _surface_metrics(p: np.ndarray, r: np.ndarray, spacing, tolerance_mm: float) -> tuple[float, float]:
    """(HD95 in mm, NSD at ``tolerance_mm``) of two non-empty boolean masks, inside their joint bounding box."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    joint = p | r
    box = []
    for axis in range(joint.ndim):
        hits = np.flatnonzero(np.any(joint, axis=tuple(a for a in range(joint.ndim) if a != axis)))
        box.append(slice(max(0, hits[0] - 2), hits[-1] + 3))
    p, r = p[tuple(box)], r[tuple(box)]
    # singleton axes (2D images as (1, y, x)) carry no surface: MONAI works on the remaining axes
    keep = [a for a in range(p.ndim) if p.shape[a] > 1] or [p.ndim - 1]
    p, r = p.reshape([p.shape[a] for a in keep]), r.reshape([r.shape[a] for a in keep])
    spacing = [float(spacing[a]) for a in keep]
    pred = torch.from_numpy(np.stack([~p, p]))[None].float()
    ref = torch.from_numpy(np.stack([~r, r]))[None].float()
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = float(compute_hausdorff_distance(pred, ref, include_background=False, percentile=95, spacing=spacing)[0, 0])
        nsd = float(compute_surface_dice(pred, ref, class_thresholds=[tolerance_mm], include_background=False,
                                         spacing=spacing)[0, 0])
    return hd95, nsd


def metrics_per_class(prediction: np.ndarray, reference: np.ndarray, classes: list, ignore: int | None = None,
                      spacing=(1.0, 1.0, 1.0), nsd_tolerance_mm: float = 1.0, surface: bool = True) -> dict:
    """``{class: {"dice", "iou", "hd95", "nsd"}}`` for label maps of one case (see module docstring)."""
    valid = reference != ignore if ignore is not None else np.ones(reference.shape, bool)
    out = {}
    for c in classes:
        p, r = _masks(prediction, reference, c, valid)
        inter, p_sum, r_sum = int((p & r).sum()), int(p.sum()), int(r.sum())
        row = {"dice": math.nan, "iou": math.nan, "hd95": math.nan, "nsd": math.nan}
        if p_sum + r_sum:
            row["dice"] = 2.0 * inter / (p_sum + r_sum)
            row["iou"] = inter / (p_sum + r_sum - inter)
            row["nsd"] = 0.0
            if surface and p_sum and r_sum:
                row["hd95"], row["nsd"] = _surface_metrics(p, r, spacing, nsd_tolerance_mm)
        if not surface:
            row.pop("hd95"), row.pop("nsd")
        out[c] = row
    return out


def nan_mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def label_classes(labels: dict) -> dict:
    """Name -> class value (or region tuple) that is scored: no background, no ignore."""
    if any(isinstance(v, list) for v in labels.values()):
        return {name: tuple(v) if isinstance(v, list) else v for name, v in labels.items()
                if name not in ("background", "ignore") and (isinstance(v, list) or v != 0)}
    return {name: v for name, v in labels.items() if isinstance(v, int) and v != 0 and name != "ignore"}


def evaluate_folders(pred_dir: Path, ref_dir, labels: dict, output: Path | None = None, nsd_tolerance_mm: float = 1.0,
                     surface: bool = True, geometry_tolerance: float = GEOMETRY_TOL) -> dict:
    """Metrics per case and class (or region) for every reference that has a prediction; writes ``summary.json``.

    ``ref_dir``: a folder of reference masks, or a mapping of case id to reference file. A prediction is matched to
    its reference by name (literally: no pattern), and must lie on the reference's grid: the same shape, and spacing,
    origin and direction equal within ``geometry_tolerance`` (relative and absolute), as a SimpleITK-based judge
    compares them; otherwise the evaluation is refused naming the file (a flipped mask would score as if correct).
    """
    classes = label_classes(labels)
    ignore = labels.get("ignore") if isinstance(labels.get("ignore"), int) else None
    if isinstance(ref_dir, dict):
        references = [Path(p) for _, p in sorted(ref_dir.items())]
    else:
        references = sorted(p for p in Path(ref_dir).iterdir() if file_ending(p) and not p.name.startswith("."))
    if not references:
        raise SegforgeError(f"{ref_dir}: no reference masks found")
    per_case, missing = [], []
    predictions: dict[str, list[Path]] = {}
    for p in sorted(Path(pred_dir).iterdir()):
        if file_ending(p) and not p.name.startswith("."):
            predictions.setdefault(strip_ending(p), []).append(p)
    for ref_path in references:
        candidates = predictions.get(strip_ending(ref_path), [])
        if not candidates:
            missing.append(ref_path.name)
            continue
        prediction, pred_geo = read_image(candidates[0])
        reference, ref_geo = read_image(ref_path)
        if prediction.shape != reference.shape:
            raise SegforgeError(f"{candidates[0]}: shape (z, y, x) {prediction.shape} differs from the reference "
                                f"{ref_path} {reference.shape}. Fix: predict on the reference's image (segforge "
                                "predict writes masks on the input's grid), or compare with the matching reference")
        differing = pred_geo.same_grid(ref_geo, tol=geometry_tolerance)
        if differing:
            detail = "; ".join(f"{name} {_fmt(getattr(pred_geo, name))} vs {_fmt(getattr(ref_geo, name))}"
                               for name in differing)
            raise SegforgeError(f"{candidates[0]}: its geometry differs from the reference {ref_path} ({detail}; "
                                f"tolerance {geometry_tolerance:g}): the masks do not lie on the same voxels, so "
                                "their overlap would mean nothing. Fix: predict on the reference's image (the mask "
                                "then keeps its geometry), or resample the prediction onto the reference's grid")
        values = metrics_per_class(prediction, reference, list(classes.values()), ignore, ref_geo.spacing,
                                   nsd_tolerance_mm, surface)
        row = {"case": strip_ending(ref_path), "prediction": str(candidates[0]), "reference": str(ref_path)}
        for metric in values[next(iter(values))] if values else []:
            row[metric] = {name: values[v][metric] for name, v in classes.items()}
        per_case.append(row)
    if not per_case:
        raise SegforgeError(f"{pred_dir}: no prediction matches a reference in {ref_dir} (by file name)")
    metrics = [m for m in METRICS if m in per_case[0]]
    means = {m: {name: nan_mean([c[m][name] for c in per_case]) for name in classes} for m in metrics}
    summary = {"classes": {k: list(v) if isinstance(v, tuple) else v for k, v in classes.items()},
               "num_cases": len(per_case), "missing_predictions": missing, "nsd_tolerance_mm": nsd_tolerance_mm,
               "mean_dice": means["dice"], "foreground_mean_dice": nan_mean(list(means["dice"].values())),
               "mean": means, "foreground_mean": {m: nan_mean(list(means[m].values())) for m in metrics},
               "cases": per_case}
    if output is not None:
        write_json(output, summary, kind="summary")
    return summary


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def format_summary(summary: dict) -> str:
    """A readable table: one row per class, one column per metric, mean over cases (NaN-safe)."""
    metrics = list(summary.get("mean", {"dice": summary["mean_dice"]}))
    header = f"{'class':<20}" + "".join(f"{m.upper() if m != 'dice' else 'Dice':>10}" for m in metrics)
    lines = [f"{summary['num_cases']} case(s), mean over cases (HD95 in mm, NSD at {summary.get('nsd_tolerance_mm', 1.0)} mm):",
             header]
    means = summary.get("mean", {"dice": summary["mean_dice"]})
    for name in summary["mean_dice"]:
        lines.append(f"{name:<20}" + "".join(f"{means[m][name]:>10.4f}" for m in metrics))
    fg = summary.get("foreground_mean", {"dice": summary["foreground_mean_dice"]})
    lines.append(f"{'mean foreground':<20}" + "".join(f"{fg[m]:>10.4f}" for m in metrics))
    if summary.get("missing_predictions"):
        lines.append(f"missing predictions: {len(summary['missing_predictions'])}")
    return "\n".join(lines)
