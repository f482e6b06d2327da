"""Budget benchmark: the best model a wall-clock budget buys on this machine, segforge against nnU-Net.

    python scripts/bench_budget.py [--budgets 5 15] [--arms ...] [--threads 2] [--force]

Data: a real-derived 3D dataset (``bench.mni_dataset``): the MNI152 T1 template that ships with nilearn, at 2 mm,
under random affine + elastic deformations, bias field, gamma and noise, with grey/white-matter labels; 24
training cases and 8 held-out ones by default. Arms, each trained from scratch for each budget, strictly one after
another (the machine should be otherwise idle: every arm is timed by the wall clock):

* ``segforge_budget``: ``segforge plan DATASET budget=Xm`` then ``segforge train DATASET budget=Xm fold=0``
  (the compute-aware configuration and the budget recipe; ``bench.budget_segforge``);
* ``segforge_full_nnunet_recipe`` (ablation): the same budget with ``recipe=nnunet configuration=3d_fullres``;
* ``nnunet``: nnU-Net v2 itself, planned with a small GPU memory target (``--nnunet-gpu-gb``), trained on the CPU
  by nnU-Net's trainer with its epoch count fitted to the budget after a timed probe (``bench.budget_nnunet``).

The budget covers what each tool does between "train" and a usable model: segforge's whole ``train`` command
(start-up, training, final validation of the fold) and nnU-Net's ``run_training`` + ``perform_actual_validation``
(its start-up in the child process before the trainer is built is not counted, a small advantage for it).
Planning and preprocessing are not counted for either (done once per dataset). Every arm then predicts the
held-out images without test-time mirroring, and ``bench.budget_eval`` scores all arms with the same Dice code.

Targets (issue 10): segforge_budget has the best mean foreground Dice at every budget, and at least 0.75 at 15
minutes. Records go to ``bench_results/results.jsonl`` (benchmark ``budget``, stage ``<budget>m``); a recorded
(arm, budget, parameters) is reused unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.budget_eval import dice_folder  # noqa: E402
from bench.budget_nnunet import DEFAULT_GPU_MEMORY_GB, NnunetBudgetArm  # noqa: E402
from bench.budget_segforge import ARMS as SEGFORGE_ARMS  # noqa: E402
from bench.budget_segforge import SegforgeBudgetArm  # noqa: E402
from bench.mni_dataset import LABELS, MniParams, ensure_mni_dataset  # noqa: E402
from bench.paths import default_bench_root, default_results_path  # noqa: E402
from bench.report import format_table  # noqa: E402
from bench.results import ResultsFile, host_facts, make_record  # noqa: E402

BENCHMARK = "budget"
ALL_ARMS = ["segforge_budget", "segforge_full_nnunet_recipe", "nnunet"]
TARGET_DICE_AT_15 = 0.75


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[5.0, 15.0], help="budgets in minutes")
    p.add_argument("--arms", nargs="+", default=ALL_ARMS, choices=ALL_ARMS)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every training process")
    p.add_argument("--num-train", type=int, default=24)
    p.add_argument("--num-test", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--nnunet-gpu-gb", type=float, default=DEFAULT_GPU_MEMORY_GB,
                   help="nnU-Net's planner GPU memory target (a smaller patch than its 8 GB default)")
    p.add_argument("--nnunet-da-workers", type=int, default=0,
                   help="nnU-Net's augmentation workers (nnUNet_n_proc_DA); 0, its fastest on 2 cores in "
                        "scripts/bench_training.py (a worker beside the 2-thread step slows the step more than it helps)")
    p.add_argument("--force", action="store_true", help="measure again what is recorded already")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--bench-root", type=Path, default=None)
    return p.parse_args(argv)


def make_arm(name: str, dataset_root: Path, params: MniParams, budget: float, args, bench_root: Path):
    arm_dir = bench_root / "work" / "budget" / params.folder_name / f"{name}_{budget:g}m"
    if name in SEGFORGE_ARMS:
        return SegforgeBudgetArm(name, dataset_root, arm_dir, budget, threads=args.threads)
    return NnunetBudgetArm(dataset_root, params.dataset_id, arm_dir, budget, threads=args.threads,
                           gpu_memory_gb=args.nnunet_gpu_gb, da_workers=args.nnunet_da_workers)


def measure(arm, name: str, dataset_root: Path, params: MniParams, budget: float, args, results: ResultsFile) -> dict | None:
    """The arm's record for this budget: recorded, or run now (train, predict, score) and appended."""
    stage = f"{budget:g}m"
    record_params = {"budget_minutes": budget, "threads": args.threads, "dataset": params.as_json(), **arm.params()}
    if not args.force and results.has(BENCHMARK, name, params.folder_name, stage, record_params):
        print(f"{name} {stage}: recorded already (use --force to measure again)")
        return results.latest(BENCHMARK, name, params.folder_name, stage, record_params)["metrics"]
    print(f"{name}, budget {stage}:")
    started = time.perf_counter()
    try:
        outcome = arm.run()
    except Exception as exc:  # one failing arm must not lose the others' figures
        print(f"{name} {stage}: FAILED: {exc}", file=sys.stderr)
        return None
    scores = dice_folder(outcome["pred_dir"], dataset_root / "labelsTs", LABELS)
    metrics = {**{k: v for k, v in outcome.items() if k != "details"}, "details": outcome.get("details"),
               "dice": scores["mean"], "foreground_dice": scores["foreground_mean"], "per_case": scores["per_case"],
               "budget_seconds": budget * 60.0, "arm_wall_seconds": time.perf_counter() - started}
    results.append(make_record(BENCHMARK, name, params.folder_name, stage, metrics, record_params))
    print(f"  {name} {stage}: mean foreground Dice {scores['foreground_mean']:.4f} "
          f"({', '.join(f'{k} {v:.4f}' for k, v in scores['mean'].items())})")
    return metrics


