"""Wall-clock durations as settings take them (``budget=15m``, ``trainer.max_time=00:02:00:00``), as seconds.

Its own module, free of Lightning: ``segforge plan DATASET budget=...`` reads a duration, and importing Lightning
for it took 1.5 s of the command.
"""

from __future__ import annotations

import re

from segforge.errors import SegforgeError

_UNITS = {"d": 86400, "h": 3600, "m": 60, "min": 60, "s": 1}


def parse_duration(value, name: str = "duration") -> float | None:
    """Seconds from Lightning's ``max_time`` forms ("DD:HH:MM:SS", a dict of days/hours/minutes/seconds, seconds) or
    a short form: "15m", "1h30m", "90s", "2d". ``None`` or "" is no limit; anything else unreadable, zero or negative
    is refused naming the setting (``name``, e.g. ``budget``)."""
    if value in (None, "", "null"):
        return None
    try:
        seconds = _seconds(value)
    except (ValueError, KeyError, TypeError):
        seconds = None
    if seconds is None or not seconds > 0:
        raise SegforgeError(f"{name}={value!r}: not a positive duration. Fix: write e.g. {name}=15m, 1h30m, 90s or "
                            "DD:HH:MM:SS")
    return seconds


def _seconds(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    if text and text[-1].isalpha():
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(d|h|min|m|s)", text)
        if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
            return None
        return float(sum(float(n) * _UNITS[u] for n, u in parts))
    if isinstance(value, dict) or hasattr(value, "items"):
        units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
        return float(sum(units[k] * float(v) for k, v in dict(value).items()))
    parts = [float(p) for p in str(value).split(":")]
    return float(sum(part * unit for part, unit in zip(reversed(parts), (1, 60, 3600, 86400))))
