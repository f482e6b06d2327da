"""One GPU acceptance command: plan, verify, train and predict on a CUDA card; everything in DIR/gpu_check.json.

    python scripts/gpu_check.py --out DIR                        # on a CUDA machine (about 8 minutes)
    python scripts/gpu_check.py --out DIR --device cpu --quick   # every code path on tiny data (CI, CPU)

Stages (each in its own process; sizes and limits in ``scripts/bench/gpu_check.yaml``, ``--set KEY=VALUE``):
``plan``: a 3D and a 2D synthetic CT dataset planned for this card (``plan.gpu_memory_gb`` = its free memory) and
``plan --verify``: predicted vs measured peak per configuration (off a GPU: the step run on the CPU);
``train``: 3d_fullres for a fixed number of steps at the plan's precision, with ``model.compile=true`` too
(iterations per second, loader wait share, peak memory), and nnU-Net's own step on its own plan when nnunetv2 is
importable; ``predict``: one 512x512x100 volume with float16 accumulation and mirroring on the card (wall time,
non-network share, NaN) against the CPU float32 mask. Any failed check exits 1; bad usage exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ -> the `bench` package

from bench.child import StageError, run_stage  # noqa: E402
from bench.datasets import ensure_dataset, get_preset  # noqa: E402
from bench.paths import SCRIPTS_DIR, default_bench_root  # noqa: E402
from bench.report import format_table  # noqa: E402
from bench.results import host_facts  # noqa: E402
from bench.segforge_cli import run_segforge  # noqa: E402

SETTINGS = SCRIPTS_DIR / "bench" / "gpu_check.yaml"
GIB = 2**30
WORK_MARKER = ".gpu_check-work"  # the work folder is this script's own: a re-run may replace it


class UsageError(Exception):
    """Bad arguments or settings: exit 2 with the message."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, logs and the work folder")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI): the full check needs a CUDA card")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of scripts/bench/gpu_check.yaml, e.g. quick.limits.min_mask_agreement=0.99")
    p.add_argument("--bench-root", type=Path, default=None, help="where the synthetic datasets are written once "
                   "(default $SEGFORGE_BENCH_ROOT or bench_results/data)")
    return p.parse_args(argv)


def load_settings(mode: str, sets: list[str]) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.load(SETTINGS)
    OmegaConf.set_struct(base, True)  # a misspelt key is an error, not a silent no-op
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(sets))
    except (OmegaConfBaseException, ValueError) as exc:
        raise UsageError(f"--set {sets}: {exc}. Fix: a key of {SETTINGS} (e.g. quick.limits.max_total_s=60)") from exc
    return OmegaConf.to_container(merged[mode], resolve=True)


class Report:
    """Measurements by stage and the checks on them; ``ok`` when every check passed."""

    def __init__(self, mode: str, settings: dict, path: Path):
        self.data = {"mode": mode, "settings": settings, "host": host_facts(), "stages": {}, "checks": []}
        self.path = path  # rewritten at every check: a run killed at a time limit leaves what it measured

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def check(self, name: str, value, limit, passed: bool | None = None, kind: str = "max") -> None:
        """``value`` against ``limit`` (``kind``: max, min, or range with ``[min, max]``); a null limit only reports
        (a missing value still fails); ``passed`` overrides."""
        if passed is None:
            low, high = (limit if kind == "range" else (limit, None) if kind == "min" else (None, limit))
            if value is None:
                passed = False
            elif low is None and high is None:
                passed = None
            else:
                passed = (low is None or value >= low) and (high is None or value <= high)
        self.data["checks"].append({"name": name, "value": value, "limit": limit, "kind": kind, "passed": passed})
        self.write()

    def failed(self, stage: str, exc: Exception) -> None:
        message = str(exc).strip()[-3000:]
        self.stage(stage)["error"] = message
        self.check(f"{stage} ran", None, None, passed=False, kind="ran")
        print(f"{stage}: FAILED: {message}", file=sys.stderr)

    @property
    def ok(self) -> bool:
        return all(c["passed"] is not False for c in self.data["checks"])

    def write(self) -> None:
        self.data["passed"] = self.ok
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def table(self) -> str:
        def fmt(v):
            return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

        def bound(c):
            if c["limit"] is None:
                return ""
            if c["kind"] == "range":
                return f"{fmt(c['limit'][0])} .. {fmt(c['limit'][1])}"
            return ("<= " if c["kind"] == "max" else ">= ") + fmt(c["limit"])

        rows = [[c["name"], fmt(c["value"]), bound(c), {True: "ok", False: "FAILED", None: "reported"}[c["passed"]]]
                for c in self.data["checks"]]
        return format_table(rows, ["check", "value", "limit", ""])


