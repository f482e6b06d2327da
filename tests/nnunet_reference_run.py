"""`python tests/nnunet_reference_run.py ID EPOCHS ITERATIONS LR IMAGES OUT`: nnU-Net v2's own pipeline on the dataset
``$nnUNet_raw/DatasetID_*`` in one process (nnunetv2 imported once): fingerprint, plan and preprocess ``3d_fullres``,
train fold ``all`` for EPOCHS x ITERATIONS steps on the CPU (seeded; initial learning rate LR), and predict the
images in IMAGES into OUT with nnU-Net's predictor (masks and probabilities). Prints each stage's seconds.
tests/test_nnunet_model.py compares segforge's prediction of the model folder this leaves under ``$nnUNet_results``
with OUT.

A separate process because nnunetv2 reads its ``nnUNet_*`` folders from the environment when it is imported."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(dataset_id: int, epochs: int, iterations: int, lr: float, images: Path, out: Path) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and never spins against a loaded machine
    clock = time.perf_counter(), time.process_time()

    def lap(stage: str) -> None:
        nonlocal clock
        wall, cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]
        print(f"nnU-Net {stage}: {wall:.1f} s ({cpu:.1f} s CPU)", flush=True)
        clock = time.perf_counter(), time.process_time()

    extract_fingerprints([dataset_id], num_processes=1, show_progress_bar=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=["3d_fullres"], num_processes=[1], show_progress_bar=False)
    lap("plan and preprocess")
    name = convert_id_to_dataset_name(dataset_id)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = {**json.loads((pre / "nnUNetPlans.json").read_text()), "continue_training": False}  # the trainer pops it
    # an eighth of the planned width (32..256 -> 4..32 features per stage): the same U-Net, trainable on a CPU in
    # seconds; the trainer copies these plans into the model folder, so both predictors build this network
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [max(4, f // 8) for f in arch["features_per_stage"]]
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: seeded, no worker processes on 2 cores
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = nnUNetTrainer(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()),
                            device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iterations, 1
    trainer.initial_lr = lr  # nnU-Net's 1e-2 decays (poly) before a few hundred steps have learned the classes
    trainer.run_training()
    lap(f"training ({epochs} x {iterations} steps)")
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    model = Path(os.environ["nnUNet_results"]) / name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    predictor.initialize_from_trained_model_folder(str(model), use_folds=("all",))
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(images), str(out), save_probabilities=True)
    lap("prediction")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]))
