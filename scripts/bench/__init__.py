"""Shared benchmark harness: synthetic datasets, child-process stage runner, per-tool stages and JSONL results.

How it is imported: ``scripts/`` is put on ``sys.path`` by the entry scripts (``scripts/bench_planning.py``) and
by the tests, so the package is ``bench``; every child process gets ``scripts/`` on ``PYTHONPATH`` from
``bench.child.run_stage``. Nothing here is part of the installed ``segforge`` package on purpose: the harness
must keep working while segforge's internals change, and it also drives nnU-Net.

Modules: ``datasets`` (named synthetic presets, written once), ``results`` (append-only JSONL, resumable),
``child`` (run one stage in a fresh interpreter with a timing protocol), ``importclock`` (time spent loading
modules inside a timed stage), ``segforge_runner`` and ``nnunet`` (the stages of each tool), ``report`` (medians
and the comparison table), ``paths`` (default locations), ``profile_stage`` (cProfile one stage: a script).

Adding a benchmark (preprocessing, training, inference): a ``stage_*`` function per tool (child side, see
``bench.child``), a method on ``SegforgeTool``/``NnunetTool`` that lays out its run folder and calls
``run_stage``, and a thin ``scripts/bench_<name>.py`` like ``bench_planning.py``.
"""
