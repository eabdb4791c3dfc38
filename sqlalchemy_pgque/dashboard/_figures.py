"""What each page shows, read through :mod:`sqlalchemy_pgque.admin` in one transaction.

Every read here costs a fixed number of statements whatever the number of queues (the
admin functions read all queues at once), so a page costs the same for 3 queues as for
3,000. The live endpoints read a subset of what their page reads. The counts in the
docstrings leave out the statement :func:`snapshot` starts each transaction with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, Engine

from .. import _statements as statements
from .. import admin
from .._duration import as_seconds
from . import _charts, _format

SPARK_MINUTES = 10
SPARK_BUCKET_SECONDS = 30
CHART_MINUTES = 60
CHART_BUCKET_SECONDS = 60
DLQ_GROWTH_MINUTES = 10
DLQ_PAGE_SIZE = 50


# A page read that takes longer fails with a page that says so, instead of holding a
# worker thread, a connection and a snapshot while the database is stuck.
READ_TIMEOUT = "10s"


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """One short read-only transaction: a page's figures all come from one snapshot
    (REPEATABLE READ), and a read-only transaction cannot change anything whatever
    the role's rights. Its first statement sets the transaction's statement timeout."""
    with engine.connect() as connection:
        connection.execution_options(isolation_level="REPEATABLE READ",
                                     postgresql_readonly=True)
        with connection.begin():
            connection.execute(statements.FIGURES_STATEMENT_TIMEOUT,
                               {"timeout": READ_TIMEOUT})
            yield connection


@dataclass(frozen=True)
class Problem:
    queue: str
    kind: str
    """``rotation-blocked``, ``stuck-consumer``, ``old-tick`` or ``dlq-growing``."""
    text: str


@dataclass(frozen=True)
class QueueRow:
    status: admin.QueueStatus
    rates: tuple[float, ...]
    """Events per second per bucket over the last minutes, oldest first."""
    problems: tuple[Problem, ...]

    @property
    def name(self) -> str:
        return self.status.queue

    @property
    def sparkline(self) -> str:
        return _charts.sparkline_points(self.rates)

    def cells(self) -> dict[str, str]:
        """The refreshable cells of the overview's row, as displayed."""
        status = self.status
        return {
            "events_per_second": _format.rate(status.events_per_second),
            "pending_events": _format.count(status.pending_events),
            "ticker_lag_seconds": _format.ago(status.ticker_lag_seconds)
            + (" (paused)" if status.ticker_paused else ""),
            "dlq_events": _format.count(status.dlq_events),
            "rotation": rotation_text(status),
        }


def rotation_text(status: admin.QueueStatus) -> str:
    text = (f"table {status.current_table + 1}/{status.tables}, rotated "
            f"{_format.ago(status.seconds_since_rotation)}")
    if status.rotation_blocked_by:
        return f"{text}; blocked by {', '.join(status.rotation_blocked_by)}"
    if status.rotation_pending_step2:
        return f"{text}; step 2 pending"
    return text


@dataclass(frozen=True)
class Overview:
    rows: tuple[QueueRow, ...]
    """Queues by their worst problem (see :data:`SEVERITY`), then by name."""
    problems: tuple[Problem, ...]


def _problems(status: admin.QueueStatus, consumers: Sequence[admin.ConsumerStatus],
              new_dead_letters: int, stale_after: float) -> tuple[Problem, ...]:
    found = [Problem(status.queue, "rotation-blocked",
                     f"rotation blocked by {name}: the event tables grow until it moves")
             for name in status.rotation_blocked_by]
    for consumer in consumers:
        if consumer.cooperative:
            continue  # judged by its subconsumers, which do the work
        if consumer.lag_seconds is not None and consumer.lag_seconds > stale_after:
            found.append(Problem(status.queue, "stuck-consumer",
                                 f"{consumer.label} is {_format.duration(consumer.lag_seconds)}"
                                 " behind"))
        elif consumer.batch_age_seconds is not None and consumer.batch_age_seconds > stale_after:
            found.append(Problem(status.queue, "stuck-consumer",
                                 f"{consumer.label} holds batch {consumer.batch_id} open for "
                                 f"{_format.duration(consumer.batch_age_seconds)}"))
    if not status.ticker_paused and (status.ticker_lag_seconds is None
                                     or status.ticker_lag_seconds > stale_after):
        found.append(Problem(status.queue, "old-tick",
                             f"latest tick {_format.ago(status.ticker_lag_seconds)}"))
    if new_dead_letters > 0:
        plural = "" if new_dead_letters == 1 else "s"
        found.append(Problem(status.queue, "dlq-growing",
                             f"{new_dead_letters} new dead letter{plural} in the last "
                             f"{DLQ_GROWTH_MINUTES} minutes"))
    return tuple(found)


