"""Training benchmark: segforge's training step against nnU-Net's, on the identical network, patch and batch
(nnU-Net's own plan for the dataset), at the same precision (fp32: nnU-Net uses no autocast on CPU) and thread
count; then both fed live by their augmenting loaders, nnU-Net at its best over 0, 1 and 2 augmentation workers.

    python scripts/bench_training.py [--dataset train30] [--steps 6] [--threads 2] [--repeat 1] [--force]

Stages (child processes, ``bench/training.py``), recorded in ``bench_results/results.jsonl``:
``step`` (bare step, both tools; target: segforge at least 0.95x nnU-Net's speed), ``loop`` (live-fed,
``loop_w0``/``loop_w1``/``loop_w2`` for nnU-Net; target: segforge at least 1.2x nnU-Net's best), and for segforge
alone ``step_bf16`` and ``step_channels_last`` (what bf16 autocast and channels-last add on this CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.child import run_stage  # noqa: E402
from bench.datasets import PRESETS, ensure_dataset, get_preset  # noqa: E402
from bench.nnunet import NnunetTool  # noqa: E402
from bench.paths import default_bench_root, default_results_path  # noqa: E402
from bench.report import format_table, summarize  # noqa: E402
from bench.results import ResultsFile, host_facts, make_record  # noqa: E402
from bench.segforge_runner import SegforgeTool  # noqa: E402

BENCHMARK = "training"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="train30", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=6, help="timed steps per stage (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the training process")
    p.add_argument("--workers", type=int, default=2, help="preprocessing processes (prerequisites)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--force", action="store_true")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--bench-root", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=7200)
    return p.parse_args(argv)


def architecture(nnunet_plans: dict) -> tuple[dict, list[int], int]:
    """nnU-Net's 3d_fullres topology in segforge's terms, its patch and its batch size."""
    conf = nnunet_plans["configurations"]["3d_fullres"]
    arch = conf["architecture"]["arch_kwargs"]
    convs = set(arch["n_conv_per_stage"]) | set(arch["n_conv_per_stage_decoder"])
    if len(convs) != 1:
        raise SystemExit(f"nnU-Net's plan has mixed convolutions per stage {convs}; segforge's UNet takes one number")
    return ({"features_per_stage": arch["features_per_stage"], "kernel_sizes": arch["kernel_sizes"],
             "strides": arch["strides"], "conv_per_stage": convs.pop()}, list(conf["patch_size"]), int(conf["batch_size"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_root = (args.bench_root or default_bench_root()).resolve()
    results = ResultsFile(args.results or default_results_path())
    preset = get_preset(args.dataset)
    root = ensure_dataset(preset, bench_root, workers=args.workers)
    work = bench_root / "work"
    nnunet = NnunetTool(root, preset.dataset_id, work, args.workers, timeout=args.timeout)
    segforge = SegforgeTool(root, work, args.workers, timeout=args.timeout)
    if not nnunet.available()[0]:
        raise SystemExit("nnunetv2 is not installed: `source scripts/setup_env.sh bench`")
    facts = host_facts()
    print(f"dataset {preset.name}: {root}\nresults: {results.path}\ncpus {facts['cpus_usable']}, load {facts['load_avg_1_5_15']}")
    nn_plans = nnunet.run_dir(0) / "preprocessed" / root.name / "nnUNetPlans.json"
    if not (nn_plans.parent / "nnUNetPlans_3d_fullres").is_dir():
        nnunet.fingerprint(0)
        nnunet.plan(0)
        nnunet.preprocess(["3d_fullres"], 0)
    if not (segforge.preprocessed("3d_fullres") / "manifest.json").is_file():
        segforge.fingerprint(0)
        segforge.plan(0)
        segforge.preprocess(["3d_fullres"], 0)
    arch, patch, batch = architecture(json.loads(nn_plans.read_text()))
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    num_classes, in_channels = len(labels), 1
    print(f"nnU-Net's plan: patch {patch}, batch {batch}, features {arch['features_per_stage']}")
    threads_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    common = {"architecture": arch, "patch_size": patch, "batch_size": batch, "in_channels": in_channels,
              "num_classes": num_classes, "steps": args.steps}
    failures = 0

    def measure(tool: str, stage: str, target: str, kwargs: dict, env: dict) -> dict | None:
        nonlocal failures
        params = {"steps": args.steps, "threads": args.threads, "patch_size": patch, "batch_size": batch,
                  "repeat": args.repeat}
        if not args.force and results.has(BENCHMARK, tool, preset.name, stage, params):
            print(f"{tool} {stage}: recorded already (use --force to measure again)")
            return results.latest(BENCHMARK, tool, preset.name, stage, params)["metrics"]
        samples = []
        for k in range(args.repeat):
            try:
                samples.append(run_stage(f"bench.training:{target}", kwargs, work / "training" / tool, name=stage,
                                         env={**threads_env, **env}, timeout=args.timeout))
            except Exception as exc:
                print(f"{tool} {stage}: FAILED: {exc}", file=sys.stderr)
                failures += 1
                return None
            r = samples[-1]
            print(f"{tool} {stage} run {k + 1}: {r.seconds / args.steps:.3f} s/step ({r.wall_seconds:.1f} s wall)")
        metrics = summarize(samples)
        metrics["seconds_per_step"] = metrics["seconds"] / args.steps
        results.append(make_record(BENCHMARK, tool, preset.name, stage, metrics, params))
        return metrics

    nn_env = nnunet.env(0)
    m = {
        ("nnunet", "step"): measure("nnunet", "step", "stage_nnunet_step",
                                    {"dataset_id": preset.dataset_id, "configuration": "3d_fullres", "steps": args.steps,
                                     "threads": args.threads}, nn_env),
        ("segforge", "step"): measure("segforge", "step", "stage_segforge_step", {**common, "threads": args.threads}, {}),
        ("segforge", "step_bf16"): measure("segforge", "step_bf16", "stage_segforge_step",
                                           {**common, "threads": args.threads, "precision": "bf16-mixed"}, {}),
        ("segforge", "step_channels_last"): measure("segforge", "step_channels_last", "stage_segforge_step",
                                                    {**common, "threads": args.threads, "channels_last": True}, {}),
    }
    for workers in (0, 1, 2):
        m[("nnunet", f"loop_w{workers}")] = measure(
            "nnunet", f"loop_w{workers}", "stage_nnunet_loop",
            {"dataset_id": preset.dataset_id, "configuration": "3d_fullres", "steps": args.steps, "threads": args.threads},
            {**nn_env, "nnUNet_n_proc_DA": str(workers)})
    m[("segforge", "loop")] = measure("segforge", "loop", "stage_segforge_loop",
                                      {**common, "folder": str(segforge.preprocessed("3d_fullres"))}, {})

    def per_step(tool, stage):
        return (m.get((tool, stage)) or {}).get("seconds_per_step")

    nn_loops = {w: per_step("nnunet", f"loop_w{w}") for w in (0, 1, 2)}
    best_workers = min((w for w in nn_loops if nn_loops[w]), key=lambda w: nn_loops[w], default=None)
    rows = []

    def row(name, reference, ours, target):
        speed = reference / ours if reference and ours else None
        rows.append([name, "-" if reference is None else f"{reference:.3f}", "-" if ours is None else f"{ours:.3f}",
                     "-" if speed is None else f"{speed:.3f}", f">= {target}",
                     "-" if speed is None else ("ok" if speed >= target else "MISSED")])

    row("bare step (fp32)", per_step("nnunet", "step"), per_step("segforge", "step"), 0.95)
    row(f"live-fed step (nnU-Net best: {best_workers} workers)", nn_loops.get(best_workers) if best_workers is not None else None,
        per_step("segforge", "loop"), 1.2)
    print(f"\n{BENCHMARK} benchmark, dataset {preset.name}: nnU-Net's 3d_fullres plan, patch {patch}, batch {batch}, "
          f"{args.threads} threads, {args.steps} steps")
    print(format_table(rows, ["measure", "nnU-Net s/step", "segforge s/step", "speed ratio", "target", ""]))
    print("nnU-Net live-fed by workers: " + ", ".join(f"{w}: {v:.3f} s/step" for w, v in nn_loops.items() if v))
    fp32 = per_step("segforge", "step")
    for stage, label in (("step_bf16", "bf16-mixed autocast"), ("step_channels_last", "channels-last")):
        value = per_step("segforge", stage)
        if value and fp32:
            print(f"segforge {label}: {value:.3f} s/step, {fp32 / value:.2f}x the fp32 speed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
