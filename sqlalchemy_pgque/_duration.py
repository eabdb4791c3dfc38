"""Durations: seconds, a ``timedelta``, or PostgreSQL interval text.

A stop on the way of a message that fails: its handler raised, and the consumer
(``consumer.py``) nacks it through :meth:`Queue.nack <sqlalchemy_pgque.queue.Queue.nack>`
with ``retry_after``, which :func:`as_seconds` turns into the seconds the engine's
``nack`` is given. ``dead_interval`` and ``shutdown_timeout`` are durations too.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Final, TypeAlias

__all__ = ["Duration", "as_seconds", "short"]

Duration: TypeAlias = float | timedelta | str
"""A duration: seconds, a ``timedelta``, or text in PostgreSQL's interval style such as
``"5 minutes"``, ``"1 hour 30 minutes"``, ``"500 ms"`` or ``"00:05:00"``."""

_UNIT_SECONDS: Final = {
    "microsecond": 1e-6, "us": 1e-6,
    "millisecond": 1e-3, "ms": 1e-3,
    "second": 1.0, "sec": 1.0, "s": 1.0,
    "minute": 60.0, "min": 60.0, "m": 60.0,
    "hour": 3600.0, "hr": 3600.0, "h": 3600.0,
    "day": 86400.0, "d": 86400.0,
    "week": 604800.0, "w": 604800.0,
}
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)
_QUANTITY = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([a-z]+)\s*", re.ASCII)
# "[N day[s]] HH:MM[:SS[.f]]", the way PostgreSQL prints an interval.
_CLOCK = re.compile(
    r"\s*(?:(\d+)\s*days?\s+)?(\d+):([0-5]?\d)(?::([0-5]?\d(?:\.\d+)?))?\s*", re.ASCII
)


def _unit_seconds(unit: str) -> float | None:
    if unit in _UNIT_SECONDS:
        return _UNIT_SECONDS[unit]
    return _UNIT_SECONDS.get(unit[:-1]) if unit.endswith("s") else None


def _text_seconds(text_value: str) -> float:
    lowered = text_value.strip().lower()
    clock = _CLOCK.fullmatch(lowered)
    if clock:
        days, hours, minutes, seconds = clock.groups()
        return (int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60
                + float(seconds or 0))
    if _NUMBER.fullmatch(lowered):
        return float(lowered)
    total, position = 0.0, 0
    while position < len(lowered):
        match = _QUANTITY.match(lowered, position)
        unit = _unit_seconds(match.group(2)) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"not a duration: {text_value!r}; give seconds, a timedelta, or text "
                "such as '5 minutes', '1 hour 30 minutes', '500 ms' or '00:05:00'"
            )
        total += float(match.group(1)) * unit
        position = match.end()
    if position == 0:
        raise ValueError(f"not a duration: {text_value!r}")
    return total


def as_seconds(value: Duration) -> float:
    """A :data:`Duration` in seconds; ``ValueError`` for text that is not one, and for
    NaN or infinity, which PostgreSQL's intervals cannot hold."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    seconds = _text_seconds(value) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"not a duration: {value!r} is not finite")
    return seconds


def short(seconds: float) -> str:
    """``0.4s``, ``12s``, ``3m04s``, ``2h01m``, ``3d04h``: short and readable, as the
    command line and the dashboard print ages and lags."""
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
