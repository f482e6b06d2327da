"""Optimizers by config name (kept free of Lightning so the planner can build the real step cheaply)."""

from __future__ import annotations

import torch


def make_optimizer(parameters, optim_cfg) -> torch.optim.Optimizer:
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(parameters, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=bool(optim_cfg.nesterov),
                               weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(parameters, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}; use sgd or adamw")
