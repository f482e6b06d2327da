"""One training run: plans + preprocessed data + config -> a fold folder inside a self-contained model folder.

```
<results>/<task>/<configuration>/            plans.json, dataset.json (the model folder `predict --model` takes)
<results>/<task>/<configuration>/fold_<k>/   config.yaml, overrides.yaml, network.yaml, checkpoints/{last,best}.ckpt,
                                             model_final.pt, logs/, progress.png, validation/summary.json
```
(``plans=<name>`` other than default: ``<configuration>__<name>/``; its plans.json records ``plans_name``.)
The task (``training/tasks.py``: ``task=segment`` or ``task=denoise``) decides the network's arguments, the
LightningModule, what the batches carry and the final validation; everything else here is the same for every task.
Every DDP rank runs this function with the same config and lands in the same folder; only global rank 0 writes
configs, the final weights and the final validation. An interrupted run resumes from ``checkpoints/last.ckpt``
(``resume=auto``), with its optimizer, step, schedule clock, best Dice and curves.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from segforge.errors import SegforgeError
from segforge.io.artifacts import read_json, write_json
from segforge.io.dataset import DatasetSpec
from segforge.io.model_folder import FINAL_WEIGHTS, build_network, check_model_folder, write_weights
from segforge.io.storage import check_writable, remove_stale_temporaries
from segforge.planning.memory import network_encoder
from segforge.planning.precision import check_step_memory, training_precision
from segforge.preprocessing.pipeline import data_folder_name, plan_hash
from segforge.training.budget import (BudgetPacer, BudgetSplit, elapsed_since, forward_seconds,
                                      split_budget, validation_windows)
from segforge.training.cascade import PreviousStage, next_stages, previous_stage
from segforge.training.callbacks import AtomicCheckpointIO, RunFolderWriter
from segforge.training.components import fill_run_context, make_callbacks, make_loggers, make_schedule
from segforge.training.data import SegmentationDataModule
from segforge.training.finetune import load_initial_weights
from segforge.training.requeue import RequeueOnSignal, slurm_requeue_wanted
from segforge.durations import parse_duration
from segforge.training.settings import check_train_settings
from segforge.training.splits import check_splits, make_splits
from segforge.training.tasks import (  # noqa: F401  (re-exported)
    label_setup, make_task, trained_encoder, segmentation_network_kwargs)
from segforge.workspace import BUDGET_CONFIGURATIONS, DEFAULT_PLANS, Workspace

log = logging.getLogger(__name__)

network_kwargs = segmentation_network_kwargs  # the segmentation network's arguments (tasks.py)


def fold_case_ids(workspace: Workspace, case_ids: list[str], fold, num_folds: int, seed: int,
                  group_pattern: str | None = None) -> tuple[list, list, list]:
    """(train ids, val ids, splits): a user's splits.json is respected, otherwise a seeded k-fold split."""
    if str(fold) == "all":
        return sorted(case_ids), [], None
    if workspace.splits_path.is_file():
        try:
            splits = check_splits(read_json(workspace.splits_path), workspace.splits_path, case_ids, num_folds,
                                  group_pattern)
        except ValueError as exc:
            raise SegforgeError(f"{exc}") from exc
    else:
        try:
            splits = make_splits(case_ids, num_folds, seed, group_pattern)
        except ValueError as exc:
            raise SegforgeError(f"{exc}") from exc
    fold = int(fold)
    if not 0 <= fold < len(splits):
        raise SegforgeError(f"fold={fold} does not exist: {workspace.splits_path} has {len(splits)} folds (0..{len(splits) - 1} or all)")
    return splits[fold]["train"], splits[fold]["val"], splits


