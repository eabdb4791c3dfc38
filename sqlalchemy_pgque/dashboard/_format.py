"""How figures read on the page: the same text on the first render and on each refresh
(the live endpoint sends these strings, so the script never formats anything)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .._duration import short


def duration(seconds: float | None, never: str = "-") -> str:
    """``0.4s``, ``12s``, ``3m04s``, ``2h01m``, ``3d04h``, as the command line prints;
    ``never`` for ``None``."""
    return never if seconds is None else short(seconds)


def ago(seconds: float | None, never: str = "never") -> str:
    return never if seconds is None else f"{duration(seconds)} ago"


def rate(per_second: float | None) -> str:
    if per_second is None:
        return "-"
    if per_second >= 100:
        return f"{per_second:,.0f}"
    return f"{per_second:.1f}"


def count(value: int) -> str:
    return f"{value:,}"


def moment(value: datetime) -> str:
    """A time in the server's local zone, to the second."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def preview(payload: Any, width: int = 80) -> str:
    """A payload on one line, cut to ``width`` characters (the page escapes it)."""
    text = json.dumps(payload, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
