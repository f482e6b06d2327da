"""What sampling and a denoising run's validation share about their inputs: a label map as the one-hot channels a
mask-conditioned denoiser takes, and per-case seeds that are the same in every process."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def one_hot(label: np.ndarray, values: list[int]) -> torch.Tensor:
    """``(*spatial)`` label values -> ``(len(values), *spatial)`` float32 one-hot."""
    label_t = torch.from_numpy(np.ascontiguousarray(label))
    return torch.stack([(label_t == v) for v in values]).float()


def seed_of(*parts) -> int:
    """A generator seed from ``parts`` that is the same in every process (``hash`` of a string is not)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)
