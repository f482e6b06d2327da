"""`segforge demo` wiring: every step runs through the real commands and the report names where things went.

A reduced run (5 training cases, one short epoch; or a short budget) checks the wiring, not the accuracy; the full
demo's accuracy and time are measured by running `bash scripts/demo.sh` (figures in the README).
"""

from __future__ import annotations

import json


from segforge.cli.main import main

REDUCED = ["num_train=5", "num_test=2", "budget=null",
           "train_overrides=['trainer.max_epochs=1','data.iterations_per_epoch=2','data.val_iterations=1','data.num_workers=0']"]


def test_reduced_demo_runs_every_step_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *REDUCED]) == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert set(report["dice"]) == {"liver", "aorta", "lesion"}
    assert set(report["threshold_baseline_dice"]) == {"liver", "aorta", "lesion"}
    assert all(0.0 <= v <= 1.0 for v in report["threshold_baseline_dice"].values())
    assert {"generate", "check", "plan+preprocess", "train", "predict", "evaluate"} <= set(report["seconds"])
    predictions = sorted(p.name for p in (out / "predictions").glob("*.nii.gz"))
    assert predictions == ["synth_ts000.nii.gz", "synth_ts001.nii.gz"]
    assert (out / "predictions" / "summary.json").is_file()
    assert (out / "work" / "Dataset900_Demo3D" / "results" / "segment" / "3d_fullres" / "fold_0" / "model_final.pt").is_file()
    printed = capsys.readouterr().out
    assert "best threshold" in printed and "report:" in printed


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    foreign = tmp_path / "demo" / "Dataset900_Demo3D"
    foreign.mkdir(parents=True)
    (foreign / "dataset.json").write_text(json.dumps({"description": "my real data"}))
    assert main(["demo", "--out", str(tmp_path / "demo")]) != 0
    assert "not a segforge demo dataset" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["dataset.json"]


def test_a_budgeted_demo_plans_and_trains_the_budget_configuration(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "num_train=5", "num_test=2", "budget=150s",
                 "train_overrides=['data.num_workers=0']"]) == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert report["budget_s"] == 150.0 and 30 <= report["train_budget_s"] < 150 * (1 - 0.17)
    fold = out / "work" / "Dataset900_Demo3D" / "results" / "segment" / "3d_budget" / "fold_0"
    summary = json.loads((fold / "training_summary.json").read_text())
    assert summary["budget"]["budget_s"] == report["train_budget_s"]  # the train child got the time left (whole seconds)
    plans = json.loads((out / "work" / "Dataset900_Demo3D" / "plans_default.json").read_text())
    assert "3d_budget" in plans["configurations"]
    assert "(budget 150)" in capsys.readouterr().out


def test_a_budget_too_small_for_training_is_refused_before_planning(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "num_train=5", "num_test=2", "budget=20s"]) == 2
    err = capsys.readouterr().err
    assert "budget=20s leaves" in err and "Fix: a larger budget" in err
    assert not (tmp_path / "demo" / "work" / "Dataset900_Demo3D" / "plans_default.json").exists()


def test_both_demos_default_to_a_budget_that_ends_them_in_time():
    """budget=auto: 3D within 220 s (scripts/demo.sh's set-up check makes it 4 minutes), 2D within 80 s (with the
    check, 90 s); `budget=null` is the fixed schedule, a duration overrides."""
    from segforge.cli.demo import demo_budget
    from segforge.cli.main import compose_config

    assert demo_budget(compose_config("demo", [])) == 220
    assert demo_budget(compose_config("demo", ["dim=2"])) == 80
    assert demo_budget(compose_config("demo", ["dim=2", "budget=null"])) is None
    assert demo_budget(compose_config("demo", ["dim=2", "budget=2m"])) == 120
