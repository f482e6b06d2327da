"""3d_lowres is a configuration on its own: planned when the fullres patch sees little of the image, then trained
and predicted like any other, with masks written back at the input's geometry."""

from __future__ import annotations

import json

import numpy as np

from conftest import data_identifier_of, write_dataset
from segforge.cli.main import main
from segforge.io.image import read_image

# upsampled target spacing and a tiny budget make the fullres patch cover < 25% of the (small) test images
LOWRES_PLAN = ["plan.features_base=8", "plan.configurations=[3d_fullres,3d_lowres]", "plan.gpu_memory_gb=0.52",
               "plan.memory.reserved_gb=0.5", "plan.target_spacing=[1.0,0.3,0.3]"]


def test_3d_lowres_plans_trains_and_predicts(tmp_path):
    dataset = write_dataset(tmp_path / "Dataset003_Low", num_train=5, num_test=1)
    work = tmp_path / "work"
    roots = [f"paths.work_root={work}"]
    assert main(["plan", str(dataset), *roots, *LOWRES_PLAN]) == 0
    plans = json.loads((work / dataset.name / "plans_default.json").read_text())
    full, low = plans["configurations"]["3d_fullres"], plans["configurations"]["3d_lowres"]
    assert full["patch_covers_median_fraction"] < 0.25 <= low["patch_covers_median_fraction"]
    assert all(lo > fu for lo, fu in zip(low["target_spacing"], full["target_spacing"]))
    manifest = work / dataset.name / "preprocessed" / data_identifier_of(work, dataset.name, "3d_lowres") / "manifest.json"
    assert manifest.is_file()  # plan preprocessed every configuration it planned

    assert main(["train", str(dataset), *roots, "configuration=3d_lowres", "trainer.max_epochs=1",
                 "data.iterations_per_epoch=2", "data.val_iterations=1", "data.num_workers=0",
                 "trainer.accelerator=cpu"]) == 0
    model = work / dataset.name / "results" / "segment" / "3d_lowres"
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "--model", str(model), *roots,
                 "predict.mirror=false"]) == 0
    mask, mask_geometry = read_image(out / "case005.nii.gz")
    image, image_geometry = read_image(dataset / "imagesTs" / "case005_0000.nii.gz")
    assert mask.shape == image.shape and mask.dtype.kind in "iu"
    assert np.allclose(mask_geometry.spacing, image_geometry.spacing)
    assert np.allclose(mask_geometry.origin, image_geometry.origin)
    assert np.allclose(mask_geometry.direction, image_geometry.direction)
