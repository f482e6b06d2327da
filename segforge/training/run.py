"""One training run: plans + preprocessed data + config -> a fold folder inside a self-contained model folder.

```
<results>/<task>/<configuration>/            plans.json, dataset.json (the model folder `predict --model` takes)
<results>/<task>/<configuration>/fold_<k>/   config.yaml, overrides.yaml, checkpoints/last.ckpt, model_final.pt, logs
```
Every DDP rank runs this function with the same config and lands in the same folder; only global rank 0 writes
configs and the final weights. An interrupted run resumes from ``checkpoints/last.ckpt`` (``resume=auto``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segforge.errors import SegforgeError
from segforge.io.artifacts import atomic_write_text, read_json, stamp, write_json
from segforge.io.dataset import DatasetSpec
from segforge.preprocessing.pipeline import plan_hash
from segforge.training.data import SegmentationDataModule, make_splits
from segforge.training.losses import make_segmentation_loss
from segforge.training.module import SegmentationModule
from segforge.training.schedules import ScheduleCallback, parse_duration
from segforge.workspace import Workspace

log = logging.getLogger(__name__)

FINAL_WEIGHTS = "model_final.pt"


def network_kwargs(cfg, plan_config: dict, in_channels: int, out_channels: int) -> dict:
    """The network's constructor arguments: the plan's topology, where the ``model`` config leaves a value null."""
    from_plan = plan_config["network"]
    model = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs = {k: v for k, v in model.items() if k != "_target_"}
    for key in ("features_per_stage", "kernel_sizes", "strides", "conv_per_stage", "norm", "deep_supervision"):
        if kwargs.get(key) is None:
            kwargs[key] = from_plan[key]
    kwargs.update(spatial_dims=plan_config["dims"], in_channels=in_channels, out_channels=out_channels)
    return {"_target_": model["_target_"], **kwargs}


def fold_case_ids(workspace: Workspace, case_ids: list[str], fold, num_folds: int, seed: int) -> tuple[list, list, list]:
    """(train ids, val ids, splits): a user's splits.json is respected, otherwise a seeded k-fold split."""
    if str(fold) == "all":
        return sorted(case_ids), [], None
    if workspace.splits_path.is_file():
        splits = read_json(workspace.splits_path)
    else:
        try:
            splits = make_splits(case_ids, num_folds, seed)
        except ValueError as exc:
            raise SegforgeError(f"{exc}") from exc
    fold = int(fold)
    if not 0 <= fold < len(splits):
        raise SegforgeError(f"fold={fold} does not exist: {workspace.splits_path} has {len(splits)} folds (0..{len(splits) - 1} or all)")
    return splits[fold]["train"], splits[fold]["val"], splits


class RunFolderWriter(L.Callback):
    """Writes the run's config and the model folder's plans/dataset.json once DDP ranks are known (rank 0 only)."""

    def __init__(self, files: dict[Path, str], copies: dict[Path, Path]):
        self.files, self.copies = files, copies

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for path, text in self.files.items():
            atomic_write_text(path, text)
        for target, source in self.copies.items():
            if not target.exists():
                tmp = target.with_name(f".tmp-{target.name}")
                shutil.copyfile(source, tmp)
                tmp.replace(target)


