"""One precision from plan to training: chosen per device by the plan, traced at, recorded in plans.json, trained at
(``trainer.precision: plan``), an override that outgrows the plan's memory warned about, and ``plan --verify`` at
the planned precision. GPU-only branches run here with ``torch.cuda`` mocked."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import segforge
from segforge.cli.main import compose_config, main
from segforge.planning import budget as budget_module
from segforge.planning.compute import choose_precision
from segforge.planning.memory import GIB, StepSpec, spec_from_plan, traced_peak_bytes
from segforge.planning.planner import make_plans
from segforge.planning.precision import check_step_memory, planned_precision, training_precision

RULES_FILE = Path(segforge.__file__).parent / "configs" / "plan" / "default.yaml"


def rules(**memory):
    rules = OmegaConf.load(RULES_FILE)
    rules.configurations = ["3d_fullres"]
    rules.gpu_memory_gb, rules.memory.reserved_gb = 0.3, 0.05
    rules.features_base, rules.features_max_3d = 8, 64
    rules.memory.update(memory)
    return rules


def fingerprint() -> dict:
    stats = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -1.0, "max": 1.0, "percentile_00_5": -1.0,
             "percentile_99_5": 1.0}
    return {"dataset_name": "Dataset051_Prec", "channel_names": {"0": "MRI"},
            "labels": {"background": 0, "a": 1}, "intensity_foreground": {"0": stats},
            "cases": [{"spacing": [1.0, 1.0, 1.0], "shape_after_crop": [48, 48, 48], "relative_size_after_crop": 1.0}
                      for _ in range(4)]}


def fake_cuda(monkeypatch, bf16: bool, name: str = "NVIDIA A100-SXM4-80GB") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_the_default_training_precision_is_the_plans():
    assert compose_config("train", []).trainer.precision == "plan"
    conf = {"precision": "bf16-mixed", "memory": {"precision": "bf16-mixed"}}
    assert training_precision("plan", conf, on_gpu=True, gpu_bf16=lambda: True)[0] == "bf16-mixed"


@pytest.mark.parametrize("setting,cuda,expected", [
    ({"gpu": "a100-80gb"}, None, "bf16-mixed"),        # a preset with bf16 units, planned on a CPU
    ({"gpu": "t4"}, None, "16-mixed"),                 # a preset without
    ({}, None, "16-mixed"),                            # no card named, no GPU here: what every GPU runs
    ({}, True, "bf16-mixed"),                          # no card named: this machine's GPU decides
    ({}, False, "16-mixed"),
    ({"gpu": "t4", "memory.precision": "32-true"}, True, "32-true"),  # stated: wins
])
def test_the_plan_chooses_the_precision_per_device(monkeypatch, setting, cuda, expected):
    if cuda is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    else:
        fake_cuda(monkeypatch, bf16=cuda)
    config = rules()
    for key, value in setting.items():
        OmegaConf.update(config, key, value)
    precision, why = planned_precision(config)
    assert precision == expected and why


def test_an_unknown_planned_precision_names_the_setting():
    with pytest.raises(ValueError, match="plan.memory.precision='fp8'.*bf16-mixed"):
        planned_precision(rules(precision="fp8"))


def test_plans_json_records_the_precision_and_traces_memory_at_it(monkeypatch):
    traced = []
    real, real_timeline = budget_module.traced_peak_bytes, budget_module.trace_timeline  # a size, or a topology's law
    monkeypatch.setattr(budget_module, "traced_peak_bytes", lambda spec, mode=None: traced.append(spec.precision) or real(spec, mode))
    monkeypatch.setattr(budget_module, "trace_timeline",
                        lambda spec, mode=None: traced.append(spec.precision) or real_timeline(spec, mode))
    config = rules()
    config.gpu = "l4"
    config.gpu_presets = {"l4": 0.3}  # a small card, so the plan's step stays tiny
    plans = json.loads(json.dumps(make_plans(fingerprint(), config)))
    conf = plans["configurations"]["3d_fullres"]
    assert conf["precision"] == conf["memory"]["precision"] == "bf16-mixed" and "l4" in conf["precision_reason"]
    assert traced and set(traced) == {"bf16-mixed"}
    assert traced_peak_bytes(spec_from_plan(plans, "3d_fullres")) == conf["memory"]["predicted_peak_bytes"]
    assert plans["rules"]["memory"]["precision"] == "auto"  # the rules as given


@pytest.mark.parametrize("planned,sized,on_gpu,bf16,expected", [
    ("bf16-mixed", None, True, False, "16-mixed"),   # a GPU without bf16 units: float16, the same memory
    ("16-mixed", None, True, True, "16-mixed"),      # the plan decides on a GPU
    ("16-mixed", None, False, False, "32-true"),     # a CPU has no float16 autocast
    ("bf16-mixed", None, False, False, "32-true"),   # a GPU's bf16 is no reason for a CPU (slow without bf16 units)
    ("bf16-mixed", {"device": "cpu", "throughput": "measured"}, False, False, "bf16-mixed"),  # measured on a CPU
])
def test_training_takes_the_plans_precision_for_its_device(planned, sized, on_gpu, bf16, expected):
    conf = {"precision": planned, "memory": {"precision": planned}, **({"sized_for": sized} if sized else {})}
    assert training_precision("plan", conf, on_gpu=on_gpu, gpu_bf16=lambda: bf16)[0] == expected
    assert training_precision("32-true", conf, on_gpu=on_gpu)[0] == "32-true"  # an override is kept
    # a plans.json from before per-configuration precisions: the one its memory was traced at
    assert training_precision("plan", {"memory": {"precision": "16-mixed"}}, on_gpu=True)[0] == "16-mixed"


def test_budget_precision_on_cuda_follows_the_gpus_bf16_units(monkeypatch):
    import segforge.planning.compute as compute

    spec = StepSpec(3, 1, 2, (16, 16, 16), 2, (4, 8), ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)))
    for units, expected in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(compute, "cuda_supports_bf16", lambda units=units: units)
        assert choose_precision(spec, torch.device("cuda"), measure=None)[0] == expected


def shrink_card(plans: dict) -> dict:
    """``plans`` (traced at 16-mixed) for a card whose budget lies between the step's peak at 16-mixed and at 32-true."""
    memory = plans["configurations"]["3d_fullres"]["memory"]
    half = memory["predicted_peak_bytes"]
    full = traced_peak_bytes(replace(spec_from_plan(plans, "3d_fullres"), precision="32-true"))
    assert full > 1.3 * half
    memory["gpu_memory_gb"] = memory["reserved_bytes"] / GIB + (half + full) / 2 * (1 + memory["margin"]) / GIB
    return plans