def latest_checkpoint(fold_dir: Path) -> str | None:
    """The most advanced of ``checkpoints/last.ckpt`` and the ``hpc_ckpt_*.ckpt`` Lightning writes when SLURM asks a
    job to requeue (signal before preemption): a requeued job continues from whichever got furthest."""
    candidates = [p for p in [fold_dir / "checkpoints" / "last.ckpt", *fold_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]

    def progress(path: Path) -> tuple[int, bool, int]:
        """The training step decides (copies change times); at equal steps the requeue checkpoint, whose loop state
        is mid-epoch where the epoch-end ``last.ckpt`` written after the stop counts the epoch as done."""
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
        except Exception:  # an unreadable checkpoint is never preferred
            step = -1
        return step, path.name.startswith("hpc_ckpt_"), path.stat().st_mtime_ns

    return str(max(candidates, key=progress)) if candidates else None


def check_resumable(path: Path) -> None:
    """Refuse, before any work, a checkpoint a resume cannot read: cut short (a full disk, a copy stopped midway) or
    holding pickled objects (``weights_only`` loading refuses them), naming the file and the way out."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        best = path.parent / "best.ckpt"
        way_out = (f"`cp {best} {path}` to resume from the best epoch instead, or " if best.is_file() and best != path
                   else "")
        raise SegforgeError(f"{path}: cannot be read as a checkpoint ({str(exc).splitlines()[0][:200]}): it is cut short "
                            "or holds pickled objects, so training cannot resume from it; nothing was run. Fix: "
                            f"{way_out}delete it (and the fold folder {path.parent.parent}) to train the fold afresh, or "
                            "choose another fold or paths.results_root") from exc


def check_precision(trainer_kwargs: dict) -> None:
    precision = str(trainer_kwargs.get("precision"))
    on_gpu = torch.cuda.is_available() and str(trainer_kwargs.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    if precision in ("16-mixed", "16", "16-true") and not on_gpu:
        raise SegforgeError(f"trainer.precision={precision} needs a CUDA GPU. Fix: trainer.precision=bf16-mixed "
                            "(CPU and GPU) or 32-true")


@dataclass
class RunInputs:
    """What a run trains on, decided before anything is built: the plan's configuration, its preprocessed data, the
    fold's cases and the Trainer's arguments (precision resolved)."""

    workspace: Workspace
    plans_name: str
    plans_path: Path
    plans: dict
    configuration: str
    plan_config: dict
    data_dir: Path
    manifest: dict
    train_ids: list
    val_ids: list
    splits: list | None
    trainer_kwargs: dict
    budget_s: float | None


def train(cfg, spec: DatasetSpec, overrides: list[str], started_at: float | None = None) -> Path:
    """Train one fold as ``cfg`` says; returns the fold folder. A ``budget`` counts from ``started_at`` (epoch
    seconds; the command's start), else from the start of this process."""
    inputs = run_inputs(cfg, spec)
    task = make_task(cfg, spec, inputs.plan_config, inputs.data_dir, inputs.manifest, inputs.plans)
    model_dir = inputs.workspace.model_dir(task.name, inputs.configuration, inputs.plans_name)
    fold_dir = inputs.workspace.fold_dir(task.name, inputs.configuration, cfg.fold, inputs.plans_name)
    resume_from = resume_checkpoint(cfg, fold_dir)
    copies = {model_dir / "dataset.json": spec.root / "dataset.json"}
    task_files = {model_dir / name: text for name, text in task.model_files().items()}
    if inputs.plans.get("plans_name", DEFAULT_PLANS) == inputs.plans_name:  # the file itself says which plan it is
        copies[model_dir / "plans.json"] = inputs.plans_path
    else:  # a plans file copied by hand under another name: the model folder's copy names the plan it was trained from
        task_files[model_dir / "plans.json"] = json.dumps({**inputs.plans, "plans_name": inputs.plans_name}, indent=2) + "\n"
    check_model_folder(model_dir, copies, task_files)

    # both stages' folders are of the plan trained (plans=, also for a plans file copied by hand under another name)
    named_plans = {**inputs.plans, "plans_name": inputs.plans_name}
    previous = previous_stage(inputs.workspace, task.name, named_plans, inputs.configuration, inputs.train_ids,
                              inputs.val_ids, spec.root, spec.file_ending)  # a cascade stage's extra input channels
    if previous is not None and task.name != "segment":
        raise SegforgeError(f"configuration={inputs.configuration} is a cascade stage, a segmentation model. Fix: "
                            "task=segment, or configuration=3d_fullres")

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    kwargs = task.network_kwargs()
    network = training_network(cfg, kwargs, inputs.plan_config, fold_dir, resume_from)
    patch_size = list(cfg.data.patch_size or inputs.plan_config["patch_size"])
    batch_size = int(cfg.data.batch_size or inputs.plan_config["batch_size"])
    module = task.module(network, kwargs)
    datamodule = SegmentationDataModule(inputs.data_dir, inputs.train_ids, inputs.val_ids, patch_size,
                                        inputs.plan_config["dims"], batch_size, task.data_cfg(), int(cfg.seed),
                                        inputs.plan_config.get("mirror_axes"), task.with_labels, previous)
    trainer_kwargs = dict(inputs.trainer_kwargs)
    max_time_s = parse_duration(trainer_kwargs.get("max_time"), "trainer.max_time")
    total_steps = int(trainer_kwargs["max_epochs"]) * int(cfg.data.iterations_per_epoch)
    split = None
    if inputs.budget_s:  # time decides: the schedule spans the training time, epochs are paced by time
        split = _split_budget(inputs.budget_s, started_at, task.window_network(network),
                              task.validation_passes(datamodule.trained_mirror_axes),
                              patch_size, inputs.data_dir, inputs.val_ids, spec, cfg,
                              int(kwargs.get("in_channels", spec.num_channels)))
        max_time_s, total_steps = split.training_s, None
        trainer_kwargs.update(max_epochs=-1, reload_dataloaders_every_n_epochs=1)
    # ${run.*} of the callback and logger entries: this run's fold folder and the metric its task follows
    fill_run_context(cfg, fold_dir, module.monitor, f"{spec.name}/{task.name}/{inputs.configuration}/fold_{cfg.fold}")
    new_files = {inputs.workspace.splits_path: json.dumps(inputs.splits, indent=2) + "\n"} \
        if inputs.splits and not inputs.workspace.splits_path.is_file() else {}
    writer = RunFolderWriter(
        files={**new_files, fold_dir / "config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
               fold_dir / "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create({"overrides": list(overrides)})),
               fold_dir / "network.yaml": OmegaConf.to_yaml(OmegaConf.create(kwargs)), **task_files},
        copies=copies)
    schedule = make_schedule(cfg, total_steps, max_time_s)  # optim.scheduler, completed with this run's steps and time
    # temporaries of a run killed while writing (a checkpoint, the plot): at setup every rank is in the process group
    # and none has written yet; rank 0 alone removes them while the others wait at its barrier
    clean_up = L.pytorch.callbacks.LambdaCallback(setup=lambda trainer, pl_module, stage: remove_stale_temporaries(
        fold_dir, trainer.global_rank, trainer.strategy.barrier))
    callbacks = [clean_up, writer, schedule, *make_callbacks(cfg, module.monitor, bool(inputs.val_ids))]
    if split is not None:
        callbacks.append(budget_pacer(cfg, split, schedule, datamodule, inputs.plan_config))
    requeue = RequeueOnSignal(fold_dir) if slurm_requeue_wanted() else None
    if requeue is not None:
        callbacks.append(requeue)
    if not any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in callbacks):  # callbacks.progress_bar: none
        trainer_kwargs.setdefault("enable_progress_bar", False)
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(fold_dir), callbacks=callbacks, logger=make_loggers(cfg),
                        plugins=[AtomicCheckpointIO()], limit_val_batches=None if inputs.val_ids else 0,
                        use_distributed_sampler=False)  # PatchIndexSampler shards by rank itself
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True if resume_from else None)
    if requeue is not None and requeue.requeued:  # not finished: the requeued job continues from hpc_ckpt_N
        log.info("stopped for the SLURM requeue at step %d; the requeued job resumes", trainer.global_step)
        return fold_dir
    trainer.save_checkpoint(fold_dir / "checkpoints" / "last.ckpt")  # the final state, also after max_time or early stopping
    if trainer.is_global_zero:
        finish_run(cfg, inputs, task, trainer, module, network, kwargs, datamodule, patch_size, fold_dir, split,
                   started_at, previous)
    return fold_dir


