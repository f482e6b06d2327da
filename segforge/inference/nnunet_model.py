"""Trained nnU-Net v2 results folders as segforge models: ``segforge predict --model <nnU-Net folder>``.

A folder such as ``<nnUNet_results>/Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres`` (plans.json, dataset.json,
``fold_k/checkpoint_final.pth``) is mapped onto segforge's pieces, none of nnU-Net's code is imported or run:

* the checkpoint loads with ``weights_only=True``, allowing only numpy's scalar and dtype reconstructors (nnU-Net
  logs numpy floats in it): data, never code;
* its ``PlainConvUNet`` weights map one to one onto segforge's ``UNet`` (same convolutions, instance norms,
  transposed convolutions and segmentation heads; ``map_state_dict``); other architectures are refused by name;
* its preprocessing maps onto segforge's plan: target spacing, per-channel CT / z-score / rescale / no
  normalisation with its stored foreground statistics, order-3 B-spline image resampling (``spline``) with a
  separate order-0 axis for anisotropic data, ``transpose_forward``; logits, not probabilities, are averaged and
  resampled (``aggregate: logits``), as nnU-Net does; the inference mirror axes come from the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from segforge.errors import SegforgeError
from segforge.io.model_folder import select_folds, trained_folds
from segforge.nn.unet import UNet

CHECKPOINT = "checkpoint_final.pth"
SUPPORTED_NETWORKS = ("PlainConvUNet",)
NORMALIZATION = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "none",
                 "RescaleTo01Normalization": "rescale", "RGBTo01Normalization": "rescale"}


def is_nnunet_model(folder: Path) -> bool:
    plans = Path(folder) / "plans.json"
    if not plans.is_file() or not trained_folds(folder, CHECKPOINT):
        return False
    try:
        return "plans_name" in json.loads(plans.read_text())
    except (OSError, ValueError):
        return False


def load_checkpoint(path: Path) -> dict:
    allowed = [np._core.multiarray.scalar, np.dtype] + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SegforgeError(f"{path}: cannot be read as data ({str(exc).splitlines()[0]}). segforge loads checkpoints "
                            "with weights_only=True and never runs code from them") from exc


def configuration_of(plans: dict, name: str) -> dict:
    """A configuration with what it inherits (``inherits_from``) filled in."""
    configurations = plans["configurations"]
    if name not in configurations:
        raise SegforgeError(f"configuration {name!r} is not in the nnU-Net plans; it has {sorted(configurations)}")
    conf, chain = dict(configurations[name]), [name]
    while "inherits_from" in conf:
        parent_name = conf.pop("inherits_from")
        if parent_name in chain or parent_name not in configurations:
            what = "a cycle" if parent_name in chain else f"{parent_name!r}, which is not in the plans"
            raise SegforgeError(f"plans.json: configuration {name!r} inherits from {what} "
                                f"({' -> '.join(map(repr, [*chain, parent_name]))}). Fix: correct `inherits_from` "
                                "in the model folder's plans.json (copy it again from nnU-Net's results folder)")
        chain.append(parent_name)
        conf = {**configurations[parent_name], **conf}
    return conf


def segforge_plans(plans: dict, dataset_json: dict, configuration: str, mirror_axes) -> dict:
    """segforge's plans for an nnU-Net configuration (see module docstring)."""
    conf = configuration_of(plans, configuration)
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    normalization = []
    for channel, (scheme, use_mask) in enumerate(zip(conf["normalization_schemes"], conf["use_mask_for_norm"])):
        if scheme not in NORMALIZATION:
            raise SegforgeError(f"nnU-Net normalisation {scheme!r} has no segforge counterpart")
        entry = {"scheme": NORMALIZATION[scheme]}
        if entry["scheme"] == "ct":
            stats = properties[str(channel)]
            entry.update(clip=[stats["percentile_00_5"], stats["percentile_99_5"]], mean=stats["mean"], std=stats["std"])
        elif entry["scheme"] == "zscore":
            entry["use_nonzero_mask"] = bool(use_mask)
        normalization.append(entry)
    patch = list(conf["patch_size"])
    spacing = [float(s) for s in conf["spacing"]]
    kwargs = conf.get("resampling_fn_data_kwargs", {})
    if kwargs.get("order", 3) != 3 or kwargs.get("order_z", 0) not in (0, 1):
        raise SegforgeError(f"nnU-Net resampling {kwargs} has no segforge counterpart (order 3, order_z 0 or 1)")
    return {
        "kind": "plans", "dataset_name": plans.get("dataset_name"), "source": "nnU-Net v2",
        "channel_names": dataset_json["channel_names"], "labels": dataset_json["labels"],
        "normalization": normalization,
        "resampling": {"image": "spline", "label": "linear", "probabilities": "linear", "separate_axis_threshold": 3.0,
                       "across_slices": "nearest" if kwargs.get("order_z", 0) == 0 else "linear"},
        "aggregate": "logits",  # nnU-Net averages logits over mirrors and folds and resamples them before softmax
        "transpose_forward": list(plans.get("transpose_forward", range(3))),
        "configurations": {configuration: {
            "dims": len(patch), "patch_size": patch, "mirror_axes": [int(a) for a in mirror_axes],
            "target_spacing": ([None] + spacing) if len(patch) == 2 else spacing}},
    }


