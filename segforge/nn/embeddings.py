"""The conditioning vector of a denoiser: sinusoidal features of the time, an MLP, and an optional class embedding.

``ConditionEmbedding(t, class_label)`` gives the ``(batch, cond_dim)`` vector that ``UNet.forward(x, cond)`` injects
into every block. Time is whatever the diffusion process calls time (integer timesteps of a noise schedule, or a
continuous ``t`` in [0, 1] of a flow path); ``time_scale`` stretches a continuous ``t`` onto the range the
sinusoidal frequencies resolve (1000 for ``t`` in [0, 1] gives the same features as 1000 discrete timesteps). The class
embedding has one extra row, the "no class" label (index ``num_classes``), which classifier-free guidance trains by
dropping labels and samples as the unconditional branch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``(batch, dim)`` features ``[cos(t * f_k), sin(t * f_k)]`` with frequencies ``f_k`` from 1 down to
    ``1 / max_period`` (geometric); an odd ``dim`` gets a zero last column. ``t``: ``(batch,)``, any real values."""
    if t.ndim != 1:
        raise ValueError(f"t needs shape (batch,), got {tuple(t.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=1)
    return features


class ConditionEmbedding(nn.Module):
    """Time (and optional class) to the conditioning vector: sinusoidal features of ``t * time_scale`` -> Linear ->
    SiLU -> Linear, plus ``nn.Embedding(num_classes + 1, cond_dim)`` of the class label (last row: no class)."""

    def __init__(self, cond_dim: int, frequency_dim: int = 128, num_classes: int | None = None,
                 time_scale: float = 1.0):
        super().__init__()
        if cond_dim < 1 or frequency_dim < 2:
            raise ValueError(f"cond_dim ({cond_dim}) must be positive and frequency_dim ({frequency_dim}) at least 2")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be at least 1 (or None for no class embedding), got {num_classes}")
        self.cond_dim, self.frequency_dim, self.num_classes, self.time_scale = cond_dim, frequency_dim, num_classes, time_scale
        self.time_mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, cond_dim) if num_classes else None

    @property
    def null_class(self) -> int | None:
        """The "no class" label (classifier-free dropout and the unconditional branch of guidance)."""
        return self.num_classes

    def forward(self, t: torch.Tensor, class_label: torch.Tensor | None = None) -> torch.Tensor:
        features = sinusoidal_embedding(t.reshape(-1) * self.time_scale, self.frequency_dim)
        cond = self.time_mlp(features.to(self.time_mlp[0].weight.dtype))
        if self.class_embedding is None:
            if class_label is not None:
                raise ValueError("this embedding was built without num_classes; it cannot take a class label")
            return cond
        if class_label is None:
            class_label = torch.full((cond.shape[0],), self.num_classes, dtype=torch.long, device=cond.device)
        class_label = class_label.reshape(-1).long()
        if class_label.shape[0] != cond.shape[0]:
            raise ValueError(f"class_label has {class_label.shape[0]} entries for a batch of {cond.shape[0]}")
        if ((class_label < 0) | (class_label > self.num_classes)).any():
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes}: no class)")
        return cond + self.class_embedding(class_label)
