"""Which ``_target_`` (a class Hydra would instantiate) a composed config may hold.

A ``_target_`` names any callable (``torch.load`` of a pickle, ``subprocess.Popen``), so one typed on the command
line is accepted only where segforge instantiates classes by design, the entries of ``callbacks.extra``, and there
only a class of Lightning or segforge. Everywhere else (``optim`` and ``logger`` are built by name), the
``model`` group included, a ``_target_`` must be one the packaged configs name: the network is built from
segforge's own allow-list (``io.model_folder.build_network``), never by whatever a config says.
"""

from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from segforge.errors import SegforgeError

# where a command-line `_target_` is instantiated by design (callbacks.extra: a list of Lightning callbacks), and the
# packages its classes may come from; no other setting is instantiated, so a `_target_` anywhere else would either
# run code or be silently ignored
INSTANTIATED = re.compile(r"^callbacks\.extra\[\d+\]")
ALLOWED_PACKAGES = ("lightning", "pytorch_lightning", "segforge")
_TARGET_LINE = re.compile(r"^\s*_target_:\s*['\"]?([\w.]+)", re.MULTILINE)


@lru_cache(maxsize=4)
def packaged_targets(config_dir: Path) -> frozenset[str]:
    """Every ``_target_`` the YAML files of ``config_dir`` name."""
    return frozenset(m for path in Path(config_dir).rglob("*.yaml") for m in _TARGET_LINE.findall(path.read_text()))


def _targets(node, path: str = ""):
    """(dotted path of the node holding it, value) of every ``_target_`` under ``node``, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield path, value
            else:
                yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def _allowed_class(target: str, packages: tuple[str, ...]) -> bool:
    """Whether ``target`` is a class defined in one of ``packages`` (nothing outside them is imported to find out)."""
    def within(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in packages)

    if not within(target):
        return False
    module_name, _, attribute = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        return False
    # a class defined there (not one re-exported from elsewhere), and no command-line parser that builds classes
    # from its own arguments (LightningCLI)
    return isinstance(found, type) and within(found.__module__) and ".cli" not in f".{found.__module__}."


def check_targets(cfg, config_dir: Path) -> None:
    """Refuse a ``_target_`` in ``cfg`` that neither the packaged configs in ``config_dir`` name nor an instantiated
    group allows (module docstring)."""
    known = packaged_targets(Path(config_dir))
    try:  # resolved, so that an interpolation (`${oc.create:...}`, `${oc.env:X}`) hides no `_target_`
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an override that does not resolve is reported where it is used; nothing resolves it here
        tree = OmegaConf.to_container(cfg, resolve=False)
    for where, target in _targets(tree):
        setting = f"{where}._target_" if where else "_target_"
        if isinstance(target, str) and target in known:
            continue
        if INSTANTIATED.match(where):
            if isinstance(target, str) and _allowed_class(target, ALLOWED_PACKAGES):
                continue
            raise SegforgeError(f"{setting}={target}: callbacks.extra entries may only name a class defined in "
                                f"{', '.join(ALLOWED_PACKAGES)} (no command-line parser such as LightningCLI); segforge "
                                "instantiates nothing else from the command line. Fix: give such a class (e.g. "
                                "lightning.pytorch.callbacks.StochasticWeightAveraging), or remove the override")
        raise SegforgeError(f"{setting}={target}: segforge instantiates classes named on the command line only in "
                            "callbacks.extra (a list of Lightning callbacks); model.*, optim.*, logger.* and every other "
                            "setting take plain values (the network comes from segforge's own list). Fix: remove the "
                            "override, or add a callback as "
                            "'callbacks.extra=[{_target_:lightning.pytorch.callbacks.StochasticWeightAveraging,swa_lrs:0.001}]'")
