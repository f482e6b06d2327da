"""segforge.planning.planner: target spacing, network topology, patch divisibility and whole plans."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import segforge
from segforge.planning.normalization import normalization_scheme
from segforge.planning.planner import make_plans
from segforge.planning.topology import divisible_patch, features_per_stage, patch_candidates, target_spacing, topology

# conftest chdirs into tmp_path, so the config is found through the package, not the working directory
RULES_FILE = Path(segforge.__file__).parent / "configs" / "plan" / "default.yaml"


@pytest.fixture
def rules():
    rules = OmegaConf.load(RULES_FILE)
    rules.memory.method = "analytic"  # rule tests need no tracing (tests/test_memory.py covers the traced search)
    return rules


def stats(mean=50.0, std=20.0, lo=-100.0, hi=300.0) -> dict:
    return {"mean": mean, "median": mean, "std": std, "min": lo - 50, "max": hi + 50,
            "percentile_00_5": lo, "percentile_99_5": hi}


def fingerprint(spacings, shapes, channels=None, relative=0.9) -> dict:
    channels = channels or {"0": "CT"}
    return {
        "dataset_name": "Dataset042_Synth",
        "channel_names": channels,
        "labels": {"background": 0, "organ": 1, "tumour": 2},
        "intensity_foreground": {k: stats() for k in channels},
        "cases": [{"spacing": list(sp), "shape_after_crop": list(sh), "relative_size_after_crop": relative,
                   "shape_before_crop": [s + 4 for s in sh]} for sp, sh in zip(spacings, shapes)],
    }


# ---- target spacing ---------------------------------------------------------------------------------------------


def test_target_spacing_is_per_axis_median_for_isotropic_data():
    spacings = [[1.0, 0.8, 0.9], [1.2, 0.7, 1.1], [0.9, 0.9, 1.0], [1.1, 0.75, 0.95], [1.0, 0.85, 1.05]]
    shapes = [[100, 120, 110]] * 5
    assert target_spacing(spacings, shapes) == pytest.approx(np.median(spacings, axis=0).tolist())


def test_target_spacing_anisotropic_short_axis_uses_10th_percentile():
    z = [3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 7.0]
    spacings = [[s, 0.7, 0.7] for s in z]
    shapes = [[20, 256, 256]] * len(z)
    result = target_spacing(spacings, shapes)
    assert result[0] == pytest.approx(float(np.percentile(z, 10)))
    assert result[0] < np.median(z)
    assert result[1:] == pytest.approx([0.7, 0.7])


def test_target_spacing_anisotropic_never_finer_than_other_axes():
    z = [0.5, 0.5, 0.5, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]  # 10th percentile 0.5 is finer than in-plane
    spacings = [[s, 0.7, 0.8] for s in z]
    shapes = [[20, 256, 256]] * len(z)
    result = target_spacing(spacings, shapes)
    assert result[0] == pytest.approx(0.8)
    assert result[0] >= max(result[1:])


def test_target_spacing_anisotropic_but_long_axis_keeps_median():
    z = [3.0, 4.0, 5.0, 5.0, 5.0, 6.0]
    spacings = [[s, 0.7, 0.7] for s in z]
    shapes = [[200, 256, 256]] * len(z)  # not a short axis: the rule does not apply
    assert target_spacing(spacings, shapes)[0] == pytest.approx(5.0)


# ---- topology ---------------------------------------------------------------------------------------------------


def check_topology(topo: dict, patch: list[int], min_feature_map: int = 4) -> None:
    dims = len(patch)
    assert len(topo["strides"]) == len(topo["kernel_sizes"])
    assert topo["strides"][0] == [1] * dims
    for stride, kernel in zip(topo["strides"], topo["kernel_sizes"]):
        assert len(stride) == len(kernel) == dims
        assert all(s in (1, 2) for s in stride)
        assert all(k in (1, 3) for k in kernel)
    total = [math.prod(s[a] for s in topo["strides"]) for a in range(dims)]
    assert topo["total_pooling"] == total
    assert all(p // t >= min_feature_map for p, t in zip(patch, total)), (patch, total)


def test_topology_isotropic_pools_all_axes():
    topo = topology([128, 128, 128], [1.0, 1.0, 1.0])
    check_topology(topo, [128, 128, 128])
    assert all(s == [2, 2, 2] for s in topo["strides"][1:])
    assert topo["total_pooling"] == [32, 32, 32]
    assert all(k == [3, 3, 3] for k in topo["kernel_sizes"])


@pytest.mark.parametrize("patch,spacing", [
    ([128, 128, 128], [1.0, 1.0, 1.0]),
    ([20, 256, 256], [5.0, 0.7, 0.7]),
    ([13, 37, 90], [1.0, 1.0, 1.0]),
    ([8, 8, 8], [1.0, 1.0, 1.0]),
    ([96, 160, 64], [1.5, 0.8, 0.8]),
    ([512, 33], [0.5, 0.5]),
])
def test_topology_invariants(patch, spacing):
    check_topology(topology(patch, spacing), patch)


def test_topology_min_feature_map_and_max_stages_are_respected():
    topo = topology([64, 64, 64], [1.0, 1.0, 1.0], min_feature_map=8)
    check_topology(topo, [64, 64, 64], min_feature_map=8)
    assert topo["total_pooling"] == [8, 8, 8]
    assert len(topology([1024, 1024], [1.0, 1.0], max_stages=3)["strides"]) == 3
    tiny = topology([6, 6, 6], [1.0, 1.0, 1.0])  # 6 // 2 < 4: nothing to pool
    assert tiny["strides"] == [[1, 1, 1]]
    assert tiny["total_pooling"] == [1, 1, 1]


def test_topology_anisotropic_does_not_pool_z_first():
    patch = [20, 256, 256]
    topo = topology(patch, [5.0, 0.7, 0.7])
    check_topology(topo, patch)
    assert topo["kernel_sizes"][0] == [1, 3, 3]
    assert topo["strides"][1] == [1, 2, 2]
    assert topo["strides"][2] == [1, 2, 2]
    assert topo["total_pooling"][0] < topo["total_pooling"][1]
    # once in-plane spacing has caught up, z is pooled and convolved too
    assert any(s[0] == 2 for s in topo["strides"])
    assert topo["kernel_sizes"][-1] == [3, 3, 3]


def test_topology_2d():
    topo = topology([256, 224], [0.7, 0.7])
    check_topology(topo, [256, 224])
    assert all(len(s) == 2 for s in topo["strides"])
    assert topo["total_pooling"] == [32, 32]


@pytest.mark.parametrize("patch,total", [([30, 100, 257], [4, 32, 32]), ([1, 5, 3], [2, 8, 4]), ([64, 64], [32, 32])])
def test_divisible_patch_pads_up(patch, total):
    result = divisible_patch(patch, total)
    assert all(r % t == 0 and r >= t for r, t in zip(result, total))
    assert all(p <= r < p + t or r == t for r, p, t in zip(result, patch, total))


def test_topology_then_divisible_patch_keeps_min_feature_map():
    for patch in ([23, 45, 67], [9, 13, 130], [17, 17, 17]):
        topo = topology(patch, [1.0, 1.0, 1.0])
        fixed = divisible_patch(patch, topo["total_pooling"])
        assert all(f % t == 0 and f // t >= 4 for f, t in zip(fixed, topo["total_pooling"]))


def test_patch_candidates_start_isotropic_in_mm_clipped_to_the_median_image():
    (first, topo), *_ = patch_candidates([1.0, 1.0, 1.0], [500, 500, 500], 256**3, 4, 6)
    assert first == [256, 256, 256]
    (first, topo), *_ = patch_candidates([2.0, 1.0, 1.0], [500, 500, 500], 256**3, 4, 6)
    assert first[1] == first[2] and abs(first[0] * 2 - first[1]) <= topo["total_pooling"][0] * 2  # same extent in mm
    (first, topo), *_ = patch_candidates([1.0, 1.0, 1.0], [40, 90, 70], 256**3, 4, 6)
    assert all(f - t < m <= f for f, m, t in zip(first, [40, 90, 70], topo["total_pooling"]))


def test_patch_candidates_shrink_the_axis_largest_relative_to_the_median():
    median = [80.0, 358.0, 358.0]
    candidates = patch_candidates([5.0, 0.7, 0.7], median, 256**3, 4, 6)
    sizes = [math.prod(p) for p, _ in candidates]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for (patch, topo), (smaller, _) in zip(candidates, candidates[1:]):
        assert all(p % t == 0 for p, t in zip(patch, topo["total_pooling"]))
        changed = [a for a in range(3) if smaller[a] != patch[a]]
        ratios = [p / m for p, m in zip(patch, median)]
        shrinkable = [a for a in range(3) if patch[a] > topo["total_pooling"][a]]
        assert changed and ratios[changed[0]] == max(ratios[a] for a in shrinkable)
    assert candidates[-1][0][0] <= 16


def test_features_per_stage_and_normalization_scheme():
    assert features_per_stage(6, 32, 320) == [32, 64, 128, 256, 320, 320]
    assert normalization_scheme(" CT ") == "ct"
    assert normalization_scheme("Computed Tomography") == "ct"
    assert normalization_scheme("MRI") == "zscore"
    assert normalization_scheme("T2") == "zscore"


# ---- whole plans ------------------------------------------------------------------------------------------------


def anisotropic_fingerprint(**kw) -> dict:
    spacings = [[5.0, 0.7, 0.7], [5.0, 0.72, 0.72], [4.5, 0.68, 0.68], [5.0, 0.7, 0.7], [5.5, 0.75, 0.75]]
    shapes = [[30, 200, 210], [32, 210, 200], [28, 190, 220], [34, 205, 205], [31, 200, 200]]
    return fingerprint(spacings, shapes, **kw)


def isotropic_fingerprint(**kw) -> dict:
    spacings = [[1.0, 1.0, 1.0], [1.1, 0.9, 0.9], [0.9, 1.0, 1.0]]
    shapes = [[90, 120, 110], [100, 110, 120], [95, 100, 100]]
    return fingerprint(spacings, shapes, **kw)


@pytest.mark.parametrize("make", [anisotropic_fingerprint, isotropic_fingerprint])
def test_make_plans_configurations(rules, make):
    plans = make_plans(make(), rules)
    assert set(plans["configurations"]) == {"2d", "3d_fullres"}
    for name, dims in (("2d", 2), ("3d_fullres", 3)):
        config = plans["configurations"][name]
        assert config["dims"] == dims
        net = config["network"]
        patch = config["patch_size"]
        assert len(patch) == dims
        assert len(net["strides"]) == len(net["kernel_sizes"]) == len(net["features_per_stage"])
        total = [math.prod(s[a] for s in net["strides"]) for a in range(dims)]
        assert all(p % t == 0 for p, t in zip(patch, total)), (patch, total)
        assert all(p // t >= rules.min_feature_map for p, t in zip(patch, total))
        assert config["batch_size"] >= rules.batch_size_min
        assert config["mirror_axes"] == list(range(dims))
        assert len(config["target_spacing"]) == 3
    assert plans["configurations"]["2d"]["target_spacing"][0] is None
    assert plans["configurations"]["3d_fullres"]["network"]["features_per_stage"][-1] <= rules.features_max_3d


def test_make_plans_anisotropic_3d_starts_in_plane(rules):
    net = make_plans(anisotropic_fingerprint(), rules)["configurations"]["3d_fullres"]["network"]
    assert net["kernel_sizes"][0][0] == 1
    assert net["strides"][1][0] == 1


def test_make_plans_normalization(rules):
    plans = make_plans(anisotropic_fingerprint(channels={"0": "CT", "1": "MRI", "2": "ct"}), rules)
    norm = {entry["channel"]: entry for entry in plans["normalization"]}
    assert sorted(norm) == [0, 1, 2]
    assert norm[0]["scheme"] == "ct"
    assert norm[0]["clip"] == [-100.0, 300.0]
    assert norm[0]["mean"] == 50.0 and norm[0]["std"] == 20.0
    assert norm[1]["scheme"] == "zscore"
    assert "clip" not in norm[1]
    assert norm[2]["scheme"] == "ct"


def test_make_plans_nonzero_mask_follows_crop_gain(rules):
    cropped = make_plans(isotropic_fingerprint(channels={"0": "MRI"}, relative=0.5), rules)
    uncropped = make_plans(isotropic_fingerprint(channels={"0": "MRI"}, relative=1.0), rules)
    assert cropped["normalization"][0]["use_nonzero_mask"] is True
    assert uncropped["normalization"][0]["use_nonzero_mask"] is False


def test_make_plans_2d_dataset_has_no_3d_configuration(rules):
    spacings = [[999.0, 0.5, 0.5], [999.0, 0.5, 0.5], [999.0, 0.6, 0.6]]
    shapes = [[1, 300, 280], [1, 310, 300], [1, 290, 290]]
    plans = make_plans(fingerprint(spacings, shapes, channels={"0": "Microscopy"}), rules)
    assert list(plans["configurations"]) == ["2d"]
    config = plans["configurations"]["2d"]
    assert config["target_spacing"][0] is None
    assert config["target_spacing"][1:] == pytest.approx([0.5, 0.5])
    total = [math.prod(s[a] for s in config["network"]["strides"]) for a in range(2)]
    assert all(p % t == 0 for p, t in zip(config["patch_size"], total))


def test_make_plans_2d_dataset_with_only_3d_configured_raises(rules):
    rules.configurations = ["3d_fullres"]
    with pytest.raises(ValueError, match="2D"):
        make_plans(fingerprint([[999.0, 1.0, 1.0]] * 2, [[1, 64, 64]] * 2), rules)


def test_make_plans_respects_a_fixed_target_spacing(rules):
    rules.target_spacing = [2.0, 1.0, 1.0]
    plans = make_plans(isotropic_fingerprint(), rules)
    assert plans["configurations"]["3d_fullres"]["target_spacing"] == [2.0, 1.0, 1.0]
    # z shapes at 2 mm: 90*1.0/2, 100*1.1/2, 95*0.9/2 -> median 45
    assert plans["configurations"]["3d_fullres"]["median_shape"][0] == pytest.approx(45.0)


def test_make_plans_is_json_serialisable_and_deterministic(rules):
    fp = anisotropic_fingerprint(channels={"0": "CT", "1": "T2"})
    original = copy.deepcopy(fp)
    plans = make_plans(fp, rules)
    text = json.dumps(plans)  # no default=: every value must be a plain JSON type
    assert json.loads(text) == plans
    assert fp == original  # the fingerprint is not modified
    assert json.dumps(make_plans(fp, rules)) == text
    assert plans["rules"]["configurations"] == ["2d", "3d_fullres", "3d_lowres"]
    assert plans["dataset_name"] == "Dataset042_Synth"
    assert plans["original_median_spacing"] == pytest.approx([5.0, 0.7, 0.7])


def test_normalization_from_channel_names_and_overrides(rules):
    channels = {"0": "CT", "1": "noNorm", "2": "rescale_to_0_1", "3": "T2"}
    plans = make_plans(anisotropic_fingerprint(channels=channels), rules)
    assert [n["scheme"] for n in plans["normalization"]] == ["ct", "none", "rescale", "zscore"]
    rules.normalization = {0: "zscore", "T2": "none"}  # by index or by name, as `plan.normalization={0:zscore}`
    plans = make_plans(anisotropic_fingerprint(channels=channels), rules)
    assert [n["scheme"] for n in plans["normalization"]] == ["zscore", "none", "rescale", "none"]
    rules.normalization = {1: "histogram"}
    with pytest.raises(ValueError, match="histogram"):
        make_plans(anisotropic_fingerprint(channels=channels), rules)


def test_normalize_rescale_and_none():
    from segforge.preprocessing.normalize import normalize

    image = np.stack([np.linspace(-5, 15, 64, dtype=np.float32).reshape(4, 4, 4)] * 2)
    out = normalize(image.copy(), [{"scheme": "rescale"}, {"scheme": "none"}])
    assert out[0].min() == 0.0 and out[0].max() == pytest.approx(1.0)
    assert np.array_equal(out[1], image[1])
