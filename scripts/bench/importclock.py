"""Measure the time a process spends loading new modules, without slowing down imports of loaded ones.

Imported as ``bench.importclock`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``).

Why not wrap ``builtins.__import__``: libraries such as torch run ``import`` statements inside hot functions
(hundreds of thousands per planning run); a Python wrapper on each would itself cost a noticeable share of the
time being measured. A finder at the front of ``sys.meta_path`` is consulted only when a module is not in
``sys.modules`` yet, i.e. exactly when a real load happens, so already-loaded imports cost nothing extra.

The finder asks the other finders for the spec, then swaps in a loader whose ``exec_module`` is timed (only the
outermost load counts: nested loads happen inside it) and puts the original loader back on the module once it
has run, so nothing keeps seeing the wrapper afterwards. Searching for the module (``find_spec``) is timed too.
"""

from __future__ import annotations

import sys
import time


class _TimedLoader:
    """Delegates everything to ``loader``; times ``exec_module`` into ``clock``."""

    def __init__(self, loader, clock: "ImportClock"):
        self._loader = loader
        self._clock = clock

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        clock = self._clock
        outermost = clock._depth == 0
        clock._depth += 1
        start = time.perf_counter()
        try:
            self._loader.exec_module(module)
        finally:
            clock._depth -= 1
            if outermost:
                clock.seconds += time.perf_counter() - start
            try:  # best effort: some modules (torch's config modules) refuse new attributes
                if getattr(module, "__loader__", None) is self:
                    module.__loader__ = self._loader
                spec = getattr(module, "__spec__", None)
                if spec is not None and spec.loader is self:
                    spec.loader = self._loader
            except Exception:
                pass


class ImportClock:
    """``with ImportClock() as clock: ...`` then ``clock.seconds``: time spent loading modules inside the block."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if self._searching:  # a finder importing something while it searches: let it through untimed
            return None
        self._searching = True
        start = time.perf_counter()
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
            if self._depth == 0:
                self.seconds += time.perf_counter() - start
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _TimedLoader(spec.loader, self)
        return spec

    def __enter__(self) -> "ImportClock":
        sys.meta_path.insert(0, self)
        return self

    def __exit__(self, *exc) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
