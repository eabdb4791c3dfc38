"""What an operator asks of a PgQue database: its queues, its consumers, its dead letters.

::

    from sqlalchemy_pgque import admin

    for queue in admin.queues(engine):
        print(queue.queue, queue.pending_events, queue.ticker_lag_seconds)
    for consumer in admin.stuck_consumers(engine, older_than="10 minutes"):
        print(consumer.label, consumer.lag_seconds)
    for entry in admin.dlq_list(engine, queue="orders", reason="timeout"):
        print(entry.id, entry.reason, entry.payload)
    for point in admin.throughput_history(engine, minutes=10)["orders"]:
        print(point.bucket_start, point.events_per_second)

Every function takes an :class:`~sqlalchemy.Engine` (it then opens its own transaction
and commits what it changes) or a Session / Connection (it runs in the current
transaction, and committing is up to the caller). Results are frozen dataclasses. Only
PgQue 0.2 functions and tables are read, so this works against any PgQue 0.2 install;
the figures are only as true as that install's ``get_consumer_info()``. The command
line (``sqlalchemy-pgque status`` / ``dlq``), the worker's metrics and the dashboard
are built on it; the dashboard's reads are a fixed number of statements whatever the
number of queues.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from math import ceil
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from . import _statements as statements
from ._duration import Duration, as_seconds
from ._statements import Bind
from .errors import DeadLetterNotFound, QueueNotFound

__all__ = [
    "ConsumerStatus",
    "DeadLetter",
    "ErrorPoint",
    "QueueStatus",
    "RatePoint",
    "consumers",
    "dlq_count",
    "dlq_growth",
    "dlq_list",
    "dlq_purge",
    "dlq_replay",
    "dlq_show",
    "error_history",
    "queues",
    "stuck_consumers",
    "throughput_history",
]

T = TypeVar("T")


class _Figures:
    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (ISO times, lists), for ``--json``."""
        result: dict[str, Any] = {}
        for name in self.__dataclass_fields__:  # type: ignore[attr-defined]
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            result[name] = value
        return result


@dataclass(frozen=True)
class QueueStatus(_Figures):
    """One queue, as ``admin.queues()`` sees it."""

    queue: str
    pending_events: int
    """Events sent and not yet acked by the queue's slowest consumer (its
    ``pending_events``), plus those not in a tick yet."""
    events_not_ticked: int
    """Events sent since the latest tick (``get_queue_info().ev_new``)."""
    events_per_second: float | None
    """Insert rate over the latest ticks; ``None`` before two ticks exist."""
    ticker_lag_seconds: float | None
    """Age of the latest tick; ``None`` when the queue was never ticked."""
    dlq_events: int
    current_table: int
    tables: int
    seconds_since_rotation: float
    rotation_period_seconds: float | None
    rotation_pending_step2: bool
    """Rotation step 1 ran and step 2 (``maint_rotate_tables_step2()``) has not yet."""
    rotation_blocked_by: tuple[str, ...]
    """Consumers whose cursor keeps an overdue rotation from truncating the oldest
    event table: while they do not move, the queue's tables only grow."""
    ticker_paused: bool
    external_ticker: bool


@dataclass(frozen=True)
class ConsumerStatus(_Figures):
    """One consumer of one queue, or one subconsumer of a cooperative consumer."""

    queue: str
    consumer: str
    """The consumer subscribed to the queue (for a subconsumer: its cooperative consumer)."""
    subconsumer: str | None
    cooperative: bool
    """A cooperative consumer's own row (its subconsumers have rows of their own)."""
    lag_seconds: float | None
    """Age of the tick the consumer's cursor is at: how far behind it is."""
    last_seen_seconds: float
    """Time since the consumer last took or finished a batch."""
    pending_events: int
    batch_id: int | None
    """The batch the consumer holds open, if any."""
    batch_age_seconds: float | None
    """How long that batch has been open."""

    @property
    def label(self) -> str:
        """``queue/consumer`` or ``queue/consumer.subconsumer``, as the worker logs it."""
        sub = f".{self.subconsumer}" if self.subconsumer else ""
        return f"{self.queue}/{self.consumer}{sub}"


@dataclass(frozen=True)
class DeadLetter(_Figures):
    """A dead-lettered event: a message its consumer gave up on after its retries."""

    id: int
    queue: str
    consumer: str
    time: datetime
    """When it was dead-lettered."""
    reason: str | None
    event_id: int
    event_time: datetime
    retry_count: int | None
    type: str | None
    payload: Any
    """The decoded JSON payload (the raw text when it is not JSON)."""
    extra1: str | None
    extra2: str | None
    extra3: str | None
    extra4: str | None


