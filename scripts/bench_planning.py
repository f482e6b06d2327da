"""Planning benchmark: fingerprint and plan of one synthetic dataset with nnU-Net v2 and segforge, timed cold.

Run from anywhere (this file puts ``scripts/`` on ``sys.path`` so the harness imports as ``bench``)::

    python scripts/bench_planning.py [--dataset plan100] [--workers 2] [--repeat 1] [--force]
                                     [--results PATH] [--bench-root DIR] [segforge plan overrides key=value ...]

The dataset is generated once under the bench root (``$SEGFORGE_BENCH_ROOT`` or ``bench_results/data``) and
reused. Every (tool, stage) runs ``--repeat`` times in fresh child processes (``bench/child.py``: in-process time
of the work, and wall time including interpreter start-up and imports); the medians are appended to the results
file (``bench_results/results.jsonl``). A (tool, stage) already recorded with the same parameters is skipped
unless ``--force``. The table at the end compares the latest records: segforge / nnU-Net, target <= 0.5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.datasets import PRESETS, ensure_dataset, get_preset  # noqa: E402
from bench.nnunet import NnunetTool  # noqa: E402
from bench.paths import default_bench_root, default_results_path  # noqa: E402
from bench.report import comparison_rows, format_table, summarize  # noqa: E402
from bench.results import ResultsFile, host_facts, make_record, segforge_source_state  # noqa: E402
from bench.segforge_runner import SegforgeTool  # noqa: E402

BENCHMARK = "planning"
STAGES = ("fingerprint", "plan")
TARGET_RATIO = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="plan100", choices=sorted(PRESETS), help="dataset preset (default plan100)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of each tool (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per (tool, stage); the median is recorded")
    p.add_argument("--force", action="store_true", help="measure again even when a matching record exists")
    p.add_argument("--results", type=Path, default=None, help="results JSONL (default bench_results/results.jsonl)")
    p.add_argument("--bench-root", type=Path, default=None,
                   help="datasets and work folders (default $SEGFORGE_BENCH_ROOT or bench_results/data)")
    p.add_argument("--tools", default="nnunet,segforge", help="comma-separated subset of nnunet,segforge")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="extra segforge plan overrides passed to compose_config, e.g. plan.gpu_memory_gb=8")
    p.add_argument("--nnunet-planner", default="ExperimentPlanner", help="nnU-Net planner class (default ExperimentPlanner)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a stage is killed (default 3600)")
    return p.parse_args(argv)


def load_line() -> str:
    facts = host_facts()
    return f"cpus {facts['cpus_usable']}/{facts['cpu_count']}, load average {facts['load_avg_1_5_15']}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeat < 1 or args.workers < 1:
        raise SystemExit("--repeat and --workers must be at least 1")
    bench_root = (args.bench_root or default_bench_root()).resolve()
    results = ResultsFile(args.results or default_results_path())
    preset = get_preset(args.dataset)
    dataset_root = ensure_dataset(preset, bench_root, workers=args.workers)
    work_root = bench_root / "work"
    all_tools = {
        "nnunet": NnunetTool(dataset_root, preset.dataset_id, work_root, args.workers, planner=args.nnunet_planner,
                             timeout=args.timeout),
        "segforge": SegforgeTool(dataset_root, work_root, args.workers, args.overrides, timeout=args.timeout),
    }
    tools = []
    for name in args.tools.split(","):
        tool = all_tools[name.strip()]
        ok, why = tool.available()
        print(f"{tool.name}: {'available' if ok else 'SKIPPED: ' + why}")
        if ok:
            tools.append(tool)
    print(f"dataset {preset.name}: {dataset_root}\nresults: {results.path}\nbefore: {load_line()}")

    failures = 0
    for stage in STAGES:
        todo = [t for t in tools if args.force or not results.has(BENCHMARK, t.name, preset.name, stage, t.params())]
        for t in tools:
            if t not in todo:
                print(f"{t.name} {stage}: recorded already (use --force to measure again)")
        samples = {t.name: [] for t in todo}
        source_before = segforge_source_state()["source_hash"]
        # repeats interleave the tools, so a burst of other load on the machine hits both alike
        for k in range(args.repeat):
            for t in list(todo):
                try:
                    if stage != "fingerprint" and not t.has_fingerprint(k):
                        t.fingerprint(k)  # a prerequisite only (e.g. resumed run): not recorded
                    result = getattr(t, stage)(k)
                except Exception as exc:  # one tool's failure must not lose the other's measurement
                    print(f"{t.name} {stage}: FAILED: {exc}", file=sys.stderr)
                    failures += 1
                    todo.remove(t)
                    continue
                samples[t.name].append(result)
                other = "?" if result.other_cpu_seconds is None else f"{result.other_cpu_seconds:.1f}"
                print(f"{t.name} {stage} run {k + 1}/{args.repeat}: {result.seconds:.2f} s in-process, "
                      f"{result.wall_seconds:.2f} s wall, {result.cpu_seconds:.1f} s cpu (other processes: {other} s cpu)")
        changed = segforge_source_state()["source_hash"] != source_before
        if changed:
            print(f"WARNING: segforge's sources changed while {stage} was measured; its runs may differ", file=sys.stderr)
        for t in todo:
            params = {**t.params(), "repeat": args.repeat, "dataset_path": str(dataset_root)}
            metrics = {**summarize(samples[t.name]), "segforge_sources_changed_during_runs": changed}
            results.append(make_record(BENCHMARK, t.name, preset.name, stage, metrics, params))
    print(f"after: {load_line()}\n")

    table = {stage: {t.name: (results.latest(BENCHMARK, t.name, preset.name, stage, t.params()) or {}).get("metrics")
                     for t in all_tools.values()} for stage in STAGES}
    rows = comparison_rows(table, "nnunet", "segforge", TARGET_RATIO)
    print(f"{BENCHMARK} benchmark, dataset {preset.name} ({preset.num_cases} cases), {args.workers} worker(s), "
          f"median of the recorded runs")
    print(format_table(rows, ["stage", "timing", "nnU-Net s", "segforge s", "segforge/nnU-Net",
                              f"target <= {TARGET_RATIO}"]))
    lazy = [f"{tool} {stage} {m['import_seconds']:.2f} s" for stage, by_tool in table.items()
            for tool, m in by_tool.items() if m and m.get("import_seconds", 0) > 0.1]
    if lazy:
        print("in-process times include first-time imports inside the timed work (main process): " + ", ".join(lazy))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
