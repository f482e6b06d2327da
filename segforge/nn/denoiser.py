"""The denoising network of a diffusion or flow-matching model: segforge's ``UNet`` conditioned on time (and class).

A plain ``nn.Module`` (no training logic): ``ConditionEmbedding`` turns ``(t, class_label)`` into the vector that the
U-Net injects into every block, and optional spatial conditioning (a label map for mask-to-image synthesis, an image
for diffusion-based segmentation) is concatenated to ``x_t`` on the channel axis. The U-Net is the segmentation
network's class, built without deep supervision and with ``image_channels`` outputs. Constructor arguments are plain
values, so a model folder rebuilds it from JSON through the allow-list in ``segforge.io.model_folder``. ``WindowDenoiser``
is the network at one time as a function of a window, what sliding windows (sampling, timing, validation) call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segforge.nn.embeddings import ConditionEmbedding
from segforge.nn.unet import UNet


class Denoiser(nn.Module):
    """``forward(x_t, t, spatial_cond=None, class_label=None)`` -> the model output (noise, v or velocity, as the
    diffusion process decides), the shape of ``x_t``. ``cond_dim`` defaults to 4x the first stage's features."""

    def __init__(self, spatial_dims: int, image_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], conv_per_stage: int = 2,
                 norm: str = "group", cond_dim: int | None = None, cond_mode: str = "add", attention_stages: int = 0,
                 attention_heads: int = 4, num_classes: int | None = None, spatial_cond_channels: int = 0,
                 encoder: str = "plain", blocks_per_stage: Sequence[int] | None = None, upsample: str = "transposed",
                 time_scale: float = 1.0, frequency_dim: int = 128):
        super().__init__()
        if image_channels < 1 or spatial_cond_channels < 0:
            raise ValueError(f"need image_channels >= 1 and spatial_cond_channels >= 0, got {image_channels}, "
                             f"{spatial_cond_channels}")
        cond_dim = int(cond_dim or 4 * features_per_stage[0])
        self.spatial_dims, self.image_channels = spatial_dims, image_channels
        self.spatial_cond_channels, self.num_classes = spatial_cond_channels, num_classes
        self.embedding = ConditionEmbedding(cond_dim, frequency_dim, num_classes, time_scale)
        self.unet = UNet(spatial_dims, image_channels + spatial_cond_channels, image_channels, features_per_stage,
                         kernel_sizes, strides, conv_per_stage=conv_per_stage, norm=norm, deep_supervision=False,
                         cond_dim=cond_dim, encoder=encoder, blocks_per_stage=blocks_per_stage, upsample=upsample,
                         cond_mode=cond_mode, attention_stages=attention_stages, attention_heads=attention_heads)

    @property
    def null_class(self) -> int | None:
        """The "no class" label: classifier-free dropout in training, the unconditional branch of guidance."""
        return self.embedding.null_class

    @property
    def total_stride(self) -> list[int]:
        """Every spatial size must be a multiple of this."""
        return self.unet.total_stride

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, spatial_cond: torch.Tensor | None = None,
                class_label: torch.Tensor | None = None) -> torch.Tensor:
        if x_t.ndim != self.spatial_dims + 2 or x_t.shape[1] != self.image_channels:
            raise ValueError(f"x_t needs shape (batch, {self.image_channels}, {self.spatial_dims} spatial axes), "
                             f"got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.spatial_cond_channels:
            if spatial_cond is None:
                raise ValueError(f"this denoiser is conditioned on {self.spatial_cond_channels} spatial channel(s) "
                                 "(e.g. a label map); pass spatial_cond")
            if spatial_cond.shape[1] != self.spatial_cond_channels or spatial_cond.shape[2:] != x_t.shape[2:] \
                    or spatial_cond.shape[0] != x_t.shape[0]:
                raise ValueError(f"spatial_cond needs shape ({x_t.shape[0]}, {self.spatial_cond_channels}, "
                                 f"{', '.join(map(str, x_t.shape[2:]))}), got {tuple(spatial_cond.shape)}")
            x_t = torch.cat([x_t, spatial_cond.to(x_t.dtype)], dim=1)
        elif spatial_cond is not None:
            raise ValueError("this denoiser was built with spatial_cond_channels=0; it cannot take spatial_cond")
        return self.unet(x_t, self.embedding(t, class_label))


class WindowDenoiser(nn.Module):
    """The denoiser at one time ``t`` as a function of a window ``(b, image + mask channels, *patch)``: the channels
    after ``image_channels`` are the one-hot label map (absent: no map). ``guidance_scale`` != 1 mixes in the
    unconditional output (classifier-free guidance): ``uncond + scale * (cond - uncond)``."""

    def __init__(self, network: nn.Module, t: float, image_channels: int, guidance_scale: float = 1.0):
        super().__init__()
        self.network, self.t, self.image_channels, self.guidance_scale = network, float(t), image_channels, guidance_scale

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        x, cond = window[:, : self.image_channels], window[:, self.image_channels:]
        wanted = int(getattr(self.network, "spatial_cond_channels", 0))
        if wanted and cond.shape[1] == 0:  # no map given (e.g. a timed forward pass): the unconditional branch
            cond = torch.zeros((x.shape[0], wanted, *x.shape[2:]), dtype=x.dtype, device=x.device)
        cond = cond if wanted else None
        t = torch.full((x.shape[0],), self.t, dtype=torch.float32, device=x.device)
        out = self.network(x, t, spatial_cond=cond)
        if cond is not None and self.guidance_scale != 1.0:
            unconditional = self.network(x, t, spatial_cond=torch.zeros_like(cond))
            out = unconditional + self.guidance_scale * (out - unconditional)
        return out
