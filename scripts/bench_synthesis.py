"""Mask-conditioned synthesis benchmark: do images that segforge synthesises from label maps carry those labels?

    python scripts/bench_synthesis.py [--gen-budget 15m] [--seg-budget 10m] [--steps 20] [--force] [--smoke]

Data: the real-derived MNI152 brain dataset of ``bench.mni_dataset`` (grey/white-matter labels, 24 training and 8
held-out deformed cases; the same folder as ``bench_budget.py``'s). Two segforge models are trained on the training
cases, both 2D (``configuration=2d``) within a wall-clock budget each: a mask-conditioned denoiser
(``task=denoise task.mask_conditioning=true``: the one-hot label map is concatenated to the noisy image) and a
segmentation model on the real images (``task=segment``). ``segforge sample --masks labelsTs/`` then synthesises one
image per held-out label map (on that map's grid, slice by slice with the 2D model), ``segforge predict`` segments
the synthetic images, and the mean foreground Dice (GM, WM) of those predictions is scored against the conditioning
maps and against shuffled maps (each image against another held-out case's map). For context the segmenter's Dice
on the real held-out images is reported too. Target: Dice >= 0.7 against the conditioning maps and at least 0.3 above
the shuffled Dice.

Records go to ``bench_results/results.jsonl`` (benchmark ``synthesis``); every segforge command runs in a child
process at normal priority (budgets are wall-clock: run it on a quiet machine); ``--smoke`` checks the pipeline on a small cropped dataset in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.budget_eval import dice, read_mask  # noqa: E402
from bench.mni_dataset import LABELS, MniParams, ensure_mni_dataset  # noqa: E402
from bench.paths import default_bench_root, default_results_path  # noqa: E402
from bench.report import format_table  # noqa: E402
from bench.results import ResultsFile, host_facts, make_record  # noqa: E402
from bench.segforge_cli import run_segforge  # noqa: E402

BENCHMARK = "synthesis"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gen-budget", default="15m", help="training budget of the mask-conditioned denoiser")
    p.add_argument("--seg-budget", default="10m", help="training budget of the segmentation model")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per synthesised image")
    p.add_argument("--features", type=int, default=16, help="plan.features_base of both models")
    p.add_argument("--features-max", type=int, default=256, help="plan.features_max_2d of both models")
    p.add_argument("--batch", type=int, default=8, help="the denoiser's batch size")
    p.add_argument("--seg-batch", type=int, default=12,
                   help="the segmenter's batch size (the GPU plan's 92 slices a step buy 53 steps in 10 CPU minutes: "
                        "a weak scorer, real held-out Dice 0.83)")
    p.add_argument("--sw-batch", type=int, default=16, help="slices per forward pass when synthesising")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="retrain and re-run even if models exist")
    p.add_argument("--smoke", action="store_true", help="small cropped dataset, 1-minute budgets, 3 steps")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--bench-root", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.gen_budget, args.seg_budget, args.steps, args.features, args.sw_batch = "1m", "1m", 3, 8, 8
    return args


def dataset_params(smoke: bool) -> MniParams:
    if smoke:  # its own id and name: never rebuilds the full dataset another benchmark uses
        return MniParams(num_train=4, num_test=3, dataset_id=921, name="MNIBrainSmoke", crop=(40, 48, 40))
    return MniParams()


def foreground_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return {name: dice(pred, ref, value) for name, value in LABELS.items() if value != 0}


def score(pred_dir: Path, refs: dict[str, Path], pairs: dict[str, str]) -> dict:
    """Mean foreground Dice of ``pred_dir/CASE.nii.gz`` against ``refs[pairs[CASE]]``, per case and overall."""
    per_case = {}
    for case, ref_case in pairs.items():
        dice = foreground_dice(read_mask(pred_dir / f"{case}.nii.gz"), read_mask(refs[ref_case]))
        per_case[case] = {**dice, "mean": float(np.mean(list(dice.values())))}
    return {"per_case": per_case, "mean": float(np.mean([v["mean"] for v in per_case.values()])),
            "by_class": {n: float(np.mean([v[n] for v in per_case.values()])) for n in LABELS if n != "background"}}


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_root = (args.bench_root or default_bench_root()).resolve()
    results = ResultsFile(args.results or default_results_path())
    params = dataset_params(args.smoke)
    dataset = ensure_mni_dataset(params, bench_root, workers=2)
    tag = params.folder_name
    folder = bench_root / "synthesis" / tag
    if args.force and folder.exists():
        shutil.rmtree(folder)
    work, log_path = folder / "work", folder / "segforge.log"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"dataset {dataset}\nwork: {folder}\nresults: {results.path}\ncpus {host_facts()['cpus_usable']}, "
          f"load {host_facts()['load_avg_1_5_15']}")
    base = [str(dataset), "--work", str(work)]
    results_dir = work / dataset.name / "results"
    generator, segmenter = results_dir / "denoise" / "2d", results_dir / "segment" / "2d"
    seconds = {}
    if not (work / dataset.name / "plans_default.json").is_file():
        seconds["plan"] = run_segforge(["plan", *base, "plan.configurations=[2d]", f"plan.features_base={args.features}",
                                        f"plan.features_max_2d={args.features_max}"], log_path, args.threads)
    if not (segmenter / "fold_all" / "model_final.pt").is_file():
        seconds["train_segment"] = run_segforge(["train", *base, "configuration=2d", "fold=all", f"budget={args.seg_budget}",
                                                 f"data.batch_size={args.seg_batch}", "callbacks.epoch_progress.plot_path=null"], log_path, args.threads)
    if not (generator / "fold_all" / "model_final.pt").is_file():
        seconds["train_denoise"] = run_segforge(
            ["train", *base, "task=denoise", "configuration=2d", "fold=all", f"budget={args.gen_budget}", "recipe=nnunet",
             "task.mask_conditioning=true", "task.network.attention_stages=1", "task.ema.decay=0.995",
             f"data.batch_size={args.batch}",
             "callbacks.epoch_progress.plot_path=null"], log_path, args.threads)
    synth, pred_synth, pred_real = folder / "synthetic", folder / "pred_synthetic", folder / "pred_real"
    for out in (synth, pred_synth, pred_real):
        shutil.rmtree(out, ignore_errors=True)
    seconds["sample"] = run_segforge(["sample", "--model", str(generator), "-o", str(synth), "--masks",
                                      str(dataset / "labelsTs"), f"steps={args.steps}", "sampler=ddim",
                                      f"generate.sw_batch_size={args.sw_batch}"], log_path, args.threads)
    seconds["predict_synthetic"] = run_segforge(["predict", "-i", str(synth), "-o", str(pred_synth), "--model",
                                                 str(segmenter), "predict.mirror=false"], log_path, args.threads)
    seconds["predict_real"] = run_segforge(["predict", "-i", str(dataset / "imagesTs"), "-o", str(pred_real), "--model",
                                            str(segmenter), "predict.mirror=false"], log_path, args.threads)
    refs = {p.name[: -len(".nii.gz")]: p for p in sorted((dataset / "labelsTs").glob("*.nii.gz"))}
    cases = sorted(refs)
    matched = score(pred_synth, refs, {c: c for c in cases})
    shuffled = score(pred_synth, refs, {c: cases[(i + 1) % len(cases)] for i, c in enumerate(cases)})  # a derangement
    real = score(pred_real, refs, {c: c for c in cases})
    target = matched["mean"] >= 0.7 and matched["mean"] - shuffled["mean"] >= 0.3
    rows = [["synthetic vs conditioning maps", f"{matched['by_class']['grey_matter']:.3f}",
             f"{matched['by_class']['white_matter']:.3f}", f"{matched['mean']:.3f}"],
            ["synthetic vs shuffled maps", f"{shuffled['by_class']['grey_matter']:.3f}",
             f"{shuffled['by_class']['white_matter']:.3f}", f"{shuffled['mean']:.3f}"],
            ["real held-out images (segmenter)", f"{real['by_class']['grey_matter']:.3f}",
             f"{real['by_class']['white_matter']:.3f}", f"{real['mean']:.3f}"]]
    print()
    print(format_table(rows, ["Dice of the segmentation of", "GM", "WM", "mean"]))
    print(f"\nmatched - shuffled: {matched['mean'] - shuffled['mean']:+.3f}; target (>= 0.7 and >= +0.3): "
          f"{'met' if target else 'NOT met'}\nseconds: {json.dumps({k: round(v) for k, v in seconds.items()})}")
    steps_trained = {name: json.loads((model / "fold_all" / "training_summary.json").read_text())["global_step"]
                     for name, model in (("denoiser", generator), ("segmenter", segmenter))}
    print(f"training steps: {steps_trained}")
    run_params = {"gen_budget": args.gen_budget, "seg_budget": args.seg_budget, "steps": args.steps,
                  "features": args.features, "features_max": args.features_max, "batch": args.batch, "seg_batch": args.seg_batch, "cases": len(cases),
                  "smoke": args.smoke, "steps_trained": steps_trained}
    for stage, scores in (("matched", matched), ("shuffled", shuffled), ("real", real)):
        results.append(make_record(BENCHMARK, "segforge", tag, stage,
                                   {"mean_dice": scores["mean"], "by_class": scores["by_class"]}, {**run_params, "seconds": seconds}))
    (folder / "summary.json").write_text(json.dumps({"params": run_params, "seconds": seconds, "matched": matched,
                                                     "shuffled": shuffled, "real": real, "target_met": target}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
