"""Training within a wall-clock budget: the compute-aware plan (planning/compute.py), the budget split and pacing
(training/budget.py), the budget recipe, and a budgeted run end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import segforge
from segforge.cli.main import implied_overrides, main
from segforge.errors import SegforgeError
from segforge.planning import compute
from segforge.planning.compute import (Candidate, ComputeBudget, StepTimer, choose_for_budget, choose_precision,
                                       expected_iterations, forward_macs, step_flops)
from segforge.planning.memory import StepSpec
from segforge.planning.planner import make_plans
from segforge.training.budget import split_budget, validation_windows
from segforge.durations import parse_duration

RULES_FILE = Path(segforge.__file__).parent / "configs" / "plan" / "default.yaml"
TRAIN_FILE = Path(segforge.__file__).parent / "configs" / "train.yaml"


@pytest.fixture
def rules():
    rules = OmegaConf.load(RULES_FILE)
    rules.memory.method = "analytic"
    rules.configurations = ["3d_fullres"]
    return rules


def brain_fingerprint(num_cases: int = 20) -> dict:
    stats = {"mean": 50.0, "median": 50.0, "std": 20.0, "min": 0.0, "max": 100.0, "percentile_00_5": 1.0,
             "percentile_99_5": 99.0}
    return {"dataset_name": "Dataset910_Brain", "channel_names": {"0": "T1"},
            "labels": {"background": 0, "grey_matter": 1, "white_matter": 2},
            "intensity_foreground": {"0": stats},
            "cases": [{"spacing": [2.0, 2.0, 2.0], "shape_after_crop": [80, 96, 80], "relative_size_after_crop": 0.9,
                       "shape_before_crop": [91, 109, 91]} for _ in range(num_cases)]}


def fake_device(monkeypatch, tflops: float, overhead_s: float = 0.002) -> list:
    """Steps 'measured' on a device of ``tflops`` effective throughput; the measured specs are recorded."""
    measured = []

    def measure(spec, device="cpu", repeats=2, give_up_after=None):
        measured.append(spec)
        return step_flops(spec) / (tflops * 1e12) + overhead_s

    monkeypatch.setattr(compute, "measure_step_seconds", measure)
    return measured


def budget_plan(rules, budget_s: float) -> dict:
    return make_plans(brain_fingerprint(), rules, budget_s=budget_s)["configurations"]["3d_budget"]


def size(conf: dict) -> float:
    """Work per step of a planned configuration (patch voxels x width)."""
    return math.prod(conf["patch_size"]) * conf["network"]["features_per_stage"][0]


def test_parse_duration_reads_short_forms_and_refuses_nonsense():
    assert parse_duration("15m") == 900 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("00:00:15:00") == 900 and parse_duration(300) == 300 and parse_duration(None) is None
    for bad in ("15x", "0", 0, "-5m", "ab:cd", {"weeks": 1}):
        with pytest.raises(SegforgeError, match="budget=.*Fix: write e.g. budget=15m"):
            parse_duration(bad, "budget")


def test_step_flops_count_convolutions_of_encoder_and_decoder():
    spec = StepSpec(3, 1, 2, (8, 8, 8), 1, (4, 8), ((3, 3, 3), (3, 3, 3)), ((1, 1, 1), (2, 2, 2)), 2)
    encoder = (1 * 4 * 27 + 4 * 4 * 27) * 512 + (4 * 8 * 27 + 8 * 8 * 27) * 64
    decoder = 8 * 4 * 512 + (8 * 4 * 27 + 4 * 4 * 27) * 512 + 4 * 2 * 512
    assert forward_macs(spec) == encoder + decoder
    assert step_flops(spec.__class__(**{**spec.__dict__, "batch_size": 2})) == 2 * step_flops(spec)


def test_budget_plan_shrinks_when_the_measured_throughput_drops(rules, monkeypatch):
    fake_device(monkeypatch, tflops=0.4)
    fast = budget_plan(rules, 900)
    fake_device(monkeypatch, tflops=0.05)
    slow = budget_plan(rules, 900)
    assert size(slow) < size(fast)
    for conf in (fast, slow):
        assert conf["sized_for"]["expected_iterations"] >= conf["sized_for"]["target_iterations"]
        assert conf["sized_for"]["throughput"] == "measured" and conf["sized_for"]["device"] == "cpu"


def test_budget_plan_grows_with_the_budget_and_says_why(rules, monkeypatch):
    measured = fake_device(monkeypatch, tflops=0.1)
    small, large = budget_plan(rules, 300), budget_plan(rules, 3600)
    assert size(small) < size(large)
    sized = large["sized_for"]
    assert sized["budget_s"] == 3600 and "iterations" in sized["reason"] and sized["step_s"] > 0
    # the chosen step was measured itself, not only predicted, and a handful of steps sufficed
    assert any(s.patch_size == tuple(large["patch_size"]) and s.features_per_stage[0] == large["network"]["features_per_stage"][0]
               for s in measured)
    assert sized["steps_measured"] <= 12
    # the budget configuration trains on the full-resolution data and its topology follows its own patch
    assert large["data_identifier"].rpartition("_")[0] == "3d_fullres"  # 3d_fullres_<hash>: its data (test below)
    assert large["target_spacing"] == [2.0, 2.0, 2.0]
    assert len(large["network"]["strides"]) == len(large["network"]["features_per_stage"])


def test_a_gpu_hour_plans_larger_than_a_cpu_quarter_hour(rules, monkeypatch):
    fake_device(monkeypatch, tflops=0.15)  # a 2-core CPU
    cpu = budget_plan(rules, 900)
    gpu_rules = rules.copy()
    gpu_rules.compute.tflops = 20.0
    gpu = budget_plan(gpu_rules, 3600)
    assert size(gpu) > size(cpu)
    assert gpu["sized_for"]["throughput"] == "stated" and gpu["precision"] == "16-mixed"
    assert gpu["patch_size"] == make_plans(brain_fingerprint(), gpu_rules)["configurations"]["3d_fullres"]["patch_size"]


def test_a_hopeless_budget_takes_the_candidate_that_trains_most_and_says_so(rules, monkeypatch):
    fake_device(monkeypatch, tflops=0.001)
    conf = budget_plan(rules, 60)
    assert "no candidate reaches" in conf["sized_for"]["reason"]
    assert conf["sized_for"]["expected_iterations"] < conf["sized_for"]["target_iterations"]


def test_without_a_feasible_candidate_the_final_validation_counts_too():
    """The cheapest step has the smallest patch, hence the most validation windows: when validation would eat the
    budget, a larger patch that leaves more time for training is the better fallback."""
    def spec(edge):
        return StepSpec(3, 1, 2, (edge,) * 3, 2, (8, 16, 32), ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), 2,
                        optimizer="adamw")

    small, large = Candidate(spec(8), 8**3 / 64**3, 4096), Candidate(spec(32), 32**3 / 64**3, 8)
    budget = ComputeBudget(budget_s=100, target_iterations=10**6, coverage_goal=0.5, setup_s=10, validation_cases=4,
                           device="cpu")
    chosen = choose_for_budget([small, large], budget, StepTimer(lambda s: 0.05 if s == small.spec else 0.1))
    assert chosen["candidate"] is large and "no candidate reaches" in chosen["reason"]
    assert chosen["expected_iterations"] > expected_iterations(small, 0.05, budget)


def test_a_slow_precision_is_ruled_out_without_timing_it_fully():
    calls = []

    def measure(spec, give_up_after=None):
        calls.append((spec.precision, give_up_after))
        return 1.0 if spec.precision == "32-true" else 100.0

    spec = StepSpec(3, 1, 2, (16,) * 3, 2, (8, 16, 32), ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), 2)
    precision, why = choose_precision(spec, torch.device("cpu"), measure)
    assert precision == "32-true" and "0.01x" in why
    assert calls == [("32-true", None), ("bf16-mixed", 10.0)]


def test_choose_for_budget_rejects_a_choice_whose_measured_step_is_slower_than_predicted():
    def spec(width, edge):
        return StepSpec(3, 1, 2, (edge,) * 3, 2, (width, 2 * width, 4 * width), ((3, 3, 3),) * 3,
                        ((1, 1, 1), (2, 2, 2), (2, 2, 2)), 2, optimizer="adamw")

    candidates = [Candidate(spec(w, e), e**3 / 64**3, 1) for w in (8, 16) for e in (16, 32, 64)]
    slow = spec(16, 64)

    def measure(s):  # small steps run at the nominal rate, the largest one 4x slower than predicted
        return step_flops(s) / 1e11 * (4.0 if s == slow else 1.0)

    budget = ComputeBudget(budget_s=step_flops(slow) / 1e11 * 120 + 10, target_iterations=100, coverage_goal=1.0,
                           setup_s=10, validation_cases=0, device="cpu")
    chosen = choose_for_budget(candidates, budget, StepTimer(measure))
    assert chosen["candidate"].spec != slow
    assert chosen["expected_iterations"] >= 100


def test_split_budget_adds_up_and_refuses_a_budget_too_small():
    rules = OmegaConf.load(TRAIN_FILE).budgeting
    split = split_budget(600, setup_s=20, forward_s=0.5, windows=40, cases=4, rules=rules)
    reserved = rules.validation_margin * (40 * 0.5 + 4 * rules.seconds_per_case)
    assert split.final_validation_s == pytest.approx(reserved)
    assert split.setup_s + split.training_s + split.final_validation_s + split.finish_s == pytest.approx(600)
    assert split.epoch_s == pytest.approx(split.training_s / rules.validations)
    with pytest.raises(SegforgeError, match="budget=60s leaves"):
        split_budget(60, setup_s=20, forward_s=0.5, windows=40, cases=4, rules=rules)
    assert validation_windows([[1, 20, 64, 64]], [20, 32, 32], 0.5) == 1 * 3 * 3


def test_a_budget_brings_the_budget_recipe_unless_a_recipe_is_given(capsys, tmp_path):
    assert implied_overrides("train", ["budget=15m"]) == ["recipe=budget", "budget=15m"]
    assert implied_overrides("train", ["budget=15m", "recipe=nnunet"]) == ["budget=15m", "recipe=nnunet"]
    assert implied_overrides("train", ["budget=null"]) == ["budget=null"]
    assert implied_overrides("plan", ["budget=15m"]) == ["budget=15m"]
    assert main(["train", str(tmp_path), "budget=15m", "--cfg", "job"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.configuration == "budget" and cfg.trainer.precision == "plan"
    assert main(["train", str(tmp_path), "budget=15m", "recipe=nnunet", "configuration=3d_fullres", "--cfg", "job"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.optim.optimizer._target_ == "torch.optim.SGD" and cfg.configuration == "3d_fullres" and cfg.budget == "15m"


def test_a_budgeted_run_ends_within_its_budget_with_the_schedule_run_out(tmp_path, capsys):
    from conftest import write_dataset

    dataset = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.configurations=[3d_fullres]", "budget=50s",
                 "plan.compute.target_iterations=100"]) == 0
    plans = json.loads((work / dataset.name / "plans_default.json").read_text())
    sized = plans["configurations"]["3d_budget"]["sized_for"]
    assert sized["budget_s"] == 50 and sized["steps_measured"] >= 1
    shared = plans["configurations"]["3d_fullres"]["data_identifier"]  # 3d_budget shares 3d_fullres's data
    assert plans["configurations"]["3d_budget"]["data_identifier"] == shared
    assert [p.name for p in (work / dataset.name / "preprocessed").iterdir()] == [shared]
    assert main(["train", str(dataset), f"paths.work_root={work}", "budget=50s", "trainer.accelerator=cpu",
                 "callbacks.epoch_progress.plot_path=null", "logger.tensorboard=null"]) == 0
    fold = work / dataset.name / "results" / "segment" / "3d_budget" / "fold_0"
    summary = json.loads((fold / "training_summary.json").read_text())
    budget = summary["budget"]
    assert budget["within_budget"] and budget["total_s"] <= 50
    assert summary["epochs"] >= 3  # validations paced by time through the run
    assert "validation_mean_dice" in summary  # the final validation ran inside the budget
    with open(next((fold / "logs").glob("version_*/metrics.csv"))) as handle:
        rates = [float(r["lr"]) for r in csv.DictReader(handle) if r.get("lr")]
    assert rates[-1] < 0.1 * max(rates)  # the cosine schedule spanned the training time and ran out at its end
    config = OmegaConf.load(fold / "config.yaml")
    assert config.optim.optimizer._target_ == "torch.optim.AdamW" and config.configuration == "budget"



def test_forward_seconds_times_windows_in_the_sliding_windows_batches():
    """One window per pass would time PyTorch's slow single-input CPU convolution, which prediction never runs."""
    from segforge.training.budget import forward_seconds

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append((tuple(x.shape), self.training))
            return x

    network = Recorder().train()
    per_window = forward_seconds(network, 1, [4, 4, 4], batch=1, repeats=2)
    assert seen == [((2, 1, 4, 4, 4), False)] * 3 and network.training and per_window >= 0
    seen.clear()
    forward_seconds(network, 1, [4, 4, 4], batch=3, repeats=1)
    assert [shape for shape, _ in seen] == [(3, 1, 4, 4, 4)] * 2
    seen.clear()  # a slow first pass is the measurement: the budget pays for every pass
    assert forward_seconds(network, 1, [4, 4, 4], batch=1, repeats=2, enough_s=-1.0) >= 0 and len(seen) == 1


