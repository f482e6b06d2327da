"""`segforge plan` (check, fingerprint.json, plans_<name>.json, then preprocess) and `segforge preprocess`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from segforge.cli.dataset_args import _checked_dataset, save_config, task_name
from segforge.errors import SegforgeError
from segforge.io.artifacts import read_json, write_json
from segforge.workspace import DEFAULT_PLANS, Workspace, check_not_inside, check_plans_name

log = logging.getLogger("segforge")


def _keep_previous(path: Path, new_payload: dict) -> None:
    """A plans file someone may have edited is never lost: if it differs, it is kept under a dated name."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        old = None
    if old is not None and {k: v for k, v in old.items() if k != "segforge_version"} == \
            {k: v for k, v in json.loads(json.dumps(new_payload, default=str)).items() if k != "segforge_version"}:
        return
    backup = path.with_name(f"{path.stem}.previous-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    shutil.copy2(path, backup)
    log.info("kept the previous %s as %s", path.name, backup.name)


def _checked_file(args, cfg) -> Path:
    """Where plan and preprocess record a passing check of the dataset (``checked.json`` in its work folder)."""
    from segforge.workspace import resolve_dataset

    root = resolve_dataset(args.dataset, cfg.paths.raw_root)
    work_dir = Workspace.from_config(cfg.paths, root.name).work_dir
    check_not_inside(work_dir, root, "dataset folder")  # before anything is written there
    return work_dir / "checked.json"


def _fingerprint(spec, ws: Workspace, cfg) -> dict:
    """fingerprint.json, reused while the dataset and the settings are unchanged (``fingerprint.reuse``)."""
    from segforge.io.artifacts import ArtifactError
    from segforge.planning.fingerprint import compute_fingerprint, dataset_signature, fingerprint_settings

    settings = fingerprint_settings(cfg.fingerprint.total_samples, cfg.fingerprint.seed, cfg.fingerprint.clip_percentiles)
    signature = dataset_signature(spec, settings)
    if cfg.fingerprint.reuse and ws.fingerprint_path.is_file():
        try:
            old = read_json(ws.fingerprint_path, "fingerprint")
        except (ArtifactError, ValueError):
            old = None
        if old is not None and old.get("source_signature") == signature:
            log.info("fingerprint: up to date (%s)", ws.fingerprint_path)
            return old
    fingerprint = compute_fingerprint(spec, num_workers=int(cfg.preprocess.num_workers), **settings)
    fingerprint["source_signature"] = signature
    write_json(ws.fingerprint_path, fingerprint, kind="fingerprint")
    return fingerprint


def run_plan(args, cfg, overrides) -> int:
    from segforge.io.artifacts import stamp
    from segforge.planning.planner import make_plans

    if getattr(args, "verify", False):
        import torch

        if not torch.cuda.is_available():
            raise SegforgeError("--verify runs each planned training step on a CUDA device, and there is none here. "
                                "Fix: run it on the GPU machine; plans themselves need no GPU (drop --verify)")
    plans_name = check_plans_name(cfg.plan.name)  # before any work
    spec = _checked_dataset(args.dataset, cfg, checked_file=_checked_file(args, cfg))  # work folder outside it
    ws = Workspace.from_config(cfg.paths, spec.name)
    fingerprint = _fingerprint(spec, ws, cfg)
    from segforge.durations import parse_duration

    try:
        rules = cfg.plan
        if task_name(cfg) == "denoise":  # the planner traces the denoising step's memory
            from segforge.planning.memory import denoiser_step

            rules = OmegaConf.create({**OmegaConf.to_container(cfg.plan, resolve=True),
                                      "denoiser_step": denoiser_step(cfg.task, spec)})
        plans = make_plans(fingerprint, rules, budget_s=parse_duration(cfg.get("budget"), "budget"))
    except ValueError as exc:
        raise SegforgeError(f"{spec.root}: {exc}") from exc
    plans["plans_name"] = plans_name
    plans_path = ws.new_plans_path(plans_name)
    _keep_previous(plans_path, stamp("plans", plans))
    if plans_name == DEFAULT_PLANS and ws.legacy_plans_path.is_file() and not plans_path.is_file():
        _retire_legacy_plans(ws)
    write_json(plans_path, plans, kind="plans")
    save_config(ws.work_dir, "plan" if plans_name == DEFAULT_PLANS else f"plan_{plans_name}", cfg, overrides)
    for name, conf in plans["configurations"].items():
        memory = conf["memory"]
        log.info("plan %s: patch %s, batch %s, spacing %s, stages %d, predicted peak %.2f GiB of %.1f GB (%s)", name,
                 conf["patch_size"], conf["batch_size"], [round(v, 3) if v else v for v in conf["target_spacing"]],
                 len(conf["network"]["strides"]), memory["predicted_peak_bytes"] / 2**30, memory["gpu_memory_gb"],
                 memory["precision"])
        if "sized_for" in conf:
            sized = conf["sized_for"]
            log.info("plan %s: features %s, %.3f s per step on %s (%s), about %d iterations in %.0f s: %s", name,
                     conf["network"]["features_per_stage"], sized["step_s"], sized["device"], conf["precision"],
                     sized["expected_iterations"], sized["budget_s"], sized["reason"])
    print(f"fingerprint: {ws.fingerprint_path}\nplans:       {plans_path}")
    if getattr(args, "verify", False):
        _verify_memory(plans, ws, plans_name)
    if cfg.preprocess.get("run", True):
        _preprocess(spec, ws, cfg, None, plans_name)
    return 0


def _retire_legacy_plans(ws: Workspace) -> None:
    """The first `segforge plan` (plan default) in a work folder from before named plans: its plans.json becomes a
    dated previous copy, so that plans_default.json alone is plan default (its model folders stay as they are)."""
    legacy = ws.legacy_plans_path
    backup = legacy.with_name(f"{legacy.stem}.previous-{time.strftime('%Y%m%d-%H%M%S')}{legacy.suffix}")
    os.replace(legacy, backup)
    log.info("plan %s now lives in %s; kept the former %s as %s", DEFAULT_PLANS, ws.new_plans_path(DEFAULT_PLANS).name,
             legacy.name, backup.name)


def _verify_memory(plans: dict, ws: Workspace, plans_name: str = DEFAULT_PLANS) -> None:
    """Run each planned step on the GPU and compare its measured peak with the prediction: one file per plan
    (``memory_verification.json`` for plan default, ``memory_verification_<name>.json`` else)."""
    from segforge.planning.memory import cuda_peak_bytes, spec_from_plan

    rows = {}
    for name in plans["configurations"]:
        memory = plans["configurations"][name]["memory"]
        predicted = memory["predicted_peak_bytes"]
        measured = cuda_peak_bytes(spec_from_plan(plans, name))  # at the precision the plan traced
        rows[name] = {"precision": memory["precision"], "predicted_peak_bytes": predicted,
                      "measured_peak_bytes": measured, "ratio": measured / predicted}
        print(f"verify {name} at {memory['precision']}: predicted {predicted / 2**30:.2f} GiB, measured "
              f"{measured / 2**30:.2f} GiB (measured/predicted {measured / predicted:.3f})")
    name = "memory_verification.json" if plans_name == DEFAULT_PLANS else f"memory_verification_{plans_name}.json"
    write_json(ws.work_dir / name, {"plans_name": plans_name, "configurations": rows})


def _preprocess(spec, ws: Workspace, cfg, configurations, plans_name: str) -> None:
    from segforge.preprocessing.pipeline import data_folder_name, run_preprocessing

    plans_path = ws.existing_plans_path(plans_name, spec.root)
    plans = read_json(plans_path, "plans")
    names = list(configurations) if configurations else list(plans["configurations"])
    unknown = [n for n in names if n not in plans["configurations"]]
    if unknown:
        raise SegforgeError(f"configuration {unknown[0]} is not in {plans_path}; it has {sorted(plans['configurations'])}")
    # one folder per data identifier: a configuration that shares another's data (3d_budget: 3d_fullres's spacing),
    # or another plan's that agrees on the data (e.g. made for another GPU), is preprocessed once, as the first
    folders = {}
    for name in names:
        folders.setdefault(data_folder_name(plans, name, plans_path), name)
    for identifier, name in folders.items():
        out = ws.preprocessed(identifier)
        check_not_inside(out, spec.root, "dataset folder")
        counts = run_preprocessing(spec.cases, plans, name, out, spec.label_values,
                                   int(cfg.preprocess.num_workers), int(cfg.preprocess.foreground_samples_per_class),
                                   ignore_label=spec.ignore_label)
        print(f"preprocessed {name}: {out} ({counts['done']} done, {counts['skipped']} up to date)")


def run_preprocess(args, cfg, overrides) -> int:
    spec = _checked_dataset(args.dataset, cfg, checked_file=_checked_file(args, cfg))
    ws = Workspace.from_config(cfg.paths, spec.name)
    _preprocess(spec, ws, cfg, cfg.configurations, str(cfg.plans))
    return 0
