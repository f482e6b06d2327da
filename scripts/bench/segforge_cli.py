"""Run the ``segforge`` command line in a child process for a benchmark, its output appended to a log file.

Imported as ``bench.segforge_cli`` (``scripts/`` on ``sys.path``) by the issue-7 benchmarks (denoise, synthesis).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.paths import REPO_ROOT


def run_segforge(args_list: list[str], log_path: Path, threads: int) -> float:
    """Run ``segforge ARGS`` at normal priority with ``threads`` threads; returns its wall seconds. A failure stops
    the benchmark, naming the log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ segforge {' '.join(args_list)}\n")
        log.flush()
        done = subprocess.run([sys.executable, "-m", "segforge", *args_list], cwd=REPO_ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"segforge {args_list[0]} failed (exit {done.returncode}); see {log_path}")
    return time.perf_counter() - start
