"""Metrics against values worked out by hand: a region made of two label values (the union is scored), and the
normalised surface distance of two shifted squares, isotropic and anisotropic."""

from __future__ import annotations

import numpy as np
import pytest

from segforge.evaluation.metrics import metrics_per_class


def test_a_region_of_two_label_values_scores_their_union():
    reference = np.array([[1, 1, 2, 2, 0, 0]])
    prediction = np.array([[1, 2, 2, 0, 0, 2]])
    scores = metrics_per_class(prediction, reference, [(1, 2), 1, 2], surface=False)
    # region {1, 2}: prediction 4 voxels, reference 4, both 3 -> Dice 6/8, IoU 3/5
    assert scores[(1, 2)]["dice"] == pytest.approx(0.75)
    assert scores[(1, 2)]["iou"] == pytest.approx(0.6)
    # the values alone: 1 -> 2*1/(1+2); 2 -> 2*1/(3+2)
    assert scores[1]["dice"] == pytest.approx(2 / 3)
    assert scores[2]["dice"] == pytest.approx(0.4)


def squares(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 reference square (rows 2-5, columns 2-5) and the same square ``shift`` columns to the right."""
    reference, prediction = np.zeros((10, 12), np.uint8), np.zeros((10, 12), np.uint8)
    reference[2:6, 2:6] = 1
    prediction[2:6, 2 + shift:6 + shift] = 1
    return prediction[None], reference[None]


def test_nsd_of_shifted_squares_isotropic():
    # Each border (the 12 pixels of the square's ring) has 8 pixels within 1 mm of the other border: the top and
    # bottom rows' 3 nearest columns and the two side pixels facing the other square -> (8 + 8) / (12 + 12)
    prediction, reference = squares(shift=2)
    scores = metrics_per_class(prediction, reference, [1], spacing=(1.0, 1.0, 1.0), nsd_tolerance_mm=1.0)[1]
    assert scores["dice"] == pytest.approx(0.5)
    assert scores["nsd"] == pytest.approx(2 / 3)


def test_nsd_uses_the_spacing_of_each_axis():
    # Columns 2 mm apart: along a row only distance 0 is within 1 mm; the side pixels facing the other square are
    # still 1 mm (one row) from its top or bottom row -> 6 of 12 on each border
    prediction, reference = squares(shift=2)
    scores = metrics_per_class(prediction, reference, [1], spacing=(1.0, 1.0, 2.0), nsd_tolerance_mm=1.0)[1]
    assert scores["nsd"] == pytest.approx(0.5)
    wider = metrics_per_class(prediction, reference, [1], spacing=(1.0, 1.0, 2.0), nsd_tolerance_mm=2.0)[1]
    assert wider["nsd"] == pytest.approx(2 / 3)  # 2 mm: the isotropic case's pixels again


def test_identical_masks_have_nsd_one_and_disjoint_far_masks_zero():
    prediction, reference = squares(shift=0)
    assert metrics_per_class(prediction, reference, [1])[1]["nsd"] == pytest.approx(1.0)
    far_prediction, _ = squares(shift=6)
    far = metrics_per_class(far_prediction, reference, [1], nsd_tolerance_mm=1.0)[1]
    assert far["dice"] == 0.0 and far["nsd"] == 0.0
