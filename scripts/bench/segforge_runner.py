"""segforge's benchmark stages (fingerprint, plan), each run cold in a child process by ``bench.child``.

Imported as ``bench.segforge_runner`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``). The ``stage_*``
functions run in the child (protocol: ``bench.child``); ``SegforgeTool`` is the parent-side handle that lays out
run folders and starts them. Later benchmarks (preprocess, train, predict) add a ``stage_*`` function and a method.

Only the public entry points are called, with only the arguments named here, so keyword arguments added to them
later keep their defaults: ``load_dataset(root)``, ``compute_fingerprint(spec, num_workers=N)``,
``compose_config("plan", overrides)``, ``make_plans(fingerprint, cfg.plan)``, ``write_json(path, payload, kind)``.
A fingerprint run always starts from an empty run folder and calls ``compute_fingerprint`` directly, so whatever
caching the CLI layer adds, the measured fingerprint is cold.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
import shutil
import time
from pathlib import Path

from bench.child import StageResult, run_stage

TOOL = "segforge"


def _preimport_planning() -> None:
    """Import every module of ``segforge.planning`` (and Hydra) before the timer: module imports are start-up.

    Modules added to the package later (e.g. a memory model that imports torch) are picked up by name, so a new
    heavy import shows in the wall time, not in the in-process time. Lazy imports inside functions still count
    in the timed region; ``bench.child.Timer`` reports them as ``import_seconds``.
    """
    import hydra  # noqa: F401  compose_config imports Hydra lazily
    import segforge.planning as planning

    for info in pkgutil.iter_modules(planning.__path__):
        try:
            importlib.import_module(f"segforge.planning.{info.name}")
        except ImportError:  # a half-written module of a concurrent edit must not stop the benchmark
            pass


def stage_fingerprint(timer, dataset_root: str, out_dir: str, num_workers: int) -> dict:
    """Child side: load the dataset spec, compute and write ``fingerprint.json`` (as ``segforge plan`` does)."""
    from segforge.io.artifacts import write_json
    from segforge.io.dataset import load_dataset
    from segforge.planning.fingerprint import compute_fingerprint

    out = Path(out_dir)
    with timer:
        spec = load_dataset(Path(dataset_root))
        fingerprint = compute_fingerprint(spec, num_workers=num_workers)
        write_json(out / "fingerprint.json", fingerprint, kind="fingerprint")
    return {"num_cases": len(spec.cases)}


def stage_plan(timer, fingerprint_path: str, out_dir: str, overrides: list[str]) -> dict:
    """Child side: compose the ``plan`` config, run ``make_plans`` on the saved fingerprint, write ``plans.json``."""
    from segforge.cli.main import compose_config
    from segforge.io.artifacts import write_json
    from segforge.planning.planner import make_plans

    _preimport_planning()
    with timer:
        fingerprint = json.loads(Path(fingerprint_path).read_text())
        t0 = time.perf_counter()
        cfg = compose_config("plan", list(overrides))
        t1 = time.perf_counter()
        plans = make_plans(fingerprint, cfg.plan)
        t2 = time.perf_counter()
        write_json(Path(out_dir) / "plans.json", plans, kind="plans")
    return {"config_seconds": t1 - t0, "make_plans_seconds": t2 - t1,
            "configurations": summarize_plans(plans)}


def summarize_plans(plans: dict) -> dict:
    """Per configuration: patch, batch, spacing (to compare the two tools' decisions next to their timings)."""
    out = {}
    for name, conf in (plans.get("configurations") or {}).items():
        out[name] = {k: conf.get(k) for k in ("patch_size", "batch_size", "target_spacing")}
    return out


class SegforgeTool:
    """Parent side: one run folder per repeat under ``<work_root>/segforge/<dataset>/run-<k>``."""

    name = TOOL

    def __init__(self, dataset_root: Path, work_root: Path, num_workers: int = 2, plan_overrides: list[str] = (),
                 timeout: float | None = None):
        self.dataset_root = Path(dataset_root).resolve()
        self.work = Path(work_root) / TOOL / self.dataset_root.name
        self.num_workers = num_workers
        self.plan_overrides = list(plan_overrides)
        self.timeout = timeout

    def available(self) -> tuple[bool, str]:
        return importlib.util.find_spec("segforge") is not None, "segforge is not installed"

    def params(self) -> dict:
        """What makes two measurements comparable (a resumed run must match these)."""
        return {"workers": self.num_workers, "plan_overrides": self.plan_overrides}

    def run_dir(self, run_index: int) -> Path:
        return self.work / f"run-{run_index}"

    def has_fingerprint(self, run_index: int) -> bool:
        return (self.run_dir(run_index) / "fingerprint.json").is_file()

    def fingerprint(self, run_index: int = 0, profile: bool = False) -> StageResult:
        run_dir = self.run_dir(run_index)
        shutil.rmtree(run_dir, ignore_errors=True)  # cold: nothing from an earlier run is there to reuse
        run_dir.mkdir(parents=True)
        return run_stage(f"{__name__}:stage_fingerprint",
                         {"dataset_root": str(self.dataset_root), "out_dir": str(run_dir), "num_workers": self.num_workers},
                         run_dir, name="fingerprint", timeout=self.timeout, profile=profile)

    def plan(self, run_index: int = 0, profile: bool = False) -> StageResult:
        run_dir = self.run_dir(run_index)
        (run_dir / "plans.json").unlink(missing_ok=True)
        return run_stage(f"{__name__}:stage_plan",
                         {"fingerprint_path": str(run_dir / "fingerprint.json"), "out_dir": str(run_dir),
                          "overrides": self.plan_overrides},
                         run_dir, name="plan", timeout=self.timeout, profile=profile)
