"""The last check before a config entry is instantiated: the entry, resolved as Hydra will build it, names a class of
the kind the setting builds (a Lightning callback, a logger, a torch optimizer, segforge's schedule) or one of
segforge's own factories, and no argument of it is built too (no nested ``_target_``).

The command line's gate (``cli/targets.py``) refuses other targets before any work; this check repeats its core at
the moment of building, on the resolved entry, so that nothing the earlier check could not see (an interpolation
that resolves only where the run does) reaches ``instantiate``. It imports the target's module to look at it, which
the earlier gate has limited to the packages that belong there.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig, OmegaConf

from segforge.errors import SegforgeError


def _located(dotted: str):
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        return None  # instantiate reports it, in its own words


def _nested_targets(node, path: str):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and path:
                yield path
            elif key != "_target_":
                yield from _nested_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _nested_targets(value, f"{path}[{i}]")


def check_buildable(entry, setting: str, kind: type | None, fix: str) -> None:
    """Refuse ``entry`` (a config node with ``_target_``) unless it builds a ``kind`` class or calls a segforge
    factory, with plain arguments only."""
    resolved = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
    nested = next(_nested_targets(resolved, ""), None)
    if nested is not None:
        raise SegforgeError(f"{setting}.{nested}._target_: an argument of {setting} would be built too; its arguments "
                            f"take plain values. Fix: {fix}")
    target = resolved.get("_target_")
    found = _located(target) if isinstance(target, str) else None
    if found is None:
        return
    if isinstance(found, type):
        if kind is None or issubclass(found, kind):
            return
    elif callable(found) and str(getattr(found, "__module__", "")).startswith("segforge."):
        return  # one of segforge's factories (the progress bar, the local MLflow logger)
    what = f"a {kind.__module__}.{kind.__qualname__} class" if kind is not None else "a class"
    raise SegforgeError(f"{setting}._target_={target}: not {what} nor a segforge factory; nothing else is built. "
                        f"Fix: {fix}")
