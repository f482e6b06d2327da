"""The last check before a config entry is instantiated: the entry, resolved as Hydra will build it, names a class
of the kind the setting builds (a Lightning callback, a logger, a torch optimizer, segforge's schedule) defined in
the packages that belong there, or a factory the packaged configs of that group name (``configs/callbacks`` for
``callbacks.NAME``); and no argument of it is built too (no
nested ``_target_``). What cannot be located is refused, not passed on.

The command line's gate (``cli/targets.py``) refuses other targets before any work; this check repeats its core at
the moment of building, on the resolved entry, so that nothing the earlier check could not see (an interpolation
that resolves only where the run does) reaches ``instantiate``. A module is imported only when the target's name
lies within the allowed packages.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig, OmegaConf

from segforge.configs import CONFIG_DIR, packaged_targets
from segforge.errors import SegforgeError


# the packages each setting's classes may come from (the command line's gate, cli/targets.py, says the same)
PACKAGES = {"callbacks": ("lightning", "segforge"), "logger": ("lightning", "segforge"),
            "optim.optimizer": ("torch.optim", "segforge"), "optim.scheduler": ("segforge",)}


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def locate(dotted: str):
    """The object ``module.attribute`` names (a plain module path: no attribute chains through other modules);
    ``LookupError`` saying why when there is none."""
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise LookupError(f"{type(exc).__name__}: {exc}") from exc


def allowed_class(found, kind: type, packages: tuple[str, ...]) -> bool:
    """A ``kind`` class defined in ``packages`` (not one re-exported there from elsewhere), and no command-line
    parser that builds classes from its own arguments (LightningCLI)."""
    return (isinstance(found, type) and issubclass(found, kind) and within(found.__module__, packages)
            and ".cli" not in f".{found.__module__}.")


def targets_in(node, path: str = ""):
    """(dotted path of the node holding it, value) of every ``_target_`` under ``node``, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield path, value
            else:
                yield from targets_in(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from targets_in(value, f"{path}[{i}]")


def check_buildable(entry, setting: str, kind: type, packages: tuple[str, ...], fix: str,
                    what: str | None = None) -> None:
    """Refuse ``entry`` (a config node with ``_target_``) unless it builds a ``kind`` class defined in ``packages``
    or calls a factory the packaged configs name, with plain arguments only (``what``: the kind in words)."""
    resolved = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
    nested = next((where for where, _ in targets_in(resolved) if where), None)
    if nested is not None:
        raise SegforgeError(f"{setting}.{nested}._target_: an argument of {setting} would be built too; its arguments "
                            f"take plain values. Fix: {fix}")
    target = resolved.get("_target_")
    what = what or f"a {kind.__module__}.{kind.__qualname__}"
    refusal = SegforgeError(f"{setting}: {target} is not {what} of {', '.join(packages)}, nor a factory the packaged "
                            f"configs name; nothing else is built. Fix: {fix}")
    if not isinstance(target, str):
        raise refusal
    group = CONFIG_DIR / setting.split(".")[0]  # callbacks.NAME -> configs/callbacks: its own group's targets only
    packaged = group.is_dir() and target in packaged_targets(group)
    if not (packaged or within(target, packages)):
        raise refusal
    try:
        found = locate(target)
    except LookupError as exc:
        raise SegforgeError(f"{setting}: cannot make {target} ({exc}). Fix: an importable class, or {fix}") from exc
    if allowed_class(found, kind, packages) or (packaged and isinstance(found, type) and issubclass(found, kind)):
        return
    if packaged and callable(found) and not isinstance(found, type):
        return  # a factory of the packaged configs (the progress bar, the local MLflow logger)
    raise refusal