# Worst first: a blocked rotation grows the tables until someone acts.
SEVERITY = ("rotation-blocked", "stuck-consumer", "old-tick", "dlq-growing")


def _worst(problems: Sequence[Problem]) -> int:
    return min((SEVERITY.index(p.kind) for p in problems), default=len(SEVERITY))


def overview(connection: Connection, stale_after: float) -> Overview:
    """Every queue with its figures, sparkline and problems: five statements."""
    statuses = admin.queues(connection)
    by_queue: dict[str, list[admin.ConsumerStatus]] = {}
    for consumer in admin.consumers(connection):
        by_queue.setdefault(consumer.queue, []).append(consumer)
    growth = admin.dlq_growth(connection, minutes=DLQ_GROWTH_MINUTES)
    rates = _rates(connection)
    rows = [
        QueueRow(status, rates.get(status.queue, ()),
                 _problems(status, by_queue.get(status.queue, ()),
                           growth.get(status.queue, 0), stale_after))
        for status in statuses
    ]
    rows.sort(key=lambda row: (_worst(row.problems), row.name))
    problems = sorted((p for row in rows for p in row.problems),
                      key=lambda p: SEVERITY.index(p.kind))
    return Overview(tuple(rows), tuple(problems))


def overview_live(connection: Connection) -> dict[str, Any]:
    """What the overview's script refreshes: the figures and the sparklines, without
    the consumers and the DLQ growth the problems need (three statements instead of
    the page's five)."""
    rates = _rates(connection)
    rows = [QueueRow(status, rates.get(status.queue, ()), ())
            for status in admin.queues(connection)]
    return {"queues": {row.name: {"cells": row.cells(), "sparkline": row.sparkline,
                                  "blocked_by": list(row.status.rotation_blocked_by)}
                       for row in rows}}


def _rates(connection: Connection, queue: str | None = None) -> dict[str, tuple[float, ...]]:
    history = admin.throughput_history(connection, queue=queue, minutes=SPARK_MINUTES,
                                       bucket_seconds=SPARK_BUCKET_SECONDS)
    return {name: tuple(point.events_per_second for point in points)
            for name, points in history.items()}


@dataclass(frozen=True)
class ConsumerRow:
    status: admin.ConsumerStatus
    stuck: bool

    def cells(self) -> dict[str, str]:
        status = self.status
        return {
            "lag_seconds": _format.duration(status.lag_seconds),
            "last_seen_seconds": _format.ago(status.last_seen_seconds),
            "pending_events": _format.count(status.pending_events),
            "batch_id": "-" if status.batch_id is None else str(status.batch_id),
            "batch_age_seconds": _format.duration(status.batch_age_seconds),
        }


@dataclass(frozen=True)
class QueuePage:
    row: QueueRow
    consumers: tuple[ConsumerRow, ...]
    throughput: _charts.Chart
    errors: _charts.Chart


