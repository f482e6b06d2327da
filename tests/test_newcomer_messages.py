"""Messages a newcomer meets: a typo in an override key or a group option names the closest existing one; a
command given the wrong kind of folder says which command takes it (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segforge.cli.folder_kinds import folder_kind
from segforge.cli.main import main


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_epoch=5", "there is no setting trainer.max_epoch; did you mean trainer.max_epochs? Fix: trainer.max_epochs=5"),
    ("optim.optimizer.lrr=0.01", "did you mean optim.optimizer.lr? Fix: optim.optimizer.lr=0.01"),
    ("optm=sgd_poly", "did you mean optim? Fix: optim=sgd_poly"),
    ("optim=sgd_polly", "optim has no option 'sgd_polly' (options: adamw_cosine, "),
    ("optim=sgd_polly", "did you mean sgd_poly? Fix: optim=sgd_poly"),
    ("data.augmentation.rotation_prb=0.1", "did you mean data.augmentation.rotation_prob?"),
    (["task=denoise", "task.mask_conditionin=true"], "did you mean task.mask_conditioning? Fix: task.mask_conditioning=true"),
])
def test_a_typo_in_an_override_names_the_closest_key(tmp_path, capsys, override, expected):
    overrides = override if isinstance(override, list) else [override]
    assert main(["train", str(tmp_path / "Dataset001_X"), *overrides]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("override, fix", [
    ("optim.lr=3e-3", "Fix: optim.optimizer.lr=3e-3"),
    ("+optim.momentum=0.9", "Fix: optim.optimizer.momentum=0.9"),
    ("optim.name=adamw", "Fix: optim=adamw_cosine"),
    ("optim.schedule=cosine", "Fix: optim.scheduler.schedule=cosine"),
    ("optim.warmup_fraction=0.1", "Fix: optim.scheduler.warmup_fraction=0.1"),
    ("callbacks.best_checkpoint=false", "Fix: callbacks.best_checkpoint=null"),
    ("callbacks.early_stopping_patience=20", "Fix: callbacks=early_stopping callbacks.early_stopping.patience=20"),
    ("callbacks.dice_ema_decay=0.8", "Fix: task.validation.metric_ema_decay=0.8"),
    ("callbacks.progress_plot=false", "Fix: callbacks.epoch_progress.plot_path=null"),
    ("callbacks.progress_bar=rich", "Fix: callbacks.progress_bar.kind=rich"),
    ("callbacks.extra=[{_target_:a.B}]", "Fix: +callbacks.NAME._target_=module.Class"),
    ("logger.csv=false", "Fix: logger.csv=null"),
    ("logger.tensorboard=false", "Fix: logger.tensorboard=null"),
])
def test_an_override_of_a_moved_key_names_the_new_one(tmp_path, capsys, override, fix):
    assert main(["train", str(tmp_path / "Dataset001_X"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segforge train: error: bad override {override}: ") and "has moved" in err and fix in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("override", ["callbacks.best_checkpoint=null", "logger.csv=null", "callbacks.progress_bar=null",
                                      "callbacks.progress_bar.kind=tqdm", "logger.csv.name=csv_logs",
                                      "~callbacks.best_checkpoint"])
def test_the_new_forms_of_the_same_keys_compose(override):
    from segforge.cli.main import compose_config

    compose_config("train", [override])


def test_a_key_nothing_resembles_says_how_to_add_one(tmp_path, capsys):
    assert main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(tmp_path), "qqqzzz=1"]) == 2
    err = capsys.readouterr().err
    assert "there is no setting qqqzzz" in err and "did you mean" not in err and "+qqqzzz=1" in err


def folders(tmp_path: Path) -> dict[str, Path]:
    dataset = tmp_path / "Dataset001_X"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                      "numTraining": 0, "file_ending": ".nii.gz"}))
    model = tmp_path / "work" / "Dataset001_X" / "results" / "segment" / "3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    (model / "fold_0" / "model_final.pt").write_bytes(b"")
    (tmp_path / "work" / "Dataset001_X" / "plans.json").write_text("{}")
    return {"dataset": dataset, "model": model, "fold": model / "fold_0", "task": model.parent,
            "work": tmp_path / "work" / "Dataset001_X"}


def test_each_kind_of_folder_is_recognised(tmp_path):
    for kind, path in folders(tmp_path).items():
        assert folder_kind(path) == kind, path
    assert folder_kind(tmp_path / "missing") is None


@pytest.mark.parametrize("command, kind, expected", [
    (["train", "{}"], "model", "is a trained model folder (plans.json and fold_*/), not a dataset. `segforge train` takes a "
                               "dataset folder in nnU-Net's raw layout (imagesTr/, labelsTr/, dataset.json). Fix: to predict "
                               "with it: segforge predict -i IMAGES -o OUT --model "),
    (["plan", "{}"], "fold", "is the fold folder of a training run, not a dataset"),
    (["check", "{}"], "work", "is segforge's work folder for a dataset"),
    (["train", "{}"], "task", "Fix: to compare its configurations: segforge select "),
    (["predict", "-i", "{}", "-o", "OUT", "--model", "{}"], "dataset",
     "is a dataset folder, not a trained model folder. `segforge predict` takes the model folder a training run writes"),
    (["sample", "-o", "OUT", "--model", "{}"], "dataset", "segforge train {} task=denoise"),
    (["predict", "-i", "{}", "-o", "OUT", "--model", "{}"], "fold", "is one fold of a model. Fix: pass its model folder"),
    (["export-model", "{}", "OUT.zip"], "fold", "(--folds 0 for this fold alone)"),
    (["predict", "-i", "{}", "-o", "OUT", "--model", "{}"], "task", "holds one model folder per configuration (3d_fullres)"),
])
def test_the_wrong_kind_of_folder_names_the_command_that_takes_it(tmp_path, capsys, command, kind, expected):
    path = folders(tmp_path)[kind]
    argv = [str(path) if a == "{}" else str(tmp_path / a) if a.startswith("OUT") else a for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected.replace("{}", str(path)) in err, err
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "OUT.zip").exists()
