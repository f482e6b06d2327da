"""The model folder contract: what a trained segforge model folder holds and how every stage reads and writes it.

```
MODEL_DIR/            plans.json, dataset.json (+ the task's files, e.g. diffusion.json), postprocessing.json
MODEL_DIR/fold_<k>/   model_final.pt (this module's weights file), config.yaml, checkpoints/, validation/ ...
```
One module owns it so that training (which writes it), prediction, denoising, fine-tuning and the model archive
(which read it) cannot drift apart: the weights file format (tensors and plain values only, loaded with
``weights_only=True``; the network built from segforge's allow-list, never from a class path the file names), fold
discovery and the default ensemble (numbered folds; ``fold_all`` only when asked, as in nnU-Net, or when it is the
only trained fold), the checks that every fold of a folder shares its plans, and device selection. It imports no
training code, so a predictor loads without Lightning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from segforge.errors import SegforgeError
from segforge.io.artifacts import atomic_path, check_header, read_json, stamp

log = logging.getLogger(__name__)

FINAL_WEIGHTS = "model_final.pt"


def select_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one; ``cuda`` without one is refused in words."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SegforgeError("device=cuda but no CUDA device is available. Fix: device=cpu or device=auto")
    return torch.device(device)


# ---- folds ---------------------------------------------------------------------------------------------------------

def fold_dirs(model_dir: Path) -> list[Path]:
    """Every ``fold_*`` folder of ``model_dir``, started or finished, in ``trained_folds``' order."""
    found = [p for p in Path(model_dir).glob("fold_*") if p.is_dir()] if Path(model_dir).is_dir() else []
    return sorted(found, key=lambda p: (not p.name[5:].isdigit(), int(p.name[5:]) if p.name[5:].isdigit() else 0, p.name))


def trained_folds(model_dir: Path, weights: str = FINAL_WEIGHTS) -> list[Path]:
    """Every fold folder of ``model_dir`` that holds finished weights (``weights``: the file's name; nnU-Net's is
    ``checkpoint_final.pth``; or another file that marks what is looked for, e.g. ``validation/summary.json``),
    numbered folds in order, then ``fold_all``."""
    return [p for p in fold_dirs(model_dir) if (p / weights).is_file()]


def select_folds(model_dir: Path, folds=None, what: str = "a finished `segforge train` run",
                 weights: str = FINAL_WEIGHTS, hint: str | None = "predict.folds=[all]") -> list[Path]:
    """The fold folders to use: ``folds`` (numbers or ``all``) when given, else the default ensemble: the numbered
    folds, and ``fold_all`` (trained on every case, so never cross-validated) only when it is the only one.
    Refused in words when nothing is left; ``what``: the command that makes such a folder; ``hint``: the setting that
    asks for ``fold_all`` (logged when it is left out; None: say nothing)."""
    model_dir = Path(model_dir)
    available = trained_folds(model_dir, weights)
    if folds is not None:
        wanted = {f"fold_{f}" for f in folds}
        chosen = [p for p in available if p.name in wanted]
    else:
        chosen = [p for p in available if p.name != "fold_all"] or available
    if not chosen:
        asked = f" for folds {list(folds)}" if folds is not None else ""
        have = f" (trained: {', '.join(p.name for p in available)})" if available else ""
        raise SegforgeError(f"{model_dir}: no fold_*/{weights} found{asked}{have}. Fix: pass the model folder "
                            f"of {what}")
    if folds is None and len(chosen) < len(available) and hint:
        log.info("%s: using %s (fold_all is used when asked: %s)", model_dir, ", ".join(p.name for p in chosen), hint)
    return chosen


def weights_file(source: Path, setting: str = "init_from") -> Path:
    """The weights file of ``source``: a ``model_final.pt``, a fold folder, or a model folder (its first fold of the
    default ensemble)."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / FINAL_WEIGHTS).is_file():
        return source / FINAL_WEIGHTS
    try:
        return select_folds(source, hint=None)[0] / FINAL_WEIGHTS
    except SegforgeError:
        raise SegforgeError(f"{setting}={source}: no {FINAL_WEIGHTS} there or in a fold_* folder. Fix: point {setting} "
                            "at a trained segforge model folder, fold folder or weights file") from None


# ---- the weights file ----------------------------------------------------------------------------------------------

def write_weights(path: Path, network: torch.nn.Module, kwargs: dict, configuration: str, plan_config: dict,
                  extras: dict | None = None, patch_size: list[int] | None = None,
                  mirror_axes: list[int] | None = None) -> None:
    """The weights ``predict`` (``sample``, ``denoise``, ``init_from``) loads: tensors and plain values only, loadable
    with ``weights_only=True``; ``extras``: the task's plain values (e.g. the diffusion process). ``patch_size`` and
    ``mirror_axes``: what the network was trained with (a ``data.*`` override), else the plan's."""
    axes = plan_config.get("mirror_axes", list(range(plan_config["dims"]))) if mirror_axes is None else mirror_axes
    payload = stamp("model_weights", {"configuration": configuration, "network": kwargs, **(extras or {}),
                                      "patch_size": [int(p) for p in (patch_size or plan_config["patch_size"])],
                                      "mirror_axes": [int(a) for a in axes],
                                      "state_dict": {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}})
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_weights(source: Path, fix: str = "re-run training or re-copy the model") -> dict:
    """The payload of a weights file (loaded as data only), refused in words when unreadable or not segforge's."""
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SegforgeError(f"{source}: cannot load weights ({exc}). Fix: {fix}") from exc
    check_header(payload, "model_weights", str(source))
    return payload


