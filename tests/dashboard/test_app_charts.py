"""The server-side charts' geometry (no database: pure arithmetic on the figures)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy_pgque.dashboard._charts import line_chart, sparkline_points


def heights(points: str, box_height: float) -> list[float]:
    return [round(box_height - float(point.split(",")[1]), 1) for point in points.split()]


def test_a_sparkline_spans_its_box_with_the_largest_value_at_the_top() -> None:
    points = sparkline_points([0.0, 5.0, 10.0], width=100, height=22)
    xs = [float(point.split(",")[0]) for point in points.split()]
    assert xs == [0.0, 50.0, 100.0]
    # One pixel of margin top and bottom: 0 at 1 px up, the largest at 21 px.
    assert heights(points, 22) == [1.0, 11.0, 21.0]
    assert heights(sparkline_points([0.0, 0.0], height=22), 22) == [1.0, 1.0]
    assert sparkline_points([]) == ""
    assert len(sparkline_points([3.0]).split()) == 2  # one bucket still draws a line


def test_a_chart_scales_to_a_round_axis_top_and_labels_its_ends() -> None:
    start = datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc)
    times = [start + timedelta(minutes=n) for n in range(61)]
    chart = line_chart("t", times, [("a", "a", [0.0] * 60 + [37.0])])
    assert [tick.label for tick in chart.y_ticks] == ["0", "25", "50"]
    (line,) = chart.lines
    last_x, last_y = (float(v) for v in line.points.split()[-1].split(","))
    assert last_x == chart.left + chart.plot_width
    bottom = chart.top + chart.plot_height - 1
    assert round((bottom - last_y) / (chart.plot_height - 2), 2) == round(37 / 50, 2)
    assert [tick.anchor for tick in chart.x_ticks] == ["start", "middle", "end"]
    assert line_chart("t", [], [("a", "a", [])]).empty
    small = line_chart("t", times[:2], [("a", "a", [0.0, 0.03])])
    assert [tick.label for tick in small.y_ticks] == ["0", "0.025", "0.05"]
