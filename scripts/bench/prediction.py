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


EXTREME_CASES = {
    # name: (shape in numpy order, spacing, channels, file ending); spacing = the stand-in plan's target: no resampling,
    # so the network runs on the full grid (the hardest case for memory)
    "ct1000": ((1000, 512, 512), (1.0, 0.78, 0.78), 1, ".nii"),
    "slide4000": ((1, 4000, 4000), (999.0, 0.5, 0.5), 3, ".tif"),  # 2D: one slice, segforge's fake slice spacing
}


def make_extreme_case(name: str, folder: Path) -> Path:
    """A synthetic case of ``EXTREME_CASES[name]`` (smooth structures in noise), written once; returns its folder."""
    import numpy as np

    from segforge.io.image import Geometry, write_image

    shape, spacing, channels, ending = EXTREME_CASES[name]
    folder = Path(folder) / name
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for c in range(channels):
        if shape[0] > 1:  # CT-like int16: a body ellipse with organs, slice by slice (never float64 x volume)
            image = np.empty(shape, np.int16)
            yy, xx = np.mgrid[:shape[1], :shape[2]]
            for z in range(shape[0]):
                body = ((yy - 256) / 200) ** 2 + ((xx - 256) / 240) ** 2 < 1
                organ = ((yy - 220 - 30 * np.sin(z / 90)) / 60) ** 2 + ((xx - 300) / 80) ** 2 < 1
                image[z] = np.where(body, 40, -1000) + 60 * organ + rng.normal(0, 20, shape[1:]).astype(np.int16)
        else:  # an RGB slide, uint8 per channel
            yy, xx = np.mgrid[:shape[1]:8, :shape[2]:8]
            coarse = (128 + 60 * np.sin(yy / (40 + 10 * c)) * np.cos(xx / 55)).astype(np.float32)
            image = np.kron(coarse, np.ones((8, 8), np.float32))[None, :shape[1], :shape[2]]
            image = np.clip(image + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)
        dims = 3 if shape[0] > 1 else 2
        geometry = Geometry(spacing=spacing, origin=(0.0,) * dims, direction=tuple(np.eye(dims).ravel()), ndim=dims)
        write_image(folder / f"case_{c:04d}{ending}", image, geometry)
        del image
    (folder / "done").write_text("")
    return folder


def stage_segforge_extreme(timer, folder: str, name: str, classes: int, threads: int) -> dict:
    """Peak memory of `segforge predict`'s path (files in, streamed labels out) on an extreme case, with a stand-in
    ``classes``-class network of one convolution (the measure is memory, not compute)."""
    import torch
    from torch import nn

    from segforge.inference.predictor import Predictor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape, spacing, channels, ending = EXTREME_CASES[name]
    dims = 3 if shape[0] > 1 else 2
    network = (nn.Conv3d if dims == 3 else nn.Conv2d)(channels, classes, 3, padding=1)
    configuration = "3d_fullres" if dims == 3 else "2d"
    patch = [64, 160, 160] if dims == 3 else [512, 512]
    plans = {"channel_names": {str(c): ("CT" if dims == 3 else f"rgb{c}") for c in range(channels)},
             "normalization": [{"scheme": "zscore", "use_nonzero_mask": False}] * channels,
             "configurations": {configuration: {"dims": dims, "patch_size": patch, "target_spacing": list(spacing) if dims == 3 else [None, *spacing[1:]],
                                                "mirror_axes": list(range(dims))}}}
    dataset = {"labels": {"background": 0, **{f"class{i}": i for i in range(1, classes)}}, "file_ending": ending}
    predictor = Predictor(plans, dataset, configuration, [network], torch.device("cpu"), 0.5, False, 2)
    files = sorted(Path(folder).glob(f"case_*{ending}"))
    with timer:
        mask, _ = predictor.predict(files)
    voxels = 1
    for n in shape:
        voxels *= n
    return {"classes": classes, "input_mb": channels * voxels * 4 / 2**20, "mask_shape": list(mask.shape),
            "labels_found": int(mask.max())}


def small_network(classes: int, features: int):
    """A stand-in segmentation network (two 1x1x1 convolutions, untrained: the windows' cost, not a real network's) with
    a trained one's kind of output: smooth label maps (class c where the normalised intensity is near a level), so
    the masks compress as real ones do and export costs what it would."""
    import torch
    from torch import nn

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv3d(1, features, 1), nn.ReLU(), nn.Conv3d(features, classes, 1))
            self.register_buffer("levels", torch.linspace(-1.5, 1.5, classes).reshape(1, -1, 1, 1, 1))

        def forward(self, x):
            return 1e-3 * self.body(x) - 4.0 * (x[:, :1] - self.levels) ** 2

    return StandIn()


def stage_segforge_folder(timer, folder: str, output: str, overlap: bool, threads: int, features: int,
                          classes: int, step_size: float = 0.5) -> dict:
    """`segforge predict`'s folder loop (``predict_folder``) over a folder of CT volumes, one case at a time or
    overlapped (``predict.overlap``), with a small stand-in network; busy seconds by stage (summed over cases; in
    the overlapped run the stages run at the same time, so they add up to more than the wall time)."""
    import shutil

    import torch

    from segforge.inference import folder as folder_module
    from segforge.inference.predictor import Predictor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    busy = {"load": 0.0, "network": 0.0, "export": 0.0}

    def timed(stage, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                busy[stage] += time.perf_counter() - start
        return run

    # the stages predict_folder binds when it runs: read + preprocess, network + back to the input grid, write
    stages = {"load": "load_case", "network": "network_case", "export": "export_case"}
    originals = {stage: getattr(folder_module, name) for stage, name in stages.items()}
    plans = {"channel_names": {"0": "CT"}, "normalization": [{"scheme": "zscore", "use_nonzero_mask": False}],
             "configurations": {"3d_fullres": {"dims": 3, "patch_size": [64, 160, 160],
                                               "target_spacing": [2.5, 0.8, 0.8], "mirror_axes": [0, 1, 2]}}}
    dataset = {"labels": {"background": 0, **{f"class{i}": i for i in range(1, classes)}}, "file_ending": ".nii.gz"}
    predictor = Predictor(plans, dataset, "3d_fullres", [small_network(classes, features)], torch.device("cpu"),
                          step_size, False, 2)
    shutil.rmtree(output, ignore_errors=True)
    for stage, name in stages.items():
        setattr(folder_module, name, timed(stage, originals[stage]))
    try:
        with timer:
            results = folder_module.predict_folder(predictor, Path(folder), Path(output), overlap=overlap)
    finally:
        for stage, name in stages.items():
            setattr(folder_module, name, originals[stage])
    failed = [f"{r.case_id}: {r.error}" for r in results if r.status != "written"]
    if failed:
        raise RuntimeError(f"cases not written: {failed}")
    return {"overlap": overlap, "cases": len(results), **{f"{stage}_s": seconds for stage, seconds in busy.items()}}