@dataclass(frozen=True)
class RatePoint(_Figures):
    """Events sent to a queue in one time bucket (``admin.throughput_history()``)."""

    bucket_start: datetime
    """Start of the bucket, a multiple of the bucket size since the Unix epoch (UTC)."""
    events: int
    """Events the queue's ticks closed in during the bucket."""
    events_per_second: float
    """``events`` over the bucket's length; for the bucket in progress, over the part
    of it that has passed."""


@dataclass(frozen=True)
class ErrorPoint(_Figures):
    """Retries and dead letters of a queue in one time bucket (``admin.error_history()``)."""

    bucket_start: datetime
    """Start of the bucket, a multiple of the bucket size since the Unix epoch (UTC)."""
    retries: int
    """Nacked events that came back for another try in the bucket."""
    dead_letters: int
    """Events dead-lettered in the bucket."""




@contextmanager
def _connection(bind: Engine | Bind) -> Iterator[Connection]:
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            yield connection
    else:
        yield statements.bind_connection(bind)


def _read(bind: Engine | Bind, read: Callable[[Connection], T]) -> T:
    with _connection(bind) as connection:
        return read(connection)


def queues(bind: Engine | Bind, queue: str | None = None) -> list[QueueStatus]:
    """Every queue (or just ``queue``), by name; :class:`QueueNotFound` for an unknown
    ``queue``."""
    statement = statements.QUEUE_STATUS if queue is None else statements.QUEUE_STATUS_ONE
    result = _read(bind, lambda connection: [
        _queue_status(row, int(row.slowest_pending))
        for row in _run(connection, statement, {"queue": queue})
    ])
    if queue is not None and not result:
        raise QueueNotFound(f"queue not found: {queue}")
    return result


def _queue_status(row: Any, slowest_pending: int) -> QueueStatus:
    not_ticked = max(int(row.ev_new or 0), 0)
    return QueueStatus(
        queue=row.queue_name,
        pending_events=slowest_pending + not_ticked,
        events_not_ticked=not_ticked,
        events_per_second=row.ev_per_sec,
        ticker_lag_seconds=row.ticker_lag,
        dlq_events=int(row.dlq),
        current_table=row.queue_cur_table,
        tables=row.queue_ntables,
        seconds_since_rotation=row.since_rotation,
        rotation_period_seconds=row.rotation_period,
        rotation_pending_step2=bool(row.mid_rotation),
        rotation_blocked_by=tuple(row.blocked_by or ()),
        ticker_paused=bool(row.queue_ticker_paused),
        external_ticker=bool(row.queue_external_ticker),
    )


def consumers(bind: Engine | Bind, queue: str | None = None) -> list[ConsumerStatus]:
    """Every consumer and subconsumer (of ``queue``, if given), by queue and name."""
    return _read(bind, lambda connection: _consumers(connection, queue))


def _consumers(connection: Connection, queue: str | None) -> list[ConsumerStatus]:
    statement = (statements.CONSUMER_STATUS if queue is None
                 else statements.CONSUMER_STATUS_ONE)
    rows = _run(connection, statement, {"queue": queue})
    result = []
    for row in rows:
        consumer, subconsumer = row.consumer_name, None
        if row.sub_role == "coop_member" and row.main_name:
            consumer = row.main_name
            subconsumer = row.consumer_name.removeprefix(f"{row.main_name}.")
        batch_open = row.current_batch is not None
        result.append(ConsumerStatus(
            queue=row.queue_name,
            consumer=consumer,
            subconsumer=subconsumer,
            cooperative=row.sub_role == "coop_main",
            lag_seconds=row.lag,
            last_seen_seconds=row.last_seen or 0.0,
            pending_events=max(int(row.pending_events or 0), 0),
            batch_id=row.current_batch,
            # next_batch sets the consumer's last-seen time when it opens the batch.
            batch_age_seconds=row.last_seen if batch_open else None,
        ))
    return result


def stuck_consumers(bind: Engine | Bind, older_than: Duration,
                    queue: str | None = None) -> list[ConsumerStatus]:
    """Consumers that look stopped: their cursor is older than ``older_than`` (a
    :data:`~sqlalchemy_pgque.Duration`), or they have held a batch open that long.

    A consumer that stopped acking pins its queue's oldest event table: rotation
    waits for it and the tables grow. A cooperative consumer's own row is judged by
    its subconsumers, which do the work.
    """
    limit = as_seconds(older_than)
    return [
        consumer for consumer in consumers(bind, queue)
        if not consumer.cooperative and (
            (consumer.lag_seconds is not None and consumer.lag_seconds > limit)
            or (consumer.batch_age_seconds is not None and consumer.batch_age_seconds > limit)
        )
    ]


