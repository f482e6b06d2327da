"""segforge's benchmark stages (fingerprint, plan, preprocess, patches, training step), each run cold in a child
process by ``bench.child``.

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


# ---- data pipeline (issue: preprocessing, patch sampling and augmentation) ------------------------------------


def stage_preprocess(timer, dataset_root: str, work_dir: str, configurations: list[str], num_workers: int) -> dict:
    """Child side: preprocess the configurations of ``<work_dir>/plans.json`` into ``<work_dir>/preprocessed`` (cold)."""
    from segforge.io.artifacts import read_json
    from segforge.io.dataset import load_dataset
    from segforge.preprocessing.pipeline import run_preprocessing

    work = Path(work_dir)
    spec = load_dataset(Path(dataset_root))
    plans = read_json(work / "plans.json", "plans")
    with timer:
        for name in configurations:
            run_preprocessing(spec.cases, plans, name, work / "preprocessed" / name, spec.label_values, num_workers,
                              ignore_label=spec.ignore_label)
    size = sum(p.stat().st_size for p in (work / "preprocessed").rglob("*") if p.is_file())
    return {"num_cases": len(spec.cases), "output_mb": size / 2**20}


def _patch_pipeline(folder: str, patch: list[int], batch_size: int, seed: int = 0):
    """The training loader's pieces for one preprocessed configuration: dataset (crops + parameters) and the
    collate that augments (what a loader worker runs per batch)."""
    from segforge.training.augment import AugmentationSettings, Augmenter, PatchGeometry
    from segforge.training.sampling import PatchCollate, PatchDataset

    case_ids = sorted(p.name[: -len(".json")] for p in Path(folder).glob("*.json") if p.name != "manifest.json")
    settings = AugmentationSettings.from_config()
    geometry = PatchGeometry.resolve(settings, patch)
    dataset = PatchDataset(Path(folder), case_ids, patch, len(patch), 0.333, settings, geometry, seed)
    return dataset, PatchCollate(Augmenter(settings, geometry)), geometry


def stage_patches(timer, folder: str, patch_size: list[int], batch_size: int, batches: int) -> dict:
    """Child side: augmented batches per second in one process on one thread (per-core throughput), nnU-Net's
    augmentation set, from memory-mapped preprocessed cases, as a loader worker makes them."""
    import torch

    torch.set_num_threads(1)
    dataset, collate, geometry = _patch_pipeline(folder, patch_size, batch_size)
    uid = iter(range(10**9))
    collate([dataset[next(uid)] for _ in range(batch_size)])  # warm-up: memory maps opened, first pages read
    with timer:
        for _ in range(batches):
            image, label = collate([dataset[next(uid)] for _ in range(batch_size)])
    return {"patches": batches * batch_size, "patch_size": list(patch_size), "batch_size": batch_size,
            "pseudo_2d": geometry.pseudo_2d, "threads": torch.get_num_threads()}


def stage_train_step(timer, folder: str, plans_path: str, configuration: str, patch_size: list[int], batch_size: int,
                     features_base: int, features_max: int, steps: int, live: bool) -> dict:
    """Child side: ``steps`` training steps (forward, Dice+CE with deep supervision, backward, SGD) of the plan's
    topology at ``patch_size``, fed either live by the training DataModule (thread policy auto: one augmenting
    worker beside the step) or from batches made beforehand and held in memory."""
    import itertools

    import torch
    from omegaconf import OmegaConf

    from segforge.nn.unet import UNet
    from segforge.training.data import SegmentationDataModule
    from segforge.training.losses import make_segmentation_loss

    plan = json.loads(Path(plans_path).read_text())
    network = plan["configurations"][configuration]["network"]
    num_classes = 1 + sum(1 for k, v in plan["labels"].items() if isinstance(v, int) and v != 0 and k != "ignore")
    stages = len(network["strides"])
    features = [min(features_base * 2**i, features_max) for i in range(stages)]
    net = UNet(len(patch_size), len(plan["channel_names"]), num_classes, features, network["kernel_sizes"],
               network["strides"], network["conv_per_stage"], network["norm"], True)
    loss_fn = make_segmentation_loss(None, stages - 1)  # the packaged task.loss
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    case_ids = sorted(p.name[: -len(".json")] for p in Path(folder).glob("*.json") if p.name != "manifest.json")
    data_cfg = OmegaConf.load(Path(__import__("segforge").__file__).parent / "configs" / "data" / "default.yaml")
    data_cfg.iterations_per_epoch = steps + 2
    module = SegmentationDataModule(Path(folder), case_ids, [], patch_size, len(patch_size), batch_size, data_cfg, 0)
    policy = module.resolve_policy()  # sets the training process's torch threads

    def step(batch) -> None:
        image, label = module.on_after_batch_transfer(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(image), label.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()

    loader = module.train_dataloader()
    batches = iter(loader)
    if not live:  # made beforehand; the loader's workers are gone before the timed steps
        held = list(itertools.islice(batches, steps + 2))
        del batches, loader
        batches = iter(held)
    for batch in itertools.islice(batches, 2):  # warm-up (allocator, first pages of the memory maps)
        step(batch)
    with timer:
        for batch in itertools.islice(batches, steps):
            step(batch)
    return {"steps": steps, "patch_size": list(patch_size), "batch_size": batch_size, "features": features,
            "live": live, "policy": policy.to_json()}


def stage_preprocess_case_memory(timer, dataset_root: str, work_dir: str, target_spacing: list[float]) -> dict:
    """Child side: preprocess the dataset's cases one by one in this process (peak RSS = one case's worth) at a
    forced target spacing, so the resampling runs for real."""
    from segforge.io.artifacts import read_json
    from segforge.io.dataset import load_dataset
    from segforge.preprocessing.pipeline import run_preprocessing

    work = Path(work_dir)
    spec = load_dataset(Path(dataset_root))
    plans = read_json(work / "plans.json", "plans")
    plans["configurations"]["3d_fullres"]["target_spacing"] = list(target_spacing)
    with timer:
        run_preprocessing(spec.cases, plans, "3d_fullres", work / "preprocessed_big", spec.label_values, num_workers=1,
                          ignore_label=spec.ignore_label)
    out = work / "preprocessed_big"
    shapes = [list(json.loads(p.read_text())["shape_after_resampling"]) for p in out.glob("*.json") if p.name != "manifest.json"]
    return {"shapes_after_resampling": shapes, "target_spacing": list(target_spacing)}


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

    def plans_path(self, run_index: int = 0) -> Path:
        return self.run_dir(run_index) / "plans.json"

    def plan(self, run_index: int = 0, profile: bool = False) -> StageResult:
        run_dir = self.run_dir(run_index)
        (run_dir / "plans.json").unlink(missing_ok=True)
        return run_stage(f"{__name__}:stage_plan",
                         {"fingerprint_path": str(run_dir / "fingerprint.json"), "out_dir": str(run_dir),
                          "overrides": self.plan_overrides},
                         run_dir, name="plan", timeout=self.timeout, profile=profile)

    # ---- data pipeline -------------------------------------------------------------------------------------
    def preprocessed(self, configuration: str, run_index: int = 0) -> Path:
        return self.run_dir(run_index) / "preprocessed" / configuration

    def preprocess(self, configurations: list[str], run_index: int = 0, profile: bool = False) -> StageResult:
        run_dir = self.run_dir(run_index)
        shutil.rmtree(run_dir / "preprocessed", ignore_errors=True)  # cold: nothing to resume from
        return run_stage(f"{__name__}:stage_preprocess",
                         {"dataset_root": str(self.dataset_root), "work_dir": str(run_dir),
                          "configurations": list(configurations), "num_workers": self.num_workers},
                         run_dir, name="preprocess", timeout=self.timeout, profile=profile)

    def patches(self, configuration: str, patch_size: list[int], batch_size: int, batches: int, run_index: int = 0,
                profile: bool = False) -> StageResult:
        return run_stage(f"{__name__}:stage_patches",
                         {"folder": str(self.preprocessed(configuration, run_index)), "patch_size": list(patch_size),
                          "batch_size": batch_size, "batches": batches},
                         self.run_dir(run_index), name=f"patches_{configuration}", timeout=self.timeout, profile=profile,
                         env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

    def train_step(self, live: bool, patch_size: list[int], batch_size: int, features_base: int, features_max: int,
                   steps: int, run_index: int = 0) -> StageResult:
        return run_stage(f"{__name__}:stage_train_step",
                         {"folder": str(self.preprocessed("3d_fullres", run_index)), "plans_path": str(self.plans_path(run_index)),
                          "configuration": "3d_fullres", "patch_size": list(patch_size), "batch_size": batch_size,
                          "features_base": features_base, "features_max": features_max, "steps": steps, "live": live},
                         self.run_dir(run_index), name=f"train_step_{'live' if live else 'premade'}", timeout=self.timeout)

    def preprocess_case_memory(self, target_spacing: list[float], run_index: int = 0) -> StageResult:
        run_dir = self.run_dir(run_index)
        shutil.rmtree(run_dir / "preprocessed_big", ignore_errors=True)
        return run_stage(f"{__name__}:stage_preprocess_case_memory",
                         {"dataset_root": str(self.dataset_root), "work_dir": str(run_dir),
                          "target_spacing": list(target_spacing)},
                         run_dir, name="preprocess_case_memory", timeout=self.timeout)
