"""Segmentation losses: soft Dice + cross-entropy (softmax over classes) or + binary cross-entropy (sigmoid per
region), with the ignore label masked out of both terms, and nnU-Net's deep-supervision weighting.

Written here rather than taken from MONAI's ``DiceCELoss``: MONAI has no ignore mask (an ``ignore`` value must be
left out of the Dice and the cross-entropy alike, or the network learns to predict it), and its one-hot target
costs a float volume per class; here the Dice terms come from ``gather``/``scatter_add`` on the integer target
(no one-hot), which is what keeps the loss cheap next to the network at large patches and many classes. Targets
arrive as ``(b, 1, *spatial)`` label values (any dtype); every term is computed in float32 under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segforge.configs import packaged_defaults


def deep_supervision_weights(num_outputs: int, levels: int | None = None) -> list[float]:
    """1/2^i per output from full resolution down for the first ``levels`` outputs (None: all but the lowest; at most
    ``num_outputs``), the others switched off, normalised to sum 1."""
    if levels is None:
        levels = max(1, num_outputs - 1)
    if isinstance(levels, bool) or int(levels) != levels or levels < 1:
        raise ValueError(f"task.loss.deep_supervision_levels={levels}: give the number of decoder outputs with a "
                         f"loss term (1: full resolution only), or null for all but the lowest")
    weights = [0.5**i if i < levels else 0.0 for i in range(num_outputs)]
    total = sum(weights)
    return [w / total for w in weights]


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return values.mean()
    return (values * valid).sum() / torch.clamp(valid.sum(), min=1)


class DiceCELoss(nn.Module):
    """Softmax over ``num_classes`` outputs: soft Dice of the foreground classes + cross-entropy."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, batch_dice: bool = False,
                 ignore_label: int | None = None, *, smooth: float):
        super().__init__()
        self.dice_weight, self.ce_weight, self.batch_dice = dice_weight, ce_weight, batch_dice
        self.ignore_label, self.smooth = ignore_label, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target[:, 0].long()
        valid = None
        if self.ignore_label is not None:
            valid = (target != self.ignore_label).float()
            target = torch.where(valid.bool(), target, torch.zeros_like(target))
        ce = _masked_mean(F.cross_entropy(logits, target, reduction="none"), valid)
        probs = torch.softmax(logits, 1)
        b, c = probs.shape[:2]
        flat_target = target.reshape(b, -1)
        true_prob = probs.gather(1, target[:, None]).reshape(b, -1)
        weight = torch.ones_like(true_prob) if valid is None else valid.reshape(b, -1)
        intersect = torch.zeros(b, c, device=probs.device).scatter_add_(1, flat_target, true_prob * weight)
        reference = torch.zeros(b, c, device=probs.device).scatter_add_(1, flat_target, weight)
        predicted = (probs * valid[:, None]).reshape(b, c, -1).sum(-1) if valid is not None else probs.reshape(b, c, -1).sum(-1)
        if self.batch_dice:
            intersect, reference, predicted = intersect.sum(0), reference.sum(0), predicted.sum(0)
        dice = (2 * intersect + self.smooth) / (reference + predicted + self.smooth)
        return self.ce_weight * ce + self.dice_weight * (1 - dice[..., 1:].mean())


class RegionDiceBCELoss(nn.Module):
    """One sigmoid output per region (a set of label values, e.g. BraTS' whole tumour): soft Dice + BCE."""

    def __init__(self, regions: list[list[int]], dice_weight: float = 1.0, ce_weight: float = 1.0,
                 batch_dice: bool = False, ignore_label: int | None = None, *, smooth: float):
        super().__init__()
        self.regions = [list(r) for r in regions]
        self.dice_weight, self.ce_weight, self.batch_dice = dice_weight, ce_weight, batch_dice
        self.ignore_label, self.smooth = ignore_label, smooth

    def region_targets(self, target: torch.Tensor) -> torch.Tensor:
        """``(b, regions, *spatial)`` float masks from ``(b, *spatial)`` label values."""
        return torch.stack([torch.isin(target, torch.tensor(r, device=target.device)) for r in self.regions], 1).float()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target[:, 0].long()
        masks = self.region_targets(target)
        valid = None if self.ignore_label is None else (target != self.ignore_label).float()[:, None].expand_as(masks)
        bce = _masked_mean(F.binary_cross_entropy_with_logits(logits, masks, reduction="none"), valid)
        probs = torch.sigmoid(logits)
        if valid is not None:
            probs, masks = probs * valid, masks * valid
        dims = tuple(range(2, probs.ndim))
        intersect, reference, predicted = (probs * masks).sum(dims), masks.sum(dims), probs.sum(dims)
        if self.batch_dice:
            intersect, reference, predicted = intersect.sum(0), reference.sum(0), predicted.sum(0)
        dice = (2 * intersect + self.smooth) / (reference + predicted + self.smooth)
        return self.ce_weight * bce + self.dice_weight * (1 - dice.mean())


class DeepSupervisionLoss(nn.Module):
    """``loss`` on every output of a deep-supervised network (a list, full resolution first), each against the
    target taken down to its size by nearest neighbour, weighted (``deep_supervision_weights``)."""

    def __init__(self, loss: nn.Module, weights: list[float]):
        super().__init__()
        self.loss, self.weights = loss, list(weights)

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, (list, tuple)):
            return self.loss(outputs, target)
        total = 0.0
        # a zero-weight output (the lowest) still enters the graph: its head must count as used under DDP,
        # and at that resolution its loss costs next to nothing
        for output, weight in zip(outputs, self.weights):
            scaled = target
            if tuple(output.shape[2:]) != tuple(target.shape[2:]):
                scaled = F.interpolate(target.float(), size=output.shape[2:], mode="nearest-exact")
            total = total + weight * self.loss(output, scaled)
        return total


def make_segmentation_loss(loss_cfg, num_outputs: int, regions: list[list[int]] | None = None,
                           ignore_label: int | None = None) -> nn.Module:
    """The training loss from ``task.loss`` (keys it lacks: configs/task/segment.yaml's): Dice + CE (or + BCE for
    regions), over ``num_outputs`` decoder outputs, ``deep_supervision_levels`` of them weighted."""
    settings = {**packaged_defaults("task", "segment")["loss"], **dict(loss_cfg or {})}
    common = {"dice_weight": float(settings["dice_weight"]), "ce_weight": float(settings["ce_weight"]),
              "batch_dice": bool(settings["batch_dice"]), "ignore_label": ignore_label,
              "smooth": float(settings["smooth"])}
    base = RegionDiceBCELoss(regions, **common) if regions else DiceCELoss(**common)
    return DeepSupervisionLoss(base, deep_supervision_weights(num_outputs, settings["deep_supervision_levels"]))
