"""Prediction benchmark: one nnU-Net model predicted by nnU-Net and by segforge (`--model` takes nnU-Net folders) on
the same 512x512x100 CT-shaped volume, with the same weights, step size, mirroring and precision; time per stage
(preprocess, network, export), end to end, and peak RAM, each tool in its own fresh process.

    python scripts/bench_prediction.py [--mirror] [--threads 2] [--repeat 1] [--force]
    python scripts/bench_prediction.py --memory 4 32          # streamed vs full labels, 512x512x100
    python scripts/bench_prediction.py --extreme --classes 4 32   # 512x512x1000 CT, 4000x4000 RGB slide
    python scripts/bench_prediction.py --overlap                # 8 CTs 512x512x100: sequential vs overlapped

The model: nnU-Net's own 3d_fullres plan for the ``train30`` dataset with a narrow network (8..64 features, so the
CPU run fits a session), trained for a few iterations by nnU-Net. Targets: segforge's non-network time at most 0.5x
nnU-Net's, end to end at most 0.8x, peak RAM no higher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.child import run_stage  # noqa: E402
from bench.datasets import ensure_dataset, get_preset  # noqa: E402
from bench.nnunet import NnunetTool  # noqa: E402
from bench.paths import default_bench_root, default_results_path  # noqa: E402
from bench.prediction import train_narrow_model  # noqa: E402
from bench.report import format_table, summarize  # noqa: E402
from bench.results import ResultsFile, host_facts, make_record  # noqa: E402

BENCHMARK = "prediction"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mirror", action="store_true", help="test-time mirroring (8x the network time) for both tools")
    p.add_argument("--step-size", type=float, default=None,
                   help="sliding-window step (default 0.5; --overlap: 1.0, so that its 16 case predictions fit minutes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--force", action="store_true")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--bench-root", type=Path, default=None)
    p.add_argument("--memory", type=int, nargs="*", default=None, metavar="CLASSES",
                   help="only the memory stage: peak RSS of streamed vs full-probability labels for these class counts")
    p.add_argument("--extreme", nargs="*", default=None, metavar="CASE",
                   help="only the extreme volumes: peak RSS of `segforge predict`'s streamed path on ct1000 (512x512x1000) "
                        "and slide4000 (4000x4000 RGB), for the class counts given by --classes")
    p.add_argument("--classes", type=int, nargs="+", default=[4, 32])
    p.add_argument("--overlap", action="store_true",
                   help="only the folder stage: 8 CT volumes (512x512x100) through `segforge predict`'s case loop with a "
                        "small stand-in network, one case at a time vs overlapped (predict.overlap); the first --classes")
    p.add_argument("--features", type=int, default=4, help="--overlap: width of the stand-in network")
    args = p.parse_args(argv)
    if args.step_size is None:
        args.step_size = 1.0 if args.overlap else 0.5
    if args.overlap:
        return overlap_stage(args, ResultsFile(args.results or default_results_path()),
                             (args.bench_root or default_bench_root()).resolve())
    if args.extreme is not None:
        return extreme_stage(args, ResultsFile(args.results or default_results_path()),
                             (args.bench_root or default_bench_root()).resolve())
    bench_root = (args.bench_root or default_bench_root()).resolve()
    results = ResultsFile(args.results or default_results_path())
    train_preset, case_preset = get_preset("train30"), get_preset("ct100")
    train_root = ensure_dataset(train_preset, bench_root)
    image = ensure_dataset(case_preset, bench_root, workers=1) / "imagesTr" / "case_0000_0000.nii.gz"
    work = bench_root / "work"
    if args.memory is not None:
        return memory_stage(args, results, image, work, case_preset.name)
    nnunet = NnunetTool(train_root, train_preset.dataset_id, work, 2)
    if not nnunet.available()[0]:
        raise SystemExit("nnunetv2 is not installed: `source scripts/setup_env.sh bench`")
    if not (nnunet.run_dir(0) / "preprocessed" / train_root.name / "nnUNetPlans_3d_fullres").is_dir():
        nnunet.fingerprint(0)
        nnunet.plan(0)
        nnunet.preprocess(["3d_fullres"], 0)
    model = train_narrow_model(nnunet.env(0), train_preset.dataset_id, train_root.name, work, [8, 16, 32, 64], 10)
    facts = host_facts()
    print(f"model: {model}\nimage: {image} (512x512x100)\ncpus {facts['cpus_usable']}, load {facts['load_avg_1_5_15']}")
    params = {"mirror": args.mirror, "step_size": args.step_size, "threads": args.threads, "repeat": args.repeat}
    metrics = {}
    for tool, env in (("nnunet", nnunet.env(0)), ("segforge", {})):
        if not args.force and results.has(BENCHMARK, tool, case_preset.name, "predict", params):
            print(f"{tool}: recorded already (use --force to measure again)")
            metrics[tool] = results.latest(BENCHMARK, tool, case_preset.name, "predict", params)["metrics"]
            continue
        out = work / "prediction" / tool
        samples = [run_stage(f"bench.prediction:stage_{tool}_predict",
                             {"model_dir": str(model), "image": str(image), "output": str(out / "case_0000.nii.gz"),
                              "mirror": args.mirror, "step_size": args.step_size, "threads": args.threads},
                             out, name="predict", env={**env, "OMP_NUM_THREADS": str(args.threads)}, timeout=7200)
                   for _ in range(args.repeat)]
        metrics[tool] = summarize(samples)
        results.append(make_record(BENCHMARK, tool, case_preset.name, "predict", metrics[tool], params))
        m = metrics[tool]
        print(f"{tool}: preprocess {m['preprocess_s']:.2f} s, network {m['network_s']:.2f} s, export {m['export_s']:.2f} s, "
              f"total {m['seconds']:.2f} s, peak RSS {m['peak_rss_mb']:.0f} MB")
    nn, sf = metrics["nnunet"], metrics["segforge"]

    def ratio(a, b):
        return f"{b / a:.3f}" if a else "-"

    other = lambda m: m["preprocess_s"] + m["export_s"]  # noqa: E731
    rows = [[stage, f"{nn[key]:.2f}", f"{sf[key]:.2f}", ratio(nn[key], sf[key]), target]
            for stage, key, target in (("preprocess", "preprocess_s", ""), ("network", "network_s", ""),
                                       ("export", "export_s", ""))]
    rows.append(["non-network", f"{other(nn):.2f}", f"{other(sf):.2f}", ratio(other(nn), other(sf)), "<= 0.5"])
    rows.append(["end to end", f"{nn['seconds']:.2f}", f"{sf['seconds']:.2f}", ratio(nn["seconds"], sf["seconds"]), "<= 0.8"])
    rows.append(["peak RSS (MB)", f"{nn['peak_rss_mb']:.0f}", f"{sf['peak_rss_mb']:.0f}",
                 ratio(nn["peak_rss_mb"], sf["peak_rss_mb"]), "<= 1.0"])
    print(f"\n{BENCHMARK} benchmark, {'with' if args.mirror else 'without'} mirroring, step {args.step_size}, {args.threads} threads")
    print(format_table(rows, ["stage", "nnU-Net s", "segforge s", "segforge/nnU-Net", "target"]))
    from segforge.io.image import read_image

    a = read_image(work / "prediction" / "nnunet" / "case_0000.nii.gz")[0]
    b = read_image(work / "prediction" / "segforge" / "case_0000.nii.gz")[0]
    print(f"voxels with the same label: {(a == b).mean() * 100:.3f} %")
    return 0


def memory_stage(args, results, image: Path, work: Path, dataset: str) -> int:
    """Peak RSS of one 512x512x100 prediction by class count, labels streamed vs from full probabilities."""
    rows = []
    for classes in args.memory or [4, 16, 64]:
        peaks = {}
        for streamed in (True, False):
            stage = f"memory_{classes}_{'streamed' if streamed else 'full'}"
            result = run_stage("bench.prediction:stage_segforge_memory",
                               {"image": str(image), "classes": classes, "streamed": streamed, "threads": args.threads},
                               work / "prediction" / "memory", name=stage, env={"OMP_NUM_THREADS": str(args.threads)},
                               timeout=7200)
            results.append(make_record(BENCHMARK, "segforge", dataset, stage, summarize([result]), {"classes": classes}))
            peaks[streamed] = (result.peak_rss_mb, result.seconds, result.metrics["input_mb"])
        (s_mb, s_s, input_mb), (f_mb, f_s, _) = peaks[True], peaks[False]
        rows.append([str(classes), f"{input_mb:.0f}", f"{s_mb:.0f}", f"{f_mb:.0f}", f"{s_s:.1f}", f"{f_s:.1f}",
                     f"{2048 + 3 * input_mb:.0f}"])
    print(format_table(rows, ["classes", "input MB", "streamed peak MB", "full peak MB", "streamed s", "full s",
                              "2 GB + 3x input"]))
    return 0


def extreme_stage(args, results, bench_root: Path) -> int:
    """Peak RSS predicting the extreme cases, against the budget of 2 GB + 3x the input as float32."""
    from bench.prediction import EXTREME_CASES, make_extreme_case

    rows = []
    for name in args.extreme or list(EXTREME_CASES):
        folder = make_extreme_case(name, bench_root / "data" / "extreme")
        for classes in args.classes:
            stage = f"extreme_{name}_{classes}"
            result = run_stage("bench.prediction:stage_segforge_extreme",
                               {"folder": str(folder), "name": name, "classes": classes, "threads": args.threads},
                               bench_root / "work" / "prediction" / "extreme", name=stage,
                               env={"OMP_NUM_THREADS": str(args.threads)}, timeout=7200)
            results.append(make_record(BENCHMARK, "segforge", name, stage, summarize([result]), {"classes": classes}))
            budget = 2048 + 3 * result.metrics["input_mb"]
            rows.append([name, str(classes), f"{result.metrics['input_mb']:.0f}", f"{result.peak_rss_mb:.0f}",
                         f"{budget:.0f}", f"{result.peak_rss_mb / budget:.2f}", f"{result.seconds:.0f}"])
    print(format_table(rows, ["case", "classes", "input MB (float32)", "peak RSS MB", "budget MB (2 GB + 3x input)",
                              "peak/budget", "seconds"]))
    return 0


def overlap_stage(args, results, bench_root: Path) -> int:
    """Wall time and peak RSS of predicting a folder of 8 CT volumes one case at a time and overlapped (each run in
    a fresh process, the two modes alternating over --repeat); targets: overlapped wall time at most the sequential
    run's network time + 25 %, peak RSS at most 1.3x the sequential run's; the masks must be identical."""
    import numpy as np

    from segforge.io.image import read_image

    preset = get_preset("ct100x8")
    images = ensure_dataset(preset, bench_root) / "imagesTr"
    work = bench_root / "work" / "prediction" / "overlap"
    params = {"threads": args.threads, "features": args.features, "classes": args.classes[0], "step_size": args.step_size}
    facts = host_facts()
    print(f"{preset.num_cases} volumes {'x'.join(map(str, preset.shape[::-1]))} in {images}\n"
          f"cpus {facts['cpus_usable']}, load {facts['load_avg_1_5_15']}")
    samples = {False: [], True: []}
    for _ in range(args.repeat):
        for overlap in (False, True):
            name = "overlapped" if overlap else "sequential"
            samples[overlap].append(run_stage(
                "bench.prediction:stage_segforge_folder",
                {"folder": str(images), "output": str(work / name), "overlap": overlap, "threads": args.threads,
                 "features": args.features, "classes": args.classes[0], "step_size": args.step_size},
                work, name=name, env={"OMP_NUM_THREADS": str(args.threads)}, timeout=3600))
    metrics = {}
    for overlap, name in ((False, "sequential"), (True, "overlapped")):
        metrics[name] = summarize(samples[overlap])
        results.append(make_record(BENCHMARK, "segforge", preset.name, f"folder_{name}", metrics[name], params))
    seq, ovl = metrics["sequential"], metrics["overlapped"]
    rows = [[name, f"{m['seconds']:.1f}", f"{m['load_s']:.1f}", f"{m['network_s']:.1f}", f"{m['export_s']:.1f}",
             f"{m['cpu_seconds']:.0f}", f"{m['other_cpu_seconds'] or 0:.0f}", f"{m['peak_rss_mb']:.0f}"]
            for name, m in metrics.items()]
    print(format_table(rows, ["run", "wall s", "read+preprocess s", "network s", "export s", "CPU s",
                              "others' CPU s", "peak RSS MB"]))
    same = all(np.array_equal(read_image(work / "sequential" / f.name)[0], read_image(work / "overlapped" / f.name)[0])
               for f in sorted((work / "sequential").glob("*.nii.gz")))
    print(format_table([
        ["overlapped wall / sequential network time", f"{ovl['seconds'] / seq['network_s']:.2f}", "<= 1.25"],
        ["overlapped wall / sequential wall", f"{ovl['seconds'] / seq['seconds']:.2f}", ""],
        ["overlapped peak RSS / sequential", f"{ovl['peak_rss_mb'] / seq['peak_rss_mb']:.2f}", "<= 1.3"],
        ["masks identical", "yes" if same else "NO", "yes"]], ["measure", "value", "target"]))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
