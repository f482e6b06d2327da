"""Where every artifact lives: the dataset folder (read-only), the work, preprocessed and results roots.

```
<work_root>/<dataset>/fingerprint.json, splits.json, plans_<name>.json (one per named plan: plan.name=...)
<preprocessed_root>/<dataset>/preprocessed/<data_identifier>/    <- shared by every plan whose configuration has it
<results_root>/<dataset>/results/<task>/<configuration>/          <- a model folder of plan default (plans.json, dataset.json)
<results_root>/<dataset>/results/<task>/<configuration>__<name>/  <- a model folder of plan <name>
<results_root>/<dataset>/results/<task>/<model folder>/fold_<k>/  <- one run (config.yaml, checkpoints, weights)
```
A plan is named (``plan.name``, default ``default``); ``plans_path`` alone decides which file a plan's readers get (a
work folder from before named plans holds ``plans.json``, read as plan ``default``). A configuration's
``data_identifier`` (its name and a hash of what determines the arrays, preprocessing/pipeline.py) names its
preprocessed folder, so plans that differ only in what does not change the data (the GPU, the network) share it; a
configuration of a plan from before identifiers reads ``preprocessed/<configuration>/``.
Every path is a pure function of the config (roots, dataset, task, plans, configuration, fold), never of the clock,
so all DDP ranks and a resumed run land in the same folder.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from segforge.errors import SegforgeError

log = logging.getLogger("segforge")

DEFAULT_PLANS = "default"  # the plan of `segforge plan DATASET` without plan.name: its model folders carry no suffix
LEGACY_PLANS_FILE = "plans.json"  # the one plans file of a work folder from before named plans (read as plan default)
# what `configuration=budget` names: the plan's budget configuration, in this order of preference
BUDGET_CONFIGURATIONS = ("3d_budget", "2d_budget")
MODEL_FOLDER_SEPARATOR = "__"  # <configuration>__<plans name>: the model folder of a plan other than default
# letters, digits, '.', '_', '-'; never ".previous-": plans_<name>.previous-<date>.json is a kept copy, not a plan
_PLANS_NAME = re.compile(r"(?!.*\.previous-)[A-Za-z0-9][A-Za-z0-9._-]*")
_legacy_logged: set[Path] = set()


def check_plans_name(name, setting: str = "plan.name") -> str:
    """A plans name is part of file and folder names: letters, digits, ``.``, ``_``, ``-``."""
    text = str(name)
    if not _PLANS_NAME.fullmatch(text):
        raise SegforgeError(f"{setting}={text}: a plans name is letters, digits, '.', '_' and '-', without "
                            "'.previous-' (the mark of a kept copy) (it names "
                            f"plans_<name>.json and the model folders <configuration>__<name>). Fix: e.g. {setting}=ResEncL")
    return text


def resolve_dataset(dataset: str, raw_root: str | None) -> Path:
    """A dataset path, or a bare name / numeric id looked up under ``raw_root``."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        return path.resolve()
    if raw_root:
        root = Path(raw_root).expanduser()
        if (root / dataset).is_dir():
            return (root / dataset).resolve()
        if dataset.isdigit() and root.is_dir():
            matches = sorted(p for p in root.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
            if len(matches) == 1:
                return matches[0].resolve()
    where = f" or under paths.raw_root={raw_root}" if raw_root else " (set SEGFORGE_RAW to look names up in a raw root)"
    raise SegforgeError(f"{dataset}: dataset folder not found as a path{where}")


@dataclass(frozen=True)
class Workspace:
    dataset_name: str
    work_dir: Path
    preprocessed_dir: Path
    results_dir: Path

    @classmethod
    def from_config(cls, paths_cfg, dataset_name: str) -> "Workspace":
        def root(value) -> Path:
            return Path(os.path.abspath(os.path.expanduser(str(value))))

        return cls(
            dataset_name=dataset_name,
            work_dir=root(paths_cfg.work_root) / dataset_name,
            preprocessed_dir=root(paths_cfg.preprocessed_root) / dataset_name / "preprocessed",
            results_dir=root(paths_cfg.results_root) / dataset_name / "results",
        )

    @property
    def fingerprint_path(self) -> Path:
        return self.work_dir / "fingerprint.json"

    def new_plans_path(self, name: str) -> Path:
        """Where `segforge plan` writes plan ``name``: ``plans_<name>.json``."""
        return self.work_dir / f"plans_{check_plans_name(name, 'plans')}.json"

    @property
    def legacy_plans_path(self) -> Path:
        return self.work_dir / LEGACY_PLANS_FILE

    def plans_path(self, name: str = DEFAULT_PLANS) -> Path:
        """The plans file every reader of plan ``name`` reads: ``plans_<name>.json``; for plan default in a work
        folder from before named plans (only ``plans.json``), that file (said once per folder)."""
        path = self.new_plans_path(name)
        if name == DEFAULT_PLANS and not path.is_file() and self.legacy_plans_path.is_file():
            if self.legacy_plans_path not in _legacy_logged:
                _legacy_logged.add(self.legacy_plans_path)
                log.info("%s: read as plan %s (a work folder from before named plans; `segforge plan` writes %s "
                         "and keeps this one as plans.previous-<date>.json)", self.legacy_plans_path, DEFAULT_PLANS,
                         path.name)
            return self.legacy_plans_path
        return path

    def existing_plans_path(self, name: str, dataset_root) -> Path:
        """``plans_path(name)``, refused in words (with the command that makes it) when there is no such plan."""
        path = self.plans_path(check_plans_name(name, "plans"))
        if not path.is_file():
            known = self.plans_names()
            make = f"segforge plan {dataset_root}" + ("" if name == DEFAULT_PLANS else f" plan.name={name}")
            raise SegforgeError(f"{path}: there is no plan {name} for {self.dataset_name}. Fix: `{make}`"
                                + (f", or plans=NAME for one that exists: {', '.join(known)}" if known else ""))
        return path

    def plans_names(self) -> list[str]:
        """The plans this work folder holds (plan default also when only a legacy ``plans.json`` is there)."""
        names = {p.name[len("plans_"):-len(".json")] for p in self.work_dir.glob("plans_*.json")
                 if _PLANS_NAME.fullmatch(p.name[len("plans_"):-len(".json")])}
        if self.legacy_plans_path.is_file():
            names.add(DEFAULT_PLANS)
        return sorted(names)

    @property
    def splits_path(self) -> Path:
        return self.work_dir / "splits.json"

    def preprocessed(self, data_identifier: str) -> Path:
        """The preprocessed folder of a configuration's ``data_identifier`` (a plan from before: its name)."""
        return self.preprocessed_dir / data_identifier

    def model_dir(self, task: str, configuration: str, plans: str = DEFAULT_PLANS) -> Path:
        return self.results_dir / task / model_folder_name(configuration, plans)

    def fold_dir(self, task: str, configuration: str, fold, plans: str = DEFAULT_PLANS) -> Path:
        return self.model_dir(task, configuration, plans) / f"fold_{fold}"


def model_folder_name(configuration: str, plans: str = DEFAULT_PLANS) -> str:
    """``<configuration>`` for plan default (the folders of before named plans), ``<configuration>__<plans>`` else."""
    plans = check_plans_name(plans, "plans")
    return configuration if plans == DEFAULT_PLANS else f"{configuration}{MODEL_FOLDER_SEPARATOR}{plans}"


def check_not_inside(output: Path, protected: Path, what: str,
                     fix: str = "choose a work root or output folder elsewhere") -> None:
    """Refuse to write ``output`` inside ``protected`` (the dataset folder is read-only for segforge)."""
    if Path(os.path.realpath(output)).is_relative_to(Path(os.path.realpath(protected))):  # through symlinks too
        raise SegforgeError(f"{output}: is inside the {what} {protected}, which segforge never writes to. Fix: {fix}")
