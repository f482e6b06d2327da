"""Model selection on cross-validation (``segforge select TASK_DIR``): the cross-validation Dice of every model
folder (its folds' ``validation/`` predictions pooled), of every pair ensembled (when the validation saved
probabilities), the best of them, and the postprocessing for it; ``selection.json`` says how to predict with the winner.
A model folder is one configuration of one plan (``<configuration>`` for plan default, ``<configuration>__<plans>``
else, its plans.json records ``plans_name``): every plan's folders are candidates, and pairs across plans are ensembled.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np

from segforge.errors import SegforgeError
from segforge.evaluation.metrics import label_classes, metrics_per_class, nan_mean
from segforge.inference.postprocessing import save_rules, search_postprocessing
from segforge.io.artifacts import read_json, write_json
from segforge.io.image import read_image
from segforge.io.model_folder import FINAL_WEIGHTS, fold_dirs, read_weights, trained_folds
from segforge.workspace import DEFAULT_PLANS, MODEL_FOLDER_SEPARATOR, model_folder_name

log = logging.getLogger("segforge")


def cross_validation(model_dir: Path) -> dict:
    """Pooled validation of a model folder's folds: mean Dice per class, and (prediction, reference) per case."""
    folds = trained_folds(model_dir, "validation/summary.json")
    cases, references, predictions = [], {}, {}
    for fold in folds:
        summary = read_json(fold / "validation" / "summary.json", "summary")
        for row in summary["cases"]:
            cases.append(row)
            references[row["case"]] = Path(row["reference"])
            predictions[row["case"]] = Path(row["prediction"])
    if not cases:
        raise SegforgeError(f"{model_dir}: no fold has validation/summary.json. Fix: train the folds with "
                            "final_validation.enabled=true (the default)")
    names = list(cases[0]["dice"])
    mean = {name: nan_mean([c["dice"][name] for c in cases]) for name in names}
    return {"folds": [f.name for f in folds], "num_cases": len(cases), "mean_dice": mean,
            "foreground_mean_dice": nan_mean(list(mean.values())), "references": references, "predictions": predictions}


def _probability_files(model_dir: Path) -> dict[str, Path]:
    return {p.stem: p for fold in fold_dirs(model_dir) for p in (fold / "validation").glob("*.npz")}


def _ensemble_score(models: list[Path], references: dict[str, Path], labels: dict, regions_order) -> dict | None:
    """Mean Dice of the averaged validation probabilities of ``models`` (None if any case lacks them)."""
    files = [_probability_files(m) for m in models]
    common = sorted(set(references).intersection(*[set(f) for f in files]))
    if len(common) < len(references):
        return None
    classes = label_classes(labels)
    ignore = labels.get("ignore") if isinstance(labels.get("ignore"), int) else None
    per_class = {name: [] for name in classes}
    for case in common:
        probabilities = sum(np.load(f[case], allow_pickle=False)["probabilities"].astype(np.float32) for f in files) / len(files)
        if regions_order:
            prediction = np.zeros(probabilities.shape[1:], np.uint16)
            for region, value in enumerate(regions_order):
                prediction[probabilities[region] > 0.5] = value
        else:
            prediction = probabilities.argmax(0)
        reference = read_image(references[case])[0]
        values = metrics_per_class(prediction, reference, list(classes.values()), ignore, surface=False)
        for name, v in classes.items():
            per_class[name].append(values[v]["dice"])
    mean = {name: nan_mean(d) for name, d in per_class.items()}
    return {"num_cases": len(common), "mean_dice": mean, "foreground_mean_dice": nan_mean(list(mean.values()))}


def with_previous_stages(task_dir: Path, members: list[str]) -> list[str]:
    """The model folders ``predict`` takes for ``members``: a cascade stage preceded by its previous stage's (which
    ``predict`` joins to it; a previous stage that is a member of its own is listed again, to be ensembled)."""
    out = []
    for member in members:
        identity = model_identity(task_dir / member)
        plans = read_json(task_dir / member / "plans.json")
        configuration = (plans.get("configurations") or {}).get(identity["configuration"]) or {}
        previous = configuration.get("previous_stage")  # of the same plan: its model folder carries the plan's name
        out += [model_folder_name(previous, identity["plans"]), member] if previous else [member]
    return out


