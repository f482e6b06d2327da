"""`segforge select`: cross-validation per configuration and for their ensemble, the best, and the postprocessing
search that keeps the largest component only where it helps; predict applies it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from segforge.cli.main import main
from segforge.evaluation.metrics import evaluate_folders
from segforge.inference.folder import save_probabilities
from segforge.inference.postprocessing import apply_postprocessing, largest_component
from segforge.io.image import Geometry, write_image

GEOMETRY = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), ndim=3)
LABELS = {"background": 0, "organ": 1, "vessel": 2}


def reference(seed: int) -> np.ndarray:
    label = np.zeros((10, 24, 24), np.uint8)
    label[2:8, 4:12, 4:12] = 1
    label[3:7, 15:20, 14 + seed % 3:19 + seed % 3] = 2
    return label


def fake_model(task: Path, name: str, noise: float, speckle: bool, cases=4) -> None:
    """A model folder whose fold validation predictions are the references with a stray blob of class 1."""
    model = task / name
    references = model.parent.parent / "refs"
    validation = model / "fold_0" / "validation"
    validation.mkdir(parents=True)
    references.mkdir(exist_ok=True)
    (model / "plans.json").write_text("{}")
    (model / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(len(name))
    for i in range(cases):
        ref = reference(i)
        write_image(references / f"c{i}.nii.gz", ref, GEOMETRY)
        prediction = ref.copy()
        if speckle:
            prediction[8, 20:23, 1:3] = 1  # a false positive far from the organ
        probabilities = np.stack([(prediction == c).astype(np.float32) for c in range(3)])
        probabilities += noise * rng.random(probabilities.shape).astype(np.float32)
        import torch

        save_probabilities(validation / f"c{i}", torch.from_numpy(probabilities / probabilities.sum(0)), list(LABELS), GEOMETRY)
        write_image(validation / f"c{i}.nii.gz", prediction, GEOMETRY)
    evaluate_folders(validation, {f"c{i}": references / f"c{i}.nii.gz" for i in range(cases)}, LABELS,
                     validation / "summary.json", surface=False)


def test_select_picks_the_best_and_finds_helpful_postprocessing(tmp_path, capsys):
    task = tmp_path / "res" / "segment"
    fake_model(task, "3d_fullres", 0.05, speckle=True)
    fake_model(task, "2d", 0.3, speckle=True)
    assert main(["select", str(task)]) == 0
    selection = json.loads((task / "selection.json").read_text())
    assert set(selection["cross_validation_dice"]) == {"2d", "3d_fullres", "2d+3d_fullres"}
    assert selection["best"] in ("3d_fullres", "2d")  # equal masks: a single configuration, not the ensemble
    rules = json.loads((task / selection["best"] / "postprocessing.json").read_text())
    assert rules["foreground_largest_component"] is False  # would delete the vessel: refused
    assert rules["classes_largest_component"] == [1]  # removes the organ's stray blob: kept
    assert rules["cross_validation_dice"]["after"]["1"] > rules["cross_validation_dice"]["before"]["1"]
    assert "predict with: segforge predict" in capsys.readouterr().out


def test_largest_component_rules():
    mask = np.zeros((6, 10, 10), np.uint8)
    mask[1:4, 1:5, 1:5] = 1
    mask[5, 8, 8] = 1
    mask[1:3, 7:9, 7:9] = 2
    assert largest_component(mask == 1).sum() == 3 * 4 * 4
    per_class = apply_postprocessing(mask, {"classes_largest_component": [1]})
    assert per_class[5, 8, 8] == 0 and (per_class == 2).sum() == 8
    foreground = apply_postprocessing(mask, {"foreground_largest_component": True})
    assert (foreground == 2).sum() == 0 and (foreground == 1).sum() == 48  # the class-2 island goes too
    assert np.array_equal(apply_postprocessing(mask, {}), mask)
