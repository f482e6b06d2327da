"""Map a function over many cases in worker processes, in order, with a progress bar (or log lines off a terminal)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger("segforge")


def _worker_init() -> None:
    # one intra-op thread per worker: the workers already use every core
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def _call(item):
    function, args = item
    return function(*args)


def progress_map(function: Callable, arg_tuples: Sequence[tuple], num_workers: int, desc: str) -> Iterator:
    """``function(*args)`` for each tuple, yielded in order; a bar on a terminal, else a log line per ~10%."""
    total = len(arg_tuples)
    if num_workers > 1 and total > 1:
        # not fork: a forked child of a process whose torch/OpenMP threads have run can deadlock in its first
        # parallel region; forkserver children start from a clean server process
        context = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
        pool = ProcessPoolExecutor(max_workers=min(num_workers, total), mp_context=context, initializer=_worker_init)
        # chunks of one: cases differ widely in size, so small tasks balance the workers best
        results = pool.map(_call, [(function, a) for a in arg_tuples])
    else:
        pool, results = None, (function(*a) for a in arg_tuples)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="case", leave=False)
    step = max(1, total // 10)
    try:
        for done, result in enumerate(results, 1):
            if bar is not None:
                bar.update()
            elif done % step == 0 or done == total:
                log.info("%s: %d/%d", desc, done, total)
            yield result
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