def prepare_work(out: Path) -> Path:
    work = out / "work"
    if work.exists():
        if not (work / WORK_MARKER).is_file():
            raise UsageError(f"{work} exists and was not made by gpu_check.py. Fix: another --out, or move it away")
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    (work / WORK_MARKER).write_text("")
    return work


def plan_dataset(report: Report, label: str, root: Path, work: Path, gpu_gb: float, cuda: bool, settings: dict,
                 configurations: str, preprocess: bool) -> Path:
    """``segforge plan`` (with ``--verify`` on a card) of one dataset; its plans.json."""
    args = ["plan", str(root), "--work", str(work / "segforge"), f"plan.gpu_memory_gb={gpu_gb}",
            f"plan.configurations={configurations}", f"preprocess.num_workers={settings['workers']}",
            f"preprocess.run={str(preprocess).lower()}", *settings["plan_overrides"]] + (["--verify"] if cuda else [])
    report.stage(f"plan_{label}")["wall_s"] = run_segforge(args, work / "logs" / f"plan_{label}.log", os.cpu_count() or 1)
    return work / "segforge" / root.name / "plans_default.json"


def record_plans(report: Report, planned: dict[str, Path], cuda: bool, settings: dict) -> None:
    """Predicted vs measured peak per configuration: ``plan --verify``'s file on a card, else the step on the CPU."""
    if cuda:
        verified = {str(p): json.loads((p.parent / "memory_verification.json").read_text())["configurations"]
                    for p in planned.values()}
    else:
        verified = run_stage("bench.gpu_stages:stage_verify_cpu", {"plans_paths": [str(p) for p in planned.values()]},
                             work_dir(planned) / "verify", name="verify_cpu", timeout=settings["stage_timeout_s"]).metrics
    limits = settings["limits"]
    for label, path in planned.items():
        stage = report.stage(f"plan_{label}")
        stage["verified_on"] = "cuda" if cuda else "cpu"
        for name, conf in json.loads(path.read_text())["configurations"].items():
            row = verified[str(path)].get(name, {})
            stage[name] = {"patch_size": conf["patch_size"], "batch_size": conf["batch_size"],
                           "precision": conf.get("precision") or conf["memory"]["precision"],
                           "gpu_memory_gb": conf["memory"]["gpu_memory_gb"], **row}
            report.check(f"{label} {name}: measured/predicted peak", row.get("ratio"),
                         [limits["verify_min_ratio"], limits["verify_max_ratio"]], kind="range")


def work_dir(planned: dict[str, Path]) -> Path:
    return next(iter(planned.values())).parents[2]  # <work>/segforge/<dataset>/plans_default.json


def train_run(report: Report, label: str, root: Path, work: Path, precision: str, settings: dict, compiled: bool) -> Path:
    """``segforge train ... configuration=3d_fullres`` for a fixed number of steps, timed by ``TrainingStepTimer``."""
    stage = report.stage(label)
    timing = work / f"{label}_timing.json"
    warmup = settings["compile_warmup_steps"] if compiled else settings["warmup_steps"]
    results = work / label
    args = ["train", str(root), "--work", str(work / "segforge"), f"paths.results_root={results}",
            "configuration=3d_fullres", "fold=0", "trainer.max_epochs=1",  # trainer.precision: plan, the default
            f"data.iterations_per_epoch={settings['train_steps']}", f"data.val_iterations={settings['val_iterations']}",
            "final_validation.enabled=false",
            f"+callbacks.step_timer={{_target_:segforge.training.step_timer.TrainingStepTimer,path:'{timing}',warmup:{warmup}}}"]
    if compiled:
        args.append("model.compile=true")
    stage["wall_s"] = run_segforge(args, work / "logs" / f"{label}.log", os.cpu_count() or 1)
    stage.update(json.loads(timing.read_text()))
    report.check(f"{label}: trained at the expected precision {precision}", stage.get("precision"), precision,
                 passed=stage.get("precision") == precision)
    report.check(f"{label}: iterations per second", stage["iterations_per_s"], None)
    report.check(f"{label}: loader wait share", stage["loader_wait_share"], settings["limits"]["max_loader_wait_share"])
    return results / root.name / "results" / "segment" / "3d_fullres"


