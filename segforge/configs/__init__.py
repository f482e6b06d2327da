"""The packaged Hydra configs (the YAML files of this folder) and their values for Python callers.

Every default lives once, in these files: the command line composes them with Hydra, and code called from Python
(tests, benchmarks, the planner's tracing, an API default) reads the same values with ``packaged_defaults``
rather than repeating a number. Files are read once and cached; each call returns a fresh copy.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
# the packaged ``optim`` option of each optimizer a plan's memory entry names (the planner traces that option)
OPTIM_OPTIONS = {"sgd": "sgd_poly", "adamw": "adamw_cosine"}


@lru_cache(maxsize=None)
def _read(relative: str) -> dict:
    from omegaconf import OmegaConf

    path = CONFIG_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"no packaged config {relative} in {CONFIG_DIR}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values.pop("defaults", None)  # a primary config's defaults list is Hydra's business, not a value
    return values


def packaged_defaults(group: str, option: str = "default") -> dict:
    """The values of ``configs/GROUP/OPTION.yaml`` as a plain dict, e.g. ``packaged_defaults("data")["augmentation"]``."""
    return copy.deepcopy(_read(f"{group}/{option}.yaml"))


def packaged_config(name: str) -> dict:
    """The keys a primary config (``configs/NAME.yaml``, e.g. ``train``) sets itself, without its defaults list."""
    return copy.deepcopy(_read(f"{name}.yaml"))


_TARGET_LINE = re.compile(r"^\s*_target_:\s*['\"]?([\w.]+)", re.MULTILINE)


@lru_cache(maxsize=4)
def packaged_targets(config_dir: Path = CONFIG_DIR) -> frozenset[str]:
    """Every ``_target_`` the YAML files of ``config_dir`` name (the packaged configs by default)."""
    return frozenset(m for path in Path(config_dir).rglob("*.yaml") for m in _TARGET_LINE.findall(path.read_text()))
