"""The end-of-training validation of a fold: sliding-window prediction of each validation case on its original
grid (as ``segforge predict`` does), written under ``fold_<k>/validation/`` (optionally with probabilities, for
``segforge select``'s ensembles), and a ``summary.json`` of its metrics.

A stage with a next one (3d_lowres before 3d_cascade_fullres) also writes each mask resampled onto the next stage's
preprocessed grid (``next_stages``: name -> ``NextStage``, its preprocessed folder and the output folder), nnU-Net's
``predicted_next_stage``); a cascade stage predicts with the previous stage's masks (``previous``: case -> mask file on
the original grid)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from segforge.configs import packaged_config
from segforge.evaluation.metrics import evaluate_folders
from segforge.io.dataset import DatasetSpec
from segforge.errors import SegforgeError
from segforge.io.artifacts import read_json, save_npy_atomic, write_json
from segforge.io.image import read_image, write_image
from segforge.preprocessing.cascade import previous_stage_on_grid

log = logging.getLogger("segforge")


def validate_fold(network: torch.nn.Module, plans: dict, dataset_json: dict, configuration: str, spec: DatasetSpec,
                  val_ids: list[str], out_dir: Path, device: torch.device, mirror: bool | None = None,
                  step_size: float | None = None, sw_batch_size: int | None = None, save_probabilities: bool = False,
                  patch_size: list[int] | None = None, mirror_axes: list[int] | None = None,
                  next_stages: dict | None = None,
                  previous: dict[str, Path] | None = None) -> dict:
    """``patch_size``, ``mirror_axes``: those the network was trained with (default: the plan's); ``mirror``,
    ``step_size``, ``sw_batch_size`` left None: ``final_validation.*`` of configs/train.yaml."""
    from segforge.inference.folder import save_probabilities as save_npz
    from segforge.inference.predictor import Predictor

    packaged = packaged_config("train")["final_validation"]
    mirror = bool(packaged["mirror"] if mirror is None else mirror)
    step_size = float(packaged["step_size"] if step_size is None else step_size)
    sw_batch_size = int(packaged["sw_batch_size"] if sw_batch_size is None else sw_batch_size)

    predictor = Predictor(plans, dataset_json, configuration, [network], device, step_size, mirror, sw_batch_size,
                          patch_size=patch_size, mirror_axes=mirror_axes)
    ending = dataset_json.get("file_ending", ".nii.gz")
    cases = [c for c in spec.cases if c.case_id in set(val_ids)]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases, 1):
        prior = read_image(previous[case.case_id])[0] if previous else None
        probabilities, geometry = predictor.probabilities(case.image_files, previous=prior)
        if save_probabilities:  # for ensembles of configurations in `segforge select`
            save_npz(out_dir / case.case_id, probabilities, predictor.class_names, geometry)
        mask = predictor.labels(probabilities)
        write_image(out_dir / f"{case.case_id}{ending}", mask, geometry)
        for name, stage in (next_stages or {}).items():
            write_next_stage(mask, case.case_id, name, stage)
        log.info("validation %d/%d: %s", i, len(cases), case.case_id)
    references = {c.case_id: c.label_file for c in cases}
    return evaluate_folders(out_dir, references, spec.labels, out_dir / "summary.json")


def write_next_stage(mask, case_id: str, name: str, stage) -> None:
    """``CASE.npy``: ``mask`` (original grid) on the next stage's preprocessed grid, and ``CASE.json``, the fold and
    weights that made it (``training.cascade.NextStage``), each written atomically (the source last: a crash between
    leaves a prediction whose source is missing, which is refused, not one of another network)."""
    properties = stage.data_dir / f"{case_id}.json"
    if not properties.is_file():
        raise SegforgeError(f"{properties}: missing, so the prediction for the next stage ({name}) of case {case_id} "
                            f"cannot be written. Fix: run `segforge preprocess DATASET` (it preprocesses {stage.data_dir.name})")
    stage.out_dir.mkdir(parents=True, exist_ok=True)
    source = stage.out_dir / f"{case_id}.json"
    if source.exists():
        source.unlink()
    save_npy_atomic(stage.out_dir / f"{case_id}.npy", previous_stage_on_grid(mask, read_json(properties, "case_properties")))
    write_json(source, {"case": case_id, **stage.source})
