"""The CLI grammar, config composition and overrides, and the work-root contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from segforge import __version__
from segforge.cli.main import COMMANDS, compose_config, main, split_overrides


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "override" in capsys.readouterr().out


def test_console_script_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "segforge", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize("name", ["check", "plan", "preprocess", "train", "predict", "evaluate", "demo"])
def test_every_primary_config_composes(name):
    cfg = compose_config(name, [])
    assert "paths" in cfg


def test_override_any_value_and_groups():
    cfg = compose_config("train", ["trainer.max_epochs=5", "model.norm=group", "optim=adamw_cosine",
                                   "data.augmentation.mirror_prob=0.2", "fold=all"])
    assert cfg.trainer.max_epochs == 5
    assert cfg.model.norm == "group"
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.optim.scheduler.schedule == "cosine"
    assert cfg.data.augmentation.mirror_prob == 0.2
    assert cfg.fold == "all"


def test_experiment_then_override_wins():
    cfg = compose_config("train", ["experiment=demo", "trainer.max_epochs=3"])
    assert cfg.trainer.max_epochs == 3
    assert cfg.data.iterations_per_epoch == 50  # from the experiment


def test_precedence_default_env_flag_override(monkeypatch, tmp_path):
    assert compose_config("plan", []).paths.work_root == "segforge_work"
    monkeypatch.setenv("SEGFORGE_WORK", str(tmp_path / "env"))
    cfg = compose_config("plan", [])
    assert cfg.paths.work_root == str(tmp_path / "env")
    assert cfg.paths.preprocessed_root == str(tmp_path / "env")  # sub-roots follow the work root by default
    monkeypatch.setenv("SEGFORGE_RESULTS", str(tmp_path / "results"))
    assert compose_config("plan", []).paths.results_root == str(tmp_path / "results")

    class Args:
        work = str(tmp_path / "flag")
        overrides = []

    assert compose_config("plan", split_overrides(Args)).paths.work_root == str(tmp_path / "flag")
    Args.overrides = [f"paths.work_root={tmp_path / 'override'}"]
    assert compose_config("plan", split_overrides(Args)).paths.work_root == str(tmp_path / "override")


def test_hydra_overrides_from_a_relauncher_are_ignored():
    class Args:
        work = None
        overrides = ["trainer.max_epochs=2", 'hydra.run.dir="/somewhere"', "hydra.job.name=train_ddp_process_1"]

    assert split_overrides(Args) == ["trainer.max_epochs=2"]


def test_print_composed_config(capsys):
    assert main(["train", "some/dataset", "trainer.max_epochs=7", "--cfg", "job"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 7


def test_bad_override_is_a_clear_error_not_a_traceback(capsys):
    assert main(["train", "x", "trainer.no_such_key_at_all"]) != 0
    err = capsys.readouterr().err
    assert "key=value" in err and "Traceback" not in err
    assert main(["train", "x", "nosuchgroup.value=3"]) != 0
    assert "Traceback" not in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(capsys, tmp_path):
    assert main(["plan", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not found" in err


def test_bare_dataset_name_resolves_under_raw_root(tiny_dataset, monkeypatch, capsys):
    monkeypatch.setenv("SEGFORGE_RAW", str(tiny_dataset.parent))
    assert main(["check", tiny_dataset.name]) == 0
    assert main(["check", "1"]) == 0  # numeric id -> Dataset001_*
    assert "no problems" in capsys.readouterr().out


def test_config_files_ship_inside_the_package():
    from segforge.cli.main import CONFIG_DIR

    assert CONFIG_DIR.is_relative_to(Path(__import__("segforge").__file__).parent)
    assert (CONFIG_DIR / "train.yaml").is_file()
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert "configs/**/*.yaml" in pyproject


def test_plan_rules_take_overrides_of_every_kind():
    from segforge.cli.main import compose_config

    cfg = compose_config("plan", ["plan.normalization={0:zscore}", "plan.gpu=a100-80gb", "plan.memory.precision=bf16-mixed",
                                  "plan.configurations=[3d_fullres]", "plan.target_spacing=[2.0,1.0,1.0]"])
    assert dict(cfg.plan.normalization) == {0: "zscore"} and cfg.plan.gpu == "a100-80gb"
    assert cfg.plan.memory.precision == "bf16-mixed" and list(cfg.plan.configurations) == ["3d_fullres"]
    assert list(cfg.plan.target_spacing) == [2.0, 1.0, 1.0]


def test_architecture_choices_are_plain_overrides():
    """model.encoder / upsample / blocks_per_stage are config values (no '+'), and reach the network built from a plan."""
    from hydra.utils import instantiate

    from segforge.nn.unet import ResidualBlock
    from segforge.training.run import network_kwargs

    plan_config = {"dims": 2, "network": {"features_per_stage": [4, 8, 16], "kernel_sizes": [[3, 3]] * 3,
                                          "strides": [[1, 1], [2, 2], [2, 2]], "conv_per_stage": 2, "norm": "instance",
                                          "deep_supervision": True}}
    cfg = compose_config("train", ["model.encoder=residual", "model.blocks_per_stage=[1,2,2]", "model.upsample=interpolate"])
    network = instantiate(network_kwargs(cfg, plan_config, in_channels=1, out_channels=3), _convert_="all")
    assert sum(isinstance(m, ResidualBlock) for m in network.modules()) == 5
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in network.modules())
    plain = instantiate(network_kwargs(compose_config("train", []), plan_config, 1, 3), _convert_="all")
    assert not any(isinstance(m, ResidualBlock) for m in plain.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in plain.modules())
