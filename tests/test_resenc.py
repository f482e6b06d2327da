"""nnU-Net's residual-encoder presets (``plan=resenc_m|resenc_l|resenc_xl``): the rules they compose, the traced peak
of the residual step against the real one, ResEnc-L plans for BraTS- and AMOS-like data beside nnU-Net's own ResEnc-L
planner (``tests/nnunet_resenc_plan.py``), the plan's encoder trained, and another encoder at training warned of."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import segforge
from segforge.cli.main import compose_config, main
from segforge.planning.budget import LAW_TOLERANCE_BYTES
from segforge.planning.memory import measured_peak_bytes, spec_from_plan, traced_peak_bytes
from segforge.planning.planner import make_plans

PLAN_CONFIGS = Path(segforge.__file__).parent / "configs" / "plan"
NNUNET_BLOCKS = [1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]  # ResEncUNetPlanner.UNet_blocks_per_stage_encoder
PRESETS = {"resenc_m": 8, "resenc_l": 24, "resenc_xl": 40}  # nnUNetPlannerResEnc*'s gpu_memory_target_in_gb


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_is_the_default_rules_with_nnunets_residual_encoder(preset):
    default, rules = compose_config("plan", []).plan, compose_config("plan", [f"plan={preset}"]).plan
    assert default.name == "default" and default.encoder == "plain"
    assert rules.name == preset and rules.gpu_memory_gb == PRESETS[preset]
    assert rules.encoder == "residual" and list(rules.blocks_per_stage) == NNUNET_BLOCKS
    assert rules.conv_per_stage == 1 and rules.max_dataset_coverage == 1.0  # nnU-Net: one decoder conv, no 5% cap
    changed = {k for k in default if OmegaConf.to_container(default)[k] != OmegaConf.to_container(rules)[k]}
    same_card = {"gpu_memory_gb"} if default.gpu_memory_gb == PRESETS[preset] else set()  # ResEnc M: 8 GB as the default
    assert changed == {"name", "gpu_memory_gb", "encoder", "blocks_per_stage", "conv_per_stage",
                       "max_dataset_coverage"} - same_card
    # the file says it starts from the default rules (Hydra defaults), so a later default reaches every preset
    assert yaml.safe_load((PLAN_CONFIGS / f"{preset}.yaml").read_text())["defaults"][0] == "default"


def test_the_presets_blocks_are_nnunets():
    """The transcribed block counts, decoder convolutions and lifted batch cap are those of the installed nnunetv2."""
    planners = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.residual_unets."
                                   "residual_encoder_unet_planners")
    source = Path(planners.__file__).read_text()
    assert f"self.UNet_blocks_per_stage_encoder = {tuple(NNUNET_BLOCKS)}" in source
    assert "self.UNet_blocks_per_stage_decoder = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)" in source
    for name, gb in PRESETS.items():
        planner = getattr(planners, f"nnUNetPlannerResEnc{name.removeprefix('resenc_').upper()}")
        assert planner.__init__.__defaults__[0] == gb


def small_fingerprint(spacing, shape, channels=("MRI",), cases=4) -> dict:
    stats = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -1.0, "max": 1.0, "percentile_00_5": -1.0,
             "percentile_99_5": 1.0}
    return {"dataset_name": "Dataset052_ResEnc", "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": {"background": 0, "a": 1, "b": 2}, "intensity_foreground": {str(i): stats for i in range(len(channels))},
            "cases": [{"spacing": list(spacing), "shape_after_crop": list(shape), "relative_size_after_crop": 1.0}
                      for _ in range(cases)]}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_traced_residual_step_peaks_as_the_real_step(precision):
    rules = compose_config("plan", ["plan=resenc_m", "plan.configurations=[3d_fullres]", "plan.gpu_memory_gb=0.15",
                                    "plan.memory.reserved_gb=0.05", f"plan.memory.precision={precision}",
                                    "plan.features_base=8", "plan.features_max_3d=64"]).plan
    plans = make_plans(small_fingerprint([1.0, 1.0, 1.0], [32, 48, 48]), rules)
    conf = plans["configurations"]["3d_fullres"]
    stages = len(conf["network"]["strides"])
    assert conf["network"]["encoder"] == "residual" and conf["network"]["blocks_per_stage"] == NNUNET_BLOCKS[:stages]
    assert conf["memory"]["fits_budget"] and conf["memory"]["precision"] == precision
    spec = spec_from_plan(plans, "3d_fullres")
    assert spec.encoder == "residual" and spec.blocks_per_stage == tuple(NNUNET_BLOCKS[:stages])
    # the same tracker on the real CPU step: the fake-tensor trace agrees within a few allocator blocks (measured:
    # equal at 32-true, 13 KiB apart in 93 MiB at bf16-mixed), and the plan's peak is that trace
    measured = measured_peak_bytes(spec)
    assert abs(traced_peak_bytes(spec) - measured) <= LAW_TOLERANCE_BYTES
    assert abs(conf["memory"]["predicted_peak_bytes"] - measured) <= LAW_TOLERANCE_BYTES
    # the residual network was traced, not the plain one: its step at the same patch and batch peaks higher
    assert measured > traced_peak_bytes(replace(spec, encoder="plain", blocks_per_stage=None, conv_per_stage=2))


def nnunet_resenc_plan(planner: str, spacing, shape, channels, labels, cases) -> dict:
    """nnU-Net's own planner on the same fingerprint, in its own process (it reads its folders from the environment)."""
    spec = {"spacing": spacing, "median_shape": shape, "num_cases": cases,
            "channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "nnunet_resenc_plan.py"), planner,
                          json.dumps(spec)], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# (spacing, median shape at that spacing, channels, classes, cases): BraTS 2021 and an abdominal CT like AMOS 2022
