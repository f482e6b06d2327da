"""Denoising benchmark: segforge's denoiser (``task=denoise``, ``segforge denoise`` with ``steps=1``) against
scikit-image's non-local means and total-variation denoising, on held-out slabs of a real image.

    python scripts/bench_denoise.py [--resolution 1] [--budget 12m] [--sigmas 0.05 0.1 0.2] [--force] [--smoke]

The image is the MNI152 T1 template that ships with nilearn (``load_mni152_template``: no download), in [0, 1].
Axial slices are split along z into a training slab, a gap, and a test slab beyond it (``--train``, ``--gap``,
``--test``); each slice is cropped in-plane to the brain's box over the whole volume (plus ``--margin``) and
written as a 2D NIfTI case. segforge trains a 2D denoiser on the clean training slices only (unlabelled dataset,
``segforge plan ... task=denoise``, ``segforge train ... task=denoise`` within ``--budget`` wall-clock, noise levels
drawn from ``task.time_band``), then denoises the test slices corrupted with Gaussian noise of sigma 0.05, 0.1 and
0.2 of the intensity range (``intensity_range=[0,1]``: the template's range). The baselines get the true sigma and
parameters tuned on the TRAINING slices at each sigma (a grid of NLM ``h`` factors, ``fast_mode``, 5x5 patches;
TV Chambolle weights): fair to them, and never tuned on the test slab. PSNR and SSIM (``skimage.metrics``,
``data_range`` = 1) per test slice, averaged. Target: segforge better than both at every level in both metrics.

Records go to ``bench_results/results.jsonl`` (benchmark ``denoise``), the table is printed. segforge runs in child
processes at normal priority (its training budget is wall-clock: run on a quiet machine); ``--smoke`` is a minutes-long run at 2 mm (2 epochs of 10 steps instead of
a budget, whose set-up time is unpredictable on a loaded machine) that checks the pipeline, not the target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.paths import default_bench_root, default_results_path  # noqa: E402
from bench.report import format_table  # noqa: E402
from bench.results import ResultsFile, host_facts, make_record  # noqa: E402
from bench.segforge_cli import run_segforge  # noqa: E402

BENCHMARK = "denoise"
NLM_H_FACTORS = (0.6, 0.8, 1.0, 1.2)
TV_WEIGHTS = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=1, choices=(1, 2), help="MNI152 template at 1 or 2 mm")
    p.add_argument("--train", default="20:100", help="training slab: axial slices z0:z1 (1 mm indices)")
    p.add_argument("--gap", type=int, default=10, help="slices left out between training and test slabs (1 mm)")
    p.add_argument("--test", type=int, default=20, help="test slab: this many slices after the gap (1 mm)")
    p.add_argument("--margin", type=int, default=4, help="voxels around the brain's in-plane box")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--budget", default="12m", help="segforge training budget (wall clock, set-up and all); none: --epochs")
    p.add_argument("--epochs", type=int, default=2, help="with --budget none: epochs of --iterations steps")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--features", type=int, default=16, help="first stage's features of the denoiser (plan.features_base)")
    p.add_argument("--features-max", type=int, default=256, help="widest stage (plan.features_max_2d)")
    p.add_argument("--patch", type=int, default=96, help="training patch edge (in-plane voxels)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tune-slices", type=int, default=6, help="training slices the baselines are tuned on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="retrain and re-run even if results exist")
    p.add_argument("--smoke", action="store_true", help="tiny run that checks the pipeline (2 mm, 2 short epochs)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--bench-root", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.resolution, args.budget, args.features, args.patch, args.batch, args.tune_slices = 2, "none", 8, 48, 4, 2
        args.train, args.gap, args.test = "40:70", 6, 6
    return args


def load_volume(resolution: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The template as a ``(z, y, x)`` float32 array in [0, 1] and its spacing (z, y, x)."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=resolution)
    data = np.asarray(image.get_fdata(), np.float32).transpose(2, 1, 0)  # nibabel (i, j, k) -> (z, y, x)
    spacing = tuple(float(v) for v in np.linalg.norm(image.affine[:3, :3], axis=0))[::-1]
    return np.ascontiguousarray(data), spacing


def slabs(volume: np.ndarray, args) -> tuple[np.ndarray, np.ndarray, dict]:
    """(training slices, test slices, where they came from), in-plane cropped to the brain's box."""
    step = 1 if args.resolution == 1 else 2
    z0, z1 = (int(v) // step for v in args.train.split(":"))
    t0 = z1 + args.gap // step
    t1 = t0 + args.test // step
    if t1 > volume.shape[0]:
        raise SystemExit(f"test slab {t0}:{t1} passes the volume's {volume.shape[0]} slices")
    inside = np.argwhere(volume > 0)
    lo = np.maximum(inside.min(0)[1:] - args.margin, 0)
    hi = np.minimum(inside.max(0)[1:] + 1 + args.margin, volume.shape[1:])
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    where = {"train_z": [z0, z1], "test_z": [t0, t1], "gap_slices": t0 - z1, "crop_yx": [[int(lo[0]), int(hi[0])], [int(lo[1]), int(hi[1])]]}
    return volume[z0:z1][:, box[0], box[1]], volume[t0:t1][:, box[0], box[1]], where


def noisy(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return (clean + sigma * np.random.default_rng(seed).standard_normal(clean.shape)).astype(np.float32)


def write_dataset(root: Path, train: np.ndarray, spacing) -> Path:
    """An unlabelled 2D dataset of the training slices (one case per slice)."""
    from segforge.io.image import Geometry, write_image

    geometry = Geometry((999.0, spacing[1], spacing[2]), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), ndim=2)
    for z, plane in enumerate(train):
        write_image(root / "imagesTr" / f"slice_{z:03d}_0000.nii.gz", plane[None], geometry)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "numTraining": len(train),
                                                   "file_ending": ".nii.gz", "name": root.name}))
    return root


