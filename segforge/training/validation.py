"""The end-of-training validation of a fold: sliding-window prediction of each validation case on its original
grid (as ``segforge predict`` does), written under ``fold_<k>/validation/`` (optionally with probabilities, for
``segforge select``'s ensembles), and a ``summary.json`` of its metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from segforge.configs import packaged_config
from segforge.evaluation.metrics import evaluate_folders
from segforge.io.dataset import DatasetSpec
from segforge.io.image import write_image

log = logging.getLogger("segforge")


def validate_fold(network: torch.nn.Module, plans: dict, dataset_json: dict, configuration: str, spec: DatasetSpec,
                  val_ids: list[str], out_dir: Path, device: torch.device, mirror: bool | None = None,
                  step_size: float | None = None, sw_batch_size: int | None = None, save_probabilities: bool = False,
                  patch_size: list[int] | None = None, mirror_axes: list[int] | None = None) -> dict:
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
        probabilities, geometry = predictor.probabilities(case.image_files)
        if save_probabilities:  # for ensembles of configurations in `segforge select`
            save_npz(out_dir / case.case_id, probabilities, predictor.class_names, geometry)
        write_image(out_dir / f"{case.case_id}{ending}", predictor.labels(probabilities), geometry)
        log.info("validation %d/%d: %s", i, len(cases), case.case_id)
    references = {c.case_id: c.label_file for c in cases}
    return evaluate_folders(out_dir, references, spec.labels, out_dir / "summary.json")
