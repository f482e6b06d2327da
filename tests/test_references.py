"""Independent references: expected values written in the test (hand-computed or nnU-Net's formulas), never taken
from the code under test. Losses, deep supervision, sliding-window placement and the Gaussian importance map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segforge.inference.sliding_window import gaussian_weights, window_starts
from segforge.training.losses import (DeepSupervisionLoss, DiceCELoss, RegionDiceBCELoss,
                                      deep_supervision_weights)

SMOOTH = 1e-5


def _two_voxel_logits() -> torch.Tensor:
    """(1, 2 classes, 2 voxels): voxel 0 softmax (0.5, 0.5), voxel 1 softmax (0.75, 0.25)."""
    return torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])


def test_dice_ce_on_two_voxels_equals_the_hand_computed_value():
    # target (1, 0): CE = (-ln 0.5 - ln 0.75) / 2; class-1 Dice = 2*0.5 / (1 + (0.5 + 0.25))
    loss = DiceCELoss(smooth=SMOOTH)(_two_voxel_logits(), torch.tensor([[[1, 0]]]))
    ce = (math.log(2) + math.log(4 / 3)) / 2
    dice = (2 * 0.5 + SMOOTH) / (1 + 0.75 + SMOOTH)
    assert loss.item() == pytest.approx(ce + 1 - dice, rel=1e-6)


def test_the_ignore_label_leaves_both_terms():
    # target (1, ignore=2): only voxel 0 counts: CE = ln 2; Dice = 2*0.5 / (1 + 0.5)
    loss = DiceCELoss(ignore_label=2, smooth=SMOOTH)(_two_voxel_logits(), torch.tensor([[[1, 2]]]))
    dice = (2 * 0.5 + SMOOTH) / (1 + 0.5 + SMOOTH)
    assert loss.item() == pytest.approx(math.log(2) + 1 - dice, rel=1e-6)


def test_batch_dice_pools_the_batch_and_per_sample_dice_averages_it():
    # sample A: target (1, 0) as above; sample B: target (0, 0), same logits (class-1 probabilities 0.5, 0.25)
    logits = _two_voxel_logits().repeat(2, 1, 1)
    target = torch.tensor([[[1, 0]], [[0, 0]]])
    ce = (math.log(2) + math.log(4 / 3) + math.log(2) + math.log(4 / 3)) / 4
    dice_a = (1 + SMOOTH) / (1.75 + SMOOTH)
    dice_b = SMOOTH / (0.75 + SMOOTH)
    per_sample = DiceCELoss(smooth=SMOOTH)(logits, target).item()
    pooled = DiceCELoss(batch_dice=True, smooth=SMOOTH)(logits, target).item()
    assert per_sample == pytest.approx(ce + 1 - (dice_a + dice_b) / 2, rel=1e-6)
    assert pooled == pytest.approx(ce + 1 - (1 + SMOOTH) / (2.5 + SMOOTH), rel=1e-6)


def test_region_bce_dice_with_a_region_of_two_label_values():
    # sigmoid(0) = 0.5 everywhere: BCE = ln 2; region {1,2} over target (1, 2): masks (1, 1): Dice 2*1 / (2 + 1);
    # region {2}: masks (0, 1): Dice 2*0.5 / (1 + 1)
    logits = torch.zeros(1, 2, 2)
    loss = RegionDiceBCELoss([[1, 2], [2]], smooth=SMOOTH)(logits, torch.tensor([[[1, 2]]]))
    dice_union = (2 + SMOOTH) / (3 + SMOOTH)
    dice_two = (1 + SMOOTH) / (2 + SMOOTH)
    assert loss.item() == pytest.approx(math.log(2) + 1 - (dice_union + dice_two) / 2, rel=1e-6)


def test_region_loss_leaves_out_the_ignore_label():
    # target (1, ignore=3): only voxel 0 counts: BCE ln 2; region {1,2}: Dice 2*0.5 / (1 + 0.5); region {2}: masks 0,
    # Dice smooth / (0.5 + smooth)
    logits = torch.zeros(1, 2, 2)
    loss = RegionDiceBCELoss([[1, 2], [2]], ignore_label=3, smooth=SMOOTH)(logits, torch.tensor([[[1, 3]]]))
    dice_union = (1 + SMOOTH) / (1.5 + SMOOTH)
    dice_two = SMOOTH / (0.5 + SMOOTH)
    assert loss.item() == pytest.approx(math.log(2) + 1 - (dice_union + dice_two) / 2, rel=1e-5)


@pytest.mark.parametrize("outputs,expected", [(1, [1.0]), (2, [1.0, 0.0]), (4, [4 / 7, 2 / 7, 1 / 7, 0.0]),
                                              (5, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])])
def test_deep_supervision_weights_halve_per_level_lowest_off_normalised(outputs, expected):
    assert deep_supervision_weights(outputs) == pytest.approx(expected)


def test_deep_supervision_takes_the_target_down_by_nearest_centre_sampling():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, output, target):
            seen.append(target.clone())
            return torch.tensor(float(len(seen)))

    target = torch.arange(16.0).reshape(1, 1, 4, 4)
    loss = DeepSupervisionLoss(Recorder(), [0.5, 0.25, 0.0])
    total = loss([torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)], target)
    assert torch.equal(seen[0], target)
    assert seen[1].flatten().tolist() == [5.0, 7.0, 13.0, 15.0]   # the centre voxel of each 2x2 block
    assert seen[2].flatten().tolist() == [10.0]
    assert total.item() == pytest.approx(0.5 * 1 + 0.25 * 2 + 0.0 * 3)


# nnU-Net's compute_steps_for_sliding_window: steps = ceil((size - patch) / (patch * step)) + 1, spread evenly,
# rounded; the expected starts are worked out by hand.
@pytest.mark.parametrize("size,patch,step,expected", [
    (100, 64, 0.5, [0, 18, 36]),
    (64, 64, 0.5, [0]),
    (65, 64, 0.5, [0, 1]),
    (300, 128, 0.25, [0, 29, 57, 86, 115, 143, 172]),
    (40, 64, 0.5, [0]),
    (160, 32, 1.0, [0, 32, 64, 96, 128]),
])
def test_window_starts_follow_nnunets_formula(size, patch, step, expected):
    assert window_starts(size, patch, step) == expected


@pytest.mark.parametrize("patch", [(16, 24, 20), (64, 64), (7, 9, 11), (64, 64, 64)])
def test_gaussian_importance_map_is_the_closed_form(patch):
    # nnU-Net's map: exp(-d^2 / (2 sigma^2)) per axis with sigma = patch / 8, 10 at the centre, held in float16
    # (relative rounding <= 2^-11) and never below float16's smallest normal (a 64^3 corner is 10 * e^-24)
    weights = gaussian_weights(patch).double().numpy()
    sigma = [p / 8 for p in patch]
    centre = [p // 2 for p in patch]
    grids = np.meshgrid(*[np.arange(p) for p in patch], indexing="ij")
    closed = 10 * np.exp(-sum((g - c) ** 2 / (2 * s**2) for g, c, s in zip(grids, centre, sigma)))
    assert weights[tuple(centre)] == 10.0 and weights.max() == 10.0
    smallest_normal = float(np.finfo(np.float16).tiny)
    np.testing.assert_allclose(weights, np.maximum(closed, smallest_normal), rtol=2**-11, atol=0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert (gaussian_weights(patch, dtype=dtype) > 0).all(), dtype
