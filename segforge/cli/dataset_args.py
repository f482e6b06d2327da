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


def _checked_dataset(dataset_arg: str, cfg, require_labels: bool | None = None, checked_before=None):
    """The dataset, every problem of it refused at once. ``checked_before(spec)``: whether these very files (names,
    sizes, modification times) passed a check already; then only the layout is looked at (paths inside the dataset,
    files present), not every image read again."""
    from segforge.io.checks import check_dataset
    from segforge.io.dataset import scan_dataset

    root = resolve_dataset(dataset_arg, cfg.paths.raw_root)
    if require_labels is None:
        _refuse_unlabelled(root, cfg)
        require_labels = labels_wanted(cfg, root)
    if checked_before is not None:
        spec, problems = scan_dataset(root, require_labels)
        if spec is not None and not problems and checked_before(spec):
            log.info("%s: unchanged since it was checked (the files fingerprint.json was made from): images not "
                     "read again (fingerprint.reuse=false reads them)", root)
            return load_dataset(root, require_labels=require_labels)
    problems = check_dataset(root, require_labels=require_labels,
                             num_workers=int((cfg.get("preprocess") or {}).get("num_workers") or 0))
    if problems:
        raise DatasetError(problems)
    return load_dataset(root, require_labels=require_labels)
