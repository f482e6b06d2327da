"""The optimizer from its config entry (``optim.optimizer``: a ``_partial_`` of a torch.optim class), kept free of
Lightning so the planner can build the real step cheaply."""

from __future__ import annotations

import torch

from segforge.errors import SegforgeError
from segforge.training.buildable import PACKAGES, check_buildable


def make_optimizer(parameters, optimizer_cfg) -> torch.optim.Optimizer:
    """``instantiate(optimizer_cfg)(parameters)``; what cannot be made, or is no optimizer, names optim.optimizer."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(optimizer_cfg, DictConfig):
        optimizer_cfg = OmegaConf.create(optimizer_cfg)
    target = optimizer_cfg.get("_target_")
    fix = ("optim=sgd_poly|adamw_cosine, or optim.optimizer._target_=torch.optim.CLASS with only the arguments it takes "
           "(~optim.optimizer.ARG removes one, e.g. ~optim.optimizer.momentum for Adam)")
    check_buildable(optimizer_cfg, "optim.optimizer", torch.optim.Optimizer, PACKAGES["optim.optimizer"], fix,
                    "a torch optimizer")
    try:
        made = instantiate(optimizer_cfg, _convert_="all")  # plain lists (betas): the checkpoint holds no OmegaConf
        optimizer = made(parameters) if callable(made) and not isinstance(made, torch.optim.Optimizer) else made
    except Exception as exc:  # Hydra wraps import and argument errors alike
        reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise SegforgeError(f"optim.optimizer: cannot make {target} ({reason}). Fix: {fix}") from exc
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SegforgeError(f"optim.optimizer: {target} is not a torch optimizer. Fix: {fix}")
    return optimizer