def model_identity(model_dir: Path) -> dict:
    """The configuration and the plans name of a model folder (its plans.json's ``plans_name``; none: default). The
    configuration is the one its trained weights record (a folder unpacked by ``import-model`` may have any name),
    else the folder's name less ``__<plans>``."""
    plans = read_json(Path(model_dir) / "plans.json")
    plans_name = plans.get("plans_name", DEFAULT_PLANS) if isinstance(plans, dict) else DEFAULT_PLANS
    known = (plans.get("configurations") or {}) if isinstance(plans, dict) else {}
    for fold in trained_folds(model_dir)[:1]:
        try:
            recorded = read_weights(fold / FINAL_WEIGHTS).get("configuration")
        except SegforgeError:  # unreadable weights are predict's to refuse; selection reads validations only
            recorded = None
        if isinstance(recorded, str) and recorded in known:  # the file is data: any type may be there
            return {"configuration": str(recorded), "plans": str(plans_name)}
    suffix = f"{MODEL_FOLDER_SEPARATOR}{plans_name}"
    name = Path(model_dir).name
    configuration = name[:-len(suffix)] if plans_name != DEFAULT_PLANS and name.endswith(suffix) else name
    return {"configuration": configuration, "plans": str(plans_name)}


def describe(candidate: str, identities: dict) -> str:
    """``3d_fullres (plans default)``; an ensemble: its members joined by `` + ``."""
    return " + ".join(f"{identities[m]['configuration']} (plans {identities[m]['plans']})" for m in candidate.split("+"))


def select(task_dir: Path, postprocessing: bool = True, plans: list[str] | None = None) -> dict:
    """Compare the model folders under ``task_dir`` (every configuration of every plan, or of the ``plans`` named)
    and their pairwise ensembles, pick the best, search its postprocessing; writes ``selection.json`` in ``task_dir``."""
    task_dir = Path(task_dir)
    models = sorted(p for p in task_dir.iterdir() if (p / "plans.json").is_file() and fold_dirs(p))
    if not models:
        raise SegforgeError(f"{task_dir}: no model folder (plans.json and fold_*) inside. Fix: pass "
                            "<results>/<dataset>/results/<task>, the folder that holds one folder per configuration")
    identities = {m.name: model_identity(m) for m in models}
    if plans is not None:
        kept = [m for m in models if identities[m.name]["plans"] in plans]
        if not kept:
            found = sorted({i["plans"] for i in identities.values()})
            raise SegforgeError(f"{task_dir}: no model folder of plans {', '.join(plans)} (its model folders are of "
                                f"plans {', '.join(found)}). Fix: plans=null for all, or one of them")
        models = kept
    candidates, details = {}, {}
    for model in models:
        try:
            cv = cross_validation(model)
        except SegforgeError as exc:
            log.warning("%s", exc)
            continue
        candidates[model.name] = cv["foreground_mean_dice"]
        details[model.name] = cv
    if not candidates:
        raise SegforgeError(f"{task_dir}: no configuration has cross-validation predictions")
    dataset_json = read_json(models[0] / "dataset.json")
    labels = dataset_json["labels"]
    regions_order = dataset_json.get("regions_class_order") if any(isinstance(v, list) for v in labels.values()) else None
    ensembles = {}
    for a, b in itertools.combinations(sorted(candidates), 2):
        score = _ensemble_score([task_dir / a, task_dir / b], details[a]["references"], labels, regions_order)
        if score is not None:
            ensembles[f"{a}+{b}"] = score
            candidates[f"{a}+{b}"] = score["foreground_mean_dice"]
    best = max(candidates, key=lambda k: candidates[k])
    members = best.split("+")
    result = {"task_dir": str(task_dir), "cross_validation_dice": candidates,
              "configurations": {k: {**identities[k], "folds": v["folds"], "num_cases": v["num_cases"],
                                     "mean_dice": v["mean_dice"]} for k, v in details.items()},
              "candidates": {k: describe(k, identities) for k in candidates},
              "ensembles": ensembles, "best": best, "best_described": describe(best, identities)}
    if postprocessing and len(members) == 1:
        cv = details[best]
        pairs = [(cv["predictions"][c], cv["references"][c]) for c in sorted(cv["references"])]
        rules = search_postprocessing(pairs, labels)
        save_rules(task_dir / best, rules)
        result["postprocessing"] = {k: rules[k] for k in ("foreground_largest_component", "classes_largest_component")}
    result["predict_command"] = "segforge predict -i IMAGES -o OUT " + " ".join(
        f"--model {task_dir / m}" for m in with_previous_stages(task_dir, members))
    write_json(task_dir / "selection.json", result)
    return result
