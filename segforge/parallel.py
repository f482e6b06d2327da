"""Map a function over many cases in worker processes, in order, with a progress bar (or log lines off a terminal)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger("segforge")


def _call(item):
    function, args = item
    return function(*args)


def progress_map(function: Callable, arg_tuples: Sequence[tuple], num_workers: int, desc: str) -> Iterator:
    """``function(*args)`` for each tuple, yielded in order; a bar on a terminal, else a log line per ~10%."""
    total = len(arg_tuples)
    if num_workers > 1 and total > 1:
        pool = ProcessPoolExecutor(max_workers=min(num_workers, total))
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
