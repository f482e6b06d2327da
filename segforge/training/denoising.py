"""The denoising LightningModule: the MSE between the network output and the diffusion process's training target,
an exponential moving average (EMA) of the weights, and per epoch the validation loss and the PSNR of the one-step
x0 estimate at a fixed noise level (``val_psnr``) with its EMA (``MetricEMA``: what the best checkpoint and early
stopping follow).

The network is a ``segforge.nn.denoiser.Denoiser``; ``process`` (``segforge.diffusion``) decides noising, target
and x0 estimate. Label maps (``mask_values`` set: mask-to-image synthesis) enter as one-hot spatial conditioning,
dropped for a share ``cond_dropout`` of samples (classifier-free guidance). Noise and timesteps come from a
generator seeded by ``(seed, step, rank)``, so a resumed run draws what the uninterrupted one would have drawn. The
optimizer and learning-rate schedule are the segmentation task's (``make_optimizer``, ``ScheduleCallback``).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from torch import nn

from segforge.configs import packaged_defaults
from segforge.diffusion.process import DiffusionProcess
from segforge.errors import SegforgeError
from segforge.training.callbacks import MetricEMA
from segforge.training.optim import make_optimizer


def one_hot_mask(label: torch.Tensor, values: list[int]) -> torch.Tensor:
    """``(b, 1, *spatial)`` label values -> ``(b, len(values), *spatial)`` float one-hot (other values: all zero)."""
    return torch.cat([(label == v) for v in values], dim=1).float()


def sample_ranges(x: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """Each sample's intensity range, at least ``floor`` (a flat patch; None: ``task.validation.range_floor`` of
    configs/task/denoise.yaml)."""
    if floor is None:
        floor = packaged_defaults("task", "denoise")["validation"]["range_floor"]
    dims = tuple(range(1, x.ndim))
    return (x.amax(dims) - x.amin(dims)).clamp_min(float(floor))


def range_psnr(estimate: torch.Tensor, clean: torch.Tensor, range_floor: float | None = None) -> torch.Tensor:
    """Per-sample PSNR (dB) of ``estimate`` against ``clean``, with each clean sample's intensity range as the peak."""
    dims = tuple(range(1, clean.ndim))
    peak = sample_ranges(clean, range_floor)
    mse = ((estimate.float() - clean.float()) ** 2).mean(dims).clamp_min(1e-12)
    return 10 * torch.log10(peak**2 / mse)


