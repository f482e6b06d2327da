"""The callbacks, loggers and learning-rate schedule of a run, built from their config entries with
``hydra.utils.instantiate`` (lightning-hydra-template's way): ``callbacks.NAME`` and ``logger.NAME`` are each
``{_target_: module.Class, arg: value, ...}`` or null (left out); ``optim.scheduler`` is a ``_partial_`` the run
completes with its step count and time.

What a command line may name there is checked before any work (``cli/targets.py``); the entries' run context (the fold
folder, the metric followed) comes in through ``${run.*}`` (``fill_run_context``). Configs read back from a model
folder never come here: only the command's own composed config is built.
"""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig, OmegaConf

from segforge.errors import SegforgeError
from segforge.training.buildable import PACKAGES, check_buildable


def fill_run_context(cfg, fold_dir, monitor: str, name: str) -> None:
    """Set ``run.*`` (what ``${run.fold_dir}``, ``${run.monitor}``, ``${run.name}`` in the entries refer to)."""
    OmegaConf.update(cfg, "run", {"fold_dir": str(fold_dir), "monitor": monitor, "name": name}, merge=True)


def _innermost(exc: BaseException) -> BaseException:
    """What Hydra's InstantiationException wraps (an ImportError, a TypeError of the arguments, segforge's own)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
        if isinstance(exc, SegforgeError):
            break
    return exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _made_error(exc: Exception, target, setting: str, fix: str) -> SegforgeError:
    inner = _innermost(exc)
    if isinstance(inner, SegforgeError):  # the entry's own message (e.g. a progress bar kind), already with its fix
        return inner
    reason = _reason(inner)
    missing = isinstance(inner, ImportError) or "not met" in reason
    install = " (install what it needs; for logger=mlflow: pip install 'segforge[mlflow]')" if missing else ""
    return SegforgeError(f"{setting}: cannot make {target} ({reason}). Fix: an importable class{install} and only the "
                         f"arguments it takes, or {fix}")


def build(entry, setting: str, fix: str, kind: type, packages: tuple[str, ...], what: str | None = None):
    """``instantiate(entry)`` with plain containers as arguments (a checkpoint holds no OmegaConf object), once
    ``check_buildable`` passed (a ``kind`` class or a segforge factory); an entry that cannot be made is a user
    error naming ``setting`` and ``fix``."""
    from hydra.utils import instantiate

    if not isinstance(entry, DictConfig) or "_target_" not in entry:
        raise SegforgeError(f"{setting}={OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry!r}: "
                            f"must be an entry {{_target_: module.Class, arg: value, ...}} or null (left out). Fix: {fix}")
    check_buildable(entry, setting, kind, packages, fix, what)
    try:
        return instantiate(entry, _convert_="all")
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise _made_error(exc, entry.get("_target_"), setting, fix) from exc


def entries(cfg, group: str, kind: type, what: str) -> list:
    """The objects of ``cfg.<group>``'s non-null entries, each checked to be a ``kind``; a factory's None is left out."""
    made = []
    for name in list(cfg.get(group) or {}):
        entry = cfg[group][name]
        if entry is None:
            continue
        setting = f"{group}.{name}"
        fix = f"{setting}=null to leave it out ({setting}.ARG=VALUE sets an argument)"
        obj = build(entry, setting, fix, kind, PACKAGES[group], what)
        if obj is None:
            continue
        if not isinstance(obj, kind):
            raise SegforgeError(f"{setting}: {entry.get('_target_')} is not {what}. Fix: {setting}._target_ names a "
                                f"{kind.__module__}.{kind.__qualname__} subclass, or {setting}=null")
        made.append(obj)
    return made


def make_callbacks(cfg, monitor: str, validating: bool) -> list[L.Callback]:
    """``callbacks.*``; without validation cases the callbacks that follow the validation metric are left out."""
    made = entries(cfg, "callbacks", L.Callback, "a Lightning callback")
    return [c for c in made if validating or getattr(c, "monitor", None) != monitor]


def make_loggers(cfg) -> list:
    """``logger.*``: Lightning loggers (inside the fold folder as packaged)."""
    from lightning.pytorch.loggers import Logger

    return entries(cfg, "logger", Logger, "a Lightning logger")


def make_schedule(cfg, total_steps: int | None, max_time_s: float | None):
    """``optim.scheduler``: segforge's progress schedule, completed with the run's steps and time (either may decide)."""
    from segforge.training.schedules import ScheduleCallback

    fix = ("optim.scheduler.schedule=poly|cosine|constant (optim.scheduler.warmup_fraction, .poly_exponent), or "
           "optim=sgd_poly|adamw_cosine")
    made = build(cfg.optim.get("scheduler"), "optim.scheduler", fix, ScheduleCallback, PACKAGES["optim.scheduler"],
                 "segforge's progress schedule")
    try:  # a _partial_'s arguments are checked when it is called
        schedule = made(total_steps=total_steps, max_time_s=max_time_s) if callable(made) else made
    except Exception as exc:
        raise _made_error(exc, cfg.optim.scheduler.get("_target_"), "optim.scheduler", fix) from exc
    if not isinstance(schedule, ScheduleCallback):
        raise SegforgeError(f"optim.scheduler: {cfg.optim.scheduler.get('_target_')} is not segforge's progress "
                            "schedule (it spans epochs and time budgets alike; torch.optim.lr_scheduler classes are not "
                            f"taken). Fix: {fix}")
    return schedule


def local_mlflow_logger(tracking_uri: str, **kwargs):
    """Lightning's ``MLFlowLogger`` on the local file store ``logger=mlflow`` packages (``file:<fold>/mlruns``).
    MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` says yes; it is said here for a ``file:`` store
    only, and never over a value the environment already holds."""
    import os

    from lightning.pytorch.loggers import MLFlowLogger

    if str(tracking_uri).startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)
