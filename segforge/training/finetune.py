"""Fine-tuning: start a network from another segforge model's weights (``init_from=MODEL_DIR``).

The source architecture must match the one being trained (kernels, strides, features, convolutions per stage,
input channels); only the output heads may differ (another set of classes), and those are re-initialised.
Weights load with ``weights_only=True``: a model folder is data, never code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from segforge.errors import SegforgeError
from segforge.io.model_folder import read_weights, weights_file

log = logging.getLogger("segforge")

ARCHITECTURE_KEYS = ("spatial_dims", "in_channels", "features_per_stage", "kernel_sizes", "strides", "conv_per_stage",
                     "norm", "encoder", "blocks_per_stage", "upsample")
DEFAULTS = {"encoder": "plain", "blocks_per_stage": None, "upsample": "transposed"}  # keys older weights lack


def load_initial_weights(network: torch.nn.Module, network_kwargs: dict, source: Path) -> dict:
    """Copy ``source``'s weights into ``network``; heads of another shape are re-initialised. Returns a report."""
    path = weights_file(source)
    payload = read_weights(path, fix="re-export the source model")
    theirs = payload["network"]
    differ = [k for k in ARCHITECTURE_KEYS
              if _plain(theirs.get(k, DEFAULTS.get(k))) != _plain(network_kwargs.get(k, DEFAULTS.get(k)))]
    if differ:
        detail = "; ".join(f"{k}: source {theirs.get(k)} vs here {network_kwargs.get(k)}" for k in differ)
        raise SegforgeError(f"init_from={source}: the architecture differs ({detail}). Fix: train with the source's "
                            "plan (copy its plans.json to <work>/<dataset>/plans_<name>.json and add plans=<name>), or set model.* to match it")
    state = payload["state_dict"]
    own = network.state_dict()
    skipped = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    unfilled = [k for k in own if k not in state and not k.startswith("heads.")]
    if any(not k.startswith("heads.") for k in skipped) or unfilled:
        bad = ([k for k in skipped if not k.startswith("heads.")] + unfilled)[:5]
        raise SegforgeError(f"init_from={source}: weights {bad} do not fit this network. Fix: train with the "
                            "source's plan and model settings")
    network.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    report = {"source": str(path), "loaded": len(state) - len(skipped), "reinitialised": skipped}
    log.info("init_from %s: %d tensors loaded, %d re-initialised (%s)", path, report["loaded"], len(skipped),
             ", ".join(skipped) or "none")
    return report


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
