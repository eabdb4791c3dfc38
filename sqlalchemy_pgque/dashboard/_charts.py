"""Charts drawn on the server as inline SVG: they show with JavaScript off, need no
chart library, and the live refresh only swaps a polyline's points.

Only numbers computed here and label strings go into the markup, and the templates
escape the labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

SPARK_WIDTH = 120
SPARK_HEIGHT = 24


def sparkline_points(values: Sequence[float], width: float = SPARK_WIDTH,
                     height: float = SPARK_HEIGHT) -> str:
    """The ``points`` of a polyline drawing ``values`` left to right, scaled to the
    box (the largest value touches the top; all zeros lie on the bottom line)."""
    if not values:
        return ""
    if len(values) == 1:
        values = [values[0], values[0]]
    top = max(max(values), 0.0)
    step = width / (len(values) - 1)
    # One pixel of margin so that a flat line at the top or bottom stays visible.
    usable = height - 2

    def y(value: float) -> float:
        return 1 + usable - (usable * max(value, 0.0) / top if top > 0 else 0.0)

    return " ".join(f"{i * step:.1f},{y(value):.1f}" for i, value in enumerate(values))


@dataclass(frozen=True)
class Line:
    css_class: str
    label: str
    points: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str
    anchor: str = "end"
    """SVG text-anchor: the time labels at the ends stay inside the chart."""


@dataclass(frozen=True)
class Chart:
    """A line chart laid out for the template: plot area, lines, axis labels."""

    title: str
    width: int
    height: int
    left: int
    top: int
    plot_width: int
    plot_height: int
    lines: tuple[Line, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    empty: bool


def line_chart(title: str, times: Sequence[datetime],
               series: Sequence[tuple[str, str, Sequence[float]]], *,
               unit: str = "", width: int = 640, height: int = 180) -> Chart:
    """A chart of ``series`` (css class, label, one value per time) over ``times``."""
    left, top, right, bottom = 56, 12, 12, 26
    plot_width, plot_height = width - left - right, height - top - bottom
    highest = max((max(values, default=0.0) for _, _, values in series), default=0.0)
    scale_top = _nice_ceiling(highest)
    lines = []
    for css_class, label, values in series:
        # Scaled against the rounded axis top, so that the line meets its labels.
        scaled = [value / scale_top * (plot_height - 2) for value in values]
        points = " ".join(
            f"{left + i * plot_width / max(len(values) - 1, 1):.1f},"
            f"{top + plot_height - 1 - v:.1f}"
            for i, v in enumerate(scaled)
        )
        lines.append(Line(css_class, label, points))
    y_ticks = tuple(
        Tick(top + plot_height - plot_height * fraction,
             _axis_number(scale_top * fraction) + unit)
        for fraction in (0.0, 0.5, 1.0)
    )
    x_ticks: tuple[Tick, ...] = ()
    if times:
        last = len(times) - 1
        x_ticks = tuple(
            Tick(left + plot_width * index / max(last, 1),
                 times[index].astimezone().strftime("%H:%M"),
                 "start" if index == 0 else "end" if index == last else "middle")
            for index in sorted({0, last // 2, last})
        )
    return Chart(title, width, height, left, top, plot_width, plot_height, tuple(lines),
                 y_ticks, x_ticks, empty=not times)


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten at or above ``value`` (1 for 0)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** (len(str(int(value))) - 1) if value >= 1 else 0.1
    while magnitude > value:
        magnitude /= 10
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= value:
            return factor * magnitude
    return 10 * magnitude


def _axis_number(value: float) -> str:
    return f"{value:g}" if value < 1000 else f"{value:,.0f}"
