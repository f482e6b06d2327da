"""Callbacks and loggers of a run as `_target_` entries (issue 20): built with hydra.utils.instantiate from the
callbacks/ and logger/ groups, run context through ${run.*}, null leaves an entry out, one of your own needs no code."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, StochasticWeightAveraging, TQDMProgressBar

from segforge.cli.main import compose_config
from segforge.errors import SegforgeError
from segforge.training.callbacks import BestCheckpoint, EpochProgress
from segforge.training.components import fill_run_context, make_callbacks, make_loggers, make_schedule


def built(tmp_path: Path, overrides: list[str], validating: bool = True, monitor: str = "val_dice_ema"):
    cfg = compose_config("train", overrides)
    fill_run_context(cfg, tmp_path / "fold_0", monitor, "Dataset001_X/segment/3d_fullres/fold_0")
    return cfg, make_callbacks(cfg, monitor, validating)


def of(callbacks, kind):
    return [c for c in callbacks if isinstance(c, kind)]


def test_the_default_callbacks_get_the_fold_folder_and_the_monitor(tmp_path):
    cfg, callbacks = built(tmp_path, ["callbacks.progress_bar.kind=none"])
    fold = tmp_path / "fold_0"
    last = [c for c in of(callbacks, ModelCheckpoint) if not isinstance(c, BestCheckpoint)]
    assert len(last) == 1 and Path(last[0].dirpath) == fold / "checkpoints" and last[0].filename == "last"
    assert last[0].monitor is None and last[0].every_n_epochs == 1
    (best,) = of(callbacks, BestCheckpoint)
    assert Path(best.path) == (fold / "checkpoints" / "best.ckpt").resolve() and best.monitor == "val_dice_ema"
    (progress,) = of(callbacks, EpochProgress)
    assert progress.plot_path == fold / "progress.png"
    assert not of(callbacks, EarlyStopping) and not of(callbacks, L.pytorch.callbacks.ProgressBar)
    assert cfg.run.fold_dir == str(fold)  # the fold's config.yaml records the paths the run used


def test_null_leaves_an_entry_out_and_early_stopping_is_a_choice(tmp_path):
    _, callbacks = built(tmp_path, ["callbacks.best_checkpoint=null", "callbacks.epoch_progress.plot_path=null"])
    assert not of(callbacks, BestCheckpoint) and of(callbacks, EpochProgress)[0].plot_path is None
    _, callbacks = built(tmp_path, ["callbacks=early_stopping", "callbacks.early_stopping.patience=3"],
                         monitor="val_psnr_ema")
    (stop,) = of(callbacks, EarlyStopping)
    assert stop.patience == 3 and stop.monitor == "val_psnr_ema" and stop.mode == "max"
    assert of(callbacks, BestCheckpoint)[0].monitor == "val_psnr_ema"  # the task's metric (denoise)
    _, callbacks = built(tmp_path, ["callbacks=early_stopping", "callbacks.early_stopping=null"])
    assert not of(callbacks, EarlyStopping)


def test_without_validation_cases_what_follows_the_metric_is_left_out(tmp_path):
    _, callbacks = built(tmp_path, ["callbacks=early_stopping"], validating=False)
    assert not of(callbacks, EarlyStopping) and not of(callbacks, BestCheckpoint)
    assert len(of(callbacks, ModelCheckpoint)) == 1 and of(callbacks, EpochProgress)  # last.ckpt and the log line stay


def test_a_callback_of_your_own_needs_no_code(tmp_path):
    _, callbacks = built(tmp_path, ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
                                    "+callbacks.swa.swa_lrs=1e-3"])
    (swa,) = of(callbacks, StochasticWeightAveraging)
    assert swa._swa_lrs == pytest.approx(1e-3)


@pytest.mark.parametrize("kind, bar", [("tqdm", TQDMProgressBar), ("rich", L.pytorch.callbacks.RichProgressBar),
                                       ("none", None), ("auto", None)])  # auto: pytest's stderr is no terminal
def test_progress_bar_kinds(tmp_path, kind, bar):
    _, callbacks = built(tmp_path, [f"callbacks.progress_bar.kind={kind}"])
    bars = of(callbacks, L.pytorch.callbacks.ProgressBar)
    assert (type(bars[0]) if bars else None) is bar


def test_a_bad_progress_bar_or_entry_says_what_to_type(tmp_path):
    with pytest.raises(SegforgeError, match=r"kind=fancy: not a progress bar. Fix: callbacks.progress_bar.kind=auto\|rich"):
        built(tmp_path, ["callbacks.progress_bar.kind=fancy"])
    with pytest.raises(SegforgeError, match="callbacks.swa: cannot make .*StochasticWeightAveraging.*callbacks.swa=null"):
        built(tmp_path, ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging"])  # no swa_lrs


def test_the_default_loggers_write_inside_the_fold_folder(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    cfg = compose_config("train", [])
    fill_run_context(cfg, tmp_path / "fold_0", "val_dice_ema", "run")
    csv, board = make_loggers(cfg)
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path / "fold_0" / "logs" / "version_0"
    assert isinstance(board, TensorBoardLogger) and Path(board.log_dir) == tmp_path / "fold_0" / "tensorboard" / "version_0"
    cfg = compose_config("train", ["logger.tensorboard=null"])
    fill_run_context(cfg, tmp_path / "fold_0", "val_dice_ema", "run")
    assert [type(x) for x in make_loggers(cfg)] == [CSVLogger]


def test_the_schedule_is_completed_with_the_runs_steps_and_time():
    schedule = make_schedule(compose_config("train", ["optim.scheduler.warmup_fraction=0.25"]), 400, 60.0)
    assert (schedule.schedule, schedule.warmup_fraction, schedule.total_steps, schedule.max_time_s) == ("poly", 0.25, 400, 60.0)
    with pytest.raises(SegforgeError, match="optim.scheduler: cannot make .*no_such.*optim.scheduler.schedule=poly"):
        make_schedule(compose_config("train", ["+optim.scheduler.no_such=1"]), 10, None)
