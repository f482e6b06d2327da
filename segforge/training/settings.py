"""Types and ranges of the training settings a run reads, checked before any work: an override such as
``optim.optimizer.lr=-1``, ``trainer.max_epochs=abc``, ``+trainer.foo=1`` or a 2D ``data.patch_size`` for a 3D plan is refused
in one line naming the setting and the fix, rather than failing minutes later inside Lightning or the loader."""

from __future__ import annotations

import inspect
import math

from segforge.errors import SegforgeError

FIX = "Fix: correct the override (`segforge train DATASET --cfg job` prints every setting)"


# Trainer arguments training/run.py passes itself, and where a user changes what they hold instead
SET_BY_SEGFORGE = {
    "callbacks": "add yours with +callbacks.NAME._target_=module.Class, leave one out with callbacks.NAME=null",
    "logger": "add one with logger=mlflow or +logger.NAME._target_=module.Class, leave one out with logger.NAME=null",
    "plugins": "checkpoints are written atomically by segforge's plugin",
    "default_root_dir": "the fold folder; move it with paths.results_root",
    "limit_val_batches": "validation batches per epoch: data.val_iterations",
    "use_distributed_sampler": "segforge's patch sampler shards by rank",
}


def _whole(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_train_settings(cfg, trainer_kwargs: dict, plan_config: dict) -> None:
    """Refuse settings of the wrong type or range (see module docstring); ``trainer_kwargs`` go to Lightning's
    ``Trainer``, so each must be one of its arguments."""
    import lightning as L

    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(trainer_kwargs) - accepted)
    own = sorted(set(trainer_kwargs) & set(SET_BY_SEGFORGE))
    if own:
        raise SegforgeError(f"trainer.{own[0]}: segforge sets this Trainer argument itself ({SET_BY_SEGFORGE[own[0]]}). "
                            f"Fix: remove the override +trainer.{own[0]}=...")
    if unknown:
        raise SegforgeError(f"trainer.{unknown[0]}: not an option of Lightning's Trainer (the trainer.* settings are "
                            f"its arguments, e.g. max_epochs, max_steps, precision, gradient_clip_val). Fix: remove "
                            f"the override +trainer.{unknown[0]}=..., or spell the option as Lightning does")
    lr = (cfg.optim.get("optimizer") or {}).get("lr")  # None: an optimizer of the user's that has no lr
    checks = [
        ("fold", cfg.get("fold"), cfg.get("fold") == "all" or _whole(cfg.get("fold"), 0), "a whole number >= 0 or all"),
        ("num_folds", cfg.get("num_folds"), _whole(cfg.get("num_folds"), 2), "a whole number >= 2"),
        ("seed", cfg.get("seed"), _whole(cfg.get("seed"), 0), "a whole number >= 0"),
        ("trainer.max_epochs", trainer_kwargs.get("max_epochs"),
         _whole(trainer_kwargs.get("max_epochs"), 1) or trainer_kwargs.get("max_epochs") == -1,
         "a whole number >= 1, or -1 (no limit: Lightning's, for trainer.max_time or max_steps)"),
        # 0 is a learning rate (a frozen run: fine-tuning checks, the EMA without updates), a negative one is not
        ("optim.optimizer.lr", lr, lr is None or _positive_number(lr) or _zero(lr), "a number >= 0"),
        ("data.iterations_per_epoch", cfg.data.get("iterations_per_epoch"),
         _whole(cfg.data.get("iterations_per_epoch"), 1), "a whole number >= 1"),
        ("data.batch_size", cfg.data.get("batch_size"),
         cfg.data.get("batch_size") is None or _whole(cfg.data.get("batch_size"), 1), "null (the plan's) or a whole number >= 1"),
    ]
    for setting, value, ok, wanted in checks:
        if not ok:
            raise SegforgeError(f"{setting}={value!r}: must be {wanted}. {FIX}")
    patch = cfg.data.get("patch_size")
    dims = int(plan_config["dims"])
    if patch is not None and not (len(list(patch)) == dims and all(_whole(p, 1) for p in patch)):
        raise SegforgeError(f"data.patch_size={list(patch) if not isinstance(patch, str) else patch}: must be null (the "
                            f"plan's {plan_config['patch_size']}) or {dims} whole numbers >= 1 for this {dims}D "
                            f"configuration. {FIX}")
