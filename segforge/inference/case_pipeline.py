"""A folder's cases through three stages (load, network, export), one at a time or overlapped.

Overlapped (``predict.overlap``), a background loader reads and preprocesses case k+1 and a background exporter
writes case k-1 while the calling thread runs the network on case k, so the accelerator does not wait for files.
Memory stays bounded: the next load starts only when the network takes a case (at most one case ahead) and a case
goes to the exporter only after the previous export finished (at most one behind). Threads suffice: reading,
resampling, compression and the network spend their time in C code that releases the GIL.

Both ways keep ``run_case``'s guarantees: a failing case (in any stage) is reported and skipped, leaving none of
the outputs this attempt made, and the others go on; a storage failure stops the run. Results (and the progress
callback) come in case order whatever finishes first.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from segforge.errors import SegforgeError
from segforge.io.storage import StorageError, storage_error

log = logging.getLogger("segforge")


@dataclass
class CaseResult:
    case_id: str
    status: str                # written | skipped | failed
    output: Path | None = None
    error: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class CaseWork:
    """One case to do: ``load()`` -> state, ``network(state)`` -> state, ``export(state)`` -> (main output,
    warnings), writing ``outputs``. Each stage may drop what the next does not need (memory)."""

    case_id: str
    outputs: list[Path]
    load: Callable[[], object]
    network: Callable[[object], object]
    export: Callable[[object], tuple[Path, list[str]]]


def failed_case(case_id: str, outputs: list[Path], before: set[Path], exc: Exception, seconds: float) -> CaseResult:
    """The result of a case that raised ``exc``, after removing the outputs this attempt created (each file is atomic,
    the set is not; a complete file from before is never removed). A storage failure (full disk, lost folder) would
    fail every case alike, so it is raised instead, saying why."""
    log.debug("case %s failed", case_id, exc_info=exc)
    created = [p for p in outputs if p not in before and p.exists()]
    for path in created:
        path.unlink(missing_ok=True)
    storage = exc if isinstance(exc, StorageError) else storage_error(exc, created[-1] if created else outputs[0])
    if storage is exc:
        raise exc
    if storage is not None:
        raise storage from exc
    reason = str(exc) if isinstance(exc, SegforgeError) else f"{type(exc).__name__}: {exc}"
    return CaseResult(case_id, "failed", error=reason, seconds=seconds)


def _report(result: CaseResult, done: Callable[[CaseResult], None]) -> None:
    if result.status == "failed":
        log.error("case %s failed: %s", result.case_id, result.error)
    done(result)


def run_cases(items: list[CaseWork | CaseResult], done: Callable[[CaseResult], None], overlap: bool) -> list[CaseResult]:
    """Do every ``CaseWork`` of ``items`` (a ``CaseResult`` there, e.g. a case ``--continue`` skips, is passed
    through untouched and loads nothing); ``done`` gets each result in the order of ``items``."""
    if not overlap:
        results = []
        for item in items:
            results.append(item if isinstance(item, CaseResult) else _sequential(item))
            _report(results[-1], done)
        return results
    return _Overlapped(items, done).run()


def _sequential(work: CaseWork) -> CaseResult:
    start = time.perf_counter()
    before = {p for p in work.outputs if p.exists()}
    try:
        output, warnings = work.export(work.network(work.load()))
    except Exception as exc:  # one bad case must not stop the others; the reason is reported
        return failed_case(work.case_id, work.outputs, before, exc, time.perf_counter() - start)
    return CaseResult(work.case_id, "written", output, seconds=time.perf_counter() - start, warnings=warnings)


def _timed(stage: Callable, *args) -> tuple[object, BaseException | None, float]:
    """``stage(*args)`` -> (value, None, seconds), or (None, the exception, seconds): a worker reports, never raises."""
    start = time.perf_counter()
    try:
        return stage(*args), None, time.perf_counter() - start
    except Exception as exc:  # handed to the calling thread, which reports it for this case
        return None, exc, time.perf_counter() - start


class _Overlapped:
    """The three-stage pipeline of ``run_cases(overlap=True)``: results in item order, filled as stages finish."""

    def __init__(self, items: list[CaseWork | CaseResult], done: Callable[[CaseResult], None]):
        self.items, self.done = items, done
        self.results: list[CaseResult | None] = [item if isinstance(item, CaseResult) else None for item in items]
        self.reported = 0
        self.before: dict[int, set[Path]] = {}

    def _flush(self) -> None:
        """Hand over the results that are complete up to the first unfinished case."""
        while self.reported < len(self.results) and self.results[self.reported] is not None:
            _report(self.results[self.reported], self.done)
            self.reported += 1

    def _fail(self, index: int, exc: BaseException, seconds: float) -> None:
        work = self.items[index]
        self.results[index] = failed_case(work.case_id, work.outputs, self.before[index], exc, seconds)

    def _load(self, index: int):
        work = self.items[index]
        self.before[index] = {p for p in work.outputs if p.exists()}  # before this attempt can create any
        return _timed(work.load)

    def _finish_export(self, pending: tuple[int, Future, float]) -> None:
        index, future, seconds = pending
        value, exc, export_seconds = future.result()
        if exc is not None:
            self._fail(index, exc, seconds + export_seconds)
        else:
            output, warnings = value
            self.results[index] = CaseResult(self.items[index].case_id, "written", output,
                                              seconds=seconds + export_seconds, warnings=warnings)

    def run(self) -> list[CaseResult]:
        todo = [i for i, item in enumerate(self.items) if isinstance(item, CaseWork)]
        loader = ThreadPoolExecutor(1, thread_name_prefix="segforge-load")
        exporter = ThreadPoolExecutor(1, thread_name_prefix="segforge-export")
        pending = None  # (index, future, seconds so far) of the case being exported
        try:
            loading = loader.submit(self._load, todo[0]) if todo else None
            for position, index in enumerate(todo):
                state, exc, seconds = loading.result()
                # the network takes this case: the next one may be read now (one ahead, never more)
                loading = loader.submit(self._load, todo[position + 1]) if position + 1 < len(todo) else None
                if exc is None:
                    state, exc, network_seconds = _timed(self.items[index].network, state)
                    seconds += network_seconds
                if exc is not None:
                    self._fail(index, exc, seconds)
                else:
                    if pending is not None:  # the previous export ends before this one starts (one behind, never more)
                        self._finish_export(pending)
                    pending = (index, exporter.submit(_timed, self.items[index].export, state), seconds)
                del state
                self._flush()
            if pending is not None:
                self._finish_export(pending)
                pending = None
            self._flush()
        finally:  # a stop (storage failure, Ctrl-C): the export under way completes its file, the next read is dropped
            loader.shutdown(wait=True, cancel_futures=True)
            exporter.shutdown(wait=True)
        return self.results
