"""`segforge train DATASET -m fold=0,1,2,3,4 [configuration=3d_fullres,2d] ...`: one command, many runs, through
Hydra's own multirun machinery (its sweeper expands the comma lists, its launcher runs the jobs).

The basic launcher runs the jobs one after another in this process; ``hydra/launcher=slurm`` (the
``hydra-submitit-launcher`` plugin, extra ``slurm``; ``configs/hydra/launcher/slurm.yaml`` holds the job resources)
submits each as a SLURM job. Each job is the same `segforge train` a user would type with that job's overrides:
the same checks, the same fold folder. Hydra's own logging is left alone (segforge logs through its logger), and its
sweep folder (``hydra.sweep.dir``: the jobs' overrides and, under SLURM, their logs) lies under the work root.
Hydra is used through its internal entry (``Hydra.create_main_hydra2``: segforge composes configs without
``@hydra.main``); hydra-core is pinned below 1.4 for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from segforge.errors import SegforgeError

# Hydra's settings for a segforge sweep: its logging untouched, the sweep folder under the work root
HYDRA_OVERRIDES = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.job.chdir=false",
                   "hydra.sweep.dir=${paths.work_root}/multirun/${now:%Y-%m-%d_%H-%M-%S}",
                   "hydra.sweep.subdir=${hydra.job.num}"]


def sweep_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides with segforge's Hydra settings in front (a user's ``hydra.*`` wins)."""
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    return [o for o in HYDRA_OVERRIDES if o.split("=", 1)[0] not in given] + overrides


def run_multirun(config_dir: str, config_name: str, overrides: list[str], run_job: Callable[[object, list[str]], int]) -> int:
    """Every job of the sweep ``overrides`` describe; ``run_job(cfg, job_overrides)`` runs one and returns its exit
    code. Returns 0 when every job succeeded, else the first failing job's code (each failure is reported as it
    happens, and the later jobs still run)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def task(cfg) -> int:
        job_overrides = list(HydraConfig.get().overrides.task)
        try:
            return run_job(cfg, job_overrides)
        except SegforgeError as exc:  # one job's refusal is reported; the others still run
            print(f"segforge {config_name} ({' '.join(job_overrides)}): error: {exc}", file=sys.stderr)
            return exc.exit_code

    from hydra import version

    version.setbase("1.3")  # as compose_config: no working-directory change, 1.3 defaults
    from segforge.cli.targets import check_hydra_targets

    try:
        check_hydra_targets(launcher_config(config_dir, config_name, overrides, node="hydra"))  # before Hydra builds any
        GlobalHydra.instance().clear()
        hydra = Hydra.create_main_hydra2(task_name=config_name, config_search_path=create_config_search_path(config_dir))
        returns = hydra.multirun(config_name=config_name, task_function=task, overrides=sweep_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise SegforgeError(f"multirun {' '.join(overrides)}: {str(exc).splitlines()[0]}. Fix: write a sweep as "
                            "key=a,b (e.g. fold=0,1,2,3,4); `segforge train DATASET ... --cfg job` checks one run's overrides") from exc
    finally:
        GlobalHydra.instance().clear()
    codes = [int(job.return_value or 0) for batch in returns for job in (batch if isinstance(batch, list) else [batch])]
    return next((code for code in codes if code), 0)


def launcher_config(config_dir: str, config_name: str, overrides: list[str], node: str = "launcher"):
    """The composed ``hydra.launcher`` node a sweep with ``overrides`` would use (what a SLURM job would be
    submitted with), without launching anything; ``node="hydra"``: all of Hydra's settings."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name=config_name, config_search_path=create_config_search_path(config_dir))
        cfg = hydra.compose_config(config_name, sweep_overrides(overrides), run_mode=RunMode.MULTIRUN,
                                   with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()
    return cfg.hydra if node == "hydra" else cfg.hydra[node]