RESENC_L_SCENARIOS = {
    "brats": ([1.0, 1.0, 1.0], [138, 169, 138], ["T1", "T1ce", "T2", "FLAIR"], 4, 1251),
    "amos": ([2.0, 0.7, 0.7], [100, 400, 400], ["CT"], 16, 360),
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(RESENC_L_SCENARIOS))
def test_resenc_l_plans_beside_nnunets_resenc_l_planner(scenario):
    """segforge's ResEnc-L patch and batch come from the traced peak of the residual step on 24 GB; nnU-Net's from
    its reference constants. They agree closely (measured: BraTS both 160x192x160 batch 3; AMOS segforge 64x256x320,
    nnU-Net 80x256x256, the same voxels, batch 2 both: the two break a tie of patch/median ratios on other axes)."""
    spacing, shape, channels, classes, cases = RESENC_L_SCENARIOS[scenario]
    labels = {"background": 0, **{f"class{i}": i for i in range(1, classes)}}
    fingerprint = small_fingerprint(spacing, shape, channels, cases)
    fingerprint["labels"] = labels
    rules = compose_config("plan", ["plan=resenc_l", "plan.configurations=[3d_fullres]"]).plan
    conf = make_plans(fingerprint, rules)["configurations"]["3d_fullres"]
    memory, network = conf["memory"], conf["network"]
    assert memory["method"] == "traced" and memory["gpu_memory_gb"] == 24 and memory["fits_budget"]
    assert network["encoder"] == "residual" and network["conv_per_stage"] == 1
    assert network["blocks_per_stage"] == NNUNET_BLOCKS[:len(network["strides"])]
    assert "next_larger_patch_size" not in memory or memory["next_larger_peak_bytes"] > memory["predicted_peak_bytes"]
    pytest.importorskip("nnunetv2")
    theirs = nnunet_resenc_plan("nnUNetPlannerResEncL", spacing, shape, channels, labels, cases)
    assert theirs["blocks_per_stage"] == network["blocks_per_stage"]
    ours_voxels, their_voxels = (p[0] * p[1] * p[2] for p in (conf["patch_size"], theirs["patch_size"]))
    assert 0.75 <= ours_voxels / their_voxels <= 1.33, (conf["patch_size"], theirs)
    assert abs(conf["batch_size"] - theirs["batch_size"]) <= 1, (conf["batch_size"], theirs)


