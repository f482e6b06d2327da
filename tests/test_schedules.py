"""segforge.training.schedules: learning-rate factors as functions of progress, progress from steps or time,
Lightning max_time parsing, and the callback's resumable clock."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from segforge.errors import SegforgeError
from segforge.durations import parse_duration
from segforge.training.schedules import ScheduleCallback, lr_factor, training_progress

GRID = np.linspace(0.0, 1.0, 41)


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_schedule_ends_and_monotonicity(schedule):
    assert lr_factor(0.0, schedule) == pytest.approx(1.0)
    assert lr_factor(1.0, schedule) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(float(p), schedule) for p in GRID]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert all(0.0 <= v <= 1.0 for v in values)


def test_poly_values():
    assert lr_factor(0.5, "poly", poly_exponent=1.0) == pytest.approx(0.5)
    assert lr_factor(0.5, "poly", poly_exponent=0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(0.75, "poly", poly_exponent=2.0) == pytest.approx(0.0625)


def test_cosine_midpoint():
    assert lr_factor(0.5, "cosine") == pytest.approx(0.5)
    assert lr_factor(0.25, "cosine") == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))


def test_constant_and_unknown_schedule():
    assert all(lr_factor(float(p), "constant") == 1.0 for p in GRID)
    with pytest.raises(ValueError, match="linear"):
        lr_factor(0.5, "linear")


def test_progress_outside_unit_interval_is_clamped():
    assert lr_factor(1.5, "poly") == pytest.approx(0.0)
    assert lr_factor(-0.1, "cosine") == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_warmup_rises_linearly_then_follows_schedule(schedule):
    w = 0.2
    rising = [lr_factor(p, schedule, warmup_fraction=w) for p in (0.05, 0.1, 0.15)]
    assert rising == pytest.approx([0.25, 0.5, 0.75])
    assert rising[1] - rising[0] == pytest.approx(rising[2] - rising[1])  # linear
    assert lr_factor(0.0, schedule, warmup_fraction=w) < 0.01
    assert lr_factor(w, schedule, warmup_fraction=w) == pytest.approx(1.0)
    # after warm-up: the schedule over the remaining progress
    for p in (0.2, 0.4, 0.6, 0.9, 1.0):
        expected = lr_factor((p - w) / (1 - w), schedule)
        assert lr_factor(p, schedule, warmup_fraction=w) == pytest.approx(expected)
    assert lr_factor(1.0, schedule, warmup_fraction=w) == pytest.approx(0.0, abs=1e-12)
    after = [lr_factor(float(p), schedule, warmup_fraction=w) for p in GRID if p >= w]
    assert all(a > b for a, b in zip(after, after[1:]))


def test_training_progress_from_steps_or_time():
    assert training_progress(0, None) == 0.0
    assert training_progress(250, 1000) == pytest.approx(0.25)
    assert training_progress(0, None, elapsed_s=900, max_time_s=3600) == pytest.approx(0.25)
    assert training_progress(5000, 1000) == 1.0  # capped
    assert training_progress(0, None, elapsed_s=7200, max_time_s=3600) == 1.0


def test_training_progress_takes_the_further_of_steps_and_time():
    assert training_progress(100, 1000, elapsed_s=2520, max_time_s=3600) == pytest.approx(0.7)
    assert training_progress(900, 1000, elapsed_s=360, max_time_s=3600) == pytest.approx(0.9)


@pytest.mark.parametrize("schedule,warmup", [("poly", 0.0), ("cosine", 0.0), ("poly", 0.1)])
def test_epoch_and_time_budgeted_runs_share_the_curve(schedule, warmup):
    """The contract: a schedule is a function of progress, whatever measures it."""
    for fraction in (0.0, 0.05, 0.3, 0.5, 0.8, 1.0):
        by_steps = training_progress(int(fraction * 2000), 2000)
        by_time = training_progress(0, None, elapsed_s=fraction * 5400.0, max_time_s=5400.0)
        assert by_steps == pytest.approx(by_time)
        assert lr_factor(by_steps, schedule, warmup_fraction=warmup) == pytest.approx(
            lr_factor(by_time, schedule, warmup_fraction=warmup))
    half = lr_factor(training_progress(500, 1000), schedule, warmup_fraction=warmup)
    assert half == pytest.approx(lr_factor(training_progress(0, None, 1800.0, 3600.0), schedule, warmup_fraction=warmup))
    assert 0.0 < half < 1.0


@pytest.mark.parametrize("value,seconds", [
    ("00:01:30:00", 5400.0),
    ("01:00:00:00", 86400.0),
    ("00:00:00:45", 45.0),
    ({"minutes": 15}, 900.0),
    ({"hours": 1, "seconds": 30}, 3630.0),
    ({"days": 1, "hours": 2}, 93600.0),
    (90, 90.0),
    (12.5, 12.5),
    (None, None),
    ("", None),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


def test_parse_duration_accepts_omegaconf_dicts():
    assert parse_duration(OmegaConf.create({"minutes": 15})) == 900.0
    assert parse_duration(OmegaConf.create({"t": "00:00:02:00"}).t) == 120.0


def test_parse_duration_rejects_unknown_units():
    with pytest.raises(SegforgeError, match="trainer.max_time=.*not a positive duration"):
        parse_duration({"weeks": 1}, "trainer.max_time")


def test_callback_progress_resumes_from_saved_clock():
    callback = ScheduleCallback("poly", 0.9, 0.0, total_steps=None, max_time_s=3600.0)
    assert callback.progress(0) == 0.0
    callback.load_state_dict({"elapsed_s": 1800.0})
    assert callback.state_dict()["elapsed_s"] == pytest.approx(1800.0)
    assert callback.progress(0) == pytest.approx(0.5)
    steps = ScheduleCallback("poly", 0.9, 0.0, total_steps=1000, max_time_s=None)
    assert steps.progress(500) == pytest.approx(0.5)
    assert lr_factor(steps.progress(500)) == pytest.approx(lr_factor(callback.progress(0)))


def test_every_rank_follows_rank_0s_clock():
    """Under DDP (max_time or a budget) a rank's own clock would give it its own learning rate, and the ranks'
    weights would drift apart: every rank takes rank 0's elapsed time."""
    from types import SimpleNamespace

    import torch

    callback = ScheduleCallback("poly", 0.9, 0.0, total_steps=None, max_time_s=3600.0)
    callback.on_train_start(None, None)  # this rank's clock: about 0 s
    sent = []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rank1 = SimpleNamespace(world_size=2, global_step=3, optimizers=[optimizer],
                            strategy=SimpleNamespace(broadcast=lambda value, src=0: sent.append(value) or 1800.0))
    callback.on_train_batch_start(rank1, SimpleNamespace(log=lambda *a, **k: None), None, 0)
    assert len(sent) == 1 and sent[0] < 60  # it sent its own clock, and took rank 0's: half the time is gone
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_factor(0.5, "poly", 0.9))
