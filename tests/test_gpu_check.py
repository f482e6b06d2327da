"""scripts/gpu_check.py: the quick CPU run goes through every stage and writes gpu_check.json; a failed check, bad
settings and a foreign work folder exit non-zero; a ``callbacks.NAME`` entry (how its step timer gets into training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from segforge.errors import SegforgeError
from segforge.training.components import make_callbacks

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"


def run_check(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--quick",
                           "--bench-root", str(tmp_path / "data"), *extra], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    return done, out / "gpu_check.json"


@pytest.mark.slow
def test_quick_run_measures_every_stage_and_passes(tmp_path):
    done, report_path = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["mode"] == "quick" and report["device"] == "cpu" and report["passed"] is True and report["finished"]
    stages = report["stages"]
    for label, configuration in (("plan_3d", "3d_fullres"), ("plan_2d", "2d")):
        row = stages[label][configuration]
        assert row["measured_peak_bytes"] > 0 and row["predicted_peak_bytes"] > 0
        assert row["ratio"] == pytest.approx(row["measured_peak_bytes"] / row["predicted_peak_bytes"])
        assert row["precision"] in ("16-mixed", "bf16-mixed", "32-true")
    train = stages["train"]  # timed by the TrainingStepTimer that `segforge train` loaded as +callbacks.step_timer
    settings = report["settings"]
    assert train["steps_timed"] == settings["train_steps"] - settings["warmup_steps"]
    assert train["iterations_per_s"] > 0 and 0 <= train["loader_wait_share"] < 1
    assert stages["train_compiled"]["skipped"] and stages["train_nnunet"]["skipped"]
    predict = stages["predict"]
    assert predict["nan_voxels"] == 0 and predict["cpu_float32"]["nan_voxels"] == 0
    assert 0 < predict["network_s"] < predict["wall_s"] and 0 <= predict["non_network_share"] < 1
    assert 0 <= predict["mask_agreement"] <= 1 and predict["cpu_float32"]["accumulate"] == "float32"
    names = [c["name"] for c in report["checks"]]
    assert "predict: NaN voxels" in names and all(c["passed"] is not False for c in report["checks"])
    assert "PASSED" in done.stdout and "predict: mask = CPU float32 mask" in done.stdout  # the table


@pytest.mark.slow
def test_a_failed_check_exits_non_zero_and_is_marked(tmp_path):
    done, report_path = run_check(tmp_path, "--set", "quick.limits.min_mask_agreement=1.01")
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    failed = [c["name"] for c in report["checks"] if c["passed"] is False]
    assert failed == ["predict: mask = CPU float32 mask (share)"]
    assert "FAILED" in done.stdout and "Traceback" not in done.stderr


def test_bad_settings_and_a_foreign_work_folder_exit_2_before_any_work(tmp_path):
    done, report_path = run_check(tmp_path, "--set", "quick.limits.no_such_limit=1")
    assert done.returncode == 2 and "no_such_limit" in done.stderr and "Traceback" not in done.stderr
    assert not report_path.exists()
    (tmp_path / "out" / "work").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "work" / "mine.txt").write_text("a user's file")
    done, report_path = run_check(tmp_path)
    assert done.returncode == 2 and "not made by gpu_check.py" in done.stderr
    assert (tmp_path / "out" / "work" / "mine.txt").read_text() == "a user's file" and not report_path.exists()


class Recorder(L.Callback):
    def __init__(self, tag: str):
        self.tag = tag


def extra_callbacks(entries: dict) -> list:
    from omegaconf import OmegaConf

    return make_callbacks(OmegaConf.create({"callbacks": entries}), "val_dice_ema", True)


def test_callback_entries_make_each_callback_and_name_a_bad_one():
    made = extra_callbacks({"lr": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor",
                                   "logging_interval": "step"}, "off": None})
    assert len(made) == 1 and isinstance(made[0], L.pytorch.callbacks.LearningRateMonitor)
    assert made[0].logging_interval == "step"
    assert extra_callbacks({}) == []
    with pytest.raises(SegforgeError, match="callbacks.timer: cannot make lightning.no_such_module.Timer"):
        extra_callbacks({"timer": {"_target_": "lightning.no_such_module.Timer"}})
    with pytest.raises(SegforgeError, match="callbacks.timer: no_such_module.Timer is not a Lightning callback"):
        extra_callbacks({"timer": {"_target_": "no_such_module.Timer"}})  # outside the packages: not even imported
    with pytest.raises(SegforgeError, match="is not a Lightning callback"):
        extra_callbacks({"od": {"_target_": "collections.OrderedDict"}})
    with pytest.raises(SegforgeError, match="cannot make"):
        extra_callbacks({"lr": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor", "no_such_argument": 1}})
    with pytest.raises(SegforgeError, match="is not a Lightning callback"):  # a class of another package
        extra_callbacks({"rec": {"_target_": f"{__name__}.Recorder", "tag": "x"}})
    with pytest.raises(SegforgeError, match=r"callbacks.rec=True: must be an entry .*Fix: callbacks.rec=null"):
        extra_callbacks({"rec": True})
