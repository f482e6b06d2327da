"""Data-pipeline benchmark: preprocessing, augmented patches per second and the training step fed live, segforge
against nnU-Net v2 in the same run; and the peak memory of preprocessing one 512x512x300 CT.

Run from anywhere (this file puts ``scripts/`` on ``sys.path`` so the harness imports as ``bench``)::

    python scripts/bench_data_pipeline.py [--dataset plan100] [--workers 2] [--repeat 1] [--force] [--tools ...]
        [--batches-3d 20] [--batches-2d 20] [--steps 8] [--step-patch 32 96 96] [--skip-big]

Measured, each stage in a fresh child process (``bench/child.py``), recorded in ``bench_results/results.jsonl``:

* ``preprocess``: 3d_fullres and 2d of every case, ``--workers`` processes each tool, from each tool's own plan
  (fingerprint and plan run first as prerequisites, not timed). Target: segforge at most 0.7x nnU-Net's time.
* ``patches_3d``, ``patches_2d``: augmented training patches per second, one process on one thread (per core),
  nnU-Net's augmentation set, at nnU-Net's planned patch and batch size for both tools; nnU-Net's loader includes
  its deep-supervision target downsampling as in training (segforge does that on the device inside the loss),
  ``patches_3d_nods`` is nnU-Net without it. Target: segforge at least 2x.
* ``train_step_premade`` / ``train_step_live`` (segforge): the same training steps (the plan's topology at
  ``--step-patch`` with 16..128 features, so a CPU step takes seconds, not a minute) fed from batches made
  beforehand, or live by the training DataModule under the automatic thread policy. Target: live at most 1.15x.
* ``preprocess_case_memory`` (segforge, dataset ``ct512``): peak RSS of preprocessing one 512x512x300 CT with
  resampling to 1.25 x 0.8 x 0.8 mm. Target: under 4 GB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.datasets import PRESETS, ensure_dataset, get_preset  # noqa: E402
from bench.nnunet import NnunetTool  # noqa: E402
from bench.paths import default_bench_root, default_results_path  # noqa: E402
from bench.report import format_table, summarize  # noqa: E402
from bench.results import ResultsFile, host_facts, make_record  # noqa: E402
from bench.segforge_runner import SegforgeTool  # noqa: E402

BENCHMARK = "data_pipeline"
CONFIGURATIONS = ["3d_fullres", "2d"]
BIG_TARGET_SPACING = [1.25, 0.8, 0.8]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="plan100", choices=sorted(PRESETS))
    p.add_argument("--workers", type=int, default=2, help="preprocessing processes of each tool (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per (tool, stage); the median is recorded")
    p.add_argument("--force", action="store_true", help="measure again even when a matching record exists")
    p.add_argument("--tools", default="nnunet,segforge")
    p.add_argument("--batches-3d", type=int, default=20)
    p.add_argument("--batches-2d", type=int, default=20)
    p.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    p.add_argument("--step-patch", type=int, nargs="+", default=[32, 96, 96])
    p.add_argument("--skip-big", action="store_true", help="skip the 512x512x300 memory stage")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--bench-root", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=7200)
    return p.parse_args(argv)


class Runner:
    """Runs (tool, stage) measurements ``repeat`` times, records their medians, skips recorded ones."""

    def __init__(self, args, results: ResultsFile, dataset: str):
        self.args, self.results, self.dataset, self.failures = args, results, dataset, 0

    def measure(self, tool, stage: str, params: dict, run) -> dict | None:
        params = {**tool.params(), **params, "repeat": self.args.repeat}
        if not self.args.force and self.results.has(BENCHMARK, tool.name, self.dataset, stage, params):
            print(f"{tool.name} {stage}: recorded already (use --force to measure again)")
            return self.results.latest(BENCHMARK, tool.name, self.dataset, stage, params)["metrics"]
        samples = []
        for k in range(self.args.repeat):
            try:
                result = run(k)
            except Exception as exc:  # one stage's failure must not lose the others
                print(f"{tool.name} {stage}: FAILED: {exc}", file=sys.stderr)
                self.failures += 1
                return None
            samples.append(result)
            print(f"{tool.name} {stage} run {k + 1}/{self.args.repeat}: {result.seconds:.2f} s in-process, "
                  f"{result.wall_seconds:.2f} s wall, peak RSS {result.peak_rss_mb:.0f} MB "
                  f"(workers {result.children_peak_rss_mb:.0f} MB)")
        metrics = summarize(samples)
        if "patches" in metrics:
            metrics["patches_per_second"] = metrics["patches"] / metrics["seconds"]
        if "steps" in metrics:
            metrics["seconds_per_step"] = metrics["seconds"] / metrics["steps"]
        self.results.append(make_record(BENCHMARK, tool.name, self.dataset, stage, metrics, params))
        return metrics


def prerequisites(tool, run_index: int = 0) -> None:
    """Fingerprint and plan (not recorded here: the planning benchmark measures them)."""
    plans = tool.plans_path(run_index) if isinstance(tool, SegforgeTool) else \
        tool.run_dir(run_index) / "preprocessed" / tool.dataset_root.name / "nnUNetPlans.json"
    if not plans.is_file():
        tool.fingerprint(run_index)
        tool.plan(run_index)


def ratio_row(name, unit, nn, sf, key, target, better="lower"):
    b, c = (nn or {}).get(key), (sf or {}).get(key)
    ratio = c / b if b and c is not None else None
    ok = None if ratio is None else (ratio <= target if better == "lower" else ratio >= target)
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    sign = "<=" if better == "lower" else ">="
    return [name, unit, fmt(b), fmt(c), fmt(ratio), f"{sign} {target}", "-" if ok is None else ("ok" if ok else "MISSED")]


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_root = (args.bench_root or default_bench_root()).resolve()
    results = ResultsFile(args.results or default_results_path())
    preset = get_preset(args.dataset)
    root = ensure_dataset(preset, bench_root, workers=args.workers)
    work = bench_root / "work"
    wanted = [t.strip() for t in args.tools.split(",")]
    nnunet = NnunetTool(root, preset.dataset_id, work, args.workers, timeout=args.timeout) if "nnunet" in wanted else None
    segforge = SegforgeTool(root, work, args.workers, timeout=args.timeout) if "segforge" in wanted else None
    if nnunet is not None and not nnunet.available()[0]:
        print(f"nnunet: SKIPPED: {nnunet.available()[1]}")
        nnunet = None
    facts = host_facts()
    print(f"dataset {preset.name}: {root}\nresults: {results.path}\ncpus {facts['cpus_usable']}, load {facts['load_avg_1_5_15']}")
    runner = Runner(args, results, preset.name)
    m = {}
    for tool in [t for t in (nnunet, segforge) if t is not None]:
        prerequisites(tool)
        m[(tool.name, "preprocess")] = runner.measure(tool, "preprocess", {"configurations": CONFIGURATIONS},
                                                      lambda k, t=tool: t.preprocess(CONFIGURATIONS, k))
    # patch sizes: nnU-Net's plan for both tools (the same work), else segforge's own
    shapes = {}
    for name in CONFIGURATIONS:
        if nnunet is not None:
            conf = nnunet.plans()["configurations"][name]
        else:
            import json
            conf = json.loads(segforge.plans_path().read_text())["configurations"][name]
        shapes[name] = (list(conf["patch_size"]), int(conf["batch_size"]))
    for name, stage, batches in (("3d_fullres", "patches_3d", args.batches_3d), ("2d", "patches_2d", args.batches_2d)):
        patch, batch = shapes[name]
        if nnunet is not None:
            m[("nnunet", stage)] = runner.measure(nnunet, stage, {"batches": batches},
                                                  lambda k, n=name, b=batches: nnunet.patches(n, b))
            if name == "3d_fullres":
                m[("nnunet", stage + "_nods")] = runner.measure(
                    nnunet, stage + "_nods", {"batches": batches}, lambda k, n=name, b=batches: nnunet.patches(n, b, False))
        if segforge is not None:
            m[("segforge", stage)] = runner.measure(
                segforge, stage, {"batches": batches, "patch_size": patch, "batch_size": batch},
                lambda k, n=name, p=patch, bs=batch, b=batches: segforge.patches(n, p, bs, b))
    if segforge is not None:
        for live in (False, True):
            stage = f"train_step_{'live' if live else 'premade'}"
            m[("segforge", stage)] = runner.measure(
                segforge, stage, {"steps": args.steps, "patch_size": args.step_patch, "batch_size": 2},
                lambda k, lv=live: segforge.train_step(lv, args.step_patch, 2, 16, 128, args.steps))
        if not args.skip_big:
            big = get_preset("ct512")
            big_root = ensure_dataset(big, bench_root, workers=1)
            tool = SegforgeTool(big_root, work, 1, timeout=args.timeout)
            prerequisites(tool)
            m[("segforge", "preprocess_case_memory")] = Runner(args, results, big.name).measure(
                tool, "preprocess_case_memory", {"target_spacing": BIG_TARGET_SPACING},
                lambda k: tool.preprocess_case_memory(BIG_TARGET_SPACING))

    get = lambda tool, stage: m.get((tool, stage))  # noqa: E731
    rows = [
        ratio_row("preprocess (in-process)", "s", get("nnunet", "preprocess"), get("segforge", "preprocess"), "seconds", 0.7),
        ratio_row("preprocess (wall)", "s", get("nnunet", "preprocess"), get("segforge", "preprocess"), "wall_seconds", 0.7),
        ratio_row(f"patches 3D {shapes['3d_fullres'][0]}", "patch/s/core", get("nnunet", "patches_3d"),
                  get("segforge", "patches_3d"), "patches_per_second", 2.0, "higher"),
        ratio_row("  vs nnU-Net without DS targets", "patch/s/core", get("nnunet", "patches_3d_nods"),
                  get("segforge", "patches_3d"), "patches_per_second", 2.0, "higher"),
        ratio_row(f"patches 2D {shapes['2d'][0]}", "patch/s/core", get("nnunet", "patches_2d"), get("segforge", "patches_2d"),
                  "patches_per_second", 2.0, "higher"),
        ratio_row("train step: live / pre-made", "s/step", get("segforge", "train_step_premade"),
                  get("segforge", "train_step_live"), "seconds_per_step", 1.15),
    ]
    print(f"\n{BENCHMARK} benchmark, dataset {preset.name} ({preset.num_cases} cases), {args.workers} worker(s)")
    print(format_table(rows, ["measure", "unit", "reference", "segforge", "ratio", "target", ""]))
    print("(reference: nnU-Net v2; for the training step, the same step fed pre-made batches)")
    big = get("segforge", "preprocess_case_memory")
    if big:
        peak = max(big["peak_rss_mb"], big["children_peak_rss_mb"])
        print(f"preprocess one 512x512x300 CT -> {big.get('shapes_after_resampling')}: peak RSS {peak:.0f} MB "
              f"({'ok' if peak < 4096 else 'MISSED'}: target < 4096 MB), {big['seconds']:.1f} s")
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