def test_an_override_that_outgrows_the_plans_memory_is_warned_with_the_peak_and_the_fix(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("segforge"), "propagate", True)  # main() may have set up segforge's log
    plans = shrink_card(json.loads(json.dumps(make_plans(fingerprint(), rules(precision="16-mixed")))))
    with caplog.at_level(logging.WARNING, logger="segforge.planning.precision"):
        assert check_step_memory(plans, "3d_fullres", "bf16-mixed") is None  # the same 2-byte step: nothing to trace
        assert not caplog.records
        peak = check_step_memory(plans, "3d_fullres", "32-true", dataset="data/Dataset051_Prec")
    message = caplog.records[-1].getMessage()
    assert f"{peak / GIB:.2f} GiB" in message and "trainer.precision=32-true" in message
    assert "segforge plan data/Dataset051_Prec plan.memory.precision=32-true" in message
    batch = plans["configurations"]["3d_fullres"]["batch_size"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segforge.planning.precision"):  # a larger batch at the plan's precision
        check_step_memory(plans, "3d_fullres", "16-mixed", 4 * batch)
    message_batch = caplog.records[-1].getMessage()
    assert f"trainer.precision=16-mixed, batch {4 * batch}" in message_batch and "re-plan" not in message_batch
    assert batch <= int(message_batch.split("data.batch_size=")[1]) < 4 * batch  # at least the plan's own batch fits
    if batch > 1:  # the largest batch that fits at 32-true is named, and it does fit
        smaller = int(message.split("data.batch_size=")[1])
        assert 1 <= smaller < batch
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="segforge.planning.precision"):
            check_step_memory(plans, "3d_fullres", "32-true", smaller)
        assert not caplog.records


def test_a_patch_override_that_outgrows_the_plans_memory_is_warned(caplog, monkeypatch):
    """A data.patch_size override at the plan's own precision and batch: traced at that patch (it was not checked)."""
    monkeypatch.setattr(logging.getLogger("segforge"), "propagate", True)
    plans = shrink_card(json.loads(json.dumps(make_plans(fingerprint(), rules(precision="16-mixed")))))
    conf = plans["configurations"]["3d_fullres"]
    larger = [2 * p for p in conf["patch_size"]]
    with caplog.at_level(logging.WARNING, logger="segforge.planning.precision"):
        assert check_step_memory(plans, "3d_fullres", "16-mixed", patch_size=list(conf["patch_size"])) is None
        assert not caplog.records  # the plan's own patch: nothing to trace
        peak = check_step_memory(plans, "3d_fullres", "16-mixed", patch_size=larger)
    message = caplog.records[-1].getMessage()
    assert peak > conf["memory"]["predicted_peak_bytes"] and f"patch {larger}" in message, message
    assert "re-plan" not in message and "Fix: " in message
    odd = [p + 1 for p in conf["patch_size"]]  # a patch the pooling may not divide: traced or skipped, never raised
    result = check_step_memory(plans, "3d_fullres", "16-mixed", patch_size=odd)
    assert result is None or result > 0