def throughput_history(
    bind: Engine | Bind,
    *,
    queue: str | None = None,
    minutes: float = 10,
    bucket_seconds: int = 30,
) -> dict[str, list[RatePoint]]:
    """Events sent per time bucket over the last ``minutes``, for every queue (or just
    ``queue``): ``{queue name: points, oldest first}``, in one statement whatever the
    number of queues. Every bucket of the window is there, empty ones with 0, so the
    series of all queues have the same length; buckets start on multiples of
    ``bucket_seconds`` since the Unix epoch and the last one is in progress.

    Read from what every PgQue 0.2 install keeps, the ticks (they live until rotation
    deletes them, two rotation periods): an event counts in the bucket of the tick that
    closes it into a batch, so events not ticked yet are not in it. The figures are event
    counts, not sequence movement: a forced tick (``force_next_tick``, or the worker's
    commit-woken ticker) adds nothing, where PgQue's own ``throughput()`` counts
    ~2 * ticker_max_count + 1000 for each. That needs the skipped-values bookkeeping of
    this project's engine; against another PgQue install, forced ticks count as there.
    :class:`QueueNotFound` for an unknown ``queue``.
    """
    buckets = _bucket_count(minutes, bucket_seconds)
    params = {"queue": queue, "bucket_seconds": bucket_seconds, "buckets": buckets}
    rows = _read(bind, lambda connection: _run(
        connection, statements.THROUGHPUT_HISTORY, params).all())
    if queue is not None and not rows:
        raise QueueNotFound(f"queue not found: {queue}")
    if not rows:
        return {}
    last_bucket, now = int(rows[0].last_bucket), float(rows[0].now_epoch)
    starts = _bucket_starts(last_bucket, buckets, bucket_seconds)
    times = [_utc(start) for start in starts]
    # The bucket in progress has lasted now - its start, not a whole bucket.
    lengths = [float(bucket_seconds)] * (buckets - 1) + [
        min(max(now - last_bucket, 1.0), float(bucket_seconds))]
    history = {}
    for row in rows:
        counts = dict(zip(row.buckets or (), row.events or (), strict=True))
        history[row.queue_name] = [
            RatePoint(bucket_start=time, events=int(counts.get(start, 0)),
                      events_per_second=int(counts.get(start, 0)) / length)
            for start, time, length in zip(starts, times, lengths, strict=True)
        ]
    return history


def error_history(
    bind: Engine | Bind,
    queue: str,
    *,
    minutes: float = 60,
    bucket_seconds: int = 60,
) -> list[ErrorPoint]:
    """Retries and dead letters of ``queue`` per time bucket over the last ``minutes``,
    oldest first, every bucket present (epoch-aligned, the last one in progress); two
    statements. :class:`QueueNotFound` for an unknown queue.

    ``dead_letters``: the queue's rows in ``pgque.dead_letter`` by their ``dl_time``
    (those replayed or purged since are gone, and no longer counted).
    ``retries``: nacked events that came back for another try. A nack parks the event
    in ``pgque.retry_queue`` with the time it is due, and keeps no record of when the
    nack happened; when due, the retry mover (``maint_retry_events``) puts it back into
    the queue's event tables with its retry count (``ev_retry`` >= 1). Those copies are
    counted, in the bucket of the tick that closes them into a batch, for as long as
    rotation keeps them; a retry still waiting for its time is not counted yet. PgQue's
    ``error_rate()`` counts the waiting ones instead, by due time.
    """
    buckets = _bucket_count(minutes, bucket_seconds)

    def read(connection: Connection) -> tuple[int, dict[tuple[str, int], int]]:
        found = _run(connection, statements.QUEUE_EVENT_TABLE,
                     {"queue": queue, "bucket_seconds": bucket_seconds,
                      "buckets": buckets}).first()
        if found is None:
            raise QueueNotFound(f"queue not found: {queue}")
        quote = connection.dialect.identifier_preparer.quote
        event_table = ".".join(quote(part) for part in found.queue_data_pfx.split(".", 1))
        last_bucket = int(found.last_bucket)
        rows = _run(connection, statements.error_history(event_table), {
            "queue_id": found.queue_id, "bucket_seconds": bucket_seconds,
            "first_bucket": last_bucket - (buckets - 1) * bucket_seconds,
            "since_xid": found.since_xid,
        })
        return last_bucket, {(row.kind, int(row.bucket)): int(row.events) for row in rows}

    last_bucket, counts = _read(bind, read)
    return [
        ErrorPoint(bucket_start=_utc(start), retries=counts.get(("retries", start), 0),
                   dead_letters=counts.get(("dead_letters", start), 0))
        for start in _bucket_starts(last_bucket, buckets, bucket_seconds)
    ]


