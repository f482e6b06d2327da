"""The planner's decisions on five synthetic fingerprints, with the default (traced, 8 GB) rules.

Each scenario pins nnU-Net's rules as segforge applies them: target spacing, pooling per axis, kernel sizes,
divisibility, configurations present, batch size bounds and normalisation.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import segforge
from segforge.planning.planner import make_plans

RULES = OmegaConf.load(Path(segforge.__file__).parent / "configs" / "plan" / "default.yaml")


def fingerprint(spacings, shapes, channels, relative=0.9) -> dict:
    stats = {"mean": 40.0, "median": 40.0, "std": 30.0, "min": -900.0, "max": 2000.0, "percentile_00_5": -80.0,
             "percentile_99_5": 250.0}
    return {"dataset_name": "Dataset060_Scenario", "channel_names": channels,
            "labels": {"background": 0, "organ": 1, "lesion": 2}, "intensity_foreground": {k: stats for k in channels},
            "cases": [{"spacing": list(sp), "shape_after_crop": list(sh), "relative_size_after_crop": relative}
                      for sp, sh in zip(spacings, shapes)]}


FINGERPRINTS = {
    # BraTS-like: 1 mm isotropic, 4 MRI channels, brain cropped out of a larger field of view
    "brain_mri": fingerprint([[1.0, 1.0, 1.0]] * 30, [[136 + i % 5, 170 + i % 7, 138 + i % 3] for i in range(30)],
                             {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}, relative=0.6),
    # abdominal CT: 0.7 x 0.7 mm in plane, 5 mm slices, 512 x 512 x 80
    "abdomen_ct": fingerprint([[5.0, 0.7, 0.7]] * 40, [[80, 512, 512]] * 40, {"0": "CT"}),
    # microscopy tiles: 2D files (z = 1, spacing 999 by convention)
    "microscopy_2d": fingerprint([[999.0, 1.0, 1.0]] * 12, [[1, 256, 256]] * 12, {"0": "fluorescence"}),
    # 3D files holding one slice each
    "single_slice": fingerprint([[3.0, 0.5, 0.5]] * 20, [[1, 400, 380]] * 20, {"0": "MRI"}),
    # whole-body scale volumes: the fullres patch sees a small part, so 3d_lowres appears
    "huge_volume": fingerprint([[1.0, 1.0, 1.0]] * 10, [[480, 512, 512]] * 10, {"0": "CT"}),
}


@cache
def plans_for(name: str) -> dict:
    return make_plans(FINGERPRINTS[name], RULES)


def total_pooling(conf: dict) -> list[int]:
    strides = conf["network"]["strides"]
    return [math.prod(s[a] for s in strides) for a in range(conf["dims"])]


def dataset_voxels(plans: dict, name: str) -> float:
    """All voxels at the 3D target spacing (2D configurations train on the slices of the same volumes)."""
    spacing = plans["configurations"].get("3d_fullres", plans["configurations"]["2d"])["target_spacing"]
    total = 0.0
    for case in FINGERPRINTS[name]["cases"]:
        total += math.prod(n * s / t if t else n for n, s, t in zip(case["shape_after_crop"], case["spacing"], spacing))
    return total


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_common_rules(name):
    plans = plans_for(name)
    for conf_name, conf in plans["configurations"].items():
        total = total_pooling(conf)
        assert all(p % t == 0 for p, t in zip(conf["patch_size"], total)), conf_name
        assert all(p // t >= RULES.min_feature_map for p, t in zip(conf["patch_size"], total)), conf_name
        assert conf["batch_size"] >= RULES.batch_size_min
        # at most what covers 5% of the dataset's voxels, unless that is below the minimum of 2
        assert conf["batch_size_is_per_device"] is True
        assert conf["memory"]["fits_budget"] and conf["memory"]["gpu_memory_gb"] == 8
        cap_features = RULES.features_max_2d if conf["dims"] == 2 else RULES.features_max_3d
        feats = conf["network"]["features_per_stage"]
        assert feats[0] == 32 and max(feats) <= cap_features
        assert all(b == min(2 * a, cap_features) for a, b in zip(feats, feats[1:]))
        if conf_name != "3d_lowres":  # fewer voxels at its coarser spacing
            cap = RULES.max_dataset_coverage * dataset_voxels(plans, name) / math.prod(conf["patch_size"])
            assert conf["batch_size"] <= max(RULES.batch_size_min, cap), conf_name


def test_brain_mri_isotropic():
    plans = plans_for("brain_mri")
    assert set(plans["configurations"]) == {"2d", "3d_fullres"}  # the patch covers most of the brain: no lowres
    full = plans["configurations"]["3d_fullres"]
    assert full["target_spacing"] == [1.0, 1.0, 1.0]
    assert all(k == [3, 3, 3] for k in full["network"]["kernel_sizes"])
    assert full["network"]["strides"][1:4] == [[2, 2, 2]] * 3
    assert len(full["network"]["strides"]) == 6 and total_pooling(full) in ([32, 32, 32], [16, 32, 32], [32, 32, 16])
    assert full["batch_size"] == 2 and full["patch_covers_median_fraction"] > 0.25
    # nnU-Net's 8 GB plan for BraTS is 128 x 160 x 112; the traced search lands in the same range
    assert 1.2e6 <= math.prod(full["patch_size"]) <= 3.5e6
    two_d = plans["configurations"]["2d"]
    assert two_d["target_spacing"] == [None, 1.0, 1.0]
    assert all(p >= m for p, m in zip(two_d["patch_size"], two_d["median_shape"]))  # whole slices
    assert two_d["batch_size"] > 2
    assert [n["scheme"] for n in plans["normalization"]] == ["zscore"] * 4
    assert all(n["use_nonzero_mask"] for n in plans["normalization"])  # cropping removed 40%


def test_abdomen_ct_anisotropic():
    plans = plans_for("abdomen_ct")
    assert set(plans["configurations"]) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    full = plans["configurations"]["3d_fullres"]
    assert full["target_spacing"] == [5.0, 0.7, 0.7]
    kernels, strides = full["network"]["kernel_sizes"], full["network"]["strides"]
    assert kernels[0] == [1, 3, 3] and kernels[-1] == [3, 3, 3]
    assert strides[1] == [1, 2, 2] and strides[2] == [1, 2, 2]  # in-plane first: 0.7 -> 2.8 mm before z pools
    assert total_pooling(full)[0] < total_pooling(full)[1]
    assert full["patch_size"][1] > full["patch_size"][0] * 4
    low = plans["configurations"]["3d_lowres"]
    assert low["target_spacing"][0] == 5.0 and low["target_spacing"][1] > 0.7  # in-plane coarsened first
    assert low["patch_covers_median_fraction"] >= RULES.lowres_threshold
    assert math.prod(low["median_shape"]) * 2 <= math.prod(full["median_shape"])
    ct = plans["normalization"][0]
    assert ct["scheme"] == "ct" and ct["clip"] == [-80.0, 250.0] and ct["mean"] == 40.0


@pytest.mark.parametrize("name", ["microscopy_2d", "single_slice"])
def test_2d_data_gets_only_a_2d_plan(name):
    plans = plans_for(name)
    assert list(plans["configurations"]) == ["2d"]
    conf = plans["configurations"]["2d"]
    assert conf["dims"] == 2 and conf["target_spacing"][0] is None
    assert all(len(k) == 2 for k in conf["network"]["kernel_sizes"])
    assert all(p >= m for p, m in zip(conf["patch_size"], conf["median_shape"]))
    # whole slices, padded up to the total pooling (64 for 7 stages): 400 x 380 -> 448 x 384
    assert conf["patch_size"] == ([256, 256] if name == "microscopy_2d" else [448, 384])


def test_microscopy_batch_is_capped_by_dataset_size():
    conf = plans_for("microscopy_2d")["configurations"]["2d"]
    # 12 tiles of 256^2: 5% is less than one patch, so the minimum of 2 holds although memory allows far more
    assert conf["batch_size"] == 2


def test_huge_volume_gets_3d_lowres():
    plans = plans_for("huge_volume")
    assert set(plans["configurations"]) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    full, low = plans["configurations"]["3d_fullres"], plans["configurations"]["3d_lowres"]
    cascade = plans["configurations"]["3d_cascade_fullres"]  # 3d_fullres' data and network, after 3d_lowres
    assert cascade["previous_stage"] == "3d_lowres" and low["next_stage"] == ["3d_cascade_fullres"]
    assert {k: v for k, v in cascade.items() if not k.startswith("previous_stage")} == full  # its data identifier too
    assert full["patch_covers_median_fraction"] < RULES.lowres_threshold
    assert low["patch_covers_median_fraction"] >= RULES.lowres_threshold
    ratio = [b / a for a, b in zip(full["target_spacing"], low["target_spacing"])]
    assert ratio[0] > 1.5 and max(ratio) - min(ratio) < 1e-6  # isotropic data coarsens isotropically
    assert low["memory"]["fits_budget"]
