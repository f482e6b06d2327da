"""Dice per class of a folder of predicted masks against reference masks (the budget benchmark's score).

Imported as ``bench.budget_eval`` (``scripts/`` on ``sys.path``); plain numpy + SimpleITK, no segforge or nnU-Net,
so every arm of ``scripts/bench_budget.py`` is scored by the same code. Cases are matched by file name
(``CASE.nii.gz`` in both folders); a reference without a prediction is an error, not a Dice of 0, so that a
broken prediction step cannot pass for a bad model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice of one class; 1.0 when the class is absent from both (never the case on the MNI dataset)."""
    p, r = pred == label, ref == label
    denominator = int(p.sum()) + int(r.sum())
    return 1.0 if denominator == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denominator


def read_mask(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice_folder(pred_dir, ref_dir, labels: dict[str, int], file_ending: str = ".nii.gz") -> dict:
    """``{"per_case": {case: {class: dice}}, "mean": {class: mean dice}, "foreground_mean": mean over classes}``
    for the foreground classes of ``labels`` (name -> value, as in dataset.json)."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    classes = {name: int(value) for name, value in labels.items() if int(value) != 0 and name != "ignore"}
    refs = sorted(ref_dir.glob(f"*{file_ending}"))
    if not refs:
        raise FileNotFoundError(f"{ref_dir}: no reference masks (*{file_ending})")
    per_case = {}
    for ref_path in refs:
        pred_path = pred_dir / ref_path.name
        if not pred_path.is_file():
            raise FileNotFoundError(f"{pred_path}: no prediction for reference {ref_path.name}")
        pred, ref = read_mask(pred_path), read_mask(ref_path)
        if pred.shape != ref.shape:
            raise ValueError(f"{pred_path}: shape {pred.shape} differs from the reference's {ref.shape}")
        per_case[ref_path.name[: -len(file_ending)]] = {name: dice(pred, ref, v) for name, v in classes.items()}
    mean = {name: float(np.mean([case[name] for case in per_case.values()])) for name in classes}
    return {"per_case": per_case, "mean": mean, "foreground_mean": float(np.mean(list(mean.values())))}
