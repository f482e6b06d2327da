"""Every default once, in YAML (issue 18): the code holds no copy of the packaged configs' values, and an override
of each config value that replaced a number in the code reaches the code that uses it."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch

from segforge.cli.main import compose_config
from segforge.configs import packaged_config, packaged_defaults


def test_packaged_defaults_are_fresh_copies_of_the_yaml():
    first = packaged_defaults("data")
    first["augmentation"]["rotation_prob"] = -1.0
    assert packaged_defaults("data")["augmentation"]["rotation_prob"] == 0.2
    assert "defaults" not in packaged_config("train") and packaged_config("train")["final_validation"]["enabled"]
    with pytest.raises(FileNotFoundError, match="no packaged config"):
        packaged_defaults("data", "nonexistent")


def test_augmentation_defaults_live_only_in_the_data_config():
    from segforge.training.augment import AugmentationSettings

    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(AugmentationSettings))
    yaml = packaged_defaults("data")["augmentation"]
    assert {f.name for f in dataclasses.fields(AugmentationSettings)} == set(yaml)
    settings = AugmentationSettings.from_config()
    assert all(getattr(settings, k) == (tuple(v) if isinstance(v, list) else v) for k, v in yaml.items())
    # a None keeps the default of a key that has one; rotation_deg's default is None itself
    assert AugmentationSettings.from_config({"noise_prob": None, "rotation_deg": None}).noise_prob == yaml["noise_prob"]


def test_resampling_defaults_live_only_in_the_plan_config():
    from segforge.preprocessing import resample
    from segforge.preprocessing.pipeline import resampling_settings

    assert not hasattr(resample, "DEFAULT_RESAMPLING")
    packaged = packaged_defaults("plan")["resampling"]
    assert resampling_settings({}) == packaged  # a plans.json from before the rules were recorded
    recorded = {**packaged, "image": "linear"}
    assert resampling_settings({"resampling": recorded}) == recorded  # a plan's own rules win


def test_no_listed_number_is_a_python_default():
    """The numbers issue 18 lists take their defaults from the packaged YAML (None in the signature)."""
    from segforge.inference import generate, sliding_window
    from segforge.planning import fingerprint, normalization
    from segforge.training import budget, denoising, losses, validation

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    assert default(sliding_window.gaussian_weights, "sigma_scale") is None
    assert default(sliding_window.gaussian_weights, "centre_weight") is None
    assert not hasattr(sliding_window, "CENTRE_WEIGHT")
    assert default(losses.DiceCELoss, "smooth") is inspect.Parameter.empty
    assert default(losses.RegionDiceBCELoss, "smooth") is inspect.Parameter.empty
    assert default(normalization.plan_normalization, "nonzero_mask_threshold") is None
    assert default(fingerprint.intensity_stats, "clip_percentiles") is None
    for name in ("total_samples", "seed", "clip_percentiles"):
        assert default(fingerprint.compute_fingerprint, name) is None
    for name in ("repeats", "windows_per_pass", "enough_s"):
        assert default(budget.forward_seconds, name) is None
    for name in ("mirror", "step_size", "sw_batch_size"):
        assert default(validation.validate_fold, name) is None
    assert default(denoising.range_psnr, "range_floor") is None
    assert default(generate.channel_ranges, "percentiles") is None


# ---- an override of each new value reaches the code ------------------------------------------------------------


def test_gaussian_overrides_change_the_importance_map():
    from segforge.inference.sliding_window import gaussian_weights

    patch = (16, 24, 20)
    cfg = compose_config("predict", ["predict.gaussian_sigma=0.25", "predict.gaussian_centre_weight=4"])
    weights = gaussian_weights(patch, cfg.predict.gaussian_sigma, centre_weight=cfg.predict.gaussian_centre_weight)
    centre = [p // 2 for p in patch]
    grids = np.meshgrid(*[np.arange(p) for p in patch], indexing="ij")
    closed = 4 * np.exp(-sum((g - c) ** 2 / (2 * (p / 4) ** 2) for g, c, p in zip(grids, centre, patch)))
    np.testing.assert_allclose(weights.double().numpy(), closed, rtol=2**-11, atol=1e-7)
    assert not torch.equal(weights, gaussian_weights(patch))  # the packaged 1/8 and 10


def test_gaussian_sigma_reaches_the_sliding_window():
    from segforge.inference.sliding_window import sliding_window

    class Ramp(torch.nn.Module):  # each window outputs its own position along x: the weighting shows in the blend
        def forward(self, x):
            return x[:, :1] * 0 + torch.linspace(0, 1, x.shape[-1]).reshape(1, 1, 1, 1, -1)

    image = torch.zeros(1, 8, 8, 24)
    narrow = sliding_window(image, Ramp(), [8, 8, 16], 0.5, progress=False, gaussian_sigma=0.05)
    default = sliding_window(image, Ramp(), [8, 8, 16], 0.5, progress=False)
    assert not torch.allclose(narrow, default)


def test_gaussian_settings_reach_the_predictors_windows(monkeypatch):
    from segforge.inference import predictor as predictor_module

    seen = []

    def recording(image, network, *args, **kwargs):
        seen.append(kwargs)
        return torch.zeros(2, *image.shape[1:])

    monkeypatch.setattr(predictor_module, "sliding_window", recording)
    plans = {"configurations": {"3d_fullres": {"patch_size": [4, 4, 4], "dims": 3, "mirror_axes": [0, 1, 2]}}}
    dataset = {"labels": {"background": 0, "organ": 1}}
    cfg = compose_config("predict", ["predict.gaussian_sigma=0.25", "predict.gaussian_centre_weight=4"])
    predictor = predictor_module.Predictor(plans, dataset, "3d_fullres", [torch.nn.Identity()], torch.device("cpu"),
                                           gaussian_sigma=cfg.predict.gaussian_sigma,
                                           gaussian_centre_weight=cfg.predict.gaussian_centre_weight)
    predictor._sliding_window(np.zeros((1, 4, 4, 4), np.float32), torch.device("cpu"))
    assert seen == [{"gaussian_sigma": 0.25, "gaussian_centre_weight": 4.0}]


def test_loss_overrides_reach_the_training_loss():
    from segforge.training.losses import make_segmentation_loss

    default = make_segmentation_loss(compose_config("train", []).task.loss, 4)
    assert default.weights == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0]) and default.loss.smooth == 1e-5
    cfg = compose_config("train", ["task.loss.deep_supervision_levels=2", "task.loss.smooth=0.5"])
    loss = make_segmentation_loss(cfg.task.loss, 4)
    assert loss.weights == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0]) and loss.loss.smooth == 0.5
    # every output still enters (a zero weight keeps its head in the DDP graph); all four: the lowest too
    assert make_segmentation_loss({"deep_supervision_levels": 4}, 4).weights == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert make_segmentation_loss({"deep_supervision_levels": 9}, 2).weights == pytest.approx([2 / 3, 1 / 3])
    assert make_segmentation_loss(None, 1).weights == [1.0]
    with pytest.raises(ValueError, match="deep_supervision_levels=0"):
        make_segmentation_loss({"deep_supervision_levels": 0}, 4)
    logits, target = torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long)
    assert loss.loss(logits, target) != default.loss(logits, target)  # the smoothing is in the Dice


def _fingerprint(percentiles=None) -> dict:
    stats = {"mean": 40.0, "median": 40.0, "std": 30.0, "min": -900.0, "max": 2000.0,
             "percentile_00_5": -80.0, "percentile_99_5": 250.0, "percentile_01_0": -60.0, "percentile_99_0": 200.0}
    return {"channel_names": {"0": "CT", "1": "T1"}, "intensity_foreground": {"0": stats, "1": stats},
            **({"settings": {"clip_percentiles": percentiles}} if percentiles else {})}


def test_planner_overrides_reach_the_normalisation():
    from segforge.planning.fingerprint import intensity_stats
    from segforge.planning.normalization import plan_normalization

    cfg = compose_config("plan", ["plan.nonzero_mask_threshold=0.5", "fingerprint.clip_percentiles=[1,99]"])
    assert plan_normalization(_fingerprint(), 0.6)[1]["use_nonzero_mask"]  # the packaged 0.75
    assert not plan_normalization(_fingerprint(), 0.6, nonzero_mask_threshold=cfg.plan.nonzero_mask_threshold)[1]["use_nonzero_mask"]
    assert plan_normalization(_fingerprint(), 0.6)[0]["clip"] == [-80.0, 250.0]  # no settings: the packaged 0.5/99.5
    stats = intensity_stats(np.arange(1001.0), cfg.fingerprint.clip_percentiles)
    assert stats["percentile_01_0"] == pytest.approx(10.0) and stats["percentile_99_0"] == pytest.approx(990.0)
    recorded = _fingerprint(list(cfg.fingerprint.clip_percentiles))
    assert plan_normalization(recorded, 0.6)[0]["clip"] == [-60.0, 200.0]


def test_fingerprint_settings_come_from_the_plan_config():
    from segforge.planning.fingerprint import fingerprint_settings

    cfg = compose_config("plan", ["fingerprint.clip_percentiles=[2,98]", "fingerprint.seed=3"])
    assert fingerprint_settings() == {"total_samples": 100000, "seed": 0, "clip_percentiles": [0.5, 99.5]}
    assert fingerprint_settings(cfg.fingerprint.total_samples, cfg.fingerprint.seed, cfg.fingerprint.clip_percentiles) \
        == {"total_samples": 100000, "seed": 3, "clip_percentiles": [2.0, 98.0]}


def test_precision_probe_sizes_come_from_the_plan_config(monkeypatch):
    from omegaconf import OmegaConf

    from segforge.planning import compute
    from segforge.planning.planner import make_plans

    probes = []

    def choose_precision(probe, device, measure, precision):
        probes.append(probe)
        return "32-true", "test"

    monkeypatch.setattr(compute, "choose_precision", choose_precision)
    monkeypatch.setattr(compute, "measure_step_seconds", lambda spec, device="cpu", **kwargs: 1e-3)
    stats = {"mean": 50.0, "median": 50.0, "std": 20.0, "min": 0.0, "max": 100.0, "percentile_00_5": 1.0,
             "percentile_99_5": 99.0}
    fingerprint = {"dataset_name": "Dataset910_Brain", "channel_names": {"0": "T1"},
                   "labels": {"background": 0, "grey": 1}, "intensity_foreground": {"0": stats},
                   "cases": [{"spacing": [2.0, 2.0, 2.0], "shape_after_crop": [80, 96, 80], "relative_size_after_crop": 0.9,
                              "shape_before_crop": [91, 109, 91]}] * 10}
    for overrides, first in (([], 16), (["plan.compute.precision_probe.features_base=8"], 8)):
        rules = compose_config("plan", ["plan.memory.method=analytic", "plan.configurations=[3d_fullres]",
                                        "plan.compute.device=cpu", *overrides]).plan
        make_plans(fingerprint, OmegaConf.create(OmegaConf.to_container(rules)), budget_s=900)
        assert probes[-1].features_per_stage[0] == first


def test_final_validation_and_budget_timing_values_come_from_the_train_config():
    from segforge.training.budget import forward_seconds

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    forward_seconds(Recorder(), 1, [4, 4, 4])  # packaged: 2 repeats after a warm-up, 2 windows a pass
    assert seen == [(2, 1, 4, 4, 4)] * 3
    cfg = compose_config("train", ["budgeting.forward_repeats=1", "final_validation.sw_batch_size=3"])
    seen.clear()
    forward_seconds(Recorder(), 1, [4, 4, 4], repeats=cfg.budgeting.forward_repeats,
                    windows_per_pass=cfg.final_validation.sw_batch_size, enough_s=cfg.budgeting.forward_enough_s)
    assert seen == [(3, 1, 4, 4, 4)] * 2


def test_denoising_range_floor_and_percentiles_come_from_the_config():
    from segforge.inference.generate import channel_ranges
    from segforge.training.denoising import range_psnr, sample_ranges

    flat = torch.ones(2, 1, 4, 4)
    assert torch.allclose(sample_ranges(flat), torch.full((2,), 1e-6))
    cfg = compose_config("train", ["task=denoise", "task.validation.range_floor=0.5"])
    assert torch.allclose(sample_ranges(flat, cfg.task.validation.range_floor), torch.full((2,), 0.5))
    estimate = flat + 0.1
    assert torch.allclose(range_psnr(estimate, flat, cfg.task.validation.range_floor),
                          torch.full((2,), 10 * math.log10(0.25 / 0.01)), rtol=1e-5)

    image = np.random.default_rng(0).random((1, 8, 16, 16)).astype(np.float32)
    cfg = compose_config("denoise", ["range_percentiles=[5,95]"])
    narrow, packaged = channel_ranges(image, None, cfg.range_percentiles)[0], channel_ranges(image)[0]
    assert narrow[0] > packaged[0] and narrow[1] < packaged[1]


def test_segforge_predict_hands_the_gaussian_settings_to_the_predictor(tmp_path, monkeypatch):
    """The command, not only the function: `predict.gaussian_*` on the command line reach ``Predictor``."""
    from segforge.cli.main import main
    from segforge.errors import SegforgeError
    from segforge.inference.predictor import Predictor

    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    images = tmp_path / "images"
    images.mkdir()
    seen = {}

    def recording(cls, model_dir, **kwargs):
        seen.update(kwargs)
        raise SegforgeError("recorded")

    monkeypatch.setattr(Predictor, "from_model_dir", classmethod(recording))
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "--model", str(model),
                 "predict.gaussian_sigma=0.25", "predict.gaussian_centre_weight=4"]) == 2
    assert (seen["gaussian_sigma"], seen["gaussian_centre_weight"]) == (0.25, 4.0)



def test_the_optimizer_is_its_config_entry_and_overrides_reach_it():
    """optim.optimizer is a _partial_ of its class: configure_optimizers builds it with the YAML's values only."""
    from segforge.training.module import SegmentationModule
    from segforge.training.optim import make_optimizer

    def optimizer(overrides):
        cfg = compose_config("train", overrides)
        return SegmentationModule(torch.nn.Linear(2, 2), torch.nn.MSELoss(), cfg.optim.optimizer, 2).configure_optimizers()

    sgd = optimizer([])
    group = sgd.param_groups[0]
    assert type(sgd) is torch.optim.SGD and (group["lr"], group["momentum"], group["nesterov"]) == (0.01, 0.99, True)
    adamw = optimizer(["optim=adamw_cosine", "optim.optimizer.lr=3e-3", "optim.optimizer.weight_decay=0.5"])
    group = adamw.param_groups[0]
    assert type(adamw) is torch.optim.AdamW and group["lr"] == 3e-3 and group["weight_decay"] == 0.5
    assert type(group["betas"]) in (list, tuple)  # a plain container: checkpoints load with weights_only=True
    adam = optimizer(["optim.optimizer._target_=torch.optim.Adam", "~optim.optimizer.momentum", "~optim.optimizer.nesterov"])
    assert type(adam) is torch.optim.Adam
    with pytest.raises(Exception, match="optim.optimizer: cannot make torch.optim.Adam .*~optim.optimizer.momentum"):
        optimizer(["optim.optimizer._target_=torch.optim.Adam"])  # SGD's momentum is no argument of Adam's
    assert not hasattr(make_optimizer, "__defaults__") or make_optimizer.__defaults__ is None


def test_the_metric_ema_decay_comes_from_the_task_config():
    """task.validation.metric_ema_decay (was callbacks.dice_ema_decay) reaches the module SegmentTask builds."""
    from types import SimpleNamespace

    from segforge.training.tasks import SegmentTask

    spec = SimpleNamespace(has_regions=False, labels={"background": 0, "a": 1}, ignore_label=None, num_outputs=2)
    for overrides, decay in (([], 0.9), (["task.validation.metric_ema_decay=0.5"], 0.5)):
        task = SegmentTask(compose_config("train", overrides), spec, {}, None)
        module = task.module(torch.nn.Identity(), {"strides": [[1, 1, 1]], "deep_supervision": False})
        assert module.metric_ema_decay == decay
