"""`segforge demo`: generate, check, plan, preprocess, train (child process), predict and evaluate, then report.

Each step is the real command (the entry point a user types, handed in as ``run_command`` so that this module does
not import ``cli/main.py`` back), run in this process, except training, which runs as a child process so that a
multi-rank launch re-executes only the training command. The report includes an oracle intensity-threshold baseline
on the held-out cases (``demo/baseline.py``), which shows the demo is not solvable by a threshold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from segforge.configs import packaged_defaults
from segforge.errors import SegforgeError
from segforge.io.artifacts import atomic_write_text

DEMO_NAMES = {3: "Dataset900_Demo3D", 2: "Dataset901_Demo2D"}


def _as_override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def _leaves(prefix: str, value):
    """(dotted key, value) for every leaf of a nested dict: overrides Hydra's grammar accepts."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(f"{prefix}.{key}", item)
    else:
        yield prefix, value


def _run(run_command: Callable[[list[str]], int], argv: list[str], timings: dict, label: str) -> None:
    print(f"\n$ segforge {' '.join(argv)}", flush=True)
    start = time.monotonic()
    code = run_command(argv)
    timings[label] = time.monotonic() - start
    if code != 0:
        raise SegforgeError(f"demo step `segforge {' '.join(argv)}` failed with exit code {code}")


def _dataset(cfg, out: Path) -> Path:
    from segforge.demo.synthetic import DEMO_MARKER, generate_dataset

    dim = int(cfg.dim)
    dataset = out / DEMO_NAMES[dim]
    if dataset.exists():
        description = json.loads((dataset / "dataset.json").read_text()).get("description", "") if (dataset / "dataset.json").is_file() else ""
        if DEMO_MARKER not in description:
            raise SegforgeError(f"{dataset}: exists and is not a segforge demo dataset; segforge will not touch it. "
                                "Fix: choose another --out folder")
        print(f"reusing the demo dataset {dataset}")
        return dataset
    print(f"generating the demo dataset {dataset}")
    return generate_dataset(dataset, dim=dim, num_train=int(cfg.num_train), num_test=int(cfg.num_test), seed=int(cfg.seed))


def demo_budget(cfg) -> float | None:
    """The demo's wall-clock budget in seconds (``budget``: a duration, ``auto`` by dim, or null: none)."""
    from segforge.durations import parse_duration

    value = cfg.get("budget")
    if value is None or str(value).lower() in ("null", "none", ""):
        return None
    if str(value) == "auto":
        auto = cfg.budget_auto[int(cfg.dim)]
        return None if auto is None else float(auto)
    return parse_duration(value, "budget")


def check_demo_budget(budget_s: float, train_budget_s: float) -> None:
    if train_budget_s < 30:
        raise SegforgeError(f"budget={budget_s:.0f}s leaves {train_budget_s:.0f} s to train after generating, checking "
                            "and planning, too little for a model. Fix: a larger budget (e.g. budget=4m), or "
                            "budget=null for the fixed demo schedule")


def run_demo(cfg, overrides: list[str], run_command: Callable[[list[str]], int]) -> int:
    """The demo as ``cfg`` (``configs/demo.yaml``) says; ``run_command(argv)`` runs one `segforge` command and returns
    its exit code. With ``torch_threads`` set for its dim, every step (the plan's step timing, training, predict)
    runs on that many intra-op threads; this process's setting is restored after."""
    import torch

    threads = cfg.torch_threads[int(cfg.dim)]
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run_demo(cfg, run_command, None if threads is None else int(threads))
    finally:
        torch.set_num_threads(before)


