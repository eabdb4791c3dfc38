"""What an operator asks of a PgQue database: its queues, its consumers, its dead letters.

::

    from sqlalchemy_pgque import admin

    for queue in admin.queues(engine):
        print(queue.queue, queue.pending_events, queue.ticker_lag_seconds)
    for consumer in admin.stuck_consumers(engine, older_than="10 minutes"):
        print(consumer.label, consumer.lag_seconds)
    for entry in admin.dlq_list(engine, queue="orders", type="order.created"):
        print(entry.id, entry.reason, entry.payload)

Every function takes an :class:`~sqlalchemy.Engine` (it then opens its own transaction
and commits what it changes) or a Session / Connection (it runs in the current
transaction, and committing is up to the caller). Results are frozen dataclasses. Only
PgQue 0.2 functions and tables are read, so this works against any PgQue 0.2 install;
the figures are only as true as that install's ``get_consumer_info()``. The command
line (``sqlalchemy-pgque status`` / ``dlq``) and the worker's metrics are built on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from . import _statements as statements
from ._duration import Duration, as_seconds
from ._statements import Bind
from .errors import DeadLetterNotFound, QueueNotFound

__all__ = [
    "ConsumerStatus",
    "DeadLetter",
    "QueueStatus",
    "consumers",
    "dlq_list",
    "dlq_purge",
    "dlq_replay",
    "dlq_show",
    "queues",
    "stuck_consumers",
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
    def read(connection: Connection) -> list[QueueStatus]:
        rows = _run(connection, statements.QUEUE_STATUS, {"queue": queue}).all()
        slowest: dict[str, int] = {}
        for consumer in _consumers(connection, queue):
            slowest[consumer.queue] = max(slowest.get(consumer.queue, 0),
                                          consumer.pending_events)
        return [_queue_status(row, slowest.get(row.queue_name, 0)) for row in rows]

    result = _read(bind, read)
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
    rows = _run(connection, statements.CONSUMER_STATUS, {"queue": queue})
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


def dlq_list(
    bind: Engine | Bind,
    queue: str | None = None,
    *,
    consumer: str | None = None,
    type: str | None = None,
    since: datetime | None = None,
    before: datetime | None = None,
    limit: int | None = 100,
    after_id: int | None = None,
) -> list[DeadLetter]:
    """Dead letters, oldest first, filtered by queue, consumer, event type and time
    (``since`` inclusive, ``before`` exclusive); ``limit`` rows at most (``None``: all).
    Page with ``after_id=<the last id of the previous page>``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    params = {"queue": queue, "consumer": consumer, "type": type, "since": since,
              "before": before, "after_id": after_id, "ids": None, "limit": limit}
    return _read(bind, lambda connection: [
        _dead_letter(row) for row in _run(connection, statements.DEAD_LETTERS, params)
    ])


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
    since: datetime | None = None,
    before: datetime | None = None,
) -> dict[int, int]:
    """Send dead letters back to their queue: the ones in ``ids``, or every one the
    filters match (at least one filter or ``ids`` is required). Returns
    ``{dead-letter id: new event id}``.

    Each replay is PgQue's ``dlq_replay()``: the event is inserted again with a new id
    and no retry count, and the dead letter is deleted, in one transaction; an id
    replayed twice, or concurrently, is replayed once (the second raises
    :class:`DeadLetterNotFound`). Like every new event it reaches every consumer
    subscribed to the queue, not only the one that gave up on it.
    """
    chosen = _chosen(ids, queue, consumer, type, since, before)

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
) -> int:
    """Delete dead letters for good: the ones in ``ids``, or those dead-lettered more
    than ``older_than`` ago (of ``queue``, or of every queue). Returns how many.

    ``older_than`` runs PgQue's ``dlq_purge()`` (pgque_admin); deleting by id needs
    DELETE on ``pgque.dead_letter`` (pgque_admin has it).
    """
    if (ids is None) == (older_than is None):
        raise ValueError("give ids or older_than (one of them)")

    def purge(connection: Connection) -> int:
        if ids is not None:
            return int(_run(connection, statements.DLQ_DELETE, {"ids": list(ids)},
                            role=statements.ADMIN).rowcount)
        assert older_than is not None
        interval = f"{as_seconds(older_than)} seconds"
        names = [queue] if queue is not None else list(
            _run(connection, statements.QUEUE_NAMES, {}).scalars())
        return sum(
            int(_run(connection, statements.DLQ_PURGE_QUEUE,
                     {"queue": name, "older_than": interval},
                     role=statements.ADMIN).scalar_one() or 0)
            for name in names
        )

    return _read(bind, purge)


@dataclass(frozen=True)
class _Selection:
    ids: list[int] | None
    filters: dict[str, Any]


def _chosen(ids: Sequence[int] | None, queue: str | None, consumer: str | None,
            type: str | None, since: datetime | None, before: datetime | None) -> _Selection:
    filters = {"queue": queue, "consumer": consumer, "type": type, "since": since,
               "before": before}
    if ids is None and all(value is None for value in filters.values()):
        raise ValueError("give ids or at least one filter (queue, consumer, type, since, "
                         "before): replaying every dead letter takes a deliberate filter")
    return _Selection(None if ids is None else list(ids), filters)


def _matching_ids(connection: Connection, chosen: _Selection) -> list[int]:
    params = {**chosen.filters, "after_id": None, "ids": chosen.ids, "limit": None}
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