def build_network(spec: dict, source, fix: str = "use a model trained by segforge") -> torch.nn.Module:
    """The network a weights file (or the ``model`` config of a training run) describes, built from an allow-list,
    never through a class path taken from it: a model folder from elsewhere is data, and ``_target_`` (at any depth)
    would otherwise name any callable. ``fix``: what the message tells the user to do."""
    from segforge.nn.denoiser import Denoiser
    from segforge.nn.unet import UNet

    networks = {"segforge.nn.unet.UNet": UNet, "segforge.nn.denoiser.Denoiser": Denoiser}
    kwargs = dict(spec)
    target = kwargs.pop("_target_", None)
    if target not in networks:
        raise SegforgeError(f"{source}: network class {target!r} is not one of segforge's networks "
                            f"({', '.join(networks)}); refused. Fix: {fix}")
    bad = [key for key, value in kwargs.items() if not _plain(value)]
    if bad:
        raise SegforgeError(f"{source}: network arguments {bad} are not plain values; refused. Fix: {fix}")
    try:
        return networks[target](**kwargs)
    except TypeError as exc:  # an argument the class does not take (e.g. `+model.foo=1`)
        raise SegforgeError(f"{source}: {target} refuses its arguments ({exc}). Fix: {fix}") from exc


def _plain(value) -> bool:
    if isinstance(value, dict):
        return "_target_" not in value and all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def load_network(payload: dict, plans: dict, source: Path, what: str = "segmentation") -> torch.nn.Module:
    """The network ``payload`` (of the weights file ``source``) describes, with its weights loaded. A file that lacks
    a key, names a configuration the model's plans.json lacks, or holds weights of other shapes (e.g. a changed
    ``features_per_stage``) is refused, naming the file and the fix (predict and denoise word these alike)."""
    missing = [key for key in ("network", "state_dict", "configuration") if key not in payload]
    if not missing and payload["configuration"] not in plans.get("configurations", {}):
        missing = [f"configuration {payload['configuration']!r} in plans.json"]
    if missing:
        raise SegforgeError(f"{source}: incomplete {what} weights (no {', '.join(map(str, missing))}). Fix: "
                            "re-run training or re-copy the model folder")
    try:
        network = build_network(payload["network"], source)
        network.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise SegforgeError(f"{source}: the weights do not fit the network they describe ({str(exc)[:300]}). "
                            "Fix: re-run training or re-copy the model folder") from exc
    return network


def trained_windows(payload: dict, plans: dict, source) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(patch size, mirror axes) a weights file's network was trained with; files from before these were recorded:
    the plan's (of the file's configuration)."""
    plan_config = plans["configurations"].get(payload["configuration"])
    if plan_config is None:
        raise SegforgeError(f"{source}: its configuration {payload['configuration']!r} is not in the model's plans.json. "
                            "Fix: re-copy the model folder as training wrote it")
    dims = int(plan_config["dims"])
    patch = payload.get("patch_size") or plan_config["patch_size"]
    axes = payload.get("mirror_axes", plan_config.get("mirror_axes", list(range(dims))))
    if len(patch) != dims or not all(isinstance(p, int) and p > 0 for p in patch) or \
            not all(isinstance(a, int) and 0 <= a < dims for a in axes):
        raise SegforgeError(f"{source}: records patch_size {patch} and mirror_axes {axes}, which do not fit the {dims}D "
                            f"configuration {payload['configuration']}. Fix: re-run training or re-copy the model")
    return tuple(patch), tuple(axes)


# ---- the folder ----------------------------------------------------------------------------------------------------

def read_model_files(model_dir: Path) -> tuple[dict, dict]:
    """(plans, dataset.json) of a model folder, each refused in words when missing or foreign."""
    model_dir = Path(model_dir)
    return read_json(model_dir / "plans.json", "plans"), read_json(model_dir / "dataset.json")


def check_model_folder(model_dir: Path, copies: dict[Path, Path], contents: dict[Path, str] | None = None) -> None:
    """The folds of a model folder share its plans.json and dataset.json (and the task's files, e.g. diffusion.json):
    refuse to add one made from others. ``copies``: file in the folder -> its source; ``contents``: file -> text."""
    expected = {target: (str(source), Path(source).read_text()) for target, source in copies.items()}
    expected.update({target: ("this run's config", text) for target, text in (contents or {}).items()})
    for target, (source, text) in expected.items():
        if target.is_file() and json.loads(target.read_text()) != json.loads(text):
            raise SegforgeError(f"{target} differs from {source}: the folds in {model_dir} were trained with another "
                                f"{target.name}. Fix: move that model folder away, or train into another paths.results_root")