def verdicts(by_budget: dict[float, dict[str, dict | None]]) -> list[str]:
    """The issue's targets, one line each."""
    lines = []
    for budget, arms in by_budget.items():
        scored = {name: m["foreground_dice"] for name, m in arms.items() if m}
        if "segforge_budget" not in scored or len(scored) < 2:
            lines.append(f"{budget:g} min: not every arm was measured")
            continue
        best = max(scored, key=scored.get)
        others = max(v for k, v in scored.items() if k != "segforge_budget")
        lines.append(f"{budget:g} min: best {best} ({scored[best]:.4f}); segforge_budget - best other = "
                     f"{scored['segforge_budget'] - others:+.4f} -> {'ok' if best == 'segforge_budget' else 'MISSED'}")
    if 15.0 in by_budget and (by_budget[15.0].get("segforge_budget") or {}).get("foreground_dice") is not None:
        value = by_budget[15.0]["segforge_budget"]["foreground_dice"]
        lines.append(f"15 min: segforge_budget {value:.4f} vs target {TARGET_DICE_AT_15} -> "
                     f"{'ok' if value >= TARGET_DICE_AT_15 else 'MISSED'}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_root = (args.bench_root or default_bench_root()).resolve()
    results = ResultsFile(args.results or default_results_path())
    params = MniParams(num_train=args.num_train, num_test=args.num_test, seed=args.seed)
    dataset_root = ensure_mni_dataset(params, bench_root)
    facts = host_facts()
    print(f"dataset {params.folder_name}: {dataset_root} ({args.num_train} training, {args.num_test} held-out cases)\n"
          f"results: {results.path}\ncpus {facts['cpus_usable']}, load {facts['load_avg_1_5_15']}")
    by_budget: dict[float, dict[str, dict | None]] = {}
    for budget in args.budgets:
        by_budget[budget] = {}
        for name in args.arms:
            arm = make_arm(name, dataset_root, params, budget, args, bench_root)
            by_budget[budget][name] = measure(arm, name, dataset_root, params, budget, args, results)

    rows = []
    for budget, arms in by_budget.items():
        for name, m in arms.items():
            if m is None:
                rows.append([f"{budget:g}", name, "FAILED", "-", "-", "-", "-", "-"])
                continue
            rows.append([f"{budget:g}", name, f"{m['foreground_dice']:.4f}", f"{m['dice']['grey_matter']:.4f}",
                         f"{m['dice']['white_matter']:.4f}", str(m.get("iterations", "-")),
                         f"{m['train_seconds']:.0f}", f"{m['train_seconds'] / m['budget_seconds']:.2f}"])
    print(f"\n{BENCHMARK} benchmark, {params.folder_name}, {args.threads} threads, held-out Dice (no mirroring)")
    print(format_table(rows, ["budget min", "arm", "mean fg Dice", "grey matter", "white matter", "iterations",
                              "train s", "of budget"]))
    for line in verdicts(by_budget):
        print(line)
    return 1 if any(m is None for arms in by_budget.values() for m in arms.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
