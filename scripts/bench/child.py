"""Run one benchmark stage (any importable function) in a fresh Python process, timed inside and outside.

Imported as ``bench.child`` (``scripts/`` on ``sys.path``); the child side runs as ``python -m bench.child
REQUEST.json`` with ``scripts/`` on ``PYTHONPATH`` (``run_stage`` sets that up).

Why a child process: every stage starts cold (no imports, caches or pools left over from an earlier stage), a
crash or leak cannot spoil later measurements, and each tool runs under its own environment variables.

Timing protocol. A stage is ``module:function`` called as ``function(timer, **kwargs)``; it does its imports and
set-up first and wraps only the measured work in ``with timer:`` (entered more than once, the times add up),
then returns a JSON-able dict of extra metrics (or None). A stage that never enters the timer is timed over its
whole call (imports of the module itself are always outside). Two times come back:

* ``seconds``: inside the child, around the work (``time.perf_counter``);
* ``wall_seconds``: in the parent, from spawning the child to its exit: interpreter start-up, imports and
  tear-down included, i.e. what a user of the command waits for.

Also reported: ``cpu_seconds`` (user + system time of the child and the worker processes it waited for, from
``wait4``), ``other_cpu_seconds`` (CPU time the rest of the machine used meanwhile: a noisy measurement shows
itself) and peak resident memory of the child itself and of its largest worker. With ``profile=True`` the
timed region runs under cProfile (main process only; pool workers are not profiled) and ``<name>.prof`` plus a
text summary ``<name>.profile.txt`` land in the run folder.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageResult:
    seconds: float          # measured in the child around the work
    wall_seconds: float     # spawn to exit, measured by the parent
    cpu_seconds: float      # user + sys of the child and its reaped descendants
    import_seconds: float   # part of ``seconds`` spent importing modules (see Timer)
    other_cpu_seconds: float | None  # CPU time other processes of the machine used meanwhile (/proc/stat)
    peak_rss_mb: float      # the child process itself
    children_peak_rss_mb: float  # the largest of its reaped worker processes
    metrics: dict = field(default_factory=dict)  # extra metrics the stage returned
    log_path: Path | None = None

    def as_metrics(self) -> dict:
        return {"seconds": self.seconds, "wall_seconds": self.wall_seconds, "cpu_seconds": self.cpu_seconds,
                "import_seconds": self.import_seconds, "other_cpu_seconds": self.other_cpu_seconds,
                "peak_rss_mb": self.peak_rss_mb, "children_peak_rss_mb": self.children_peak_rss_mb, **self.metrics}


class StageError(RuntimeError):
    """The child failed or timed out; the message holds the end of its log."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have been busy since boot (Linux ``/proc/stat``), else None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_stage(target: str, kwargs: dict, run_dir: str | os.PathLike, name: str = "stage", env: dict | None = None,
              timeout: float | None = None, profile: bool = False) -> StageResult:
    """Run ``target`` (``"module:function"``) with ``kwargs`` in a child process whose working folder is ``run_dir``.

    ``env`` entries are added to (``None`` values removed from) the parent's environment. Output of the child
    goes to ``<run_dir>/<name>.log``.
    """
    from bench.paths import SCRIPTS_DIR

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    request, result_path, log_path = (run_dir / f"{name}.{s}" for s in ("request.json", "result.json", "log"))
    result_path.unlink(missing_ok=True)
    request.write_text(json.dumps({
        "target": target, "kwargs": kwargs, "result_path": str(result_path),
        "profile_path": str(run_dir / f"{name}.prof") if profile else None}, indent=2, default=str))
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS_DIR)] + [p for p in [child_env.get("PYTHONPATH")] if p])
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = str(value)
    timed_out = threading.Event()
    busy_before = _busy_cpu_seconds()
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        # own session: a timeout kills the child together with its pool workers
        proc = subprocess.Popen([sys.executable, "-m", "bench.child", str(request)], cwd=run_dir, env=child_env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # wait4: resource usage of exactly this child
        except BaseException:  # Ctrl-C reaches only our session: take the child and its workers down too
            kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    busy_after, cpu = _busy_cpu_seconds(), usage.ru_utime + usage.ru_stime
    # CPU time the rest of the machine used meanwhile: on 2 cores, other load can double a wall time
    other = max(0.0, busy_after - busy_before - cpu) if busy_before is not None and busy_after is not None else None
    if timed_out.is_set():
        raise StageError(f"{name}: timed out after {timeout} s; log {log_path}:\n{_tail(log_path)}")
    if proc.returncode != 0 or not result_path.is_file():
        raise StageError(f"{name}: child exited with {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
    result = json.loads(result_path.read_text())
    return StageResult(seconds=result["seconds"], wall_seconds=wall, cpu_seconds=cpu,
                       import_seconds=result.get("import_seconds", 0.0), other_cpu_seconds=other,
                       peak_rss_mb=result["peak_rss_mb"], children_peak_rss_mb=result["children_peak_rss_mb"],
                       metrics=result.get("metrics") or {}, log_path=log_path)


# ------------------------------------------------------------------------------------------------ child side
class Timer:
    """Times the ``with`` blocks of a stage (they add up); optionally profiles them with cProfile.

    It also measures ``import_seconds``: time spent inside the timed blocks loading new modules (lazy imports of
    the tool, main process only; ``bench.importclock``). That time stays in ``seconds`` (the tool really spends it
    on a cold call) but is reported so that a slow stage can be told apart from a slow import.
    """

    def __init__(self, profile_path: str | None = None):
        from bench.importclock import ImportClock

        self.seconds = 0.0
        self.used = False
        self.profile_path = profile_path
        self._profiler = None
        self._start = 0.0
        self._imports = ImportClock()

    @property
    def import_seconds(self) -> float:
        return self._imports.seconds

    def __enter__(self) -> "Timer":
        if self.profile_path and self._profiler is None:
            import cProfile

            self._profiler = cProfile.Profile()
        if self._profiler:
            self._profiler.enable()
        self.used = True
        self._imports.__enter__()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start
        self._imports.__exit__(*exc)
        if self._profiler:
            self._profiler.disable()

    def save_profile(self) -> None:
        if not self._profiler:
            return
        import io
        import pstats

        self._profiler.dump_stats(self.profile_path)
        text = io.StringIO()
        for order in ("cumulative", "tottime"):
            text.write(f"==== sorted by {order} ====\n")
            pstats.Stats(self._profiler, stream=text).strip_dirs().sort_stats(order).print_stats(45)
        Path(self.profile_path).with_suffix(".profile.txt").write_text(text.getvalue())


def stage_selftest(timer, sleep: float = 0.0, fail: bool = False, echo=None) -> dict:
    """A stage that does nothing but sleep in the timer: the protocol's own test, and a start-up cost baseline."""
    with timer:
        time.sleep(sleep)
        if fail:
            raise RuntimeError("selftest asked to fail")
    return {"echo": echo, "cwd": os.getcwd()}


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def child_main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    module_name, _, func_name = request["target"].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    timer = Timer(request.get("profile_path"))
    start = time.perf_counter()
    metrics = func(timer, **request["kwargs"]) or {}
    whole = time.perf_counter() - start
    timer.save_profile()
    kb_to_mb = 1 / 1024  # ru_maxrss is in KiB on Linux
    _atomic_json(Path(request["result_path"]), {
        "seconds": timer.seconds if timer.used else whole,
        "import_seconds": timer.import_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb_to_mb,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb_to_mb,
        "metrics": metrics,
    })
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
