"""Evaluation: Dice, IoU, HD95 and NSD in physical units against known answers; absent classes; the table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segforge.evaluation.metrics import evaluate_folders, format_summary, metrics_per_class
from segforge.io.image import Geometry, write_image


def shifted_boxes(shift: int):
    reference = np.zeros((20, 40, 40), np.uint8)
    reference[5:15, 10:30, 10:30] = 1
    prediction = np.zeros_like(reference)
    prediction[5:15, 10 + shift:30 + shift, 10:30] = 1
    return prediction, reference


def test_known_answers_in_millimetres():
    prediction, reference = shifted_boxes(2)  # two voxels of 0.5 mm along y
    m = metrics_per_class(prediction, reference, [1], spacing=(2.0, 0.5, 0.5), nsd_tolerance_mm=0.6)[1]
    assert m["dice"] == pytest.approx(0.9) and m["iou"] == pytest.approx(18 / 22)
    assert m["hd95"] == pytest.approx(1.0)  # 2 voxels x 0.5 mm
    assert 0 < m["nsd"] < 1
    assert metrics_per_class(prediction, reference, [1], spacing=(2.0, 0.5, 0.5), nsd_tolerance_mm=1.01)[1]["nsd"] == 1.0
    coarse = metrics_per_class(prediction, reference, [1], spacing=(2.0, 1.5, 0.5))[1]
    assert coarse["hd95"] == pytest.approx(3.0)  # the same shift on a coarser grid is farther
    same = metrics_per_class(reference, reference, [1])[1]
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and same["nsd"] == 1.0


def test_absent_and_one_sided_classes():
    prediction, reference = shifted_boxes(0)
    m = metrics_per_class(prediction, reference, [1, 2, 3], spacing=(1, 1, 1))
    assert all(math.isnan(v) for v in m[2].values())  # in neither: no value, left out of means
    prediction[0, 0, 0] = 3  # a false positive of a class the reference lacks
    m = metrics_per_class(prediction, reference, [3])[3]
    assert m["dice"] == 0.0 and m["nsd"] == 0.0 and math.isnan(m["hd95"])


def test_ignore_label_and_regions_and_the_table(tmp_path):
    prediction, reference = shifted_boxes(0)
    reference[0:3] = 9  # unannotated
    prediction[0:3] = 1  # whatever is predicted there does not count
    geometry = Geometry(spacing=(2.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), ndim=3)
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    write_image(tmp_path / "pred" / "a.nii.gz", prediction, geometry)
    write_image(tmp_path / "ref" / "a.nii.gz", reference, geometry)
    labels = {"background": 0, "box": 1, "ignore": 9}
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels, tmp_path / "pred" / "summary.json")
    assert summary["mean"]["dice"]["box"] == 1.0 and summary["mean"]["hd95"]["box"] == 0.0
    table = format_summary(summary)
    assert "HD95" in table and "NSD" in table and "IOU" in table and "box" in table
    regions = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {"background": 0, "all": [1, 2], "ignore": 9})
    assert regions["mean"]["dice"]["all"] == 1.0
