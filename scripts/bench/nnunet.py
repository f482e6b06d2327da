"""nnU-Net v2's benchmark stages (fingerprint, plan, preprocess, patches), each run cold in a child process by
``bench.child``.

Imported as ``bench.nnunet`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``). Importing this module does
not import nnunetv2 (the parent and the tests work without it); the ``stage_*`` functions run in the child.

Layout (all bench-owned, under ``<work_root>/nnunet``): ``raw/DatasetNNN_Name`` is a symlink to the generated
dataset (nnU-Net finds datasets with ``os.scandir(...).is_dir()``, which follows symlinks); each repeat has
``<dataset>/run-<k>/{preprocessed,results}`` so every fingerprint starts with no ``dataset_fingerprint.json``.
The child gets ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` and ``nnUNet_def_n_proc`` (= workers).
Nothing here needs a GPU: fingerprint and planning never touch a device (later training/inference stages pass
``device="cpu"``).

The stages call the API behind the CLI commands: ``nnUNetv2_extract_fingerprint -d ID -np N --clean`` is
``extract_fingerprint_dataset(ID, DatasetFingerprintExtractor, num_processes=N, clean=True)``;
``nnUNetv2_plan_experiment -d ID`` is ``plan_experiment_dataset(ID, ExperimentPlanner)`` (the CLI first looks the
planner class up by name, importing every planner module; here the class is passed, so that lookup is in neither
time). Keyword arguments a given nnunetv2 version lacks are dropped.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from pathlib import Path

from bench.child import StageResult, run_stage

TOOL = "nnunet"


def _call(func, *args, **kwargs):
    """``func(*args, **kwargs)`` minus keyword arguments this nnunetv2 version does not have."""
    accepted = inspect.signature(func).parameters
    return func(*args, **{k: v for k, v in kwargs.items() if k in accepted})


def stage_fingerprint(timer, dataset_id: int, num_processes: int) -> dict:
    """Child side: ``nnUNetv2_extract_fingerprint -d ID -np N --clean`` (the extractor's spawn pool included)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    with timer:
        fingerprint = _call(extract_fingerprint_dataset, dataset_id, DatasetFingerprintExtractor,
                            num_processes=num_processes, check_dataset_integrity=False, clean=True, verbose=False,
                            show_progress_bar=False)
    return {"num_cases": len(fingerprint["spacings"])}


def stage_fingerprint_serial(timer, dataset_id: int, max_cases: int | None = None) -> dict:
    """Child side, for profiling only: the per-case work of the extractor (``analyze_case``) serially in this
    process, with the per-case sample count of the whole dataset (cProfile cannot see into pool workers)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    extractor = DatasetFingerprintExtractor(dataset_id, 1)
    keys = sorted(extractor.dataset)[:max_cases]
    reader = determine_reader_writer_from_dataset_json(extractor.dataset_json, extractor.dataset[keys[0]]["images"][0])
    per_case = int(extractor.num_foreground_voxels_for_intensitystats // len(extractor.dataset))
    with timer:
        for key in keys:
            DatasetFingerprintExtractor.analyze_case(extractor.dataset[key]["images"], extractor.dataset[key]["label"],
                                                     reader, per_case)
    return {"num_cases": len(keys), "samples_per_case": per_case}


def stage_plan(timer, dataset_id: int, gpu_memory_gb: float | None, planner: str) -> dict:
    """Child side: ``nnUNetv2_plan_experiment -d ID [-pl PLANNER] [-gpu_memory_target GB]``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner

    planner_class = getattr(default_experiment_planner, planner, None)
    if planner_class is None:  # other planners (e.g. nnUNetPlannerResEncM) live in other modules
        import nnunetv2
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

        planner_class = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                                                    planner, current_module="nnunetv2.experiment_planning")
    with timer:
        plans, _identifier = _call(plan_experiment_dataset, dataset_id, planner_class,
                                   gpu_memory_target_in_gb=gpu_memory_gb)
    return {"configurations": summarize_plans(plans)}


def summarize_plans(plans: dict) -> dict:
    """Per configuration: patch, batch, spacing (the same summary as ``bench.segforge_runner``)."""
    out = {}
    for name, conf in (plans.get("configurations") or {}).items():
        if "patch_size" in conf:  # 3d_cascade_fullres only says what it inherits
            out[name] = {"patch_size": conf.get("patch_size"), "batch_size": conf.get("batch_size"),
                         "target_spacing": conf.get("spacing")}
    return out


# ---- data pipeline ------------------------------------------------------------------------------------------


