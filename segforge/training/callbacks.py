"""Lightning pieces of a training run: atomic checkpoint writes, the validation metric's EMA and the best checkpoint
by it (one mechanism for every task), one summary line and a ``progress.png`` per epoch, and the run folder's files.

Each piece keeps what it needs in the checkpoint (``state_dict``, ``on_save_checkpoint``), so a resumed run continues
its metric EMA, its best value, its curves and its clock.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from segforge.errors import SegforgeError
from segforge.io.artifacts import atomic_path, atomic_write_bytes, atomic_write_text

log = logging.getLogger("segforge")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name and renamed: a kill mid-write never leaves a truncated file.

    The file keeps the mode the umask gave the temporary: Lightning's writer (fsspec) replaces it with a file of the
    umask fsspec read once per process (``get_umask`` is cached), which a later umask never reaches."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        with atomic_path(path, f".tmp-{os.getpid()}-{path.name}") as tmp:
            mode = os.stat(tmp).st_mode & 0o777
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.chmod(tmp, mode)


PROGRESS_BARS = ("auto", "rich", "tqdm", "none")


def progress_bar(kind: str) -> L.Callback | None:
    """``callbacks.progress_bar``: Rich's bar (``rich``, or ``auto`` on a terminal), Lightning's tqdm bar, or none
    (``none``, ``auto`` elsewhere: the run then turns Lightning's own bar off; EpochProgress logs a line per epoch)."""
    kind = str(kind)
    if kind not in PROGRESS_BARS:
        raise SegforgeError(f"callbacks.progress_bar.kind={kind}: not a progress bar. Fix: "
                            f"callbacks.progress_bar.kind={'|'.join(PROGRESS_BARS)}")
    if kind == "rich" or (kind == "auto" and sys.stderr.isatty()):
        return L.pytorch.callbacks.RichProgressBar()
    if kind == "tqdm":
        return L.pytorch.callbacks.TQDMProgressBar()
    return None


class MetricEMA:
    """LightningModule mixin: the task's validation metric ``metric`` (e.g. ``val_dice``) and its exponential moving
    average ``<metric>_ema`` (``monitor``: what the best checkpoint and early stopping follow), kept in the checkpoint
    as ``segforge_<name>_ema`` so a resumed run continues the same average. The module sets ``metric_ema_decay``."""

    metric: str
    metric_ema_decay: float
    metric_ema: float | None = None

    @property
    def monitor(self) -> str:
        return f"{self.metric}_ema"

    @property
    def _ema_checkpoint_key(self) -> str:
        return f"segforge_{self.metric.removeprefix('val_')}_ema"

    def log_metric_and_ema(self, value: float) -> None:
        """Log this epoch's ``value`` and, outside the sanity check, fold it into the EMA (first epoch: the value)."""
        if not self.trainer.sanity_checking:
            d = self.metric_ema_decay
            self.metric_ema = value if self.metric_ema is None else d * self.metric_ema + (1 - d) * value
        self.log(self.metric, value, prog_bar=True)
        if self.metric_ema is not None:
            self.log(self.monitor, float(self.metric_ema), prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self._ema_checkpoint_key] = self.metric_ema

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.metric_ema = checkpoint.get(self._ema_checkpoint_key)


class BestCheckpoint(ModelCheckpoint):
    """``path`` (``checkpoints/best.ckpt``) whenever ``monitor`` (a ``MetricEMA.monitor``) reaches a new high: Lightning's
    top-1 checkpoint, written at validation end through the trainer's checkpoint IO (atomic). Before the metric has a
    value (no finite score yet) nothing is written; the best value resumes whatever folder the run sits in now."""

    def __init__(self, path: Path, monitor: str):
        path = Path(path)
        super().__init__(dirpath=path.parent, filename=path.stem, monitor=monitor, mode="max", save_top_k=1,
                         enable_version_counter=False, auto_insert_metric_name=False, save_on_train_epoch_end=False)

    @property
    def path(self) -> str:
        return self.format_checkpoint_name({})

    @property
    def state_key(self) -> str:
        return type(self).__qualname__  # one per run; the key of checkpoints written before it was a ModelCheckpoint

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor in trainer.callback_metrics:  # ModelCheckpoint would raise on a metric not logged yet
            super().on_validation_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict) -> None:
        # the score alone, tied to this run's path (a moved run folder keeps its best value), from a ModelCheckpoint
        # state or the former {"best": float}
        score = state_dict.get("best_model_score", state_dict.get("best"))
        if score is None:
            return
        score = torch.tensor(float(score))
        self.best_model_score = self.kth_value = score
        self.best_model_path = self.kth_best_model_path = self.path
        self.best_k_models = {self.path: score}


