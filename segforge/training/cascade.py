"""The cascade's bookkeeping between stages (nnU-Net's ``previous_stage``/``next_stage``): where a stage's final
validation writes the predictions for its next stage, and, for a cascade stage, where each case's previous-stage
prediction is, refused in words when a case has none.

```
<results>/<task>/3d_lowres/predicted_next_stage/3d_cascade_fullres/CASE.npy   int16, the 3d_fullres preprocessed grid
<results>/<task>/3d_lowres/predicted_next_stage/3d_cascade_fullres/CASE.json  which fold made it, with which weights
<results>/<task>/3d_lowres/fold_<k>/validation/CASE<ending>                   the mask on the original grid
```
Every case is in exactly one lowres fold's validation set (the folds share ``splits.json``), so training all lowres
folds predicts every case once, by a network that never trained on it. A cascade fold trains only on predictions
made by the fold that holds the case out now, with the weights that fold has now (SHA-256 of its
``model_final.pt``): a lowres fold retrained without its final validation, or splits made anew, leave predictions
of another network, refused in words.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from segforge.errors import SegforgeError
from segforge.io.artifacts import read_json
from segforge.io.model_folder import FINAL_WEIGHTS
from segforge.preprocessing.cascade import NEXT_STAGE_FOLDER
from segforge.preprocessing.pipeline import data_folder_name
from segforge.workspace import DEFAULT_PLANS, Workspace


def plans_name(plans: dict) -> str:
    """The plan both stages belong to (a cascade's previous stage is of the same plan): its model folders' suffix."""
    return str(plans.get("plans_name", DEFAULT_PLANS))


@dataclass(frozen=True)
class NextStage:
    """Where a stage's final validation writes a next stage's inputs, and what it records as their source."""

    data_dir: Path   # the next stage's preprocessed folder (each case's properties)
    out_dir: Path    # predicted_next_stage/<next stage>/
    source: dict     # {"fold": "0", "weights_sha256": ...}: the fold and weights that made them


def weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def next_stages(workspace: Workspace, task: str, plans: dict, configuration: str, fold) -> dict[str, NextStage]:
    """Next stage name -> where fold ``fold``'s validation (its weights written) writes that stage's inputs."""
    names = [n for n in plans["configurations"][configuration].get("next_stage") or [] if n in plans["configurations"]]
    if not names:
        return {}
    model_dir = workspace.model_dir(task, configuration, plans_name(plans))
    source = {"fold": str(fold), "weights_sha256": weights_digest(model_dir / f"fold_{fold}" / FINAL_WEIGHTS)}
    return {name: NextStage(workspace.preprocessed(data_folder_name(plans, name, workspace.work_dir)),
                            model_dir / NEXT_STAGE_FOLDER / name, source) for name in names}


@dataclass(frozen=True)
class PreviousStage:
    """A cascade stage's extra input: ``labels`` one-hot encoded; per case its map on the preprocessed grid
    (``arrays``) and, for the validation cases, its mask on the original grid (``masks``)."""

    configuration: str
    labels: list[int]
    arrays: dict[str, Path]
    masks: dict[str, Path]


def previous_stage(workspace: Workspace, task: str, plans: dict, configuration: str, train_ids: list[str],
                   val_ids: list[str], dataset_root: Path, ending: str) -> PreviousStage | None:
    """The previous stage's predictions of every case a cascade fold uses (None for a configuration without
    ``previous_stage``); a case without one is refused, naming it and the lowres fold to train."""
    plan_config = plans["configurations"][configuration]
    previous = plan_config.get("previous_stage")
    if not previous:
        return None
    if previous not in plans["configurations"]:
        raise SegforgeError(f"{workspace.plans_path(plans_name(plans))}: {configuration} names previous_stage {previous!r}, which the plan "
                            f"lacks. Fix: re-run `segforge plan {dataset_root}`")
    splits = read_json(workspace.splits_path) if workspace.splits_path.is_file() else []
    fold_of = {case: k for k, split in enumerate(splits) for case in split["val"]}
    folder = workspace.model_dir(task, previous, plans_name(plans)) / NEXT_STAGE_FOLDER / configuration
    arrays = {case: folder / f"{case}.npy" for case in [*train_ids, *val_ids]}
    masks = {case: workspace.fold_dir(task, previous, fold_of.get(case, "?"), plans_name(plans)) / "validation" / f"{case}{ending}"
             for case in val_ids}
    missing = sorted({case for case, path in [*arrays.items(), *masks.items()] if not path.is_file()})
    stale = _made_by_another_network(workspace, task, previous, plans_name(plans), arrays, fold_of) if not missing else []
    if stale:
        case, why = stale[0]
        of_plan = "" if plans_name(plans) == DEFAULT_PLANS else f" plans={plans_name(plans)}"
        folds = sorted({fold_of[c] for c, _ in stale if c in fold_of})
        command = " && ".join(f"segforge train {dataset_root}{of_plan} configuration={previous} fold={k}" for k in folds)
        raise SegforgeError(f"{folder}: the {previous} prediction of case {case} {why} ({len(stale)} case(s) so): "
                            f"{configuration} trains on predictions of the {previous} fold that holds each case out "
                            f"now. Fix: re-train those folds with their final validation (`{command}`, "
                            "final_validation.enabled=true)")
    if missing:
        folds = sorted({fold_of[c] for c in missing if c in fold_of})
        of_plan = "" if plans_name(plans) == DEFAULT_PLANS else f" plans={plans_name(plans)}"
        command = " && ".join(f"segforge train {dataset_root}{of_plan} configuration={previous} fold={k}" for k in folds) \
            if folds else f"segforge train {dataset_root}{of_plan} configuration={previous} fold=K for every fold K"
        raise SegforgeError(f"{folder}: no {previous} prediction of case(s) {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(arrays)}): {configuration} "
                            f"trains on the {previous} prediction of every case, made by the final validation of the "
                            f"{previous} fold that holds the case out. Fix: train the {previous} folds first "
                            f"(`{command}`, with final_validation.enabled=true)")
    return PreviousStage(previous, [int(v) for v in plan_config["previous_stage_labels"]], arrays, masks)


def _made_by_another_network(workspace: Workspace, task: str, previous: str, plans: str, arrays: dict[str, Path],
                             fold_of: dict[str, int]) -> list[tuple[str, str]]:
    """(case, why) of each prediction not made by the fold holding the case out now, with that fold's weights."""
    digests: dict[int, str | None] = {}
    stale = []
    for case, path in arrays.items():
        source_file = path.with_suffix(".json")
        source = read_json(source_file) if source_file.is_file() else None
        fold = fold_of.get(case)
        if fold not in digests:
            weights = workspace.fold_dir(task, previous, fold, plans) / FINAL_WEIGHTS
            digests[fold] = weights_digest(weights) if fold is not None and weights.is_file() else None
        if not isinstance(source, dict):
            stale.append((case, "records no source (no CASE.json beside it)"))
        elif source.get("fold") != str(fold):
            stale.append((case, f"was made by fold {source.get('fold')}, but fold {fold} holds the case out now"))
        elif source.get("weights_sha256") != digests[fold]:
            stale.append((case, f"was made by earlier weights of fold {fold} (its model_final.pt changed since)"))
    return stale