def stage_preprocess(timer, dataset_id: int, configurations: list[str], num_processes: int) -> dict:
    """Child side: ``nnUNetv2_preprocess -d ID -c CONFIGS -np N`` (plans from an earlier ``plan`` stage)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    with timer:
        _call(preprocess_dataset, dataset_id, plans_identifier="nnUNetPlans", configurations=tuple(configurations),
              num_processes=tuple([num_processes] * len(configurations)), verbose=False)
    return {"configurations": list(configurations)}


def training_pipeline(dataset_id: int, configuration: str, deep_supervision: bool = True):
    """nnU-Net's training loader for a configuration, built as ``nnUNetTrainer.get_dataloaders`` builds it: its
    ``nnUNetDataLoader`` over the preprocessed cases, with the transforms of ``get_training_transforms`` at the
    rotation, pseudo-2D and initial-patch rules of ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``
    (restated here: that method needs a whole trainer object)."""
    import json

    import numpy as np
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset_id)
    plans = PlansManager(str(folder / "nnUNetPlans.json"))
    config = plans.get_configuration(configuration)
    labels = plans.get_label_manager(json.loads((folder / "dataset.json").read_text()))
    data_folder = folder / config.data_identifier
    dataset = infer_dataset_class(str(data_folder))(str(data_folder))
    patch = list(config.patch_size)
    dim = len(patch)
    if dim == 2:
        dummy_2d, mirror = False, (0, 1)
        rotation = (-np.pi, np.pi) if max(patch) / min(patch) <= 1.5 else (-np.pi / 12, np.pi / 12)
    else:
        dummy_2d, mirror = max(patch) / patch[0] > ANISO_THRESHOLD, (0, 1, 2)
        rotation = (-np.pi, np.pi) if dummy_2d else (-np.pi / 6, np.pi / 6)
    initial = get_patch_size(patch[-dim:], rotation, rotation, rotation, (0.85, 1.25))
    if dummy_2d:
        initial[0] = patch[0]
    scales = None
    if deep_supervision:
        scales = [list(s) for s in 1 / np.cumprod(np.vstack(config.pool_op_kernel_sizes), axis=0)][:-1]
    transforms = nnUNetTrainer.get_training_transforms(
        patch, rotation, scales, mirror, dummy_2d, use_mask_for_norm=config.use_mask_for_norm, is_cascaded=False,
        foreground_labels=labels.foreground_labels, regions=None, ignore_label=None)
    loader = nnUNetDataLoader(dataset, config.batch_size, initial, patch, labels, oversample_foreground_percent=0.33,
                              sampling_probabilities=None, pad_sides=None, transforms=transforms,
                              probabilistic_oversampling=False)
    return loader, {"patch_size": patch, "batch_size": config.batch_size, "initial_patch_size": [int(v) for v in initial],
                    "pseudo_2d": bool(dummy_2d)}


def stage_patches(timer, dataset_id: int, configuration: str, batches: int, deep_supervision: bool = True) -> dict:
    """Child side: augmented batches of nnU-Net's training loader in one process on one thread (what one of its
    augmentation workers produces), deep-supervision targets included as in training."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    np.random.seed(0)
    torch.manual_seed(0)
    loader, info = training_pipeline(dataset_id, configuration, deep_supervision)
    next(loader)  # warm-up
    with timer:
        for _ in range(batches):
            next(loader)
    return {**info, "patches": batches * info["batch_size"], "deep_supervision": deep_supervision}