def test_a_denoising_plan_describes_the_denoising_step():
    plans = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
             "rules": {"denoiser_step": {"task": "denoise", "norm": "group", "cond_mode": "scale_shift",
                                         "attention_stages": 1, "deep_supervision": False, "optimizer": "adamw"}},
             "configurations": {"2d": {"dims": 2, "patch_size": [32, 32], "batch_size": 2,
                                       "network": {"features_per_stage": [8, 16], "kernel_sizes": [[3, 3]] * 2,
                                                   "strides": [[1, 1], [2, 2]], "conv_per_stage": 2,
                                                   "norm": "group", "deep_supervision": False},
                                       "memory": {"precision": "bf16-mixed", "optimizer": "adamw"}}}}
    spec = spec_from_plan(plans, "2d")
    assert (spec.task, spec.cond_mode, spec.attention_stages, spec.precision) == ("denoise", "scale_shift", 1, "bf16-mixed")


def test_plan_verify_measures_each_step_at_the_planned_precision(tiny_dataset, tmp_path, monkeypatch, capsys):
    """The success path of ``plan --verify`` on a (mocked) bf16 GPU; the measured peak is a stand-in: the step
    traced at the precision it is given, plus 5 %."""
    import segforge.planning.memory as memory

    fake_cuda(monkeypatch, bf16=True)
    seen = []
    monkeypatch.setattr(memory, "cuda_peak_bytes", lambda spec: seen.append(spec.precision) or int(1.05 * traced_peak_bytes(spec)))
    work = tmp_path / "work"
    assert main(["plan", str(tiny_dataset), f"paths.work_root={work}", "plan.features_base=4", "preprocess.num_workers=0",
                 "plan.configurations=[3d_fullres]", "preprocess.run=false", "--verify"]) == 0
    plans = json.loads((work / tiny_dataset.name / "plans_default.json").read_text())
    assert plans["configurations"]["3d_fullres"]["precision"] == "bf16-mixed" and seen == ["bf16-mixed"]
    row = json.loads((work / tiny_dataset.name / "memory_verification.json").read_text())["configurations"]["3d_fullres"]
    assert row["precision"] == "bf16-mixed" and row["ratio"] == pytest.approx(1.05, abs=1e-3)  # predicted at bf16 too
    assert "verify 3d_fullres at bf16-mixed" in capsys.readouterr().out
    # a named plan's verification has its own file: plan default's stays
    assert main(["plan", str(tiny_dataset), f"paths.work_root={work}", "plan.features_base=4", "preprocess.num_workers=0",
                 "plan.configurations=[3d_fullres]", "preprocess.run=false", "--verify", "plan.name=wide"]) == 0
    named = json.loads((work / tiny_dataset.name / "memory_verification_wide.json").read_text())
    assert named["plans_name"] == "wide" and "3d_fullres" in named["configurations"]
    assert json.loads((work / tiny_dataset.name / "memory_verification.json").read_text())["configurations"]["3d_fullres"] == row


def test_training_warns_when_its_precision_override_outgrows_the_plan(tmp_path, capsys):
    """Through the CLI: a plan fitted at 16-mixed, trained at 32-true on a card it no longer fits: warned, and the
    run records the precision it trained at."""
    from conftest import write_dataset

    dataset = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    paths = [f"paths.work_root={work}", f"paths.preprocessed_root={work / 'pre'}", f"paths.results_root={work / 'res'}"]
    assert main(["plan", str(dataset), *paths, "plan.features_base=4", "plan.configurations=[3d_fullres]",
                 "plan.memory.precision=16-mixed"]) == 0
    plans_path = work / dataset.name / "plans_default.json"
    plans_path.write_text(json.dumps(shrink_card(json.loads(plans_path.read_text()))))  # a hand edit: the card is smaller (preprocessed data stays valid)
    capsys.readouterr()
    assert main(["train", str(dataset), *paths, "trainer.precision=32-true", "trainer.accelerator=cpu",
                 "+trainer.max_steps=1", "data.iterations_per_epoch=1", "data.val_iterations=1",
                 "final_validation.enabled=false", "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("trainer.precision=32-true"))
    assert "predicted to peak at" in warning and "plan.memory.precision=32-true" in warning  # segforge's log: stderr
    fold = work / "res" / dataset.name / "results" / "segment" / "3d_fullres" / "fold_0"
    assert json.loads((fold / "training_summary.json").read_text())["precision"] == "32-true"
