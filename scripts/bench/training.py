"""Training-step benchmark stages for both tools, on the same network, patch, batch and precision.

Imported as ``bench.training`` (``scripts/`` on ``sys.path``); the ``stage_*`` functions run in child processes
(``bench.child``) and import nnunetv2 or segforge only there.

* ``stage_nnunet_step`` / ``stage_segforge_step``: the bare step (forward, Dice+CE with deep supervision,
  backward, gradient clipping at 12, SGD with Nesterov momentum 0.99) on one fixed batch. nnU-Net's is its own
  ``nnUNetTrainer.train_step`` after ``initialize()`` (its ``PlainConvUNet``, ``DC_and_CE_loss``, optimizer);
  segforge's is its ``UNet`` built with nnU-Net's plan topology and its loss and optimizer factory.
* ``stage_nnunet_loop`` / ``stage_segforge_loop``: the same step fed live by each tool's training loader with
  augmentation (nnU-Net's ``get_dataloaders`` with ``nnUNet_n_proc_DA`` workers; segforge's DataModule under
  its automatic thread policy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _batch(batch_size: int, in_channels: int, num_classes: int, patch: list[int], seed: int = 0):
    """A fixed batch: Gaussian image, labels from a smooth random field (so every class occurs)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, in_channels, *patch, generator=generator)
    coarse = torch.randn(batch_size, num_classes, *[max(2, p // 8) for p in patch], generator=generator)
    label = F.interpolate(coarse, size=list(patch), mode="trilinear" if len(patch) == 3 else "bilinear").argmax(1, keepdim=True)
    return image, label


def _nnunet_trainer(dataset_id: int, configuration: str, device: str = "cpu"):
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset_id)
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds (nnunetv2 2.6+)
    trainer = nnUNetTrainer(plans, configuration, 0, dataset_json, device=torch.device(device))
    trainer.initialize()
    return trainer


def stage_nnunet_step(timer, dataset_id: int, configuration: str, steps: int, threads: int, device: str = "cpu") -> dict:
    """nnU-Net's own ``train_step`` (on CUDA with its float16 autocast and grad scaler; on a CPU in float32)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    trainer = _nnunet_trainer(dataset_id, configuration, device)
    config = trainer.configuration_manager
    image, label = _batch(config.batch_size, trainer.num_input_channels, trainer.label_manager.num_segmentation_heads,
                          list(config.patch_size))
    targets = [label if all(s == 1 for s in scale) else
               F.interpolate(label.float(), scale_factor=list(scale), mode="nearest-exact").long()
               for scale in trainer._get_deep_supervision_scales()]
    batch = {"data": image, "target": targets}
    for _ in range(2 if device == "cpu" else 5):  # on a GPU also cuDNN's autotuning
        trainer.train_step(batch)
    with timer:
        for _ in range(steps):
            trainer.train_step(batch)
    return {"steps": steps, "patch_size": list(config.patch_size), "batch_size": config.batch_size, "threads": threads,
            "parameters": sum(p.numel() for p in trainer.network.parameters())}


def stage_nnunet_loop(timer, dataset_id: int, configuration: str, steps: int, threads: int) -> dict:
    import os

    import torch

    torch.set_num_threads(threads)
    trainer = _nnunet_trainer(dataset_id, configuration)
    trainer.on_train_start()  # nnU-Net's loaders: nnUNet_n_proc_DA augmentation workers
    trainer.network.train()
    try:
        for _ in range(2):
            trainer.train_step(next(trainer.dataloader_train))
        with timer:
            for _ in range(steps):
                trainer.train_step(next(trainer.dataloader_train))
    finally:
        finish = getattr(trainer.dataloader_train, "_finish", None)
        if finish:
            finish()
    return {"steps": steps, "augmentation_workers": int(os.environ.get("nnUNet_n_proc_DA", "-1")), "threads": threads}


def _segforge_parts(architecture: dict, in_channels: int, num_classes: int, channels_last: bool = False):
    import torch

    from segforge.configs import packaged_defaults
    from segforge.nn.unet import UNet
    from segforge.training.losses import make_segmentation_loss
    from segforge.training.optim import make_optimizer

    strides = architecture["strides"]
    network = UNet(len(strides[0]), in_channels, num_classes, architecture["features_per_stage"], architecture["kernel_sizes"],
                   strides, architecture["conv_per_stage"], "instance", True)
    if channels_last:
        network = network.to(memory_format=torch.channels_last_3d if len(strides[0]) == 3 else torch.channels_last)
    loss = make_segmentation_loss(None, len(strides) - 1)  # the packaged task.loss
    optimizer = make_optimizer(network.parameters(), packaged_defaults("optim", "sgd_poly")["optimizer"])
    return network, loss, optimizer


def _segforge_step(network, loss_fn, optimizer, image, label, precision: str, channels_last: bool):
    import contextlib

    import torch

    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d if image.ndim == 5 else torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with context:
        loss = loss_fn(network(image), label)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
    optimizer.step()


def stage_segforge_step(timer, architecture: dict, patch_size: list[int], batch_size: int, in_channels: int,
                        num_classes: int, steps: int, threads: int, precision: str = "32-true",
                        channels_last: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    network, loss_fn, optimizer = _segforge_parts(architecture, in_channels, num_classes, channels_last)
    image, label = _batch(batch_size, in_channels, num_classes, patch_size)
    for _ in range(2):
        _segforge_step(network, loss_fn, optimizer, image, label, precision, channels_last)
    with timer:
        for _ in range(steps):
            _segforge_step(network, loss_fn, optimizer, image, label, precision, channels_last)
    return {"steps": steps, "patch_size": patch_size, "batch_size": batch_size, "threads": threads,
            "precision": precision, "channels_last": channels_last,
            "parameters": sum(p.numel() for p in network.parameters())}


def stage_segforge_loop(timer, folder: str, architecture: dict, patch_size: list[int], batch_size: int,
                        in_channels: int, num_classes: int, steps: int) -> dict:
    import itertools

    from omegaconf import OmegaConf

    import segforge
    from segforge.training.data import SegmentationDataModule

    network, loss_fn, optimizer = _segforge_parts(architecture, in_channels, num_classes)
    case_ids = sorted(p.name[: -len(".json")] for p in Path(folder).glob("*.json") if p.name != "manifest.json")
    data_cfg = OmegaConf.load(Path(segforge.__file__).parent / "configs" / "data" / "default.yaml")
    data_cfg.iterations_per_epoch = steps + 2
    module = SegmentationDataModule(Path(folder), case_ids, [], patch_size, len(patch_size), batch_size, data_cfg, 0)
    policy = module.resolve_policy()  # the training process's threads, the loader's workers
    batches = iter(module.train_dataloader())
    for batch in itertools.islice(batches, 2):
        _segforge_step(network, loss_fn, optimizer, *module.on_after_batch_transfer(batch, 0), "32-true", False)
    start = time.perf_counter()
    with timer:
        for batch in itertools.islice(batches, steps):
            _segforge_step(network, loss_fn, optimizer, *module.on_after_batch_transfer(batch, 0), "32-true", False)
    return {"steps": steps, "policy": policy.to_json(), "seconds_check": time.perf_counter() - start}