def test_pacer_caps_validation_and_stops_within_half_a_step_of_the_deadline(monkeypatch):
    """nnU-Net's 25 validation batches of a full-size 3D patch take minutes on a CPU, and Lightning validates once
    more when training stops: a budgeted run caps them to a share of an epoch. A slow step must not start when the
    clock would pass the training time by more than half a step."""
    from types import SimpleNamespace

    from segforge.training import budget as budget_module
    from segforge.training.budget import BudgetPacer, BudgetSplit

    def split(forward_s):
        return BudgetSplit(budget_s=300, setup_s=10, final_validation_s=20, finish_s=10, training_s=260, epoch_s=26,
                           forward_s=forward_s, windows=10, validation_share=0.1)

    slow = SimpleNamespace(cfg={"iterations_per_epoch": 250, "val_iterations": 25}, batch_size=2)
    BudgetPacer(split(1.0), None, slow, first_epoch_steps=7)
    assert slow.cfg == {"iterations_per_epoch": 7, "val_iterations": 1}  # 0.1 x 26 s / (2 x 1 s) -> at least 1
    fast = SimpleNamespace(cfg={"iterations_per_epoch": 250, "val_iterations": 25}, batch_size=2)
    BudgetPacer(split(0.01), None, fast, first_epoch_steps=7)
    assert fast.cfg["val_iterations"] == 25  # 130 would fit: the configured number is the cap

    clock = {"now": 0.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    schedule = SimpleNamespace(elapsed=lambda: clock["now"])
    trainer = SimpleNamespace(should_stop=False, strategy=SimpleNamespace(broadcast=lambda value, src=0: value))
    clock["now"] = -15.0  # 15 s of set-up after the split (trainer, loaders) come out of the training time
    pacer = BudgetPacer(split(1.0), schedule, slow, first_epoch_steps=7)
    clock["now"] = 0.0
    pacer.on_train_start(trainer, None)
    assert pacer.split.training_s == 245 and pacer.split.setup_s == 25 and schedule.max_time_s == 245
    pacer.on_train_epoch_start(trainer, None)
    for now in (0.0, 100.0, 200.0):  # at 200 s, 45 s are left and the last step took 100 s: stop (not at 100 s)
        clock["now"] = now
        pacer.on_train_batch_end(trainer, None, None, None, 0)
        assert trainer.should_stop == (now == 200.0)


def test_the_next_validation_is_capped_by_the_validation_batches_just_timed(monkeypatch):
    """The first cap comes from the plan's window forward; on cores that got busy the batches ran 30x slower and a
    validation took most of an epoch. After a validation (not the sanity check) the cap follows its timed batches,
    in a real Lightning loop, and a resumed run keeps it."""
    from types import SimpleNamespace

    import lightning as L

    from segforge.training import budget as budget_module
    from segforge.training.budget import BudgetPacer, BudgetSplit

    clock = {"now": 0.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: clock["now"])
    split = BudgetSplit(budget_s=300, setup_s=10, final_validation_s=20, finish_s=10, training_s=260, epoch_s=26,
                        forward_s=0.01, windows=10, validation_share=0.1)
    data = SimpleNamespace(cfg={"iterations_per_epoch": 250, "val_iterations": 25}, batch_size=2)
    pacer = BudgetPacer(split, SimpleNamespace(elapsed=lambda: clock["now"]), data, first_epoch_steps=4)
    assert data.cfg == {"iterations_per_epoch": 4, "val_iterations": 25}  # 0.1 x 26 s / 0.02 s: 130, capped

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            clock["now"] += 5.0
            return self.layer(batch).sum()

        def validation_step(self, batch, batch_idx):
            # timed batches of 1.25 s: 0.1 x 26 s fits 2 of them; the sanity check's (10 s) would fit none
            clock["now"] += 10.0 if self.trainer.sanity_checking else 1.25

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                        limit_train_batches=4, limit_val_batches=3, callbacks=[pacer])
    zeros = torch.utils.data.DataLoader(torch.zeros(4, 2), batch_size=1)
    trainer.fit(Tiny(), zeros, zeros)
    assert data.cfg == {"iterations_per_epoch": round(26 / 5.0), "val_iterations": 2}
    resumed = SimpleNamespace(cfg={"iterations_per_epoch": 250, "val_iterations": 25}, batch_size=2)
    again = BudgetPacer(split, None, resumed, first_epoch_steps=4)
    again.load_state_dict(pacer.state_dict())
    assert resumed.cfg == data.cfg
    lower = SimpleNamespace(cfg={"iterations_per_epoch": 250, "val_iterations": 1}, batch_size=2)
    BudgetPacer(split, None, lower, first_epoch_steps=4).load_state_dict(pacer.state_dict())
    assert lower.cfg["val_iterations"] == 1  # resumed with data.val_iterations=1: never above it