def queue_page(connection: Connection, queue: str, stale_after: float) -> QueuePage:
    """One queue, its consumers and charts: seven statements.
    :class:`~sqlalchemy_pgque.QueueNotFound` for an unknown queue."""
    (status,) = admin.queues(connection, queue)
    consumers = admin.consumers(connection, queue)
    growth = admin.dlq_growth(connection, minutes=DLQ_GROWTH_MINUTES)
    history = admin.throughput_history(connection, queue=queue, minutes=CHART_MINUTES,
                                       bucket_seconds=CHART_BUCKET_SECONDS).get(queue, [])
    errors = admin.error_history(connection, queue, minutes=CHART_MINUTES,
                                 bucket_seconds=CHART_BUCKET_SECONDS)
    rates = tuple(point.events_per_second for point in history)
    row = QueueRow(status, rates[-(SPARK_MINUTES * 60 // CHART_BUCKET_SECONDS):],
                   _problems(status, consumers, growth.get(queue, 0), stale_after))
    stuck_labels = {c.label for c in consumers if _is_stuck(c, stale_after)}
    throughput = _charts.line_chart(
        "Events per second", [point.bucket_start for point in history],
        [("line-events", "events/s", rates)])
    error_chart = _charts.line_chart(
        "Retries and dead letters per minute", [point.bucket_start for point in errors],
        [("line-retries", "retries", [float(p.retries) for p in errors]),
         ("line-dead", "dead letters", [float(p.dead_letters) for p in errors])])
    return QueuePage(row, tuple(ConsumerRow(c, c.label in stuck_labels) for c in consumers),
                     throughput, error_chart)


def queue_live(connection: Connection, queue: str) -> dict[str, Any]:
    """What the queue page's script refreshes: the queue's and its consumers' figures
    (three statements, where the page reads seven; the charts move by the minute and
    wait for a reload)."""
    (status,) = admin.queues(connection, queue)
    return {
        "queue": QueueRow(status, (), ()).cells(),
        "consumers": {c.label: ConsumerRow(c, False).cells()
                      for c in admin.consumers(connection, queue)},
    }


def _is_stuck(consumer: admin.ConsumerStatus, stale_after: float) -> bool:
    return not consumer.cooperative and (
        (consumer.lag_seconds is not None and consumer.lag_seconds > stale_after)
        or (consumer.batch_age_seconds is not None and consumer.batch_age_seconds > stale_after))


# -- dead letters ------------------------------------------------------------------------

FILTER_NAMES = ("queue", "consumer", "type", "reason", "since", "before")


class BadFilter(ValueError):
    """A filter value the page cannot use (a time that is neither ISO nor a duration)."""


@dataclass(frozen=True)
class DeadLetterFilter:
    """The DLQ page's filters as typed, and as given (to put back in forms and links)."""

    given: dict[str, str]
    queue: str | None = None
    consumer: str | None = None
    type: str | None = None
    reason: str | None = None
    since: datetime | None = None
    before: datetime | None = None

    @classmethod
    def parse(cls, values: dict[str, str]) -> DeadLetterFilter:
        given = {name: values[name].strip() for name in FILTER_NAMES
                 if values.get(name, "").strip()}
        return cls(given, queue=given.get("queue"), consumer=given.get("consumer"),
                   type=given.get("type"), reason=given.get("reason"),
                   since=_moment("since", given.get("since")),
                   before=_moment("before", given.get("before")))

    @property
    def empty(self) -> bool:
        return not self.given

    def admin_filters(self) -> dict[str, Any]:
        return {"queue": self.queue, "consumer": self.consumer, "type": self.type,
                "reason": self.reason, "since": self.since, "before": self.before}

    def describe(self) -> str:
        return ", ".join(f"{name} {value!r}" for name, value in self.given.items())


def _moment(name: str, value: str | None) -> datetime | None:
    """An ISO time, or a duration meaning that long ago (``1 hour``), as the CLI reads."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        try:
            return datetime.now(timezone.utc) - timedelta(seconds=as_seconds(value))
        except (ValueError, TypeError):
            raise BadFilter(f"{name}: {value!r} is neither an ISO time nor a duration "
                            "such as '2 hours'") from None
    return moment if moment.tzinfo else moment.astimezone()


@dataclass(frozen=True)
class DeadLetterPage:
    entries: tuple[admin.DeadLetter, ...]
    matching: int
    next_after_id: int | None
    filters: DeadLetterFilter


def dead_letters(connection: Connection, filters: DeadLetterFilter,
                 after_id: int | None) -> DeadLetterPage:
    """A page of dead letters and how many match in all: two statements."""
    entries = admin.dlq_list(connection, limit=DLQ_PAGE_SIZE + 1, after_id=after_id,
                             **filters.admin_filters())
    matching = admin.dlq_count(connection, **filters.admin_filters())
    more = len(entries) > DLQ_PAGE_SIZE
    entries = entries[:DLQ_PAGE_SIZE]
    return DeadLetterPage(tuple(entries), matching,
                          entries[-1].id if more and entries else None, filters)
