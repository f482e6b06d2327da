"""Memory traced, not estimated: the tracker, the traced prediction against the real step, and the budget search.

The real CPU step is measured by the same live-storage tracker that the planner runs under fake tensors; plans
are made for a small budget so that the real step stays cheap here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import segforge
from segforge.planning.budget import MemoryBudget
from segforge.planning.memory import GIB, LiveStorageTracker, cuda_peak_bytes, measured_peak_bytes, spec_from_plan
from segforge.planning.fitting import memory_budget, step_spec
from segforge.planning.planner import make_plans
from segforge.planning.topology import patch_candidates

RULES_FILE = Path(segforge.__file__).parent / "configs" / "plan" / "default.yaml"


def small_rules(precision: str, configurations: list[str]):
    rules = OmegaConf.load(RULES_FILE)
    rules.configurations = configurations
    rules.gpu_memory_gb = 0.3
    rules.memory.reserved_gb = 0.05
    rules.memory.precision = precision
    rules.features_base = 8
    rules.features_max_3d = 64
    rules.features_max_2d = 64
    return rules


def fingerprint(spacing, shape, cases=4) -> dict:
    stats = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -1.0, "max": 1.0, "percentile_00_5": -1.0,
             "percentile_99_5": 1.0}
    return {"dataset_name": "Dataset050_Mem", "channel_names": {"0": "MRI"},
            "labels": {"background": 0, "a": 1, "b": 2}, "intensity_foreground": {"0": stats},
            "cases": [{"spacing": list(spacing), "shape_after_crop": list(shape), "relative_size_after_crop": 1.0}
                      for _ in range(cases)]}


SCENARIOS = {
    "3d": (fingerprint([1.0, 1.0, 1.0], [96, 96, 96]), "3d_fullres"),
    "3d_anisotropic": (fingerprint([4.0, 0.8, 0.8], [24, 160, 160]), "3d_fullres"),
    "2d": (fingerprint([1.0, 0.5, 0.5], [20, 384, 384], cases=40), "2d"),
}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_traced_prediction_matches_the_real_step_and_the_search_is_tight(scenario, precision):
    fp, name = SCENARIOS[scenario]
    rules = small_rules(precision, [name])
    plans = make_plans(fp, rules)
    conf = plans["configurations"][name]
    memory = conf["memory"]
    budget = memory_budget(rules)
    assert memory["method"] == "traced" and memory["precision"] == precision
    assert memory["fits_budget"] and budget.fits(memory["predicted_peak_bytes"])
    assert memory["required_bytes"] <= memory["budget_bytes"]
    # the real step, measured by the same tracker, is within 10% of the prediction
    measured = measured_peak_bytes(spec_from_plan(plans, name))
    assert abs(measured - memory["predicted_peak_bytes"]) <= 0.1 * measured, (measured, memory)
    # the budget bites: the next larger candidate of the search was traced and does not fit
    if "next_larger_patch_size" in memory:
        assert not budget.fits(memory["next_larger_peak_bytes"])
        assert memory["next_larger_peak_bytes"] > memory["predicted_peak_bytes"]
    else:  # the whole median image fits: the batch grew until the next sample would not (or hit its cap)
        assert conf["patch_covers_median_fraction"] >= 1.0 or conf["batch_size"] > rules.batch_size_min


def test_next_larger_candidate_is_really_the_one_before_in_the_search():
    fp, name = SCENARIOS["3d"]
    rules = small_rules("bf16-mixed", [name])
    conf = make_plans(fp, rules)["configurations"][name]
    spacing, median = conf["target_spacing"], conf["median_shape"]
    candidates = [p for p, _ in patch_candidates(spacing, median, rules.initial_patch_voxels_3d, rules.min_feature_map,
                                                 rules.max_stages_3d)]
    index = candidates.index(conf["patch_size"])
    assert index > 0 and candidates[index - 1] == conf["memory"]["next_larger_patch_size"]


def test_bigger_budget_bigger_patch_and_a_preset_sets_the_budget():
    fp, name = SCENARIOS["3d"]
    rules = small_rules("bf16-mixed", [name])
    small = make_plans(fp, rules)["configurations"][name]
    rules.gpu_memory_gb = 1.0
    big = make_plans(fp, rules)["configurations"][name]
    assert big["patch_size"] != small["patch_size"]
    assert big["memory"]["predicted_peak_bytes"] > small["memory"]["predicted_peak_bytes"]
    rules.gpu = "A100-80GB"
    assert memory_budget(rules).gpu_memory_gb == 80
    rules.gpu = "no-such-card"
    with pytest.raises(ValueError, match="presets"):
        memory_budget(rules)


def test_tracker_counts_storages_once_and_releases_them():
    tracker = LiveStorageTracker()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes -> 8 blocks of 512
        view = a[10:20]
        assert tracker.current == 4096 and view.untyped_storage().nbytes() == 4000
        b = torch.empty(10, dtype=torch.float32)     # rounds up to one block
        assert tracker.current == 4096 + 512
        del a
        assert tracker.current == 4096 + 512        # the view keeps the storage alive
        del view
        assert tracker.current == 512
        del b
    assert tracker.current == 0 and tracker.peak == 4096 + 512


def test_budget_arithmetic():
    budget = MemoryBudget(8.0, reserved_gb=0.5, margin=0.1)
    assert budget.peak_limit_bytes == int(7.5 * GIB / 1.1)
    assert budget.fits(budget.peak_limit_bytes) and not budget.fits(budget.peak_limit_bytes + 1)


def test_step_spec_carries_the_rules_that_change_memory():
    rules = small_rules("16-mixed", ["3d_fullres"])
    rules.norm, rules.memory.optimizer = "batch", "adamw"
    patch, topo = patch_candidates([1.0, 1.0, 1.0], [64, 64, 64], 64**3, 4, 6)[0]
    spec = step_spec(patch, topo, rules, in_channels=2, num_classes=3, batch_size=2)
    assert (spec.norm, spec.optimizer, spec.precision, spec.in_channels) == ("batch", "adamw", "16-mixed", 2)
    assert spec.features_per_stage[0] == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prediction_against_cuda_max_memory_allocated():
    fp, name = SCENARIOS["3d"]
    rules = small_rules("16-mixed", [name])
    rules.gpu_memory_gb = 2.0
    plans = make_plans(fp, rules)
    predicted = plans["configurations"][name]["memory"]["predicted_peak_bytes"]
    measured = cuda_peak_bytes(spec_from_plan(plans, name))
    assert abs(measured - predicted) <= 0.1 * measured, (measured, predicted)


def denoise_spec(dims: int, **kw):
    from segforge.planning.memory import StepSpec

    args = dict(spatial_dims=dims, in_channels=1, num_classes=1, patch_size=(64, 64) if dims == 2 else (16, 32, 32),
                batch_size=2, features_per_stage=(8, 16, 32, 64), kernel_sizes=((3,) * dims,) * 4,
                strides=((1,) * dims,) + ((2,) * dims,) * 3, norm="group", deep_supervision=False, optimizer="adamw",
                task="denoise", attention_stages=2, cond_mode="scale_shift")
    args.update(kw)
    return StepSpec(**args)


@pytest.mark.parametrize("dims,precision,spatial_cond", [(2, "bf16-mixed", 1), (3, "32-true", 0)])
def test_traced_denoiser_step_matches_the_real_step(dims, precision, spatial_cond):
    """The planner traces the denoising step as configured (Denoiser, attention, extra channels, MSE loss)."""
    from segforge.planning.memory import fake_mode, traced_peak_bytes

    spec, mode = denoise_spec(dims, precision=precision, spatial_cond_channels=spatial_cond), fake_mode()
    traced = traced_peak_bytes(spec, mode)
    measured = measured_peak_bytes(spec)
    assert abs(measured - traced) <= 0.1 * measured, (measured, traced)
    # what the denoiser adds is seen: attention at two stages, and conditioning channels, cost memory
    without_attention = denoise_spec(dims, precision=precision, spatial_cond_channels=spatial_cond, attention_stages=0)
    assert traced > traced_peak_bytes(without_attention, mode)
    more_channels = denoise_spec(dims, precision=precision, spatial_cond_channels=spatial_cond + 2)
    assert traced_peak_bytes(more_channels, mode) > traced
