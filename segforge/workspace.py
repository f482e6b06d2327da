"""Where every artifact lives: the dataset folder (read-only), the work, preprocessed and results roots.

```
<work_root>/<dataset>/fingerprint.json, plans.json, splits.json
<preprocessed_root>/<dataset>/preprocessed/<configuration>/
<results_root>/<dataset>/results/<task>/<configuration>/          <- a model folder (plans.json, dataset.json)
<results_root>/<dataset>/results/<task>/<configuration>/fold_<k>/ <- one run (config.yaml, checkpoints, weights)
```
Every path is a pure function of the config (roots, dataset, task, configuration, fold), never of the clock, so
all DDP ranks and a resumed run land in the same folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from segforge.errors import SegforgeError


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

    @property
    def plans_path(self) -> Path:
        return self.work_dir / "plans.json"

    @property
    def splits_path(self) -> Path:
        return self.work_dir / "splits.json"

    def preprocessed(self, configuration: str) -> Path:
        return self.preprocessed_dir / configuration

    def model_dir(self, task: str, configuration: str) -> Path:
        return self.results_dir / task / configuration

    def fold_dir(self, task: str, configuration: str, fold) -> Path:
        return self.model_dir(task, configuration) / f"fold_{fold}"


def check_not_inside(output: Path, protected: Path, what: str,
                     fix: str = "choose a work root or output folder elsewhere") -> None:
    """Refuse to write ``output`` inside ``protected`` (the dataset folder is read-only for segforge)."""
    if Path(os.path.realpath(output)).is_relative_to(Path(os.path.realpath(protected))):  # through symlinks too
        raise SegforgeError(f"{output}: is inside the {what} {protected}, which segforge never writes to. Fix: {fix}")
