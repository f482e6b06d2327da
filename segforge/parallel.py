"""Map a function over many cases in worker processes, in order, with a progress bar (or log lines off a terminal)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger("segforge")


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _exit_when_gone(pid: int, poll_s: float) -> None:
    while _process_alive(pid):
        time.sleep(poll_s)
    os._exit(1)


def _worker_init(owner_pid: int, poll_s: float) -> None:
    """Each worker dies with the process that made the pool (a SIGKILLed ``segforge preprocess`` would otherwise
    leave its workers, their forkserver and the resource tracker running and writing for as long as the cases take:
    the workers' parent is the forkserver, which lives while they do)."""
    # one intra-op thread per worker: the workers already use every core
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):  # the kernel kills the worker the moment its parent (the forkserver) exits
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # a libc without prctl: the watch below still ends the worker
            pass
    if sys.platform != "win32":  # the owner is not the worker's parent, so poll it (os.kill(pid, 0) is a signal on Windows)
        threading.Thread(target=_exit_when_gone, args=(owner_pid, poll_s), daemon=True,
                         name="segforge-owner-watch").start()


def _call(item):
    function, args = item
    return function(*args)


def progress_map(function: Callable, arg_tuples: Sequence[tuple], num_workers: int, desc: str,
                 owner_poll_s: float = 1.0) -> Iterator:
    """``function(*args)`` for each tuple, yielded in order; a bar on a terminal, else a log line per ~10%.
    Workers check every ``owner_poll_s`` seconds that this process lives, and exit when it does not."""
    total = len(arg_tuples)
    if num_workers > 1 and total > 1:
        # not fork: a forked child of a process whose torch/OpenMP threads have run can deadlock in its first
        # parallel region; forkserver children start from a clean server process
        context = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
        pool = ProcessPoolExecutor(max_workers=min(num_workers, total), mp_context=context,
                                   initializer=_worker_init, initargs=(os.getpid(), owner_poll_s))
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