def metrics(clean: np.ndarray, estimate: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return (float(peak_signal_noise_ratio(clean, estimate, data_range=1.0)),
            float(structural_similarity(clean, estimate, data_range=1.0)))


def mean_metrics(cleans, estimates) -> dict:
    values = np.array([metrics(c, e) for c, e in zip(cleans, estimates)])
    return {"psnr": float(values[:, 0].mean()), "ssim": float(values[:, 1].mean())}


def nlm(image: np.ndarray, sigma: float, factor: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(image, h=factor * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6)


def tv(image: np.ndarray, weight: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(image, weight=weight)


def tune(train: np.ndarray, sigma: float, count: int, seed: int) -> dict:
    """The baselines' parameters at ``sigma`` that give the best mean PSNR on ``count`` training slices."""
    picks = np.linspace(0, len(train) - 1, count).round().astype(int)
    cleans = [train[i] for i in picks]
    noisies = [noisy(c, sigma, seed + int(i)) for c, i in zip(cleans, picks)]
    best_h = max(NLM_H_FACTORS, key=lambda f: mean_metrics(cleans, [nlm(n, sigma, f) for n in noisies])["psnr"])
    best_w = max(TV_WEIGHTS, key=lambda w: mean_metrics(cleans, [tv(n, w) for n in noisies])["psnr"])
    return {"nlm_h_factor": best_h, "tv_weight": best_w}


def segforge(args_list: list[str], log_path: Path) -> float:
    """Run ``segforge ...`` in a child process with this run's threads; returns its wall seconds."""
    return run_segforge(args_list, log_path, ARGS.threads)


ARGS = None


def main(argv=None) -> int:
    global ARGS
    ARGS = args = parse_args(argv)
    from segforge.io.image import Geometry, read_image, write_image

    bench_root = (args.bench_root or default_bench_root()).resolve()
    results = ResultsFile(args.results or default_results_path())
    tag = f"mni{args.resolution}mm{'_smoke' if args.smoke else ''}"
    folder = bench_root / "denoise" / tag
    volume, spacing = load_volume(args.resolution)
    train, test, where = slabs(volume, args)
    print(f"MNI152 T1 {args.resolution} mm {volume.shape}: train slices {where['train_z']}, gap {where['gap_slices']}, "
          f"test slices {where['test_z']}, crop {where['crop_yx']}\nwork: {folder}\nresults: {results.path}\n"
          f"cpus {host_facts()['cpus_usable']}, load {host_facts()['load_avg_1_5_15']}")
    dataset = folder / "Dataset920_MNIDenoise"
    work, log_path = folder / "work", folder / "segforge.log"
    model = work / dataset.name / "results" / "denoise" / "2d"
    params = {"resolution": args.resolution, "budget": args.budget, "features": args.features,
              "features_max": args.features_max, "patch": args.patch,
              "batch": args.batch, **where}
    if args.force and folder.exists():
        import shutil

        shutil.rmtree(folder)
    train_s = None
    if not (model / "fold_all" / "model_final.pt").is_file():
        write_dataset(dataset, train, spacing)
        base = [str(dataset), "--work", str(work)]
        segforge(["plan", *base, "task=denoise", "plan.configurations=[2d]", f"plan.features_base={args.features}",
                  f"plan.features_max_2d={args.features_max}"], log_path)
        length = [f"trainer.max_epochs={args.epochs}", f"data.iterations_per_epoch={args.iterations}"] \
            if args.budget == "none" else [f"budget={args.budget}"]
        train_s = segforge(["train", *base, "task=denoise", "configuration=2d", "fold=all", *length,
                            "recipe=nnunet", f"data.patch_size=[{args.patch},{args.patch}]", f"data.batch_size={args.batch}",
                            "task.time_band=[0.0,0.4]", "task.ema.decay=0.995", "task.network.attention_stages=1",
                            "callbacks.epoch_progress.plot_path=null"], log_path)
    trained = json.loads((model / "fold_all" / "training_summary.json").read_text())
    params["train_steps"] = trained["global_step"]
    print(f"denoiser: {trained['global_step']} training steps ({args.budget if args.budget != 'none' else 'fixed'})")
    geometry = Geometry((999.0, spacing[1], spacing[2]), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), ndim=2)
    rows, table = [], []
    for k, sigma in enumerate(args.sigmas):
        tuned = tune(train, sigma, args.tune_slices, seed=1000 + k)
        noisy_slices = [noisy(c, sigma, seed=10_000 * (k + 1) + z) for z, c in enumerate(test)]
        in_dir, out_dir = folder / f"noisy_{sigma:g}", folder / f"segforge_{sigma:g}"
        for z, plane in enumerate(noisy_slices):
            write_image(in_dir / f"test_{z:03d}_0000.nii.gz", plane[None], geometry)
        seconds = segforge(["denoise", "--model", str(model), "-i", str(in_dir), "-o", str(out_dir), f"sigma={sigma}",
                            "intensity_range=[0.0,1.0]", "steps=1"], log_path)
        ours = [read_image(out_dir / f"test_{z:03d}_0000.nii.gz")[0][0] for z in range(len(test))]
        start = time.perf_counter()
        nlm_out = [nlm(n, sigma, tuned["nlm_h_factor"]) for n in noisy_slices]
        nlm_s = time.perf_counter() - start
        start = time.perf_counter()
        tv_out = [tv(n, tuned["tv_weight"]) for n in noisy_slices]
        tv_s = time.perf_counter() - start
        scores = {"noisy": mean_metrics(test, noisy_slices), "nlm": mean_metrics(test, nlm_out),
                  "tv": mean_metrics(test, tv_out), "segforge": mean_metrics(test, ours)}
        better = {m: scores["segforge"][m] > max(scores["nlm"][m], scores["tv"][m]) for m in ("psnr", "ssim")}
        row = {"sigma": sigma, **{f"{tool}_{m}": v[m] for tool, v in scores.items() for m in ("psnr", "ssim")},
               **tuned, "segforge_denoise_s": round(seconds, 1), "nlm_s": round(nlm_s, 1), "tv_s": round(tv_s, 2),
               "segforge_better_psnr": better["psnr"], "segforge_better_ssim": better["ssim"]}
        rows.append(row)
        for tool in ("noisy", "nlm", "tv", "segforge"):
            results.append(make_record(BENCHMARK, tool, tag, f"sigma_{sigma:g}",
                                       {**scores[tool], **({k2: row[k2] for k2 in tuned} if tool != "segforge" else {})},
                                       {**params, "sigma": sigma, "train_seconds": train_s}))
        gain = scores["segforge"]["psnr"] - max(scores["nlm"]["psnr"], scores["tv"]["psnr"])
        table.append([f"{sigma:g}", f"{scores['noisy']['psnr']:.2f} / {scores['noisy']['ssim']:.3f}",
                      f"{scores['nlm']['psnr']:.2f} / {scores['nlm']['ssim']:.3f}",
                      f"{scores['tv']['psnr']:.2f} / {scores['tv']['ssim']:.3f}",
                      f"{scores['segforge']['psnr']:.2f} / {scores['segforge']['ssim']:.3f}", f"{gain:+.2f} dB",
                      "ok" if all(better.values()) else "below target"])
        print(f"sigma {sigma:g}: done ({len(test)} slices; segforge {seconds:.0f} s, NLM {nlm_s:.0f} s, TV {tv_s:.1f} s)")
    print()
    print(format_table(table, ["sigma", "noisy PSNR/SSIM", "NLM", "TV", "segforge", "vs best baseline", "verdict"]))
    summary = {"params": params, "train_seconds": train_s, "rows": rows,
               "target_met": all(r["segforge_better_psnr"] and r["segforge_better_ssim"] for r in rows)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntarget (segforge better than NLM and TV at every level, PSNR and SSIM): "
          f"{'met' if summary['target_met'] else 'NOT met'}; {folder / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