def _run_demo(cfg, run_command: Callable[[list[str]], int], threads: int | None) -> int:
    from segforge.demo.baseline import threshold_baseline

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.monotonic()
    dataset = _dataset(cfg, out)
    timings["generate"] = time.monotonic() - start
    configuration = "3d_fullres" if int(cfg.dim) == 3 else "2d"
    work = out / "work"
    # the demo is self-contained: all roots under --out, whatever the environment says
    roots = [f"paths.work_root={work}", f"paths.preprocessed_root={work}", f"paths.results_root={work}"]
    plan = OmegaConf.to_container(cfg.plan, resolve=True)
    plan["configurations"] = plan["configurations"] or [configuration]
    # what differs from the plan command's own defaults (the demo's plan section, a user's plan.* or plan=...)
    packaged = dict(_leaves("plan", packaged_defaults("plan")))
    plan_overrides = [_as_override(k, v) for k, v in _leaves("plan", plan) if k not in packaged or packaged[k] != v]
    plan_overrides.append(_as_override("preprocess.num_workers", int(cfg.preprocess.num_workers)))

    _run(run_command, ["check", str(dataset)] + roots, timings, "check")
    budget_s = demo_budget(cfg)
    train_budget_s = None
    if budget_s:  # the plan sizes a configuration for the training time left (3d_budget / 2d_budget)
        train_budget_s = float(int(budget_s * (1 - cfg.finish_share - cfg.plan_share) - (time.monotonic() - start)))
        check_demo_budget(budget_s, train_budget_s)
        plan_overrides += [f"budget={train_budget_s:.0f}s", *[str(o) for o in cfg.budget_overrides[int(cfg.dim)].plan]]
    _run(run_command, ["plan", str(dataset)] + roots + plan_overrides, timings, "plan+preprocess")

    if budget_s:  # what is left, less the time predict and evaluate take
        train_budget_s = min(train_budget_s, float(int(budget_s * (1 - cfg.finish_share) - (time.monotonic() - start))))
        check_demo_budget(budget_s, train_budget_s)
        schedule = [f"budget={train_budget_s:.0f}s", "configuration=budget", *[str(o) for o in cfg.budget_overrides[int(cfg.dim)].train]]
        configuration = f"{configuration[:2]}_budget"
    else:
        schedule = [f"configuration={configuration}", "experiment=demo"]
    # the child's threads from its start (the budget's forward timing comes before the data policy sets them)
    env = dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    train_cmd = [sys.executable, "-m", "segforge", "train", str(dataset), *roots, *schedule,
                 *([] if threads is None else [f"data.torch_threads={threads}"]), *[str(o) for o in cfg.train_overrides]]
    print(f"\n$ {' '.join(train_cmd[2:])}", flush=True)
    t0 = time.monotonic()
    if subprocess.run(train_cmd, env=env).returncode != 0:
        raise SegforgeError("demo training failed (see its output above)")
    timings["train"] = time.monotonic() - t0

    model_dir = work / dataset.name / "results" / "segment" / configuration
    predictions = out / "predictions"
    _run(run_command, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(predictions), "--model", str(model_dir)] + roots
         + [str(o) for o in cfg.predict_overrides], timings, "predict")
    _run(run_command, ["evaluate", str(predictions), str(dataset / "labelsTs")] + roots, timings, "evaluate")

    summary = json.loads((predictions / "summary.json").read_text())
    baseline = threshold_baseline(dataset, summary["classes"])
    baseline_mean = float(np.mean(list(baseline.values())))
    report = {"dataset": str(dataset), "work_root": str(work), "model_dir": str(model_dir), "predictions": str(predictions),
              "dice": summary["mean_dice"], "mean_foreground_dice": summary["foreground_mean_dice"],
              "threshold_baseline_dice": baseline, "threshold_baseline_mean": baseline_mean,
              "seconds": {k: round(v, 1) for k, v in timings.items()}, "total_seconds": round(time.monotonic() - start, 1),
              "budget_s": budget_s, "train_budget_s": train_budget_s, "torch_threads": threads}
    atomic_write_text(out / "demo_report.json", json.dumps(report, indent=2) + "\n")
    print("\n== segforge demo ==")
    print(f"dataset:       {dataset}\nwork root:     {work}\nmodel folder:  {model_dir}\npredictions:   {predictions}")
    print(f"{'class':<16}{'segforge Dice':>15}{'best threshold':>16}")
    for name, value in summary["mean_dice"].items():
        print(f"{name:<16}{value:>15.3f}{baseline[name]:>16.3f}")
    print(f"{'mean':<16}{summary['foreground_mean_dice']:>15.3f}{baseline_mean:>16.3f}")
    print("time (s):      " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f"; total {report['total_seconds']:.0f}"
          + (f" (budget {budget_s:.0f})" if budget_s else ""))
    print(f"report:        {out / 'demo_report.json'}")
    return 0
