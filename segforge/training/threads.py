"""How the cores of a machine are shared between training, loader workers and DDP ranks (one pure function).

nnU-Net's CPU-bound augmentation workers compete with the training step for cores; on a small machine, more
workers make every epoch slower. The policy here:

* each rank gets ``cores // ranks_on_this_node`` cores (its share);
* on CUDA, augmentation runs batched on the GPU (``augment_on=device``), so workers only copy crops: up to 4 per
  rank, leaving one core of the share to the training process;
* on CPU, the training step already uses every core of the share, and augmentation costs a few percent of a step,
  so it runs in the training process between steps: a worker beside a step that uses every core oversubscribes
  them and slows each step down more than the augmentation costs (measured on 2 cores, demo plan: 1.0 s per
  iteration with one augmenting worker, 0.8 s in the training process). With four cores or more in the share, one
  worker reads the next crops from disk meanwhile.

An ``OMP_NUM_THREADS`` set in the environment caps the automatic intra-op threads, as it caps torch's own default:
whoever set it knows the process shares the cores (a job step, a test worker, a second run beside this one), and
two threads on cores busy with other work ran 10-30x slower steps than one (measured on 2 cores).

Every value can be set instead (``data.num_workers``, ``data.torch_threads``, ``data.worker_threads``,
``data.augment_on``); the resolved policy and its reason are logged and saved with the run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ThreadPolicy:
    augment_on: str     # device | workers
    num_workers: int    # loader processes of this rank
    torch_threads: int  # intra-op threads of the training process
    worker_threads: int  # intra-op threads of each loader worker
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def environment_thread_limit(environ=None) -> int | None:
    """``OMP_NUM_THREADS`` when set to a positive integer, else None."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _value(setting, auto):
    return auto if setting in (None, "auto") else setting


def thread_policy(data_cfg, on_cuda: bool, ranks_on_node: int = 1, cores: int | None = None,
                  thread_limit: int | None = None) -> ThreadPolicy:
    """The thread and worker policy of one rank (see module docstring); ``data_cfg`` values other than auto win.
    ``thread_limit`` (``environment_thread_limit()``) caps the automatic intra-op threads."""
    cores = cores or available_cores()
    share = max(1, cores // max(1, ranks_on_node))
    augment_on = str(_value(data_cfg.get("augment_on"), "device"))
    if augment_on not in ("device", "workers"):
        raise ValueError(f"data.augment_on={augment_on!r}; use device, workers or auto")
    if on_cuda:
        workers = min(4, share - 1) if share > 1 else 0
        why = f"{share} core(s) per rank on CUDA: crops in {workers} worker(s), augmentation on the {augment_on}"
    else:
        workers = 1 if share >= 4 else 0
        why = (f"{share} core(s) per rank on CPU: the step uses them all, augmentation runs between steps"
               + ("; one worker reads crops meanwhile" if workers else ""))
    workers = int(_value(data_cfg.get("num_workers"), workers))
    auto_threads = max(1, share - (workers if on_cuda else 0))
    if thread_limit is not None and thread_limit < auto_threads:
        auto_threads = thread_limit
        why += f"; OMP_NUM_THREADS={thread_limit} caps the training process's threads"
    torch_threads = int(_value(data_cfg.get("torch_threads"), auto_threads))
    worker_threads = int(_value(data_cfg.get("worker_threads"), 1))
    if min(workers, torch_threads - 1, worker_threads - 1) < 0:
        raise ValueError("data.num_workers must be >= 0, data.torch_threads and data.worker_threads >= 1")
    return ThreadPolicy(augment_on, workers, torch_threads, worker_threads, why)