def dlq_growth(bind: Engine | Bind, *, minutes: float = 10) -> dict[str, int]:
    """Dead letters per queue dead-lettered in the last ``minutes`` (still in the DLQ:
    replayed and purged ones are gone), in one statement; queues with none are absent."""
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    rows = _read(bind, lambda connection: _run(
        connection, statements.DLQ_GROWTH, {"period": f"{minutes * 60} seconds"}).all())
    return {row.queue_name: int(row.dead_letters) for row in rows}


def _bucket_count(minutes: float, bucket_seconds: int) -> int:
    """How many buckets of ``bucket_seconds`` cover the last ``minutes`` (at least one)."""
    if bucket_seconds < 1:
        raise ValueError(f"bucket_seconds must be >= 1, got {bucket_seconds}")
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    return max(ceil(minutes * 60 / bucket_seconds), 1)


def _bucket_starts(last_bucket: int, buckets: int, bucket_seconds: int) -> list[int]:
    """The epoch starts of ``buckets`` buckets, oldest first, ending with ``last_bucket``."""
    return [last_bucket - (buckets - 1 - n) * bucket_seconds for n in range(buckets)]


def _utc(epoch_seconds: int) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)


def dlq_list(
    bind: Engine | Bind,
    queue: str | None = None,
    *,
    consumer: str | None = None,
    type: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    before: datetime | None = None,
    limit: int | None = 100,
    after_id: int | None = None,
) -> list[DeadLetter]:
    """Dead letters, oldest first, filtered by queue, consumer, event type, reason (a
    case-insensitive part of it) and time (``since`` inclusive, ``before`` exclusive);
    ``limit`` rows at most (``None``: all). Page with ``after_id=<the last id of the
    previous page>``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    params = {**_sql_filters(_filters(queue, consumer, type, reason, since, before)),
              "after_id": after_id, "ids": None, "limit": limit}
    return _read(bind, lambda connection: [
        _dead_letter(row) for row in _run(connection, statements.DEAD_LETTERS, params)
    ])


def dlq_count(
    bind: Engine | Bind,
    queue: str | None = None,
    *,
    consumer: str | None = None,
    type: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    before: datetime | None = None,
) -> int:
    """How many dead letters :func:`dlq_list` with the same filters would list without
    a limit."""
    params = {**_sql_filters(_filters(queue, consumer, type, reason, since, before)),
              "after_id": None, "ids": None}
    return _read(bind, lambda connection: int(
        _run(connection, statements.DEAD_LETTER_COUNT, params).scalar_one()))


def dlq_show(bind: Engine | Bind, id: int) -> DeadLetter:
    """One dead letter; :class:`DeadLetterNotFound` when there is none with ``id``."""
    row = _read(bind, lambda connection: _run(
        connection, statements.DEAD_LETTER, {"id": id}).first())
    if row is None:
        raise DeadLetterNotFound(f"dead letter entry not found: {id}")
    return _dead_letter(row)


def dlq_replay(
    bind: Engine | Bind,
    ids: Sequence[int] | None = None,
    *,
    queue: str | None = None,
    consumer: str | None = None,
    type: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    before: datetime | None = None,
) -> dict[int, int]:
    """Send dead letters back to their queue: the ones in ``ids``, or every one the
    filters (those of :func:`dlq_list`) match; at least one filter or ``ids`` is
    required. Returns ``{dead-letter id: new event id}``.

    Each replay is PgQue's ``dlq_replay()``: the event is inserted again with a new id
    and no retry count, and the dead letter is deleted, in one transaction; an id
    replayed twice, or concurrently, is replayed once (the second raises
    :class:`DeadLetterNotFound`). Like every new event it reaches every consumer
    subscribed to the queue, not only the one that gave up on it.
    """
    chosen = _chosen(ids, _filters(queue, consumer, type, reason, since, before))

    def replay(connection: Connection) -> dict[int, int]:
        return {
            entry: int(_run(connection, statements.DLQ_REPLAY, {"id": entry},
                            role=statements.WRITER).scalar_one())
            for entry in _matching_ids(connection, chosen)
        }

    return _read(bind, replay)


def dlq_purge(
    bind: Engine | Bind,
    ids: Sequence[int] | None = None,
    *,
    older_than: Duration | None = None,
    queue: str | None = None,
    consumer: str | None = None,
    type: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
    before: datetime | None = None,
) -> int:
    """Delete dead letters for good: the ones in ``ids``, or every one the filters
    match: those dead-lettered more than ``older_than`` ago, and those of
    :func:`dlq_list` (at least one of them; ``older_than`` alone means of every queue).
    Returns how many.

    ``older_than`` with at most ``queue`` runs PgQue's ``dlq_purge()`` (pgque_admin);
    the rest needs DELETE on ``pgque.dead_letter`` (pgque_admin has it).
    """
    filters = _filters(queue, consumer, type, reason, since, before)
    chosen = _chosen(ids, {**filters, "older_than": older_than})
    if ids is not None and any(value is not None for value in chosen.filters.values()):
        raise ValueError("give ids or filters (older_than, queue, consumer, type, reason, "
                         "since, before), not both")

    def purge(connection: Connection) -> int:
        if ids is not None:
            return int(_run(connection, statements.DLQ_DELETE, {"ids": list(ids)},
                            role=statements.ADMIN).rowcount)
        if older_than is not None and all(
                value is None for name, value in filters.items() if name != "queue"):
            interval = f"{as_seconds(older_than)} seconds"
            names = [queue] if queue is not None else list(
                _run(connection, statements.QUEUE_NAMES, {}).scalars())
            return sum(
                int(_run(connection, statements.DLQ_PURGE_QUEUE,
                         {"queue": name, "older_than": interval},
                         role=statements.ADMIN).scalar_one() or 0)
                for name in names
            )
        return int(_run(connection, statements.DLQ_DELETE_MATCHING,
                        {**_sql_filters(chosen.filters), "after_id": None, "ids": None},
                        role=statements.ADMIN).rowcount)

    return _read(bind, purge)


def _filters(queue: str | None, consumer: str | None, type: str | None,
             reason: str | None, since: datetime | None,
             before: datetime | None) -> dict[str, Any]:
    return {"queue": queue, "consumer": consumer, "type": type, "reason": reason,
            "since": since, "before": before}


def _sql_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """The statements' filter parameters: ``older_than`` as interval text, NULL if unset."""
    older_than = filters.get("older_than")
    return {**filters, "older_than": None if older_than is None
            else f"{as_seconds(older_than)} seconds"}


