"""`python tests/nnunet_resenc_plan.py PLANNER SPEC_JSON`: nnU-Net v2's own ResEnc planner (``nnUNetPlannerResEncM``,
``L`` or ``XL``) on a described fingerprint, offline: prints its 3d_fullres patch size, batch size and blocks per stage as
JSON. SPEC_JSON holds ``spacing``, ``median_shape``, ``num_cases``, ``channel_names`` and ``labels``.

The planner reads only ``dataset.json`` and ``dataset_fingerprint.json``, so both are written to a temporary
``nnUNet_raw``/``nnUNet_preprocessed`` pair, and its ``get_plans_for_configuration`` is called on the target spacing
and median shape directly (no images needed). A separate process because nnunetv2 reads its ``nnUNet_*`` folders
from the environment when it is imported."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path


def main(planner_name: str, spec: dict) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nnunet_resenc_"))
    name = "Dataset991_ResEncReference"
    raw, pre = root / "raw" / name, root / "preprocessed" / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    pre.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": spec["channel_names"], "labels": spec["labels"],
                                                  "numTraining": 0, "file_ending": ".nii.gz"}))
    stats = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -1.0, "max": 1.0, "percentile_00_5": -1.0,
             "percentile_99_5": 1.0}
    (pre / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [spec["spacing"]], "shapes_after_crop": [spec["median_shape"]],
        "foreground_intensity_properties_per_channel": {k: stats for k in spec["channel_names"]},
        "median_relative_size_after_cropping": 1.0}))
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"))
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as p

    planner = getattr(p, planner_name)(name)
    voxels = math.prod(spec["median_shape"]) * spec["num_cases"]
    plan = planner.get_plans_for_configuration(spec["spacing"], spec["median_shape"], "3d_fullres", voxels, {})
    arch = plan["architecture"]["arch_kwargs"]
    return {"patch_size": [int(v) for v in plan["patch_size"]], "batch_size": int(plan["batch_size"]),
            "blocks_per_stage": list(arch["n_blocks_per_stage"]), "strides": [list(s) for s in arch["strides"]],
            "decoder_convs": list(arch["n_conv_per_stage_decoder"])}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
