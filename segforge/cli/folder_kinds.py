"""Which kind of segforge folder a path is, so that a command given the wrong kind says which command takes it.

A dataset folder (nnU-Net raw layout) goes to check/plan/preprocess/train; a model folder (plans.json + fold_*/) to
predict/sample/denoise/export-model; a fold folder, a task folder (one model folder per configuration and plan) and a
work folder (plans_<name>.json, or a plans.json from before named plans) are pointed to the folder the command wants.
Only the layout is looked at, nothing is read.
"""

from __future__ import annotations

from pathlib import Path

from segforge.errors import SegforgeError
from segforge.io.model_folder import FINAL_WEIGHTS, fold_dirs

DATASET_COMMANDS = ("check", "plan", "preprocess", "train")
MODEL_COMMANDS = ("predict", "sample", "denoise", "export-model")


def folder_kind(path: Path) -> str | None:
    """``dataset``, ``model``, ``fold``, ``task`` (model folders inside), ``work`` (plans files, no folds) or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "dataset.json").is_file() and ((path / "imagesTr").is_dir() or (path / "labelsTr").is_dir()):
        return "dataset"
    if _holds_folds(path):
        return "model"
    if path.name.startswith("fold_") and ((path / FINAL_WEIGHTS).is_file() or (path / "config.yaml").is_file()
                                          or (path / "checkpoints").is_dir()):
        return "fold"
    if any(_holds_folds(child) for child in path.iterdir() if child.is_dir()):
        return "task"
    if (path / "plans.json").is_file() or (path / "fingerprint.json").is_file() or any(path.glob("plans_*.json")):
        return "work"
    return None


def _holds_folds(path: Path) -> bool:
    """plans.json beside fold folders (trained or not): a model folder."""
    return (path / "plans.json").is_file() and bool(fold_dirs(path))


def check_folder_kind(command: str, path: Path) -> None:
    """Refuse, before any work, a folder of the wrong kind for ``command``, naming the command that takes it."""
    kind = folder_kind(path)
    if command in DATASET_COMMANDS and kind in ("model", "fold", "task", "work"):
        what = {"model": "a trained model folder (plans.json and fold_*/)", "fold": "the fold folder of a training run",
                "task": "a results folder holding model folders", "work": "segforge's work folder for a dataset "
                "(plans_<name>.json, fingerprint.json, preprocessed/)"}[kind]
        use = {"model": f"to predict with it: segforge predict -i IMAGES -o OUT --model {path}",
               "fold": f"to predict with its model: segforge predict -i IMAGES -o OUT --model {path.parent}",
               "task": f"to compare its configurations: segforge select {path}",
               "work": "give the dataset folder itself (imagesTr/, labelsTr/, dataset.json)"}[kind]
        raise SegforgeError(f"{path}: is {what}, not a dataset. `segforge {command}` takes a dataset folder in nnU-Net's "
                            f"raw layout (imagesTr/, labelsTr/, dataset.json). Fix: {use}")
    if command in MODEL_COMMANDS and kind in ("dataset", "fold", "task", "work"):
        if kind == "dataset":
            task = " task=denoise" if command in ("sample", "denoise") else ""
            raise SegforgeError(f"{path}: is a dataset folder, not a trained model folder. `segforge {command}` takes "
                                "the model folder a training run writes (<work>/<dataset>/results/<task>/<configuration>, "
                                f"holding plans.json and fold_*/). Fix: train one first: segforge plan {path}{task} && "
                                f"segforge train {path}{task}; then pass the model folder it prints")
        if kind == "fold":
            alone = f"--folds {path.name[5:]}" if command == "export-model" else f"predict.folds=[{path.name[5:]}]"
            raise SegforgeError(f"{path}: is one fold of a model. Fix: pass its model folder, {path.parent} "
                                f"({alone} for this fold alone)")
        if kind == "task":
            models = sorted(child.name for child in Path(path).iterdir() if (child / "plans.json").is_file())
            raise SegforgeError(f"{path}: holds one model folder per configuration ({', '.join(models)}) and plan "
                                f"(<configuration>__<plans> for a plan other than default). Fix: pass one of them, "
                                f"e.g. --model {Path(path) / models[0]}")
        trained = sorted(str(m) for m in Path(path).glob("results/*/*") if _holds_folds(m))  # results_root = work root
        example = ", ".join(trained[:4]) if trained else str(Path(path) / "results" / "segment" / "3d_fullres")
        raise SegforgeError(f"{path}: is segforge's work folder for a dataset (plans files, no trained folds). Fix: pass "
                            f"a trained model folder (<configuration> for plan default, <configuration>__<plans> else), "
                            f"e.g. {example}")


def model_paths(args) -> list[Path]:
    """The model folders a command's arguments name."""
    value = getattr(args, "model", None) or getattr(args, "model_dir", None)
    if value is None:
        return []
    return [Path(v) for v in (value if isinstance(value, list) else [value])]


def resolve_model_folders(paths: list[Path], configuration, plans) -> list[Path]:
    """``--model`` given a task folder (``results/<task>``, one model folder per configuration and plan) with
    ``configuration=`` (and ``plans=``): that plan's model folder of the configuration, as nnU-Net's ``-c``/``-p``
    pick one; a cascade stage comes with its ``3d_lowres`` of the same plan. Other paths are kept as given."""
    from segforge.workspace import BUDGET_CONFIGURATIONS, DEFAULT_PLANS, model_folder_name

    resolved = []
    for path in paths:
        if configuration is None or folder_kind(path) != "task":
            resolved.append(path)
            continue
        plan = DEFAULT_PLANS if plans is None else str(plans)
        wanted = str(configuration)
        if wanted == "budget":  # as train's configuration=budget: the plan's budget configuration
            wanted = next((c for c in BUDGET_CONFIGURATIONS if _holds_folds(Path(path) / model_folder_name(c, plan))),
                          BUDGET_CONFIGURATIONS[0])
        stages = ["3d_lowres", wanted] if wanted.startswith("3d_cascade") else [wanted]
        for stage in stages:
            folder = Path(path) / model_folder_name(stage, plan)
            if not _holds_folds(folder):
                models = sorted(child.name for child in Path(path).iterdir() if _holds_folds(child))
                raise SegforgeError(f"{path}: has no trained model of configuration {stage} and plans {plan} "
                                    f"({folder.name}/); it holds {', '.join(models) or 'none'}. Fix: train it "
                                    f"(segforge train DATASET configuration={stage} plans={plan}) or pick one of those")
            resolved.append(folder)
    return resolved


def check_arguments(command: str, args) -> None:
    """``check_folder_kind`` for the dataset and model folders of a command's arguments."""
    if command in DATASET_COMMANDS and getattr(args, "dataset", None):
        check_folder_kind(command, Path(args.dataset))
    for path in model_paths(args):
        check_folder_kind(command, path)

