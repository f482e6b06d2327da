"""Profile one stage of one tool with cProfile (in a child process, like the benchmark) and print where time goes.

Run from anywhere: ``python scripts/bench/profile_stage.py --tool segforge --stage fingerprint [--dataset plan100]
[--workers 1] [--max-cases N] [segforge plan overrides key=value ...]`` (this file puts ``scripts/`` on
``sys.path``). cProfile sees the child's main process only, so the fingerprint is profiled serially: segforge
with ``--workers 1`` (``compute_fingerprint`` then runs in-process), nnU-Net through its per-case function
``analyze_case`` in a loop (its extractor always uses a pool). Work folders go to ``<bench root>/profile``;
the full profile is ``<run folder>/<stage>.prof`` (open with ``python -m pstats`` or snakeviz).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a file: Python put scripts/bench/ first on sys.path, where our `datasets` would shadow the
    # Hugging Face package of that name; scripts/ instead makes the harness importable as `bench`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.datasets import PRESETS, ensure_dataset, get_preset  # noqa: E402
from bench.nnunet import NnunetTool  # noqa: E402
from bench.paths import default_bench_root  # noqa: E402
from bench.segforge_runner import SegforgeTool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tool", choices=["segforge", "nnunet"], required=True)
    p.add_argument("--stage", choices=["fingerprint", "plan"], required=True)
    p.add_argument("--dataset", default="plan100", choices=sorted(PRESETS))
    p.add_argument("--workers", type=int, default=1, help="segforge fingerprint workers (1: profiled in-process)")
    p.add_argument("--max-cases", type=int, default=None, help="nnU-Net fingerprint: only the first N cases")
    p.add_argument("--bench-root", type=Path, default=None)
    p.add_argument("--lines", type=int, default=60, help="lines of the text summary to print")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="segforge plan overrides")
    args = p.parse_args(argv)
    preset = get_preset(args.dataset)
    bench_root = (args.bench_root or default_bench_root()).resolve()
    root = ensure_dataset(preset, bench_root)
    work = bench_root / "profile"
    if args.tool == "segforge":
        tool = SegforgeTool(root, work, args.workers, args.overrides)
        if args.stage == "plan" and not tool.has_fingerprint(0):
            tool.fingerprint(0)
        result = getattr(tool, args.stage)(0, profile=True)
        name = args.stage
    else:
        tool = NnunetTool(root, preset.dataset_id, work, args.workers)
        if args.stage == "fingerprint":
            result, name = tool.fingerprint_serial(0, args.max_cases), "fingerprint_serial"
        else:
            if not tool.has_fingerprint(0):
                tool.fingerprint(0)
            result, name = tool.plan(0, profile=True), "plan"
    summary = tool.run_dir(0) / f"{name}.profile.txt"
    print(f"{args.tool} {args.stage} on {preset.name}: {result.seconds:.2f} s in-process (under cProfile), "
          f"{result.wall_seconds:.2f} s wall; metrics {result.metrics}\nprofile: {summary.with_suffix('').with_suffix('.prof')}")
    print("\n".join(summary.read_text().splitlines()[: args.lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
