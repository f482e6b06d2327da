"""The U-Net core: one class for 2D and 3D, built from per-stage features, kernels and strides.

Encoder stages downsample with a strided first convolution (stride 1 for the first stage), the decoder upsamples
with transposed convolutions and concatenates skips. Deep-supervision heads (1x1 convolutions at every decoder
resolution) are kept apart from the trunk. ``forward(x, cond=None)``: ``cond`` is an optional ``(batch,
cond_dim)`` vector (the denoising task's timestep embedding) that reaches every block of encoder, bottleneck and
decoder after its first convolution and norm, through a zero-initialised projection, so a conditioned network starts
out identical to an unconditioned one: ``cond_mode="add"`` adds a per-channel shift, ``"scale_shift"`` applies
``x * (1 + scale) + shift`` (FiLM, as in improved DDPM). ``attention_stages`` adds self-attention over voxels (group
norm, multi-head, zero-initialised output projection, residual, so it too starts as identity) after the blocks of the
lowest resolutions, in the encoder (bottleneck included) and the decoder stages at those resolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

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


COND_MODES = ("add", "scale_shift")


def make_cond_proj(cond_dim: int | None, channels: int, cond_mode: str) -> nn.Linear | None:
    """The zero-initialised projection of the conditioning vector: a shift, or a scale and a shift, per channel."""
    if cond_mode not in COND_MODES:
        raise ValueError(f"unknown cond_mode {cond_mode!r}; use add or scale_shift")
    if not cond_dim:
        return None
    proj = nn.Linear(cond_dim, channels * (2 if cond_mode == "scale_shift" else 1))
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)
    return proj


def apply_cond(x: torch.Tensor, proj: nn.Linear | None, cond: torch.Tensor | None) -> torch.Tensor:
    """``x`` after a norm, conditioned: ``x + shift`` or ``x * (1 + scale) + shift`` (both identity at zero init)."""
    if proj is None or cond is None:
        return x
    out = proj(cond).reshape(*cond.shape[:1], -1, *([1] * (x.ndim - 2)))
    if out.shape[1] == x.shape[1]:  # the projection's width says the mode: channels (add) or twice (scale_shift)
        return x + out
    scale, shift = out.chunk(2, dim=1)
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention over all voxels: group norm, one projection to queries, keys and values, a
    zero-initialised output projection, and the residual (identity at initialisation)."""

    def __init__(self, spatial_dims: int, channels: int, heads: int):
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"attention_heads ({heads}) must divide the stage's {channels} channels")
        self.heads = heads
        self.norm = make_norm("group", spatial_dims, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (batch, voxels, channels)
        q, k, v = self.qkv(tokens).reshape(batch, -1, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, channels)
        return x + self.out(attended).transpose(1, 2).reshape(batch, channels, *spatial)


class ConvBlock(nn.Module):
    """``num_convs`` x (conv, norm, LeakyReLU); the first conv carries the stride; optional conditioning."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], num_convs: int, norm: str, cond_dim: int | None, cond_mode: str = "add"):
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
        self.cond_proj = make_cond_proj(cond_dim, out_channels, cond_mode)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x))
            # after the norm: an instance norm would subtract a per-channel shift added before it
            if i == 0:
                x = apply_cond(x, self.cond_proj, cond)
            x = self.act(x)
        return x


class ResidualBlock(nn.Module):
    """nnU-Net's residual encoder block (ResEnc, ``BasicBlockD``): conv-norm-act-conv-norm plus a shortcut (average
    pooling for a stride, a 1x1 conv + norm for a change of width), then the activation; optional conditioning
    after the first norm, as in ``ConvBlock``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], norm: str, cond_dim: int | None, cond_mode: str = "add"):
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
        self.cond_proj = make_cond_proj(cond_dim, out_channels, cond_mode)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = apply_cond(self.norm1(self.conv1(x)), self.cond_proj, cond)
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
    convolutions; ``cond_mode``, ``attention_stages`` and ``attention_heads`` shape the denoiser (module docstring)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], conv_per_stage: int = 2,
                 norm: str = "instance", deep_supervision: bool = True, cond_dim: int | None = None,
                 encoder: str = "plain", blocks_per_stage: Sequence[int] | None = None, upsample: str = "transposed",
                 cond_mode: str = "add", attention_stages: int = 0, attention_heads: int = 4):
        super().__init__()
        if not (len(features_per_stage) == len(kernel_sizes) == len(strides)):
            raise ValueError("features_per_stage, kernel_sizes and strides need one entry per stage")
        if any(len(k) != spatial_dims or len(s) != spatial_dims for k, s in zip(kernel_sizes, strides)):
            raise ValueError(f"every kernel size and stride needs {spatial_dims} entries")
        if encoder not in ("plain", "residual"):
            raise ValueError(f"unknown encoder {encoder!r}; use plain or residual")
        if cond_mode not in COND_MODES:
            raise ValueError(f"unknown cond_mode {cond_mode!r}; use add or scale_shift")
        if not 0 <= attention_stages <= len(strides):
            raise ValueError(f"attention_stages must lie in [0, {len(strides)}] (the number of stages), got {attention_stages}")
        self.spatial_dims, self.deep_supervision, self.cond_dim = spatial_dims, deep_supervision, cond_dim
        self.strides = [list(s) for s in strides]
        blocks = list(blocks_per_stage or RESIDUAL_BLOCKS)[: len(strides)]
        if encoder == "residual" and len(blocks) < len(strides):
            raise ValueError(f"blocks_per_stage needs {len(strides)} entries, got {blocks_per_stage}")
        self.encoder = nn.ModuleList()
        channels = in_channels
        for stage, (feats, kernel, stride) in enumerate(zip(features_per_stage, kernel_sizes, strides)):
            if encoder == "plain":
                self.encoder.append(ConvBlock(spatial_dims, channels, feats, kernel, stride, conv_per_stage, norm, cond_dim,
                                              cond_mode))
            else:
                self.encoder.append(Stage([ResidualBlock(spatial_dims, channels if b == 0 else feats, feats, kernel,
                                                         stride if b == 0 else [1] * spatial_dims, norm, cond_dim,
                                                         cond_mode)
                                           for b in range(int(blocks[stage]))]))
            channels = feats
        # attention at the lowest resolutions; parameter-free Identity elsewhere keeps the state-dict keys unchanged
        first_attended = len(strides) - attention_stages
        self.encoder_attention = nn.ModuleList(
            SelfAttention(spatial_dims, feats, attention_heads) if stage >= first_attended else nn.Identity()
            for stage, feats in enumerate(features_per_stage))
        self.decoder_attention = nn.ModuleList()
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for stage in range(len(features_per_stage) - 1, 0, -1):
            below, skip = features_per_stage[stage], features_per_stage[stage - 1]
            self.upsample.append(make_upsample(spatial_dims, below, skip, list(strides[stage]), upsample))
            self.decoder.append(ConvBlock(spatial_dims, 2 * skip, skip, kernel_sizes[stage - 1], [1] * spatial_dims,
                                          conv_per_stage, norm, cond_dim, cond_mode))
            # this decoder block works at the resolution of encoder stage ``stage - 1``
            self.decoder_attention.append(SelfAttention(spatial_dims, skip, attention_heads)
                                          if stage - 1 >= first_attended else nn.Identity())
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
        for block, attention in zip(self.encoder, self.encoder_attention):
            x = attention(block(x, cond))
            skips.append(x)
        outputs = []
        x = skips.pop()
        last = len(self.decoder) - 1
        for i, (up, block, attention) in enumerate(zip(self.upsample, self.decoder, self.decoder_attention)):
            x = attention(block(torch.cat([up(x), skips.pop()], dim=1), cond))
            if i == last:
                outputs.append(self.heads[-1](x))
            elif self.deep_supervision and self.training:
                outputs.append(self.heads[i](x))
        outputs.reverse()
        return outputs if (self.deep_supervision and self.training) else outputs[0]