class NnunetTool:
    """Parent side: bench-owned nnU-Net folders for one dataset, one run folder per repeat."""

    name = TOOL

    def __init__(self, dataset_root: Path, dataset_id: int, work_root: Path, num_workers: int = 2,
                 gpu_memory_gb: float | None = None, planner: str = "ExperimentPlanner", timeout: float | None = None):
        self.dataset_root = Path(dataset_root).resolve()
        self.dataset_id = int(dataset_id)
        if not self.dataset_root.name.startswith(f"Dataset{self.dataset_id:03d}_"):
            raise ValueError(f"nnU-Net needs the folder named Dataset{self.dataset_id:03d}_Name, got {self.dataset_root.name}")
        self.root = Path(work_root).resolve() / TOOL
        self.num_workers = num_workers
        self.gpu_memory_gb = gpu_memory_gb
        self.planner = planner
        self.timeout = timeout

    def available(self) -> tuple[bool, str]:
        return importlib.util.find_spec("nnunetv2") is not None, "nnunetv2 is not installed (pip install nnunetv2)"

    def params(self) -> dict:
        return {"workers": self.num_workers, "planner": self.planner, "gpu_memory_gb": self.gpu_memory_gb}

    def run_dir(self, run_index: int) -> Path:
        return self.root / self.dataset_root.name / f"run-{run_index}"

    def _raw_root(self) -> Path:
        """``raw/`` holding a symlink named like the dataset folder (replaced if it points elsewhere)."""
        raw = self.root / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        link = raw / self.dataset_root.name
        if link.is_symlink() and Path(os.readlink(link)) != self.dataset_root:
            link.unlink()
        if not link.is_symlink():
            if link.exists():
                raise RuntimeError(f"{link} exists and is not the benchmark's symlink; remove it")
            link.symlink_to(self.dataset_root, target_is_directory=True)
        return raw

    def env(self, run_index: int) -> dict:
        run_dir = self.run_dir(run_index)
        return {"nnUNet_raw": str(self._raw_root()), "nnUNet_preprocessed": str(run_dir / "preprocessed"),
                "nnUNet_results": str(run_dir / "results"), "nnUNet_def_n_proc": str(self.num_workers),
                "nnUNet_n_proc_DA": str(self.num_workers)}

    def has_fingerprint(self, run_index: int) -> bool:
        path = self.run_dir(run_index) / "preprocessed" / self.dataset_root.name / "dataset_fingerprint.json"
        return path.is_file()

    def fingerprint(self, run_index: int = 0, profile: bool = False) -> StageResult:
        run_dir = self.run_dir(run_index)
        shutil.rmtree(run_dir, ignore_errors=True)  # cold: no fingerprint or plans of an earlier run
        for sub in ("preprocessed", "results"):
            (run_dir / sub).mkdir(parents=True)
        return run_stage(f"{__name__}:stage_fingerprint", {"dataset_id": self.dataset_id, "num_processes": self.num_workers},
                         run_dir, name="fingerprint", env=self.env(run_index), timeout=self.timeout, profile=profile)

    def fingerprint_serial(self, run_index: int = 0, max_cases: int | None = None, profile: bool = True) -> StageResult:
        """The per-case fingerprint work in one process (to profile it; no fingerprint file is written)."""
        run_dir = self.run_dir(run_index)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_stage(f"{__name__}:stage_fingerprint_serial", {"dataset_id": self.dataset_id, "max_cases": max_cases},
                         run_dir, name="fingerprint_serial", env=self.env(run_index), timeout=self.timeout, profile=profile)

    def plan(self, run_index: int = 0, profile: bool = False) -> StageResult:
        run_dir = self.run_dir(run_index)
        for old in (run_dir / "preprocessed" / self.dataset_root.name).glob("nnUNetPlans*.json"):
            old.unlink()  # plan_experiment merges into an existing plans file; start from none
        return run_stage(f"{__name__}:stage_plan",
                         {"dataset_id": self.dataset_id, "gpu_memory_gb": self.gpu_memory_gb, "planner": self.planner},
                         run_dir, name="plan", env=self.env(run_index), timeout=self.timeout, profile=profile)

    # ---- data pipeline ---------------------------------------------------------------------------------------
    def plans(self, run_index: int = 0) -> dict:
        import json

        return json.loads((self.run_dir(run_index) / "preprocessed" / self.dataset_root.name / "nnUNetPlans.json").read_text())

    def preprocess(self, configurations: list[str], run_index: int = 0, profile: bool = False) -> StageResult:
        folder = self.run_dir(run_index) / "preprocessed" / self.dataset_root.name
        for name in configurations:  # cold: nnU-Net skips nothing, but start from empty folders all the same
            shutil.rmtree(folder / f"nnUNetPlans_{name}", ignore_errors=True)
        return run_stage(f"{__name__}:stage_preprocess",
                         {"dataset_id": self.dataset_id, "configurations": list(configurations),
                          "num_processes": self.num_workers},
                         self.run_dir(run_index), name="preprocess", env=self.env(run_index), timeout=self.timeout,
                         profile=profile)

    def patches(self, configuration: str, batches: int, deep_supervision: bool = True, run_index: int = 0,
                profile: bool = False) -> StageResult:
        env = {**self.env(run_index), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        return run_stage(f"{__name__}:stage_patches",
                         {"dataset_id": self.dataset_id, "configuration": configuration, "batches": batches,
                          "deep_supervision": deep_supervision},
                         self.run_dir(run_index), name=f"patches_{configuration}", env=env, timeout=self.timeout,
                         profile=profile)
