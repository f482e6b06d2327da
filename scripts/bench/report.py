"""Reduce repeated stage runs to one record's metrics (medians), and print tool-vs-tool comparison tables.

Imported as ``bench.report`` (``scripts/`` on ``sys.path``, see ``bench/__init__.py``).
"""

from __future__ import annotations

import statistics

from bench.child import StageResult

# timings reduced by the median over repeats (robust to one run disturbed by other load on the machine)
TIMED = ("seconds", "wall_seconds", "cpu_seconds", "import_seconds")


def summarize(samples: list[StageResult]) -> dict:
    """One record's metrics: medians of the timings, every sample kept, peaks maxed, the stage's own metrics.

    The stage's extra metrics come from the first sample; numeric ones (e.g. ``make_plans_seconds``) get the median.
    """
    if not samples:
        raise ValueError("no samples")
    metrics = {key: statistics.median(getattr(s, key) for s in samples) for key in TIMED}
    metrics["samples"] = {key: [round(getattr(s, key), 4) for s in samples] for key in ("seconds", "wall_seconds")}
    metrics["repeats"] = len(samples)
    if all(s.other_cpu_seconds is not None for s in samples):
        metrics["other_cpu_seconds"] = statistics.median(s.other_cpu_seconds for s in samples)
        metrics["samples"]["other_cpu_seconds"] = [round(s.other_cpu_seconds, 2) for s in samples]
    metrics["peak_rss_mb"] = max(s.peak_rss_mb for s in samples)
    metrics["children_peak_rss_mb"] = max(s.children_peak_rss_mb for s in samples)
    for key, value in samples[0].metrics.items():
        values = [s.metrics.get(key) for s in samples]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        metrics.setdefault(key, statistics.median(values) if numeric else value)
    return metrics


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_rows(stage_metrics: dict[str, dict[str, dict | None]], baseline: str = "nnunet",
                    candidate: str = "segforge", target: float = 0.5) -> list[list[str]]:
    """Rows (stage, timing, baseline s, candidate s, ratio, verdict) for ``{stage: {tool: metrics or None}}``.

    A ``total`` row adds up the stages when both tools have every stage.
    """
    rows = []
    totals = {baseline: {"seconds": 0.0, "wall_seconds": 0.0}, candidate: {"seconds": 0.0, "wall_seconds": 0.0}}
    complete = True
    for stage, by_tool in list(stage_metrics.items()) + [("total", None)]:
        for key, label in (("seconds", "in-process"), ("wall_seconds", "wall")):
            if by_tool is None:
                if not complete:
                    continue
                b, c = totals[baseline][key], totals[candidate][key]
            else:
                b = (by_tool.get(baseline) or {}).get(key)
                c = (by_tool.get(candidate) or {}).get(key)
                if b is None or c is None:
                    complete = False
                else:
                    totals[baseline][key] += b
                    totals[candidate][key] += c
            ratio = c / b if b and c is not None else None
            verdict = "-" if ratio is None else ("ok" if ratio <= target else "slower than target")
            rows.append([stage, label, _fmt(b), _fmt(c), _fmt(ratio, 3), verdict])
    return rows


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if i >= 2 else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
