"""The ``nnunet`` arm of the budget benchmark (``scripts/bench_budget.py``): nnU-Net v2 itself, planned with a small
GPU memory target, trained on CPU for as long as a wall-clock budget allows, then scored on held-out cases.

Imported as ``bench.budget_nnunet`` (``scripts/`` on ``sys.path``). Importing it does not import nnunetv2 or
torch: the ``stage_*`` functions run in child processes (``bench.child.run_stage``); the trainer's schedule
arithmetic is ``bench.budget_schedule`` (pure, tested in ``tests/test_bench_budget.py``).

Steps of one arm run (``NnunetBudgetArm.run``), each in a fresh child process, strictly one after another:

1. prepare (not timed, like ``segforge plan``): fingerprint, ``ExperimentPlanner`` with
   ``gpu_memory_target_in_gb`` (default ``DEFAULT_GPU_MEMORY_GB``), preprocess 3d_fullres (``bench.nnunet``);
2. train (timed): ``stage_train`` builds ``nnUNetTrainerBudget`` (``bench.budget_nnunet_trainer``: nnU-Net's
   trainer whose epoch count is fitted to the budget after a probe of a few timed iterations, the probe counted
   in the budget) for fold 0 on ``device=cpu`` and runs ``run_training()`` + ``perform_actual_validation()``;
   the time of those two calls is the arm's training time;
3. predict (not timed): ``imagesTs`` with ``checkpoint_final.pth`` through ``nnUNetPredictor`` (cpu,
   ``use_mirroring=False``, step 0.5, sequential);
4. score: Dice per class against ``labelsTs`` (``bench.budget_eval``).

GPU memory target. nnU-Net's default (8 GB) plans the whole 96x128x112 volume as one patch, batch 2, features
32-320 over 5 stages: seconds per iteration on 2 CPU cores, so a 5-minute budget buys a few dozen steps. The
target only shrinks the patch (2 GB: 80x96x80, 1 GB: 64x64x64, 0.5 GB: 48x64x48 and one stage fewer; the batch
stays 2 and the features start at 32). ``DEFAULT_GPU_MEMORY_GB`` is the value that did best in our tiny-budget
trials (see ``scripts/bench_budget.py`` ``--nnunet-gpu-gb`` to try others; each value gets its own work folder).

Environment of every child: ``nnUNet_raw`` (a symlink to the dataset), ``nnUNet_preprocessed``,
``nnUNet_results``, ``nnUNet_def_n_proc=2``, ``nnUNet_n_proc_DA`` (augmentation workers, default 2),
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and ``torch.set_num_threads`` = threads (2).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench.child import run_stage

ARM = "nnunet"
DEFAULT_GPU_MEMORY_GB = 1.0
CONFIGURATION = "3d_fullres"
FOLD = 0

# ------------------------------------------------------------------------------------------------ child side


def stage_train(timer, dataset_name: str, budget_seconds: float, threads: int, configuration: str = CONFIGURATION,
                fold: int = FOLD) -> dict:
    """Child side: ``nnUNetTrainerBudget`` on cpu, ``run_training()`` + ``perform_actual_validation()`` timed."""
    import torch

    torch.set_num_threads(threads)
    from nnunetv2.paths import nnUNet_preprocessed

    from bench.budget_nnunet_trainer import nnUNetTrainerBudget

    folder = Path(nnUNet_preprocessed) / dataset_name
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds (nnunetv2 2.6+)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = nnUNetTrainerBudget(plans, configuration, fold, dataset_json, device=torch.device("cpu"))
    trainer.budget_seconds = float(budget_seconds)
    with timer:
        start = time.perf_counter()
        trainer.budget_start = start
        trainer.run_training()
        trained = time.perf_counter()
        trainer.perform_actual_validation(False)
        end = time.perf_counter()
    fold_dir = Path(trainer.output_folder)
    summary_path = fold_dir / "validation" / "summary.json"
    val_dice = json.loads(summary_path.read_text())["foreground_mean"]["Dice"] if summary_path.is_file() else None
    config = plans["configurations"][configuration]
    report = trainer.budget_report
    return {"train_seconds": end - start, "run_training_seconds": trained - start, "validation_seconds": end - trained,
            "iterations": report.get("iterations"), "epochs": report.get("epochs"),
            "seconds_per_iteration": report.get("probe", {}).get("seconds_per_iteration"),
            "budget_report": report, "model_dir": str(fold_dir.parent), "val_dice_fold0": val_dice,
            "patch_size": config["patch_size"], "batch_size": config["batch_size"],
            "features_per_stage": config["architecture"]["arch_kwargs"]["features_per_stage"]}


def stage_predict(timer, model_dir: str, input_dir: str, output_dir: str, threads: int, fold: int = FOLD,
                  checkpoint: str = "checkpoint_final.pth") -> dict:
    """Child side: predict a folder with one fold's checkpoint, no mirroring, on cpu, sequentially.

    The network is built here (``nnUNetTrainer.build_network_architecture``, which the budget trainer does not
    change) because nnU-Net's own loader looks the trainer class up by name inside the nnunetv2 package."""
    import torch

    torch.set_num_threads(threads)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model = Path(model_dir)
    plans_manager = PlansManager(json.loads((model / "plans.json").read_text()))
    dataset_json = json.loads((model / "dataset.json").read_text())
    saved = torch.load(model / f"fold_{fold}" / checkpoint, map_location="cpu", weights_only=False)
    config = plans_manager.get_configuration(saved["init_args"]["configuration"])
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, config, determine_num_input_channels(plans_manager, config, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(saved["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, config, [saved["network_weights"]], dataset_json,
                                    saved["trainer_name"], saved.get("inference_allowed_mirroring_axes"))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with timer:
        predictor.predict_from_files_sequential(str(input_dir), str(output_dir), save_probabilities=False, overwrite=True)
    return {"cases": len(list(Path(output_dir).glob("*.nii.gz"))), "epoch": saved.get("current_epoch")}


# ----------------------------------------------------------------------------------------------- parent side


class NnunetBudgetArm:
    """One nnU-Net budget run under ``arm_dir`` (``work/`` for nnU-Net's folders, ``pred/``, logs)."""

    name = ARM

    def __init__(self, dataset_root: Path, dataset_id: int, arm_dir: Path, budget_minutes: float, threads: int = 2,
                 gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB, da_workers: int = 2, workers: int = 2, log=print):
        from bench.nnunet import NnunetTool

        self.dataset_root = Path(dataset_root).resolve()
        self.arm_dir = Path(arm_dir).resolve()
        self.budget_seconds = float(budget_minutes) * 60.0
        self.threads = int(threads)
        self.gpu_memory_gb = float(gpu_memory_gb)
        self.da_workers = int(da_workers)
        self.log = log
        self.tool = NnunetTool(self.dataset_root, dataset_id, self.arm_dir / "work", workers, gpu_memory_gb=self.gpu_memory_gb)
        self.timeout = 3 * self.budget_seconds + 900  # a hung child must not hang the benchmark

    def params(self) -> dict:
        return {"gpu_memory_gb": self.gpu_memory_gb, "augmentation_workers": self.da_workers,
                "configuration": CONFIGURATION, "fold": FOLD, "mirroring_at_prediction": False}

    def env(self) -> dict:
        return {**self.tool.env(0), "nnUNet_n_proc_DA": str(self.da_workers), "OMP_NUM_THREADS": str(self.threads),
                "MKL_NUM_THREADS": str(self.threads)}

    def _marker(self) -> Path:
        return self.tool.run_dir(0) / "bench_prepared.json"

    def prepare(self) -> dict:
        """Fingerprint, plan (GPU memory target) and preprocess 3d_fullres, unless done for these settings."""
        want = {"gpu_memory_gb": self.gpu_memory_gb, "dataset": self.dataset_root.name,
                "dataset_json": json.loads((self.dataset_root / "dataset.json").read_text()).get("bench_mni")}
        marker = self._marker()
        if marker.is_file() and json.loads(marker.read_text()) == want:
            return {"reused": True}
        start = time.perf_counter()
        self.tool.fingerprint(0)  # starts from an empty run folder
        plan = self.tool.plan(0)
        self.tool.preprocess([CONFIGURATION], 0)
        marker.write_text(json.dumps(want))
        conf = plan.metrics["configurations"][CONFIGURATION]
        self.log(f"  nnU-Net plan ({self.gpu_memory_gb:g} GB target): patch {conf['patch_size']}, batch "
                 f"{conf['batch_size']} ({time.perf_counter() - start:.0f} s, not timed)")
        return {"reused": False, "seconds": time.perf_counter() - start, "plan": conf}

    def run(self) -> dict:
        self.prepare()
        results = self.tool.run_dir(0) / "results"
        shutil.rmtree(results, ignore_errors=True)  # a fresh training, never a continuation
        results.mkdir(parents=True)
        self.log(f"  training nnU-Net for {self.budget_seconds:.0f} s ...")
        train = run_stage(f"{__name__}:stage_train",
                          {"dataset_name": self.dataset_root.name, "budget_seconds": self.budget_seconds,
                           "threads": self.threads},
                          self.arm_dir, name="train", env=self.env(), timeout=self.timeout)
        m = train.metrics
        self.log(f"  trained: {m['train_seconds']:.0f} s (run_training {m['run_training_seconds']:.0f} s + final "
                 f"validation {m['validation_seconds']:.0f} s), {m['iterations']} iterations in {m['epochs']} epochs, "
                 f"{m['seconds_per_iteration']:.2f} s/it; log {train.log_path}")
        pred_dir = self.arm_dir / "pred"
        shutil.rmtree(pred_dir, ignore_errors=True)
        predict = run_stage(f"{__name__}:stage_predict",
                            {"model_dir": m["model_dir"], "input_dir": str(self.dataset_root / "imagesTs"),
                             "output_dir": str(pred_dir), "threads": self.threads},
                            self.arm_dir, name="predict", env=self.env(), timeout=self.timeout)
        self.log(f"  predicted {predict.metrics['cases']} held-out case(s) in {predict.seconds:.0f} s")
        return {"train_seconds": m["train_seconds"], "train_wall_seconds": train.wall_seconds,
                "iterations": m["iterations"], "epochs": m["epochs"], "predict_seconds": predict.seconds,
                "pred_dir": str(pred_dir), "details": {k: v for k, v in m.items() if k not in ("train_seconds",)},
                "cpu_seconds": train.cpu_seconds, "other_cpu_seconds": train.other_cpu_seconds,
                "peak_rss_mb": train.peak_rss_mb}
