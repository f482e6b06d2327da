"""Which ``_target_`` (a class Hydra would instantiate) a composed config may hold.

A ``_target_`` names any callable (``torch.load`` of a pickle, ``subprocess.Popen``), so one typed on the command
line is accepted only where segforge instantiates classes by design (``training/components.py``, ``training/optim.py``)
and there only a class of the kind built there from the packages that belong there: an entry ``callbacks.NAME`` a
Lightning ``Callback`` and ``logger.NAME`` a Lightning ``Logger`` of Lightning or segforge (Lightning's MLflow logger
included), ``optim.optimizer`` a torch ``Optimizer`` of torch.optim or segforge, ``optim.scheduler`` a callback of
segforge. A ``_target_`` nested inside an entry (an argument Hydra would build too) and
one anywhere else, the ``model`` group included, must be one the packaged configs name: the network is built from
segforge's own allow-list (``io.model_folder.build_network``), never by whatever a config says. Configs read back from
a model folder (a fold's ``config.yaml``) are never instantiated at all: segforge reads the weights and plans there.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from segforge.configs import packaged_targets
from segforge.errors import SegforgeError
from segforge.training.buildable import PACKAGES, allowed_class, locate, targets_in, within

# where a command-line `_target_` is instantiated by design (the node holding it), and the packages its classes may
# come from; no other setting is instantiated, so a `_target_` anywhere else would either run code or be ignored
INSTANTIATED = {
    re.compile(r"^callbacks\.[^.\[\]]+$"): ("callbacks.NAME", PACKAGES["callbacks"], "lightning.pytorch.callbacks.Callback",
                                          "lightning.pytorch.callbacks.StochasticWeightAveraging"),
    re.compile(r"^logger\.[^.\[\]]+$"): ("logger.NAME", PACKAGES["logger"], "lightning.pytorch.loggers.Logger",
                                       "lightning.pytorch.loggers.MLFlowLogger"),
    re.compile(r"^optim\.optimizer$"): ("optim.optimizer", PACKAGES["optim.optimizer"], "torch.optim.Optimizer",
                                      "torch.optim.AdamW"),
    re.compile(r"^optim\.scheduler$"): ("optim.scheduler", PACKAGES["optim.scheduler"],
                                      "lightning.pytorch.callbacks.Callback", "segforge.training.schedules.ScheduleCallback"),
}
WHERE = ("callbacks.NAME and logger.NAME (classes of Lightning or segforge), optim.optimizer (torch.optim) and "
         "optim.scheduler (segforge's ScheduleCallback)")


def _allowed_class(target: str, packages: tuple[str, ...], kind: str | None = None) -> bool:
    """Whether ``target`` is a class defined in one of ``packages`` (nothing outside them is imported to find out),
    and of ``kind`` (a dotted class: what the zone builds, e.g. Lightning's ``Callback``) when given."""
    if not within(target, packages):
        return False
    try:
        return allowed_class(locate(target), locate(kind) if kind else object, packages)
    except LookupError:
        return False


def check_targets(cfg, config_dir: Path) -> None:
    """Refuse a ``_target_`` in ``cfg`` that neither the packaged configs in ``config_dir`` name nor an instantiated
    group allows (module docstring)."""
    known = packaged_targets(Path(config_dir))
    try:  # resolved, so that an interpolation (`${oc.create:...}`, `${oc.env:X}`) hides no `_target_`
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an override that does not resolve is reported where it is used; nothing resolves it here
        tree = OmegaConf.to_container(cfg, resolve=False)
        # unresolved, a node built from a string (which may resolve where the run does: another environment, a
        # SLURM node) would hide its `_target_`: none is accepted then
        _refuse_node_builders(tree, "the config does not resolve here")
    for where, target in targets_in(tree):
        setting = f"{where}._target_" if where else "_target_"
        if isinstance(target, str) and target in known:
            continue
        zone = next((z for pattern, z in INSTANTIATED.items() if pattern.match(where)), None)
        if zone is not None:
            name, packages, kind, example = zone
            if isinstance(target, str) and _allowed_class(target, packages, kind):
                continue
            raise SegforgeError(f"{setting}={target}: {name} may only name a {kind.rpartition('.')[2]} class defined "
                                f"in {', '.join(packages)} (no command-line parser such as LightningCLI); segforge "
                                "instantiates nothing else from "
                                f"the command line. Fix: give such a class (e.g. {where}._target_={example}), or remove "
                                "the override")
        raise SegforgeError(f"{setting}={target}: segforge instantiates classes named on the command line only in "
                            f"{WHERE}; an argument of an entry, model.* and every other setting take plain values (the "
                            "network comes from segforge's own list). Fix: remove the override, or add a callback as "
                            "+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging "
                            "+callbacks.swa.swa_lrs=0.001")


# what Hydra itself instantiates in a sweep (`hydra.launcher`, `hydra.sweeper`, `hydra.callbacks`): classes of Hydra and
# of its installed plugins only; an interpolation that builds a node (`${oc.create:...}`) could hide a `_target_`
HYDRA_PACKAGES = ("hydra", "hydra_plugins")
# OmegaConf takes whitespace (tabs, newlines too) after `${` and around the resolver's name
_NODE_BUILDER = re.compile(r"\$\{\s*oc\s*\.\s*(create|decode)\s*:")


def check_hydra_targets(hydra_node) -> None:
    """Refuse a sweep whose composed ``hydra`` node (what ``Hydra.multirun`` instantiates before any job runs) names a
    class outside Hydra and its plugins, or builds a node from a string (e.g. ``+hydra.callbacks.x._target_=...``)."""
    tree = OmegaConf.to_container(hydra_node, resolve=False)
    for where, target in targets_in(tree, "hydra"):
        if not (isinstance(target, str) and _allowed_class(target, HYDRA_PACKAGES)):
            raise SegforgeError(f"{where}._target_={target}: a sweep's Hydra settings may only name classes of Hydra "
                                "and its plugins (launchers, sweepers); segforge instantiates nothing else from the "
                                "command line. Fix: remove the override (callbacks of a run go in callbacks.NAME)")
    strings = [value for value in _strings(tree) if _NODE_BUILDER.search(value)]
    if strings:
        raise SegforgeError(f"hydra: {strings[0]!r}: a sweep's Hydra settings take plain values, not nodes built from "
                            "strings. Fix: remove the override")


def _refuse_node_builders(tree, why: str) -> None:
    strings = [value for value in _strings(tree) if _NODE_BUILDER.search(value)]
    if strings:
        raise SegforgeError(f"{strings[0]!r}: a node built from a string may hold a `_target_`, and {why}. Fix: give the "
                            "setting's values themselves (e.g. +callbacks.NAME._target_=... +callbacks.NAME.ARG=...)")


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node