@dataclass(frozen=True)
class _Selection:
    ids: list[int] | None
    filters: dict[str, Any]


def _chosen(ids: Sequence[int] | None, filters: dict[str, Any]) -> _Selection:
    if ids is None and all(value is None for value in filters.values()):
        raise ValueError(f"give ids or at least one filter ({', '.join(filters)}): "
                         "doing this to every dead letter takes a deliberate filter")
    return _Selection(None if ids is None else list(ids), filters)


def _matching_ids(connection: Connection, chosen: _Selection) -> list[int]:
    params = {**_sql_filters(chosen.filters), "after_id": None, "ids": chosen.ids,
              "limit": None}
    found = [row.dl_id for row in _run(connection, statements.DEAD_LETTERS, params)]
    if chosen.ids is not None:
        missing = sorted(set(chosen.ids) - set(found))
        if missing:
            raise DeadLetterNotFound(
                f"dead letter entry not found: {', '.join(map(str, missing))}")
        return chosen.ids
    return found


def _dead_letter(row: Any) -> DeadLetter:
    try:
        payload = json.loads(row.ev_data) if row.ev_data is not None else None
    except ValueError:
        payload = row.ev_data
    return DeadLetter(
        id=row.dl_id, queue=row.queue_name, consumer=row.co_name, time=row.dl_time,
        reason=row.dl_reason, event_id=row.ev_id, event_time=row.ev_time,
        retry_count=row.ev_retry, type=row.ev_type, payload=payload,
        extra1=row.ev_extra1, extra2=row.ev_extra2, extra3=row.ev_extra3,
        extra4=row.ev_extra4,
    )


def _run(connection: Connection, statement: Any, params: dict[str, Any],
         role: str = statements.READER) -> Any:
    return statements.execute(connection, statement, params, role)