def run_inputs(cfg, spec: DatasetSpec) -> RunInputs:
    """The plan's configuration and its preprocessed data (refused when from another plan), the settings checked,
    the fold's cases, and the Trainer's arguments with the precision resolved and the step's memory re-checked."""
    workspace = Workspace.from_config(cfg.paths, spec.name)
    plans_name = str(cfg.plans)
    plans_path = workspace.existing_plans_path(plans_name, spec.root)
    plans = read_json(plans_path, "plans")
    budget_s = parse_duration(cfg.get("budget"), "budget")
    configuration = resolve_configuration(str(cfg.configuration), plans, plans_path, budget_s)
    plan_config = plans["configurations"][configuration]
    data_dir = workspace.preprocessed(data_folder_name(plans, configuration, plans_path))
    manifest = read_json(data_dir / "manifest.json", "preprocessing_manifest") if (data_dir / "manifest.json").is_file() else None
    if manifest is None or manifest["plan_hash"] != plan_hash(plans, configuration):
        named = "" if plans_name == DEFAULT_PLANS else f" plans={plans_name}"
        raise SegforgeError(f"{data_dir}: preprocessed data is missing or from another plan. "
                            f"Fix: run `segforge preprocess {spec.root}{named}`")
    check_train_settings(cfg, OmegaConf.to_container(cfg.trainer, resolve=True), plan_config)
    train_ids, val_ids, splits = fold_case_ids(workspace, manifest["cases"], cfg.fold, int(cfg.num_folds), int(cfg.seed),
                                               cfg.get("split_groups"))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    requested = str(trainer_kwargs.get("precision"))
    on_gpu = torch.cuda.is_available() and str(trainer_kwargs.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    trainer_kwargs["precision"], why = training_precision(requested, plan_config, on_gpu)
    log.info("precision %s: %s", trainer_kwargs["precision"], why)
    check_precision(trainer_kwargs)
    # the encoder trained (model.encoder: null is the plan's): another one than the plan traced is traced and warned of
    encoder = trained_encoder(OmegaConf.to_container(cfg.model, resolve=True), plan_config["network"])
    other_encoder = network_encoder({**plan_config["network"], **encoder}) != network_encoder(plan_config["network"])
    if requested != "plan" or cfg.data.batch_size or cfg.data.get("patch_size") or other_encoder:  # does it still fit?
        # a batch or patch override alone is checked at the plan's precision (a CPU's 32-true is not the planned card's)
        check_step_memory(plans, configuration, requested if requested != "plan" else plan_config["memory"]["precision"],
                          cfg.data.batch_size, str(spec.root), cfg.data.get("patch_size"),
                          encoder=network_encoder(encoder))
    return RunInputs(workspace, plans_name, plans_path, plans, configuration, plan_config, data_dir, manifest,
                     train_ids, val_ids, splits, trainer_kwargs, budget_s)


def resume_checkpoint(cfg, fold_dir: Path) -> str | None:
    """The checkpoint this run continues (``resume=auto``), checked readable; a fold that holds a run is never
    trained over."""
    found = latest_checkpoint(fold_dir)
    if found and str(cfg.resume) in ("False", "false"):
        raise SegforgeError(f"{fold_dir} already holds a run. Fix: resume=auto to continue it, or choose another fold "
                            "or paths.results_root (segforge never overwrites a run)")
    resume_from = found if str(cfg.resume) in ("auto", "True", "true") else None
    if resume_from:
        check_resumable(Path(resume_from))
    return resume_from


def training_network(cfg, kwargs: dict, plan_config: dict, fold_dir: Path, resume_from: str | None) -> torch.nn.Module:
    """The network to train, from segforge's allow-list (never Hydra's instantiate: a `_target_` under model.* would
    name any callable), with room for its checkpoints checked and ``init_from``'s weights loaded."""
    network = build_network(kwargs, "the model config (model.*, task.network.*)",
                            fix="remove the model.* override that is not a plain network setting")
    # last.ckpt, best.ckpt (weights + optimizer moments each), model_final.pt, a requeue checkpoint: room for them now
    parameter_bytes = 4 * sum(p.numel() for p in network.parameters())
    check_writable(fold_dir, 10 * parameter_bytes, what="this run's checkpoints",
                   setting="paths.results_root=DIR (or $SEGFORGE_RESULTS)")
    if cfg.get("init_from") and not resume_from:  # a resumed run continues its own weights
        load_initial_weights(network, kwargs, Path(str(cfg.init_from)))
    if cfg.model.get("channels_last"):
        network = network.to(memory_format=torch.channels_last_3d if plan_config["dims"] == 3 else torch.channels_last)
    return network


def budget_pacer(cfg, split: BudgetSplit, schedule, datamodule, plan_config: dict) -> BudgetPacer:
    """Epochs paced by time; the first epoch's steps from the plan's step time where it was measured on this kind of
    device (not a stated GPU throughput), else ``budgeting.first_epoch_steps``."""
    sized = plan_config.get("sized_for", {})
    measured_here = sized.get("throughput") == "measured" and sized.get("device") == _validation_device(cfg).type
    first_epoch_steps = (round(split.epoch_s / (sized["step_s"] * sized.get("loop_overhead", 1.0))) if measured_here
                         else int(cfg.budgeting.first_epoch_steps))
    return BudgetPacer(split, schedule, datamodule, max(1, first_epoch_steps))


def finish_run(cfg, inputs: RunInputs, task, trainer, module, network, kwargs: dict, datamodule, patch_size: list[int],
               fold_dir: Path, split: BudgetSplit | None, started_at: float | None,
               previous: PreviousStage | None = None) -> None:
    """Rank 0 after training: the final weights, the final validation (with the cascade's inputs: the previous
    stage's masks, the predictions for the next stage) and ``training_summary.json``."""
    network = task.exported(module, network)  # e.g. the denoiser's averaged weights
    trained = {"patch_size": patch_size, "mirror_axes": datamodule.trained_mirror_axes}  # predict uses these
    write_weights(fold_dir / FINAL_WEIGHTS, network, kwargs, inputs.configuration, inputs.plan_config,
                  task.weights_extras(inputs.train_ids), **trained)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = {"fold": str(cfg.fold), "train_cases": len(inputs.train_ids), "val_cases": len(inputs.val_ids),
               "precision": inputs.trainer_kwargs["precision"],
               "global_step": trainer.global_step, "epochs": trainer.current_epoch, "final_metrics": metrics,
               "data_policy": datamodule.policy.to_json() if datamodule.policy else None}
    if inputs.val_ids and cfg.final_validation.enabled:
        stages = next_stages(inputs.workspace, task.name, {**inputs.plans, "plans_name": inputs.plans_name},
                             inputs.configuration, cfg.fold) if task.name == "segment" else {}
        cascade = {**({"next_stages": stages} if stages else {}), **({"previous": previous.masks} if previous else {})}
        summary.update(task.final_validation(network, inputs.plans, inputs.configuration, inputs.val_ids, fold_dir,
                                             _validation_device(cfg), **trained, **cascade))
    if split is not None:
        total = elapsed_since(started_at)
        summary["budget"] = {**split.to_json(), "total_s": round(total, 1), "within_budget": total <= inputs.budget_s}
        log.info("budget %.0f s: %.0f s used (set-up %.0f, training %.0f, final validation reserved %.0f)",
                 inputs.budget_s, total, split.setup_s, split.training_s, split.final_validation_s)
    write_json(fold_dir / "training_summary.json", summary, kind="run")
    log.info("trained fold %s: %s", cfg.fold, fold_dir)


def resolve_configuration(name: str, plans: dict, plans_path: Path, budget_s: float | None) -> str:
    """``configuration=budget`` is the plan's budget configuration (3d_budget, else 2d_budget); names are checked."""
    available = plans["configurations"]
    if name == "budget":
        found = [n for n in BUDGET_CONFIGURATIONS if n in available]
        if not found:
            raise SegforgeError(f"{plans_path} has no budget configuration. Fix: `segforge plan DATASET budget=...` "
                                "(sizes one for this device), or choose configuration=3d_fullres (2d)")
        name = found[0]
    if name not in available:
        raise SegforgeError(f"configuration={name} is not in {plans_path}; choose one of {sorted(available)}")
    sized = available[name].get("sized_for")
    if sized and budget_s and abs(float(sized["budget_s"]) - budget_s) > 0.05 * budget_s:
        log.warning("%s was sized for %.0f s on %s, this run has %.0f s: `segforge plan DATASET budget=%.0fs` sizes "
                    "it for this budget", name, sized["budget_s"], sized["device"], budget_s, budget_s)
    return name


def _split_budget(budget_s: float, started_at: float | None, network, passes: int, patch_size: list[int], data_dir: Path,
                  val_ids: list[str], spec: DatasetSpec, cfg, in_channels: int) -> BudgetSplit:
    """Time the final validation's forward pass and split the budget (``training/budget.py``); ``passes``: how
    often the final validation runs the network over each window (the task's ``validation_passes``)."""
    validating = bool(val_ids) and bool(cfg.final_validation.enabled)
    device = _validation_device(cfg)
    forward_s = 0.0
    windows = 0
    if validating:
        network.to(device)
        forward_s = forward_seconds(network, in_channels, patch_size, 1, device, int(cfg.budgeting.forward_repeats),
                                    int(cfg.final_validation.sw_batch_size), float(cfg.budgeting.forward_enough_s))
        network.to("cpu")
        shapes = [read_json(data_dir / f"{case}.json")["shape_after_resampling"] for case in val_ids]
        windows = passes * validation_windows(shapes, patch_size, float(cfg.final_validation.step_size))
    split = split_budget(budget_s, elapsed_since(started_at), forward_s, windows, len(val_ids) if validating else 0,
                         cfg.budgeting)
    log.info("budget %.0f s: set-up %.0f s, training %.0f s (an epoch every %.0f s), final validation %.0f s "
             "(%d windows at %.3f s), finishing %.0f s", budget_s, split.setup_s, split.training_s, split.epoch_s,
             split.final_validation_s, windows, forward_s, split.finish_s)
    return split


def _validation_device(cfg) -> torch.device:
    """Where this rank times and runs its forward passes: its own GPU (``cuda:LOCAL_RANK``; before Lightning sets the
    device, every rank would otherwise time on GPU 0 at once and leave a CUDA context there), else the CPU."""
    if not (torch.cuda.is_available() and str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda")):
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return torch.device("cuda", int(local_rank) if local_rank.isdigit() else 0)
