"""The U-Net core: one class for 2D and 3D, built from per-stage features, kernels and strides.

Encoder stages downsample with a strided first convolution (stride 1 for the first stage), the decoder upsamples
with transposed convolutions and concatenates skips. Deep-supervision heads (1x1 convolutions at every decoder
resolution) are kept apart from the trunk. ``forward(x, cond=None)``: ``cond`` is an optional ``(batch,
cond_dim)`` vector (the denoising task's timestep embedding) added to every block after its first convolution and norm
through a zero-initialised projection, so a conditioned network starts out identical to an unconditioned one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def make_norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True, eps=1e-5)
    if kind == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 2 or g == 1)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}; use instance, batch or group")


class ConvBlock(nn.Module):
    """``num_convs`` x (conv, norm, LeakyReLU); the first conv carries the stride; optional conditioning."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], num_convs: int, norm: str, cond_dim: int | None):
        super().__init__()
        conv = _CONV[spatial_dims]
        padding = [k // 2 for k in kernel_size]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(num_convs):
            self.convs.append(conv(in_channels if i == 0 else out_channels, out_channels, list(kernel_size),
                                   stride=list(stride) if i == 0 else 1, padding=padding))
            self.norms.append(make_norm(norm, spatial_dims, out_channels))
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.cond_proj = None
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, out_channels)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x))
            # after the norm: an instance norm would subtract a per-channel shift added before it
            if i == 0 and self.cond_proj is not None and cond is not None:
                x = x + self.cond_proj(cond).reshape(*cond.shape[:1], -1, *([1] * (x.ndim - 2)))
            x = self.act(x)
        return x


class ResidualBlock(nn.Module):
    """nnU-Net's residual encoder block (ResEnc, ``BasicBlockD``): conv-norm-act-conv-norm plus a shortcut (average
    pooling for a stride, a 1x1 conv + norm for a change of width), then the activation; optional conditioning
    after the first norm, as in ``ConvBlock``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], norm: str, cond_dim: int | None):
        super().__init__()
        conv = _CONV[spatial_dims]
        padding = [k // 2 for k in kernel_size]
        self.conv1 = conv(in_channels, out_channels, list(kernel_size), stride=list(stride), padding=padding)
        self.norm1 = make_norm(norm, spatial_dims, out_channels)
        self.conv2 = conv(out_channels, out_channels, list(kernel_size), padding=padding)
        self.norm2 = make_norm(norm, spatial_dims, out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        shortcut = []
        if any(s != 1 for s in stride):
            shortcut.append((nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d)(list(stride), list(stride)))
        if in_channels != out_channels:
            shortcut += [conv(in_channels, out_channels, 1, bias=False), make_norm(norm, spatial_dims, out_channels)]
        self.shortcut = nn.Sequential(*shortcut)
        self.cond_proj = None
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, out_channels)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.norm1(self.conv1(x))
        if self.cond_proj is not None and cond is not None:
            out = out + self.cond_proj(cond).reshape(*cond.shape[:1], -1, *([1] * (out.ndim - 2)))
        out = self.norm2(self.conv2(self.act(out)))
        return self.act(out + self.shortcut(x))


class Stage(nn.Module):
    """A sequence of blocks that all take the conditioning vector."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cond)
        return x


def make_upsample(spatial_dims: int, below: int, skip: int, stride: list[int], kind: str) -> nn.Module:
    """Decoder upsampling: a transposed convolution, or nearest-neighbour interpolation + 1x1 convolution."""
    if kind == "transposed":
        return _TRANSPOSED[spatial_dims](below, skip, stride, stride=stride)
    if kind == "interpolate":
        return nn.Sequential(nn.Upsample(scale_factor=tuple(float(s) for s in stride), mode="nearest"),
                             _CONV[spatial_dims](below, skip, 1))
    raise ValueError(f"unknown upsample {kind!r}; use transposed or interpolate")


RESIDUAL_BLOCKS = [1, 3, 4, 6, 6, 6, 6, 6]  # nnU-Net ResEnc-M's blocks per encoder stage


class UNet(nn.Module):
    """A U-Net from a plan's topology (see module docstring); ``encoder="residual"`` uses ``ResidualBlock`` stages
    (``blocks_per_stage``, default nnU-Net ResEnc-M's), ``upsample="interpolate"`` replaces transposed
    convolutions."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], conv_per_stage: int = 2,
                 norm: str = "instance", deep_supervision: bool = True, cond_dim: int | None = None,
                 encoder: str = "plain", blocks_per_stage: Sequence[int] | None = None, upsample: str = "transposed"):
        super().__init__()
        if not (len(features_per_stage) == len(kernel_sizes) == len(strides)):
            raise ValueError("features_per_stage, kernel_sizes and strides need one entry per stage")
        if any(len(k) != spatial_dims or len(s) != spatial_dims for k, s in zip(kernel_sizes, strides)):
            raise ValueError(f"every kernel size and stride needs {spatial_dims} entries")
        if encoder not in ("plain", "residual"):
            raise ValueError(f"unknown encoder {encoder!r}; use plain or residual")
        self.spatial_dims, self.deep_supervision, self.cond_dim = spatial_dims, deep_supervision, cond_dim
        self.strides = [list(s) for s in strides]
        blocks = list(blocks_per_stage or RESIDUAL_BLOCKS)[: len(strides)]
        if encoder == "residual" and len(blocks) < len(strides):
            raise ValueError(f"blocks_per_stage needs {len(strides)} entries, got {blocks_per_stage}")
        self.encoder = nn.ModuleList()
        channels = in_channels
        for stage, (feats, kernel, stride) in enumerate(zip(features_per_stage, kernel_sizes, strides)):
            if encoder == "plain":
                self.encoder.append(ConvBlock(spatial_dims, channels, feats, kernel, stride, conv_per_stage, norm, cond_dim))
            else:
                self.encoder.append(Stage([ResidualBlock(spatial_dims, channels if b == 0 else feats, feats, kernel,
                                                         stride if b == 0 else [1] * spatial_dims, norm, cond_dim)
                                           for b in range(int(blocks[stage]))]))
            channels = feats
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for stage in range(len(features_per_stage) - 1, 0, -1):
            below, skip = features_per_stage[stage], features_per_stage[stage - 1]
            self.upsample.append(make_upsample(spatial_dims, below, skip, list(strides[stage]), upsample))
            self.decoder.append(ConvBlock(spatial_dims, 2 * skip, skip, kernel_sizes[stage - 1], [1] * spatial_dims,
                                          conv_per_stage, norm, cond_dim))
            if deep_supervision or stage == 1:  # without deep supervision only the full-resolution head exists
                self.heads.append(_CONV[spatial_dims](skip, out_channels, 1))

    @property
    def total_stride(self) -> list[int]:
        total = [1] * self.spatial_dims
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return total

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Logits at full resolution; in training with deep supervision, a list from full to lowest resolution."""
        if cond is not None and self.cond_dim is None:
            raise ValueError("this network was built without cond_dim; it cannot take a conditioning vector")
        skips = []
        for block in self.encoder:
            x = block(x, cond)
            skips.append(x)
        outputs = []
        x = skips.pop()
        last = len(self.decoder) - 1
        for i, (up, block) in enumerate(zip(self.upsample, self.decoder)):
            x = block(torch.cat([up(x), skips.pop()], dim=1), cond)
            if i == last:
                outputs.append(self.heads[-1](x))
            elif self.deep_supervision and self.training:
                outputs.append(self.heads[i](x))
        outputs.reverse()
        return outputs if (self.deep_supervision and self.training) else outputs[0]