def train(cfg, spec: DatasetSpec, overrides: list[str]) -> Path:
    """Train one fold as ``cfg`` says; returns the fold folder."""
    workspace = Workspace.from_config(cfg.paths, spec.name)
    plans = read_json(workspace.plans_path, "plans")
    configuration = str(cfg.configuration)
    if configuration not in plans["configurations"]:
        raise SegforgeError(f"configuration={configuration} is not in {workspace.plans_path}; "
                            f"choose one of {sorted(plans['configurations'])}")
    plan_config = plans["configurations"][configuration]
    data_dir = workspace.preprocessed(configuration)
    manifest = read_json(data_dir / "manifest.json", "preprocessing_manifest") if (data_dir / "manifest.json").is_file() else None
    if manifest is None or manifest["plan_hash"] != plan_hash(plans, configuration):
        raise SegforgeError(f"{data_dir}: preprocessed data is missing or from another plan. "
                            f"Fix: run `segforge preprocess {spec.root}`")
    train_ids, val_ids, splits = fold_case_ids(workspace, manifest["cases"], cfg.fold, int(cfg.num_folds), int(cfg.seed))

    task = str(cfg.task.name)
    model_dir = workspace.model_dir(task, configuration)
    fold_dir = workspace.fold_dir(task, configuration, cfg.fold)
    checkpoint = fold_dir / "checkpoints" / "last.ckpt"
    if checkpoint.is_file() and str(cfg.resume) in ("False", "false"):
        raise SegforgeError(f"{fold_dir} already holds a run. Fix: resume=auto to continue it, or choose another fold "
                            "or paths.results_root (segforge never overwrites a run)")

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    kwargs = network_kwargs(cfg, plan_config, spec.num_channels, spec.num_outputs)
    network = instantiate(kwargs, _convert_="all")
    patch_size = list(cfg.data.patch_size or plan_config["patch_size"])
    batch_size = int(cfg.data.batch_size or plan_config["batch_size"])
    num_outputs = len(kwargs["strides"]) - 1 if kwargs.get("deep_supervision") else 1
    module = SegmentationModule(network, make_segmentation_loss(cfg.task.loss, num_outputs), cfg.optim, spec.num_outputs)
    datamodule = SegmentationDataModule(data_dir, train_ids, val_ids, patch_size, plan_config["dims"], batch_size, cfg.data,
                                        int(cfg.seed), plan_config.get("mirror_axes"))

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_time_s = parse_duration(trainer_kwargs.get("max_time"))
    total_steps = int(trainer_kwargs["max_epochs"]) * int(cfg.data.iterations_per_epoch)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    new_files = {workspace.splits_path: json.dumps(splits, indent=2) + "\n"} if splits and not workspace.splits_path.is_file() else {}
    writer = RunFolderWriter(
        files={**new_files, fold_dir / "config.yaml": resolved,
               fold_dir / "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create({"overrides": list(overrides)})),
               fold_dir / "network.yaml": OmegaConf.to_yaml(OmegaConf.create(kwargs))},
        copies={model_dir / "plans.json": workspace.plans_path, model_dir / "dataset.json": spec.root / "dataset.json"},
    )
    callbacks = [
        writer,
        ScheduleCallback(cfg.optim.schedule, cfg.optim.poly_exponent, cfg.optim.warmup_fraction, total_steps, max_time_s),
        L.pytorch.callbacks.ModelCheckpoint(dirpath=fold_dir / "checkpoints", save_last=True, save_top_k=0,
                                            every_n_epochs=1, save_on_train_epoch_end=True),
    ]
    logger = L.pytorch.loggers.CSVLogger(str(fold_dir), name="logs", version="")
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(fold_dir), callbacks=callbacks, logger=logger,
                        limit_val_batches=None if val_ids else 0,
                        use_distributed_sampler=False)  # PatchIndexSampler shards by rank itself
    resume_from = str(checkpoint) if checkpoint.is_file() and str(cfg.resume) == "auto" else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True if resume_from else None)

    if trainer.is_global_zero:
        export_weights(fold_dir / FINAL_WEIGHTS, network, kwargs, configuration, plan_config)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        write_json(fold_dir / "training_summary.json", {"fold": str(cfg.fold), "train_cases": len(train_ids),
                                                        "val_cases": len(val_ids), "global_step": trainer.global_step,
                                                        "epochs": trainer.current_epoch, "final_metrics": metrics}, kind="run")
        log.info("trained fold %s: %s", cfg.fold, fold_dir)
    return fold_dir


def export_weights(path: Path, network: torch.nn.Module, kwargs: dict, configuration: str, plan_config: dict) -> None:
    """The weights ``predict`` loads: tensors and plain values only, loadable with ``weights_only=True``."""
    payload = stamp("model_weights", {"configuration": configuration, "network": kwargs,
                                      "patch_size": plan_config["patch_size"],
                                      "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()}})
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(payload, tmp)
    tmp.replace(path)
