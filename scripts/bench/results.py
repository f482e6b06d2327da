"""Benchmark results as an append-only JSON-lines file: one complete record per line, resumable, crash-tolerant.

Imported as ``bench.results`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``).

A record: ``benchmark``, ``tool`` ("segforge" | "nnunet"), ``dataset`` (preset name), ``stage``, ``metrics``
(seconds and whatever the stage reports), ``params`` (what was asked: workers, repeats, overrides, ...),
``versions`` (segforge, nnunetv2, torch, python), ``host`` (cpu count, load average, platform), ``timestamp``
(UTC ISO 8601). Each append is one ``write`` of one line followed by flush and fsync; a crash can at worst leave
a partial last line, which readers skip (and the next append starts on a fresh line, so it is never glued to it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

KEY_FIELDS = ("benchmark", "tool", "dataset", "stage")


def package_version(name: str) -> str | None:
    """Installed version from the package metadata (no import: torch/nnunetv2 imports cost seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def segforge_source_state() -> dict:
    """Which segforge code was measured: git commit, uncommitted changes under segforge/, hash of the sources.

    The version number does not change between commits (nor with edits in the working tree), and the code may be
    edited while a benchmark runs: two records measured the same code only when their ``source_hash`` agree.
    """
    from bench.paths import REPO_ROOT

    package = REPO_ROOT / "segforge"
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "segforge")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "source_hash": digest.hexdigest()[:16]}


def versions() -> dict:
    return {
        "segforge": package_version("segforge"),
        "segforge_source": segforge_source_state(),
        "nnunetv2": package_version("nnunetv2"),
        "torch": package_version("torch"),
        "numpy": package_version("numpy"),
        "python": platform.python_version(),
    }


def host_facts() -> dict:
    """Facts that change what a timing means: cores available, and how busy the machine was when recorded."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_avg_1_5_15": [round(v, 2) for v in load] if load else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def make_record(benchmark: str, tool: str, dataset: str, stage: str, metrics: dict, params: dict | None = None) -> dict:
    return {
        "benchmark": benchmark,
        "tool": tool,
        "dataset": dataset,
        "stage": stage,
        "metrics": metrics,
        "params": params or {},
        "versions": versions(),
        "host": host_facts(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class ResultsFile:
    """The JSONL results file at ``path`` (created with its folder on the first append)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if not self._ends_with_newline(fd):
                line = "\n" + line  # the last append was cut off: do not glue this record to its fragment
            data = line.encode("utf-8")
            written = os.write(fd, data)  # one write: O_APPEND keeps it contiguous
            if written != len(data):
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _ends_with_newline(fd: int) -> bool:
        size = os.fstat(fd).st_size
        return size == 0 or os.pread(fd, 1, size - 1) == b"\n"

    def records(self) -> list[dict]:
        """Every complete record, oldest first; lines that do not parse (a crash's partial line) are skipped."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and all(k in record for k in KEY_FIELDS):
                out.append(record)
        return out

    def find(self, benchmark: str, tool: str, dataset: str, stage: str, params: dict | None = None) -> list[dict]:
        """Records of one (benchmark, tool, dataset, stage), oldest first; ``params`` entries must match too."""
        want = dict(zip(KEY_FIELDS, (benchmark, tool, dataset, stage)))
        found = []
        for record in self.records():
            if any(record.get(k) != v for k, v in want.items()):
                continue
            if params and any(record.get("params", {}).get(k) != v for k, v in params.items()):
                continue
            found.append(record)
        return found

    def latest(self, benchmark: str, tool: str, dataset: str, stage: str, params: dict | None = None) -> dict | None:
        found = self.find(benchmark, tool, dataset, stage, params)
        return found[-1] if found else None

    def has(self, benchmark: str, tool: str, dataset: str, stage: str, params: dict | None = None) -> bool:
        """Whether a runner may skip this measurement (it re-runs anyway with ``--force``)."""
        return self.latest(benchmark, tool, dataset, stage, params) is not None