class TwoRanks:
    """Broadcasts between two fake DDP ranks: rank 0's calls record what they send, rank 1's receive it in order."""

    def __init__(self):
        from types import SimpleNamespace

        self.sent = []
        self.rank0 = SimpleNamespace(broadcast=lambda obj, src=0: self.sent.append(obj) or obj)
        self.rank1 = SimpleNamespace(broadcast=lambda obj, src=0: self.sent.pop(0))


def test_pacer_ranks_take_rank_0s_split_first_epoch_and_step_counts():
    """Each rank timed its own set-up and forward pass: a rank with its own first epoch or validation batches would
    wait in a collective for ever, or train on a different curve. Rank 0 decides; an epoch's step count is
    broadcast by every rank, also one that measured no step."""
    from types import SimpleNamespace

    from segforge.training.budget import BudgetPacer, BudgetSplit

    def pacer(forward_s, epoch_s, first_epoch_steps):
        split = BudgetSplit(budget_s=300, setup_s=10, final_validation_s=20, finish_s=10, training_s=10 * epoch_s,
                            epoch_s=epoch_s, forward_s=forward_s, windows=10, validation_share=0.1)
        data = SimpleNamespace(cfg={"iterations_per_epoch": 250, "val_iterations": 25}, batch_size=2)
        return BudgetPacer(split, SimpleNamespace(elapsed=lambda: 0.0), data, first_epoch_steps)

    ranks = TwoRanks()
    first, second = pacer(0.25, 40.0, 7), pacer(1.0, 26.0, 3)  # rank 1 is slower
    first.setup(SimpleNamespace(strategy=ranks.rank0), None, "fit")
    second.setup(SimpleNamespace(strategy=ranks.rank1), None, "fit")
    assert second.split == first.split
    assert second.datamodule.cfg == first.datamodule.cfg == {"iterations_per_epoch": 7, "val_iterations": 8}

    first._seconds, first._steps = 4.0, 2  # 2 s a step: 40 s -> 20 steps; rank 1 timed no step
    first.on_train_epoch_end(SimpleNamespace(strategy=ranks.rank0), None)
    second.on_train_epoch_end(SimpleNamespace(strategy=ranks.rank1), None)
    assert second.datamodule.cfg["iterations_per_epoch"] == first.datamodule.cfg["iterations_per_epoch"] == 20
    assert not ranks.sent


