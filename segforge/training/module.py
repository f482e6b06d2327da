"""The segmentation LightningModule: loss, optimizer, and the per-epoch pseudo-Dice on validation patches.

The network is any ``nn.Module`` with ``forward(x, cond=None)``; the learning rate follows the progress-based
schedule applied by ``ScheduleCallback`` (no scheduler object here, so epochs and time budgets are one mechanism).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from segforge.training.optim import make_optimizer


class SegmentationModule(L.LightningModule):
    def __init__(self, network: nn.Module, loss: nn.Module, optim_cfg, num_classes: int):
        super().__init__()
        self.network, self.loss, self.optim_cfg, self.num_classes = network, loss, optim_cfg, num_classes
        self._val_counts = None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        return self.network(x, cond)

    def training_step(self, batch, batch_idx):
        image, label = batch
        loss = self.loss(self.network(image), label.float())
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=image.shape[0], sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(3, self.num_classes - 1, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        image, label = batch
        logits = self.network(image)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        self.log("val_loss", self.loss(logits, label.float()), on_epoch=True, batch_size=image.shape[0], sync_dist=True)
        prediction = logits.argmax(1)
        target = label[:, 0]
        for c in range(1, self.num_classes):
            p, t = prediction == c, target == c
            self._val_counts[0, c - 1] += (p & t).sum()
            self._val_counts[1, c - 1] += (p & ~t).sum()
            self._val_counts[2, c - 1] += (~p & t).sum()

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")  # counts of every rank
        tp, fp, fn = counts
        dice = 2 * tp / torch.clamp(2 * tp + fp + fn, min=1)
        for c, value in enumerate(dice, 1):
            self.log(f"val_dice_{c}", value.float(), sync_dist=True)
        self.log("val_dice", dice.mean().float(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return make_optimizer(self.network.parameters(), self.optim_cfg)