class DenoisingModule(MetricEMA, L.LightningModule):
    metric = "val_psnr"

    def __init__(self, network: nn.Module, process: DiffusionProcess, optimizer_cfg, *, seed: int = 0,
                 mask_values: list[int] | None = None, cond_dropout: float = 0.0, time_band: tuple[float, float] = (0.0, 1.0),
                 validation_sigma: float = 0.1, metric_ema_decay: float = 0.9, weight_ema_decay: float | None = 0.999,
                 channels_last: bool = False, compile: bool = False, range_floor: float | None = None):
        super().__init__()
        self.range_floor = range_floor  # None: the packaged task.validation.range_floor (sample_ranges)
        self.network, self.process, self.optimizer_cfg, self.seed = network, process, optimizer_cfg, int(seed)
        self.__dict__["_run"] = torch.compile(network) if compile else network  # see SegmentationModule
        self.mask_values, self.cond_dropout = list(mask_values) if mask_values else None, float(cond_dropout)
        low, high = (float(v) for v in time_band)
        if not 0.0 <= low < high <= 1.0:
            raise SegforgeError(f"task.time_band={[low, high]}: give [low, high] with 0 <= low < high <= 1 (fractions "
                                "of the process, 1 = pure noise)")
        self.time_band = (low, high)
        self.validation_sigma, self.metric_ema_decay = float(validation_sigma), float(metric_ema_decay)
        self.weight_ema_decay = weight_ema_decay
        # the averaged weights: what validation scores and what the model folder gets (no gradients, not optimised)
        self.ema_network = copy.deepcopy(network).requires_grad_(False) if weight_ema_decay else None
        self.channels_last = channels_last
        self._val = None

    # ---- pieces ---------------------------------------------------------------------------------------------
    @property
    def averaged(self) -> nn.Module:
        """The network to validate and export: the EMA of the weights when kept, else the trained weights."""
        return self.ema_network if self.ema_network is not None else self.network

    def _generator(self, *key: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(hash((self.seed, *key)) % (2**63))
        return generator

    def training_generator(self, batch_idx: int) -> torch.Generator:
        """The noise and times of one training batch: keyed by epoch and batch, not ``global_step`` (with gradient
        accumulation several batches share one step), so a resumed run draws what the uninterrupted one would."""
        return self._generator(int(self.current_epoch), int(batch_idx), int(self.global_rank))

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
        return x

    def _condition(self, label: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor | None:
        if self.mask_values is None:
            return None
        cond = one_hot_mask(label, self.mask_values)
        if generator is not None and self.cond_dropout > 0:  # classifier-free: some samples see no label map
            keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= self.cond_dropout
            cond = cond * keep.reshape(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
        return cond

    def sample_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch,)`` training times, uniform over ``time_band`` (fractions of the process's time range)."""
        return self.process.sample_timesteps(batch, generator, self.device, self.time_band)

    def _loss(self, network, image: torch.Tensor, label, generator: torch.Generator, dropout: bool) -> torch.Tensor:
        noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
        t = self.sample_times(image.shape[0], generator)
        x_t = self.process.add_noise(image, noise, t)
        cond = self._condition(label, generator if dropout else None)
        out = network(self._inputs(x_t), t, spatial_cond=cond)
        return torch.mean((out.float() - self.process.training_target(image, noise, t).float()) ** 2)

    # ---- training -------------------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, spatial_cond: torch.Tensor | None = None):
        return self.network(x_t, t, spatial_cond=spatial_cond)

    def training_step(self, batch, batch_idx):
        image, label = batch
        generator = self.training_generator(batch_idx)
        loss = self._loss(self._run, image, label, generator, dropout=True)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=image.shape[0], sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema_network is None:
            return
        # warm-up: early on the average follows the weights closely (decay (1 + n) / (10 + n) until it reaches the set one)
        n = int(self.global_step)
        decay = min(float(self.weight_ema_decay), (1 + n) / (10 + n))
        with torch.no_grad():
            for averaged, current in zip(self.ema_network.parameters(), self.network.parameters()):
                averaged.lerp_(current.detach(), 1 - decay)
            for averaged, current in zip(self.ema_network.buffers(), self.network.buffers()):
                averaged.copy_(current)

    # ---- validation -----------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, device=self.device, dtype=torch.float64)  # PSNR sum, samples

    def one_step_estimate(self, network, image: torch.Tensor, label, generator: torch.Generator) -> torch.Tensor:
        """x0 estimated in one step from ``image`` plus Gaussian noise of ``validation_sigma`` x each sample's range."""
        sigmas = self.validation_sigma * sample_ranges(image, self.range_floor)
        entries = [self.process.entry_for_sigma(float(s)) for s in sigmas]
        t = torch.tensor([e[0] for e in entries], device=image.device, dtype=torch.float32)
        scale = torch.tensor([e[1] for e in entries], device=image.device, dtype=image.dtype)
        shape = (-1, *([1] * (image.ndim - 1)))
        noisy = image + sigmas.reshape(shape) * torch.randn(image.shape, generator=generator, device=image.device)
        x_t = scale.reshape(shape) * noisy
        out = network(self._inputs(x_t), t, spatial_cond=self._condition(label, None))
        return self.process.predict_x0_and_noise(x_t, t, out.float())[0]

    def validation_step(self, batch, batch_idx):
        image, label = batch
        generator = self._generator(-1, int(batch_idx), int(self.global_rank))  # the same draws every epoch
        network = self.averaged
        loss = self._loss(network, image, label, generator, dropout=False)
        self.log("val_loss", loss, on_epoch=True, batch_size=image.shape[0], sync_dist=True)
        psnr = range_psnr(self.one_step_estimate(network, image, label, generator), image, self.range_floor)
        self._val[0] += psnr.double().sum()
        self._val[1] += psnr.numel()

    def on_validation_epoch_end(self) -> None:
        total, count = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        if float(count) == 0:
            return
        psnr = float(total / count)
        if not math.isfinite(psnr):
            return
        self.log_metric_and_ema(psnr)

    def configure_optimizers(self):
        return make_optimizer(self.network.parameters(), self.optimizer_cfg)  # optim.optimizer, a _partial_
