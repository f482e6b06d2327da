"""Prediction benchmark stages: one nnU-Net model predicted by nnU-Net and by segforge (which reads nnU-Net model
folders), on the same image, same weights, step size, mirroring and precision, timed per stage in one process.

Imported as ``bench.prediction`` (``scripts/`` on ``sys.path``); the ``stage_*`` functions run in child processes.

Stages of one case: ``preprocess`` (read, crop, normalise, resample), ``network`` (sliding windows), ``export``
(back to the input grid, labels, write the file). nnU-Net's are its predictor's own functions, called in sequence
in this process (``preprocessor.run_case``, ``predict_sliding_window_return_logits``,
``convert_predicted_logits_to_segmentation_with_correct_shape`` + its writer), as ``nnUNetv2_predict`` runs them
for a case without its background worker processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def stage_nnunet_predict(timer, model_dir: str, image: str, output: str, mirror: bool, step_size: float,
                         threads: int) -> dict:
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_dir, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    with timer:
        t0 = time.perf_counter()
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case([image], None, predictor.plans_manager, predictor.configuration_manager,
                                                    predictor.dataset_json)
        t1 = time.perf_counter()
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).cpu()
        t2 = time.perf_counter()
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
            num_threads_torch=threads)
        writer = predictor.plans_manager.image_reader_writer_class()
        writer.write_seg(segmentation, output, properties)
        t3 = time.perf_counter()
    return {"preprocess_s": t1 - t0, "network_s": t2 - t1, "export_s": t3 - t2, "shape_network": list(data.shape[1:])}


def stage_segforge_predict(timer, model_dir: str, image: str, output: str, mirror: bool, step_size: float,
                           threads: int) -> dict:
    import torch

    from segforge.inference.predictor import Predictor
    from segforge.io.image import write_image

    torch.set_num_threads(threads)
    predictor = Predictor.from_model_dir(model_dir, folds=[0], device="cpu", step_size=step_size, mirror=mirror)
    with timer:
        t0 = time.perf_counter()
        probabilities, geometry = predictor.probabilities(image)
        t1 = time.perf_counter()
        write_image(output, predictor.labels(probabilities), geometry)
        t2 = time.perf_counter()
    timings = predictor.last_timings
    # read + preprocess are both in "preprocess"; restore + labels + write make "export"
    return {"preprocess_s": (t1 - t0) - timings["network"] - timings["restore"], "network_s": timings["network"],
            "export_s": timings["restore"] + (t2 - t1)}


def train_narrow_model(env: dict, dataset_id: int, dataset_name: str, work: Path, features: list[int], iterations: int) -> Path:
    """An nnU-Net model of nnU-Net's own plan with a narrower network, trained for a few iterations (child process).

    The plan is copied as ``nnUNetPlansNarrow`` with the same ``data_identifier``, so nnU-Net's preprocessed data
    serves it."""
    import os
    import subprocess
    import sys

    pre = Path(env["nnUNet_preprocessed"]) / dataset_name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetPlansNarrow"
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [features[min(i, len(features) - 1)] for i in range(len(arch["features_per_stage"]))]
    (pre / "nnUNetPlansNarrow.json").write_text(json.dumps(plans, indent=2))
    model = Path(env["nnUNet_results"]) / dataset_name / "nnUNetTrainer__nnUNetPlansNarrow__3d_fullres"
    if (model / "fold_0" / "checkpoint_final.pth").is_file():
        return model
    script = (
        "import json, torch; torch.set_num_threads(2)\n"
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        f"plans = json.load(open('{pre / 'nnUNetPlansNarrow.json'}')); plans['continue_training'] = False\n"
        f"t = nnUNetTrainer(plans, '3d_fullres', 0, json.load(open('{pre / 'dataset.json'}')), device=torch.device('cpu'))\n"
        f"t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.num_epochs = {iterations}, 2, 1\n"
        "t.run_training()\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nnU-Net training failed:\n{done.stderr[-3000:]}")
    return model


def stage_segforge_memory(timer, image: str, classes: int, streamed: bool, threads: int) -> dict:
    """Peak memory of predicting ``image`` with a stand-in ``classes``-class network (one 3x3x3 convolution: the test
    is about memory, not compute), labels streamed (``predict``) or from full probabilities (``probabilities``)."""
    import torch
    from torch import nn

    from segforge.inference.predictor import Predictor
    from segforge.io.image import read_case

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = nn.Conv3d(1, classes, 3, padding=1)
    plans = {"channel_names": {"0": "CT"}, "normalization": [{"scheme": "zscore", "use_nonzero_mask": False}],
             "configurations": {"3d_fullres": {"dims": 3, "patch_size": [64, 160, 160],
                                               "target_spacing": [2.5, 0.8, 0.8], "mirror_axes": [0, 1, 2]}}}
    dataset = {"labels": {"background": 0, **{f"class{i}": i for i in range(1, classes)}}, "file_ending": ".nii.gz"}
    predictor = Predictor(plans, dataset, "3d_fullres", [network], torch.device("cpu"), 0.5, False, 2)
    volume, geometry = read_case([image])
    with timer:
        if streamed:
            mask, _ = predictor.predict(volume, geometry)
        else:
            mask = predictor.labels(predictor.probabilities(volume, geometry)[0])
    return {"classes": classes, "streamed": streamed, "input_mb": volume.nbytes / 2**20, "labels_found": int(mask.max())}