def map_state_dict(state: dict) -> dict:
    """nnU-Net ``PlainConvUNet`` parameter names -> segforge ``UNet`` names (duplicates nnU-Net keeps are dropped)."""
    rules = [
        (r"^encoder\.stages\.(\d+)\.(?:0\.)?convs\.(\d+)\.conv\.(weight|bias)$", r"encoder.\1.convs.\2.\3"),
        (r"^encoder\.stages\.(\d+)\.(?:0\.)?convs\.(\d+)\.norm\.(weight|bias)$", r"encoder.\1.norms.\2.\3"),
        (r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.(weight|bias)$", r"decoder.\1.convs.\2.\3"),
        (r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.norm\.(weight|bias)$", r"decoder.\1.norms.\2.\3"),
        (r"^decoder\.transpconvs\.(\d+)\.(weight|bias)$", r"upsample.\1.\2"),
        (r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$", r"heads.\1.\2"),
    ]
    mapped = {}
    for key, value in state.items():
        if key.startswith("decoder.encoder.") or ".all_modules." in key:
            continue  # the same tensors under a second name
        for pattern, target in rules:
            if re.match(pattern, key):
                mapped[re.sub(pattern, target, key)] = value
                break
        else:
            raise SegforgeError(f"nnU-Net weight {key!r} has no place in segforge's UNet")
    return mapped


def network_from_checkpoint(checkpoint: dict, plans: dict, configuration: str, source: Path) -> UNet:
    conf = configuration_of(plans, configuration)
    architecture = conf.get("architecture", {})
    name = str(architecture.get("network_class_name", "")).rsplit(".", 1)[-1]
    if name not in SUPPORTED_NETWORKS:
        raise SegforgeError(f"{source}: nnU-Net network {name or '(unknown)'} is not supported; segforge maps "
                            f"{', '.join(SUPPORTED_NETWORKS)} (the default nnU-Net U-Net)")
    arch = architecture["arch_kwargs"]
    convs = set(arch["n_conv_per_stage"]) | set(arch["n_conv_per_stage_decoder"])
    norm = str(arch.get("norm_op", ""))
    if len(convs) != 1 or "InstanceNorm" not in norm or arch.get("dropout_op"):
        raise SegforgeError(f"{source}: this nnU-Net architecture (convolutions per stage {sorted(convs)}, norm {norm}, "
                            f"dropout {arch.get('dropout_op')}) has no segforge counterpart")
    state = checkpoint["network_weights"]
    in_channels = int(state[next(k for k in state if k.startswith("encoder.stages.0."))].shape[1])
    out_channels = int(state[next(k for k in state if k.startswith("decoder.seg_layers.") and k.endswith("weight"))].shape[0])
    network = UNet(len(conf["patch_size"]), in_channels, out_channels, arch["features_per_stage"], arch["kernel_sizes"],
                   arch["strides"], convs.pop(), "instance", True)
    network.load_state_dict(map_state_dict(state))
    return network


def load_nnunet_model(folder: Path, folds=None) -> tuple[dict, dict, str, list[torch.nn.Module]]:
    """(segforge plans, dataset.json, configuration, networks) of an nnU-Net results folder."""
    folder = Path(folder)
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    configuration = folder.name.rsplit("__", 1)[-1]
    checkpoints = [fold / CHECKPOINT for fold in select_folds(folder, folds, "a finished nnU-Net v2 training",
                                                                CHECKPOINT)]
    networks, mirror_axes = [], None
    for path in checkpoints:
        checkpoint = load_checkpoint(path)
        configuration = checkpoint.get("init_args", {}).get("configuration", configuration)
        mirror_axes = checkpoint.get("inference_allowed_mirroring_axes", mirror_axes)
        networks.append(network_from_checkpoint(checkpoint, plans, configuration, path))
    dims = len(configuration_of(plans, configuration)["patch_size"])
    axes = list(mirror_axes) if mirror_axes is not None else list(range(dims))
    return segforge_plans(plans, dataset_json, configuration, axes), dataset_json, configuration, networks
