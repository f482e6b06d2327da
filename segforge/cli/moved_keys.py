"""Settings that moved when callbacks, loggers, the optimizer and its schedule became ``_target_`` entries (issue 20):
an override of an old key is refused before composing, naming what to type instead.

A key that still exists under the same name (``callbacks.best_checkpoint``, ``logger.csv``, ...) is an entry now:
only a plain value there (``=false``, ``=rich``) is the old switch; ``=null`` (leave the entry out) and its arguments
(``logger.csv.name=...``) are the new ones.
"""

from __future__ import annotations

from segforge.configs import OPTIM_OPTIONS

# old key -> the fix for a given value (a function of the value as typed)
MOVED: dict[str, object] = {
    "callbacks.best_checkpoint": lambda v: "callbacks.best_checkpoint=null leaves the best checkpoint out (it is on by default)",
    "callbacks.dice_ema_decay": lambda v: f"task.validation.metric_ema_decay={v}",
    "callbacks.early_stopping_patience": lambda v: (
        "leave it out (early stopping is off unless callbacks=early_stopping)" if v.lower() in ("null", "none", "")
        else f"callbacks=early_stopping callbacks.early_stopping.patience={v}"),
    "callbacks.progress_plot": lambda v: ("callbacks.epoch_progress.plot_path=null (no progress.png; the epoch log line "
                                          "stays)" if v.lower() in ("false", "0") else "leave it out (on by default)"),
    "callbacks.progress_bar": lambda v: f"callbacks.progress_bar.kind={v}",
    "callbacks.extra": lambda v: ("+callbacks.NAME._target_=module.Class +callbacks.NAME.ARG=VALUE (one entry per "
                                  "callback, e.g. +callbacks.swa._target_=lightning.pytorch.callbacks."
                                  "StochasticWeightAveraging +callbacks.swa.swa_lrs=1e-3)"),
    "logger.csv": lambda v: "logger.csv=null leaves the CSV logger out (it is on by default)",
    "logger.tensorboard": lambda v: "logger.tensorboard=null leaves TensorBoard out (it is on by default)",
    "optim.name": lambda v: (f"optim={OPTIM_OPTIONS.get(v, '|'.join(OPTIM_OPTIONS.values()))} "
                             "(or optim.optimizer._target_=torch.optim.CLASS)"),
    **{f"optim.{key}": (lambda v, key=key: f"optim.optimizer.{key}={v}")
       for key in ("lr", "momentum", "nesterov", "weight_decay", "betas")},
    **{f"optim.{key}": (lambda v, key=key: f"optim.scheduler.{key}={v}")
       for key in ("schedule", "poly_exponent", "warmup_fraction")},
}
SAME_NAME = {"callbacks.best_checkpoint", "callbacks.progress_plot", "callbacks.progress_bar", "logger.csv",
             "logger.tensorboard"}  # still keys (entries): only a plain value is the old switch


def _plain(value: str) -> bool:
    """A scalar as typed (``false``, ``rich``, ``3``), not null and not a mapping."""
    text = value.strip()
    return text.lower() not in ("null", "none", "~") and not text.startswith("{")


def moved_key_error(overrides: list[str]) -> str | None:
    """One line for the first override of a moved key: what it was, and the new key to type; None when there is none."""
    import re

    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        base = re.sub(r"\[\d+\]$", "", key)  # callbacks.extra[0]
        if base not in MOVED and not any(key.startswith(f"{old}.") or key.startswith(f"{old}[") for old in
                                         ("callbacks.extra",)):
            continue
        base = base if base in MOVED else "callbacks.extra"
        if base in SAME_NAME and (override.startswith("~") or not _plain(value) or key != base):
            continue
        return (f"bad override {override}: {base} has moved (callbacks, loggers, the optimizer and its schedule are "
                f"_target_ entries now). Fix: {MOVED[base](value)}")
    return None
