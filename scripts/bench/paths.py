"""Default locations of the benchmark harness: repo root, bench root (datasets, work folders), results file.

Imported as ``bench.paths`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``). Paths derive from this
file's location, never from the working directory, so tests that chdir elsewhere still find the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent.parent  # put on PYTHONPATH of every child process
REPO_ROOT = SCRIPTS_DIR.parent
BENCH_ROOT_ENV = "SEGFORGE_BENCH_ROOT"


def default_bench_root() -> Path:
    """``$SEGFORGE_BENCH_ROOT`` or ``<repo>/bench_results/data`` (gitignored): datasets and work folders."""
    env = os.environ.get(BENCH_ROOT_ENV)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "bench_results" / "data"


def default_results_path() -> Path:
    """``<repo>/bench_results/results.jsonl``: one JSON record per measured stage."""
    return REPO_ROOT / "bench_results" / "results.jsonl"