_CURVES = ("train_loss_epoch", "val_loss", "val_dice", "val_dice_ema", "val_psnr", "val_psnr_ema", "lr")


class EpochProgress(L.Callback):
    """One log line per epoch (loss, Dice, its EMA, learning rate, epoch time) and ``progress.png`` (rank 0)."""

    def __init__(self, plot_path: Path | None):
        self.plot_path = Path(plot_path) if plot_path else None
        self.history: list[dict] = []
        self._epoch_start = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in _CURVES}
        metrics.update(epoch=trainer.current_epoch, step=trainer.global_step,
                       epoch_seconds=time.monotonic() - self._epoch_start if self._epoch_start else None)
        self.history.append(metrics)
        if not trainer.is_global_zero:
            return
        shown = ", ".join(f"{k.replace('_epoch', '')} {metrics[k]:.4g}" for k in _CURVES if k in metrics)
        log.info("epoch %d/%d (step %d): %s, %.1f s", trainer.current_epoch + 1, trainer.max_epochs or 0,
                 trainer.global_step, shown, metrics["epoch_seconds"] or 0.0)
        if self.plot_path is not None:
            try:
                plot_progress(self.history, self.plot_path)
            except Exception as exc:  # a plot must never stop training
                log.warning("progress plot not written: %s", exc)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def plot_progress(history: list[dict], path: Path) -> None:
    """Losses and pseudo-Dice, learning rate, and epoch time against the epoch, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]

    def series(key):
        return [h.get(key, float("nan")) if h.get(key) is not None else float("nan") for h in history]

    figure, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(epochs, series("train_loss_epoch"), label="train loss")
    axes[0].plot(epochs, series("val_loss"), label="validation loss")
    axes[0].set_ylabel("loss")
    dice_axis = axes[0].twinx()
    if any(h.get("val_psnr") is not None for h in history):  # a denoiser: PSNR of its one-step estimate
        dice_axis.plot(epochs, series("val_psnr"), "g.", label="PSNR")
        dice_axis.plot(epochs, series("val_psnr_ema"), "g-", label="PSNR (EMA)")
        dice_axis.set_ylabel("PSNR (dB)")
    else:
        dice_axis.plot(epochs, series("val_dice"), "g.", label="pseudo-Dice")
        dice_axis.plot(epochs, series("val_dice_ema"), "g-", label="pseudo-Dice (EMA)")
        dice_axis.set_ylabel("Dice")
        dice_axis.set_ylim(0, 1)
    axes[0].legend(loc="upper left")
    dice_axis.legend(loc="upper right")
    axes[1].plot(epochs, series("lr"))
    axes[1].set_ylabel("learning rate")
    axes[2].plot(epochs, series("epoch_seconds"))
    axes[2].set_ylabel("epoch time (s)")
    axes[2].set_xlabel("epoch")
    figure.tight_layout()
    with atomic_path(path, f".tmp-{os.getpid()}-{path.name}") as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)


class RunFolderWriter(L.Callback):
    """Writes the run's config and the model folder's plans/dataset.json once DDP ranks are known (rank 0 only)."""

    def __init__(self, files: dict[Path, str], copies: dict[Path, Path]):
        self.files, self.copies = files, copies

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for path, text in self.files.items():
            atomic_write_text(path, text)
        for target, source in self.copies.items():  # same content when it exists (checked before training)
            atomic_write_bytes(target, Path(source).read_bytes())
