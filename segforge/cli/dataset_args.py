"""What the dataset commands share: the dataset a command names, checked (labels where the task needs them), and
the composed config saved beside a command's outputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from segforge.errors import SegforgeError
from segforge.io.artifacts import atomic_write_text
from segforge.io.dataset import DatasetError, load_dataset
from segforge.workspace import resolve_dataset

log = logging.getLogger("segforge")


def save_config(folder: Path, command: str, cfg, overrides: list[str]) -> None:
    """The exact composed config and the overrides of a run, beside its outputs."""
    atomic_write_text(folder / f"{command}_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_text(folder / f"{command}_overrides.yaml", OmegaConf.to_yaml(OmegaConf.create({"overrides": list(overrides)})))


def task_name(cfg) -> str:
    """The task a command works for: ``task=denoise`` (a config group in train, a plain value elsewhere)."""
    task = cfg.get("task", "segment")
    return str(task.name if OmegaConf.is_config(task) else task)


def labels_wanted(cfg, root: Path) -> bool:
    """Whether a command reads the dataset's labels: segmentation needs them; denoising uses them when the dataset
    has them (labelsTr/, or a ``dataset`` listing) or conditions on them, and takes images alone otherwise."""
    if cfg.get("require_labels") is not None:
        return bool(cfg.require_labels)
    if task_name(cfg) != "denoise":
        return True
    task = cfg.get("task")
    masks = OmegaConf.is_config(task) and bool(task.get("mask_conditioning"))
    return masks or (root / "labelsTr").is_dir() or _lists_cases(root)


def _lists_cases(root: Path) -> bool:
    try:
        return isinstance(json.loads((root / "dataset.json").read_text()).get("dataset"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _refuse_unlabelled(root: Path, cfg) -> None:
    """A segmentation command on a dataset without labels: say that it is one, and what can use it."""
    if labels_wanted(cfg, root) and root.is_dir() and (root / "dataset.json").is_file() \
            and not (root / "labelsTr").exists() and not _lists_cases(root):
        need = "mask conditioning (task.mask_conditioning=true)" if task_name(cfg) == "denoise" else f"task={task_name(cfg)}"
        raise SegforgeError(f"{root}: has no labelsTr/: an unlabelled dataset; {need} needs one label file per case, "
                            f"only task=denoise trains on images alone. Fix: add labelsTr/CASE<file_ending> for every "
                            f"case, or add task=denoise to the command (e.g. `segforge plan {root} task=denoise`)")


def _checked_dataset(dataset_arg: str, cfg, require_labels: bool | None = None, checked_file: Path | None = None):
    """The dataset, every problem of it refused at once. ``checked_file``: where a passing check is recorded
    (``check_signature``); while it matches, only the checks that read no image run (``layout_problems``). Written
    after a passing check; ``recheck=true`` reads every image anyway."""
    from segforge.io.artifacts import ArtifactError, read_json, write_json
    from segforge.io.checks import check_dataset, check_signature, layout_problems
    from segforge.io.dataset import scan_dataset
    from segforge.io.storage import StorageError

    root = resolve_dataset(dataset_arg, cfg.paths.raw_root)
    if require_labels is None:
        _refuse_unlabelled(root, cfg)
        require_labels = labels_wanted(cfg, root)
    spec, problems = scan_dataset(root, require_labels) if checked_file is not None else (None, [])
    # signed before the images are read: a file that changes during the check is not recorded as checked
    before = check_signature(spec) if spec is not None and not problems else None
    if before is not None and not cfg.get("recheck", False) and Path(checked_file).is_file():
        try:
            recorded = read_json(checked_file, "check").get("check_signature")
        except (ArtifactError, ValueError, OSError):
            recorded = None
        if recorded == before:
            problems = layout_problems(spec)
            if problems:
                raise DatasetError(problems)
            log.info("%s: unchanged since it was checked (%s): images not read again (recheck=true reads them)",
                     root, checked_file)
            return spec
    problems = check_dataset(root, require_labels=require_labels,
                             num_workers=int((cfg.get("preprocess") or {}).get("num_workers") or 0))
    if problems:
        raise DatasetError(problems)
    checked = load_dataset(root, require_labels=require_labels)
    if before is not None and check_signature(checked) == before:
        try:  # a record to save work later: a work folder that cannot take it costs only that
            write_json(checked_file, {"check_signature": before}, kind="check")
        except (StorageError, OSError) as exc:
            log.warning("%s: not written (%s); the next plan or preprocess reads every image again", checked_file, exc)
    return checked
