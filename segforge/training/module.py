"""The segmentation LightningModule: the loss step, and the per-epoch pseudo-Dice on validation patches
(``val_dice``) with its exponential moving average (``MetricEMA``: what the best checkpoint and early stopping follow).

The network is any ``nn.Module`` with ``forward(x, cond=None)``; the optimizer is ``optim.optimizer`` (a ``_partial_``
of its class) and the learning rate follows the progress-based schedule applied by ``ScheduleCallback`` (no scheduler object here, so epochs and time budgets are one mechanism).
Labels: softmax over classes, or one sigmoid per region (``regions``); the ignore label counts nowhere.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from segforge.training.callbacks import MetricEMA
from segforge.training.optim import make_optimizer


class SegmentationModule(MetricEMA, L.LightningModule):
    metric = "val_dice"

    def __init__(self, network: nn.Module, loss: nn.Module, optimizer_cfg, num_classes: int,
                 regions: list[list[int]] | None = None, ignore_label: int | None = None, ema_decay: float = 0.9,
                 channels_last: bool = False, compile: bool = False):
        super().__init__()
        self.network, self.loss, self.optimizer_cfg, self.num_classes = network, loss, optimizer_cfg, num_classes
        # the compiled callable is kept outside the module tree: checkpoints hold the plain network's keys, so a
        # run can be resumed with or without compilation
        self.__dict__["_run"] = torch.compile(network) if compile else network
        self.regions, self.ignore_label, self.metric_ema_decay = regions, ignore_label, ema_decay
        self.channels_last = channels_last
        self._val_counts = None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        return self.network(x, cond)

    def _inputs(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return image.contiguous(memory_format=torch.channels_last_3d if image.ndim == 5 else torch.channels_last)
        return image

    def training_step(self, batch, batch_idx):
        image, label = batch
        loss = self.loss(self._run(self._inputs(image)), label)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=image.shape[0], sync_dist=True)
        return loss

    @property
    def num_scored(self) -> int:
        """Classes (without background) or regions the pseudo-Dice is computed for."""
        return len(self.regions) if self.regions else self.num_classes - 1

    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(3, self.num_scored, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        image, label = batch
        logits = self._run(self._inputs(image))
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        self.log("val_loss", self.loss(logits, label), on_epoch=True, batch_size=image.shape[0], sync_dist=True)
        target = label[:, 0].long()
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_label is None else target != self.ignore_label
        if self.regions:
            predicted = [logits[:, r] > 0 for r in range(len(self.regions))]
            truth = [torch.isin(target, torch.tensor(r, device=target.device)) for r in self.regions]
        else:
            prediction = logits.argmax(1)
            predicted = [prediction == c for c in range(1, self.num_classes)]
            truth = [target == c for c in range(1, self.num_classes)]
        for k, (p, t) in enumerate(zip(predicted, truth)):
            p, t = p & valid, t & valid
            self._val_counts[0, k] += (p & t).sum()
            self._val_counts[1, k] += (p & ~t).sum()
            self._val_counts[2, k] += (~p & t).sum()

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")  # counts of every rank
        tp, fp, fn = counts
        # a class absent from both prediction and reference has no Dice (nnU-Net's nanmean), not a Dice of 0
        denominator = 2 * tp + fp + fn
        dice = torch.where(denominator > 0, 2 * tp / torch.clamp(denominator, min=1), torch.full_like(tp, float("nan")))
        for k, value in enumerate(dice, 1):
            self.log(f"val_dice_{k}", value.float())  # counts were summed over ranks already: no second reduction
        if bool(torch.isnan(dice).all()):
            return
        self.log_metric_and_ema(float(torch.nanmean(dice)))

    def configure_optimizers(self):
        return make_optimizer(self.network.parameters(), self.optimizer_cfg)  # optim.optimizer, a _partial_
