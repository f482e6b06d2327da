"""All folds in one command (issue 19): `segforge train DATASET -m fold=0,1` through Hydra's multirun (basic
launcher: one run after another here), and the SLURM launcher's job parameters composed without a cluster."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import write_dataset
from segforge.cli.main import main
from segforge.cli.multirun import launcher_config, sweep_overrides
from segforge.configs import CONFIG_DIR

QUICK = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "data.iterations_per_epoch=2", "data.val_iterations=1",
         "final_validation.enabled=false", "data.num_workers=0"]


def test_a_multirun_over_folds_trains_each_fold_with_its_own_overrides(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=6)
    work = tmp_path / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.configurations=[3d_fullres]"]) == 0
    assert main(["train", str(dataset), "-m", "fold=0,1", f"paths.work_root={work}", "num_folds=3", *QUICK]) == 0
    model = work / "Dataset001_Tiny" / "results" / "segment" / "3d_fullres"
    folds = sorted(p.parent.name for p in model.glob("fold_*/model_final.pt"))
    assert folds == ["fold_0", "fold_1"]
    for fold in (0, 1):
        recorded = (model / f"fold_{fold}" / "overrides.yaml").read_text()
        assert f"fold={fold}" in recorded and "num_folds=3" in recorded and "hydra" not in recorded
        summary = json.loads((model / f"fold_{fold}" / "training_summary.json").read_text())
        assert summary["fold"] == str(fold)
    sweeps = list((work / "multirun").iterdir())
    assert len(sweeps) == 1 and os.getcwd() != str(sweeps[0])  # the sweep folder under the work root, no chdir


def test_a_failing_job_is_reported_and_the_others_still_run(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=6)
    work = tmp_path / "work"
    assert main(["plan", str(dataset), f"paths.work_root={work}", "plan.configurations=[3d_fullres]"]) == 0
    code = main(["train", str(dataset), "-m", "fold=7,0", f"paths.work_root={work}", "num_folds=3", *QUICK])
    assert code == 2
    err = capsys.readouterr().err
    assert "fold=7 does not exist" in err and "(fold=7" in err
    assert (work / "Dataset001_Tiny" / "results" / "segment" / "3d_fullres" / "fold_0" / "model_final.pt").is_file()


def test_a_sweep_written_wrongly_is_one_clear_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "x"), "-m", "fold=0,1", "nosuchkey=1,2"]) == 2
    assert "nosuchkey" in capsys.readouterr().err


def test_segforge_settings_for_hydra_yield_to_the_users():
    overrides = sweep_overrides(["fold=0,1", "hydra.sweep.dir=/scratch/sweeps"])
    assert "hydra.sweep.dir=/scratch/sweeps" in overrides and "hydra/job_logging=none" in overrides
    assert sum(o.startswith("hydra.sweep.dir=") for o in overrides) == 1


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="needs hydra-submitit-launcher (extra slurm; in dev)")
def test_the_slurm_launcher_composes_with_the_resources_of_its_config():
    launcher = launcher_config(str(CONFIG_DIR), "train", ["hydra/launcher=slurm", "fold=0,1,2,3,4",
                                                         "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                                                         "hydra.launcher.tasks_per_node=4"])
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert (launcher.timeout_min, launcher.cpus_per_task, launcher.mem_gb, launcher.signal_delay_s) == (1440, 8, 64, 120)
    assert "/multirun/" in launcher.submitit_folder


@pytest.mark.parametrize("override", [
    "+hydra.callbacks.x._target_=os.mkdir",                           # Hydra instantiates hydra.callbacks itself
    "+hydra.callbacks.x={_target_:os.mkdir,path:MARK}",
    "hydra.launcher._target_=os.mkdir",                              # ... and the launcher
    "+hydra.callbacks.x=${oc.create:{_target_:os.mkdir,path:MARK}}",  # a node built from a string
    "+hydra.callbacks.x='${\toc.create:\"{_target_: os.mkdir, path: MARK}\"}'",  # ... with a tab OmegaConf takes
])
def test_a_sweep_cannot_make_hydra_instantiate_code(tmp_path, capsys, override):
    """`-m` hands the composed config to Hydra, which builds its launcher, sweeper and callbacks before any job (and
    so before the per-job `_target_` check): their classes must be Hydra's or its plugins'."""
    mark = tmp_path / "ran"
    dataset = write_dataset(tmp_path / "Dataset001_Tiny")
    code = main(["train", str(dataset), "-m", "fold=0,1", f"paths.work_root={tmp_path / 'work'}",
                 override.replace("MARK", str(mark))])
    assert code == 2 and not mark.exists()
    err = capsys.readouterr().err
    assert "Fix: remove the override" in err or "${oc.create" in override and "Fix:" in err  # or no valid override
    assert not (tmp_path / "work" / dataset.name / "results").exists()


def test_the_packaged_launchers_pass_the_sweep_gate():
    from segforge.cli.targets import check_hydra_targets

    check_hydra_targets(launcher_config(str(CONFIG_DIR), "train", ["fold=0,1"], node="hydra"))  # the basic launcher
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        check_hydra_targets(launcher_config(str(CONFIG_DIR), "train", ["fold=0,1", "hydra/launcher=slurm"], node="hydra"))


def test_the_launchers_settings_on_the_command_line_reach_hydra(tmp_path, monkeypatch):
    """`-m ... hydra.launcher.partition=gpu` (README) is handed to Hydra's sweep, not dropped like a relauncher's
    `hydra.run.dir` in a single run."""
    import segforge.cli.multirun as multirun

    seen = {}
    monkeypatch.setattr(multirun, "run_multirun", lambda config_dir, name, overrides, run_job: seen.setdefault("o", overrides) and 0)
    assert main(["train", str(tmp_path), "-m", "fold=0,1", "hydra.sweep.dir=/scratch/s", "+hydra.launcher.x=1"]) == 0
    assert "hydra.sweep.dir=/scratch/s" in seen["o"] and "+hydra.launcher.x=1" in seen["o"]