def nnunet_arm(report: Report, root: Path, preset, work: Path, settings: dict, device: str) -> None:
    """nnU-Net's own training step on its own plan of the same data, for the ratio (when nnunetv2 is importable)."""
    stage = report.stage("train_nnunet")
    if settings["nnunet_steps"] <= 0 or importlib.util.find_spec("nnunetv2") is None:
        stage["skipped"] = "nnunetv2 is not importable" if settings["nnunet_steps"] > 0 else "nnunet_steps is 0"
        return
    from bench.nnunet import NnunetTool

    tool = NnunetTool(root, preset.dataset_id, work / "nnunet", settings["workers"], timeout=settings["stage_timeout_s"])
    tool.fingerprint(0)
    tool.plan(0)
    tool.preprocess(["3d_fullres"], 0)
    steps = settings["nnunet_steps"]
    result = run_stage("bench.training:stage_nnunet_step",
                       {"dataset_id": preset.dataset_id, "configuration": "3d_fullres", "steps": steps,
                        "threads": os.cpu_count() or 1, "device": device}, work / "nnunet", name="nnunet_step",
                       env=tool.env(0), timeout=settings["stage_timeout_s"])
    stage.update(result.metrics, iterations_per_s=steps / result.seconds)
    ours = report.stage("train")
    plan = report.stage("plan_3d").get("3d_fullres", {})
    if ours.get("iterations_per_s"):
        voxels = lambda patch, batch: batch * (patch[0] * patch[1] * patch[2])  # noqa: E731
        ratio = (ours["iterations_per_s"] * voxels(plan["patch_size"], plan["batch_size"])
                 / (stage["iterations_per_s"] * voxels(stage["patch_size"], stage["batch_size"])))
        stage["segforge_voxel_throughput_ratio"] = ratio
        report.check("segforge/nnU-Net training voxels per second", ratio, None)


def predict_volume(report: Report, model_dir: Path, image: Path, work: Path, device: str, settings: dict) -> None:
    """The volume on ``device`` with float16 accumulation and mirroring, and on the CPU in float32: the masks agree."""
    result = run_stage("bench.gpu_stages:stage_predict", {"model_dir": str(model_dir), "image": str(image),
                       "device": device, "tie_margin": settings["tie_margin"]}, work / "predict", name="predict",
                       timeout=settings["stage_timeout_s"])
    stage = report.stage("predict")
    stage.update(result.metrics)
    report.check("predict: wall s", stage["wall_s"], None)
    report.check("predict: non-network share", stage["non_network_share"], None)
    report.check("predict: NaN voxels", stage["nan_voxels"], 0)
    report.check("predict: mask = CPU float32 mask (share)", stage["mask_agreement"], settings["limits"]["min_mask_agreement"],
                 kind="min")


