"""Segmentation losses: MONAI's Dice+CE, with nnU-Net's deep-supervision weighting over decoder resolutions."""

from __future__ import annotations

from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """1/2^i per output from full resolution down, the lowest switched off, normalised to sum 1."""
    weights = [0.5**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def make_segmentation_loss(loss_cfg, num_outputs: int) -> nn.Module:
    """Dice (foreground classes) + cross-entropy on integer targets ``(b, 1, *spatial)``."""
    base = DiceCELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        batch=bool(loss_cfg.batch_dice),
        smooth_nr=1e-5,
        smooth_dr=1e-5,
        lambda_dice=float(loss_cfg.dice_weight),
        lambda_ce=float(loss_cfg.ce_weight),
    )
    return DeepSupervisionLoss(base, weights=deep_supervision_weights(num_outputs))