def test_a_2d_configuration_of_3d_data_validates_every_slice():
    assert validation_windows([[80, 96, 80]], [96, 80], 0.5) == 80  # one window per slice, 80 slices
    assert validation_windows([[1, 96, 80]], [96, 80], 0.5) == 1    # a 2D image: one slice


def test_step_timing_runs_the_denoisers_step_too():
    """The budget plan times the task's own step: a denoiser takes (x_t, t) and an MSE loss, not Dice+CE."""
    spec = StepSpec(2, 1, 2, (16, 16), 2, (8, 16), ((3, 3), (3, 3)), ((1, 1), (2, 2)), 2, norm="group",
                    deep_supervision=False, precision="32-true", optimizer="adamw", task="denoise",
                    spatial_cond_channels=3)
    assert compute.measure_step_seconds(spec, "cpu", repeats=1) > 0


def test_a_2d_budget_configuration_counts_every_slice_in_its_final_validation(rules, monkeypatch):
    from segforge.inference.sliding_window import window_starts

    fake_device(monkeypatch, tflops=0.1)
    rules.configurations = ["2d"]
    conf = make_plans(brain_fingerprint(), rules, budget_s=900)["configurations"]["2d_budget"]
    sized = conf["sized_for"]
    in_plane = math.prod(len(window_starts(n, p, 0.5)) for n, p in zip([96, 80], conf["patch_size"]))
    windows = sized["final_validation_s"] * 3 * conf["batch_size"] / (4 * sized["step_s"])  # 4 validation cases
    assert windows == pytest.approx(80 * in_plane, rel=0.02)  # 80 slices per case, not one


def test_a_short_2d_budget_keeps_the_patch_floor(rules, monkeypatch):
    """A budget that buys few steps falls back to the candidate that trains most, but not below
    plan.compute.min_coverage_2d of the median image (16x16 of a 96x80 image sees no context)."""
    fake_device(monkeypatch, tflops=0.001)
    rules.configurations = ["2d"]
    conf = make_plans(brain_fingerprint(), rules, budget_s=60)["configurations"]["2d_budget"]
    assert "no candidate reaches" in conf["sized_for"]["reason"]
    assert conf["patch_covers_median_fraction"] >= rules.compute.min_coverage_2d > 0
    rules.compute.min_coverage_2d = 0.0
    unfloored = make_plans(brain_fingerprint(), rules, budget_s=60)["configurations"]["2d_budget"]
    assert unfloored["patch_covers_median_fraction"] < conf["patch_covers_median_fraction"]
    assert math.prod(unfloored["patch_size"]) < math.prod(conf["patch_size"])