def run(args, report: Report, settings: dict, work: Path) -> None:
    started = time.perf_counter()
    info = {"cuda": False}
    if args.device != "cpu":  # asked in a child: a CUDA context here would hold memory the plans are sized for
        info = run_stage("bench.gpu_stages:stage_device_info", {}, work / "device", name="device_info",
                         timeout=settings["stage_timeout_s"]).metrics
    report.data["device_info"] = info
    cuda = info["cuda"]
    if args.device == "cuda" and not cuda:
        raise UsageError("--device cuda: torch sees no CUDA device here. Fix: run on the GPU machine, or --device cpu --quick")
    if not cuda and not args.quick:
        raise UsageError("the full check needs a CUDA card and there is none here. Fix: --device cpu --quick (tiny sizes)")
    device = "cuda" if cuda else "cpu"
    report.data["device"] = device
    if cuda:  # the card's free memory, a little held back (GiB, as plan.gpu_memory_gb counts)
        gpu_gb = int(info["free_bytes"] * settings["memory_fraction"] / GIB * 10) / 10
    else:
        gpu_gb = float(settings["quick_gpu_memory_gb"] or 8)
    bench_root = (args.bench_root or default_bench_root()).resolve()
    preset = get_preset(settings["dataset_3d"])
    root_3d = ensure_dataset(preset, bench_root, workers=settings["workers"])
    root_2d = ensure_dataset(settings["dataset_2d"], bench_root, workers=settings["workers"])
    image = ensure_dataset(settings["predict_volume"], bench_root, workers=1) / "imagesTr" / "case_0000_0000.nii.gz"
    report.stage("data").update(dataset_3d=str(root_3d), dataset_2d=str(root_2d), predict_volume=str(image),
                                seconds=time.perf_counter() - started, gpu_memory_gb=gpu_gb)

    planned = {}
    with ThreadPoolExecutor(2) as pool:  # both plans at once: much of each is single-threaded start-up
        jobs = {label: pool.submit(plan_dataset, report, label, root, work, gpu_gb, cuda, settings, configurations, pre)
                for label, root, configurations, pre in (("3d", root_3d, "[3d_fullres,3d_lowres]", True),
                                                        ("2d", root_2d, "[2d]", False))}
        for label, job in jobs.items():
            try:
                planned[label] = job.result()
            except (StageError, SystemExit, OSError, ValueError) as exc:
                report.failed(f"plan_{label}", exc)
    try:
        if planned:
            record_plans(report, planned, cuda, settings)
    except (StageError, OSError, KeyError, ValueError) as exc:
        report.failed("verify", exc)
    if "3d" not in planned:
        return
    plans = json.loads(planned["3d"].read_text())
    conf = plans["configurations"]["3d_fullres"]
    # what the default trainer.precision=plan must resolve to: the plan's on this card (an H200 has bf16 units),
    # float32 on a CPU (no float16 autocast there; a budget plan aside)
    precision = (conf.get("precision") or conf["memory"]["precision"]) if cuda else "32-true"
    model_dir = None
    for label, compiled in (("train", False), ("train_compiled", True)):
        if compiled and not settings["compile"]:
            report.stage(label)["skipped"] = "compile is false in this mode"
            continue
        try:
            made = train_run(report, label, root_3d, work, precision, settings, compiled)
            model_dir = model_dir or made  # the plain run's model is the one predicted
            peak = report.stage(label).get("peak_memory_bytes")
            if cuda:
                report.check(f"{label}: peak memory GiB (plan's card: {gpu_gb})", None if peak is None else peak / GIB, gpu_gb)
        except (StageError, SystemExit, OSError, KeyError, ValueError) as exc:
            if compiled:  # compile needs a C compiler and Triton on the machine: reported, not a failed check
                report.stage(label)["not_checked"] = f"model.compile=true did not run: {str(exc).strip()[-1500:]}"
                continue
            report.failed(label, exc)
    try:
        nnunet_arm(report, root_3d, preset, work, settings, device)
    except (StageError, SystemExit, OSError, KeyError, ValueError) as exc:
        report.failed("train_nnunet", exc)
    if model_dir is not None:
        try:
            predict_volume(report, model_dir, image, work, device, settings)
        except (StageError, OSError, KeyError, ValueError) as exc:
            report.failed("predict", exc)
    report.check("total s", time.perf_counter() - started, settings["limits"]["max_total_s"])


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    try:
        settings = load_settings(mode, args.sets)
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        work = prepare_work(out)
        report = Report(mode, settings, out / "gpu_check.json")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        try:
            run(args, report, settings, work)  # segforge train loads segforge.training.step_timer.TrainingStepTimer
        except (StageError, OSError, ValueError) as exc:  # the device query or the datasets: nothing to measure
            report.failed("setup", exc)
    except UsageError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    report.data["finished"] = True
    report.write()
    print(f"\ngpu_check ({mode}, {report.data.get('device')}): {out / 'gpu_check.json'}")
    print(report.table())
    print("PASSED" if report.ok else "FAILED: see the checks above and the logs in " + str(work / "logs"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