QUICK = ["optim=adamw_cosine", "trainer.max_epochs=1", "data.iterations_per_epoch=2", "data.val_iterations=1",
         "trainer.accelerator=cpu", "final_validation.enabled=false", "callbacks.epoch_progress.plot_path=null",
         "logger.tensorboard=null"]


def roots(work: Path, results: str) -> list[str]:
    return [f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}", f"paths.results_root={work / results}"]


def trained_network(work: Path, dataset: Path, results: str, plans: str = "default") -> dict:
    folder = "3d_fullres" if plans == "default" else f"3d_fullres__{plans}"  # a preset names its plans
    fold = work / results / dataset.name / "results" / "segment" / folder / "fold_0"
    return yaml.safe_load((fold / "network.yaml").read_text())


@pytest.fixture(scope="module")
def resenc_planned(tmp_path_factory):
    from conftest import write_dataset

    base = tmp_path_factory.mktemp("resenc")
    dataset = write_dataset(base / "Dataset001_Tiny")
    work = base / "work"
    assert main(["plan", str(dataset), *roots(work, "res"), "plan=resenc_m", "plan.features_base=4",
                 "plan.configurations=[3d_fullres]"]) == 0
    return dataset, work


def test_a_preset_plan_trains_its_residual_encoder(resenc_planned, caplog):
    dataset, work = resenc_planned
    plans = json.loads((work / dataset.name / "plans_resenc_m.json").read_text())  # the preset's own name
    assert plans["plans_name"] == "resenc_m"
    network = plans["configurations"]["3d_fullres"]["network"]
    assert network["encoder"] == "residual" and network["blocks_per_stage"] == NNUNET_BLOCKS[:len(network["strides"])]
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(dataset), *roots(work, "res"), "plans=resenc_m", *QUICK]) == 0
    trained = trained_network(work, dataset, "res", "resenc_m")
    assert trained["encoder"] == "residual" and trained["blocks_per_stage"] == network["blocks_per_stage"]
    assert not [r for r in caplog.records if "model.encoder" in r.getMessage()]  # the plan's own network: no warning
    # an explicit override still wins: the plain encoder on the residual plan, traced and warned of
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(dataset), *roots(work, "plain"), "plans=resenc_m", *QUICK, "model.encoder=plain"]) == 0
    assert trained_network(work, dataset, "plain", "resenc_m")["encoder"] == "plain"
    warned = [r.getMessage() for r in caplog.records if "model.encoder=plain" in r.getMessage()]
    assert warned and "GiB" in warned[0] and "plan=resenc_m" in warned[0]


def test_the_residual_encoder_on_a_plain_plan_is_traced_and_warned_of(tmp_path, caplog):
    from conftest import write_dataset

    dataset = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    assert main(["plan", str(dataset), *roots(work, "res"), "plan.features_base=4", "plan.configurations=[3d_fullres]"]) == 0
    plans = json.loads((work / dataset.name / "plans_default.json").read_text())
    assert plans["configurations"]["3d_fullres"]["network"]["encoder"] == "plain"
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(dataset), *roots(work, "res"), *QUICK, "model.encoder=residual"]) == 0
    assert trained_network(work, dataset, "res")["encoder"] == "residual"
    warned = [r.getMessage() for r in caplog.records if "model.encoder=residual" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    # the residual network's own traced peak, not the plain plan's
    residual = replace(spec_from_plan(plans, "3d_fullres"), encoder="residual", blocks_per_stage=None,
                       precision=plans["configurations"]["3d_fullres"]["memory"]["precision"])
    assert f"{traced_peak_bytes(residual) / 2**30:.2f} GiB" in warned[0]
    assert "plan=resenc_m" in warned[0]
