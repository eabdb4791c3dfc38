"""Queue: a declaration of a PgQue queue and the calls made on it.

``Queue("orders")`` does no I/O. Declared consumers and queue settings are what the
Alembic autogenerate comparator (``alembic_ops``) compares with the database when the
queue is collected in a :class:`QueueRegistry`.

Sending is part of the unit of work: :meth:`Queue.send` records an event on the
Session and the Session emits it on its own connection, in its own transaction, when it
flushes or commits. Receiving, acknowledging and the other consumer-side calls are
immediate, one statement each.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from sqlalchemy import Connection, CursorResult, TextClause, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from .errors import InvalidName, PayloadError, translate
from .message import Message, encode_payload, messages_from_rows

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "MAX_MESSAGES",
    "WAKE_CHANNEL",
    "PendingEvent",
    "Queue",
    "QueueRegistry",
]

# The notify channel is 'pgque_' || name and channel names are identifiers of at most
# 63 bytes, hence PgQue's 57-byte limit on queue names.
MAX_QUEUE_NAME_BYTES = 57

#: NOTIFY channel of commit-woken ticking: every transaction that sends to a queue
#: notifies it with the queue name as payload, delivered when (and only if) it commits.
WAKE_CHANNEL: Final = "sqlalchemy_pgque_wake"

#: ``receive``'s default: take the whole batch.
MAX_MESSAGES: Final = 2_147_483_647

_NO_EXTRAS: Final = (None, None, None, None)

_READER: Final = "pgque_reader"
_WRITER: Final = "pgque_writer"
_ADMIN: Final = "pgque_admin"


def _check_name(kind: str, name: object, max_bytes: int | None = None) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{kind} name must be a non-empty string, got {name!r}")
    if max_bytes is not None and len(name.encode()) > max_bytes:
        raise InvalidName(
            f"{kind} name too long: {len(name.encode())} bytes (max {max_bytes}): {name!r}"
        )
    return name


def check_cooperative_name(kind: str, name: object) -> str:
    checked = _check_name(kind, name)
    if "." in checked:
        raise InvalidName(
            f"cooperative {kind} name must not contain a dot (members are stored as "
            f"<consumer>.<subconsumer>): {checked!r}"
        )
    return checked


class PendingEvent:
    """An event recorded by :meth:`Queue.send`, waiting for the Session to emit it.

    ``event_id`` is ``None`` until the Session flushes or commits, then the id PgQue
    assigned. It returns to ``None`` if the transaction (or the SAVEPOINT) that
    emitted it rolls back.
    """

    __slots__ = ("_emitted_in", "_factory", "_key", "_recorded_in", "_text", "event_id", "queue")

    def __init__(
        self,
        queue: Queue,
        key: tuple[str, str, tuple[str | None, ...] | None],
        text: str | None,
        factory: Callable[[], object] | None,
        recorded_in: SessionTransaction | None,
    ) -> None:
        self.queue = queue
        self.event_id: int | None = None
        self._key = key
        self._text = text
        self._factory = factory
        self._recorded_in = recorded_in
        self._emitted_in: SessionTransaction | None = None

    @property
    def type(self) -> str:
        """The event type."""
        return self._key[1]

    @property
    def extras(self) -> tuple[str | None, str | None, str | None, str | None]:
        """``(extra1, extra2, extra3, extra4)``."""
        extras = self._key[2]
        if extras is None:
            return _NO_EXTRAS
        return (extras[0], extras[1], extras[2], extras[3])

    def _payload_text(self) -> str:
        if self._factory is None:
            assert self._text is not None
            return self._text
        payload = self._factory()
        try:
            return encode_payload(payload)
        except PayloadError as exc:
            name = getattr(self._factory, "__qualname__", None) or repr(self._factory)
            raise PayloadError(
                f"payload callable {name} for queue {self.queue.name!r}, type {self.type!r}, "
                f"returned a payload that cannot be sent: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"<PendingEvent {self.queue.name!r} type={self.type!r} event_id={self.event_id}>"


class Queue:
    """A PgQue queue, declared by name.

    :param name: the queue name (at most 57 bytes).
    :param consumers: consumer names that should be subscribed; used by Alembic
        autogenerate, never subscribed implicitly at run time.
    :param cooperative: cooperative consumer groups that should exist, each mapped to
        the name of the member that creates it (``{"shipping": "w"}``); used by
        autogenerate, which registers that member (converting a normal consumer of
        the same name). Further members register themselves when they first receive.
    :param config: queue settings for ``pgque.set_queue_config`` (for example
        ``{"ticker_max_lag": "500 milliseconds", "max_retries": 3}``); used by
        autogenerate.
    :param registry: a :class:`QueueRegistry` to collect this declaration in.
    :param wake: whether a transaction that sends to the queue also notifies
        :data:`WAKE_CHANNEL`, so a worker running the ticker ticks the queue as soon
        as the transaction commits instead of at its next periodic tick.

    Sending happens in the unit of work::

        orders_q = Queue("orders")

        with Session(engine) as session, session.begin():
            order = Order(total=99)
            session.add(order)
            orders_q.send(session, lambda: {"order_id": order.id}, type="order.created")
        # the event commits with the order, or not at all

    The remaining methods (``receive``, ``ack``, ``nack``, ``subscribe``, ...) run one
    statement at once on ``bind``, a ``Session`` or ``Connection``, inside its current
    transaction; committing is up to the caller. Engine errors are raised as the
    exceptions of :mod:`sqlalchemy_pgque.errors`, chained to the SQLAlchemy error.
    """

    def __init__(
        self,
        name: str,
        *,
        consumers: Iterable[str] = (),
        cooperative: Mapping[str, str] | None = None,
        config: Mapping[str, object] | None = None,
        registry: QueueRegistry | None = None,
        wake: bool = True,
    ) -> None:
        self.name = _check_name("queue", name, MAX_QUEUE_NAME_BYTES)
        self.consumers: tuple[str, ...] = tuple(_check_name("consumer", c) for c in consumers)
        self.cooperative: dict[str, str] = {
            check_cooperative_name("consumer", group): check_cooperative_name(
                "subconsumer", member)
            for group, member in (cooperative or {}).items()
        }
        both = sorted(set(self.consumers) & set(self.cooperative))
        if both:
            raise InvalidName(
                f"queue {name!r}: {', '.join(map(repr, both))} declared both as a normal "
                "and as a cooperative consumer"
            )
        self.config: dict[str, str] = {
            k.removeprefix("queue_"): str(v) for k, v in (config or {}).items()
        }
        self.wake = wake
        if registry is not None:
            registry.add(self)

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    # -- the unit of work ----------------------------------------------------------

    def send(
        self,
        session: Session | AsyncSession | scoped_session[Any],
        payload: object,
        *,
        type: str = "default",
        extra1: str | None = None,
        extra2: str | None = None,
        extra3: str | None = None,
        extra4: str | None = None,
    ) -> PendingEvent:
        """Record an event on ``session``; it is sent when the session flushes or commits.

        No I/O happens here. The event is inserted on the session's connection, in its
        transaction, after the ORM's own INSERTs of that flush, so ``payload`` may be a
        zero-argument callable that reads primary keys the flush assigns (it is called
        then). A rollback discards the event; so does rolling back a SAVEPOINT
        (``begin_nested``) the event was recorded in. Sends to one queue with one type
        and the same extras that are emitted together go out in one ``send_batch`` call;
        events are inserted in the order they were recorded.

        ``payload``: dict, list, str (JSON text, validated), int, float, bool, None, a
        dataclass instance, a pydantic model, or a callable returning one of these.
        Raises :class:`~sqlalchemy_pgque.errors.PayloadError` at once, recording
        nothing, when the payload cannot be encoded (a callable's result is encoded at
        flush time, where the error fails the flush).

        Works the same on an ``AsyncSession``: the event is emitted by
        ``await session.flush()`` / ``await session.commit()``.
        """
        sync = _sync_session(session)
        extras = (extra1, extra2, extra3, extra4)
        pending = self._pending_event(sync, payload, type, None if extras == _NO_EXTRAS else extras)
        _outbox(sync).pending.append(pending)
        return pending

    def send_batch(
        self,
        session: Session | AsyncSession | scoped_session[Any],
        payloads: Iterable[object],
        *,
        type: str = "default",
    ) -> list[PendingEvent]:
        """Record several events of one type, as :meth:`send` does for each.

        All payloads are validated first; if one cannot be encoded, nothing is recorded.
        """
        sync = _sync_session(session)
        events = [self._pending_event(sync, payload, type, None) for payload in payloads]
        _outbox(sync).pending.extend(events)
        return events

    def _pending_event(
        self,
        session: Session,
        payload: object,
        type: str,
        extras: tuple[str | None, ...] | None,
    ) -> PendingEvent:
        if not isinstance(type, str):
            raise TypeError(f"event type must be a str, got {type!r}")
        if callable(payload):
            payload_text, factory = None, payload
        else:
            payload_text, factory = encode_payload(payload), None
        return PendingEvent(
            self, (self.name, type, extras), payload_text, factory, _current_transaction(session)
        )

    def send_now(
        self,
        bind: Session | Connection | scoped_session[Any],
        payload: object,
        *,
        type: str = "default",
        extra1: str | None = None,
        extra2: str | None = None,
        extra3: str | None = None,
        extra4: str | None = None,
    ) -> int:
        """Insert one event at once on ``bind`` and return its id.

        The event belongs to ``bind``'s current transaction (it is delivered only if that
        commits); pending ORM changes are not flushed. A callable payload is called now.
        """
        payload_text = encode_payload(payload() if callable(payload) else payload)
        params: dict[str, object] = {"queue": self.name, "type": type, "payload": payload_text}
        if (extra1, extra2, extra3, extra4) == _NO_EXTRAS:
            stmt = _SEND_WAKE if self.wake else _SEND
        else:
            stmt = _INSERT_EVENT_WAKE if self.wake else _INSERT_EVENT
            params.update(extra1=extra1, extra2=extra2, extra3=extra3, extra4=extra4)
        event_id: int = _execute(_connection(bind), stmt, params, _WRITER).scalar_one()
        return event_id

    # -- immediate calls -----------------------------------------------------------

    def receive(
        self,
        bind: Session | Connection | scoped_session[Any],
        consumer: str,
        max_messages: int = MAX_MESSAGES,
    ) -> list[Message]:
        """Open (or re-open) the consumer's next batch and return its messages.

        An empty list means no batch is ready (nothing to ack). Otherwise every message
        carries the ``batch_id`` to pass to :meth:`ack` once they are processed, in the
        same transaction as the processing for exactly-once effects.
        """
        result = _execute(
            _connection(bind),
            _RECEIVE,
            {"queue": self.name, "consumer": consumer, "max_messages": max_messages},
            _READER,
        )
        return messages_from_rows(result.fetchall())

    def receive_coop(
        self,
        bind: Session | Connection | scoped_session[Any],
        consumer: str,
        subconsumer: str,
        max_messages: int = MAX_MESSAGES,
        dead_interval: Duration | None = None,
    ) -> list[Message]:
        """Receive a batch for one member of a cooperative consumer group.

        ``dead_interval`` (a :data:`Duration`) lets this member take over the batch of
        a sibling that has not been seen for that long. Experimental in PgQue.
        """
        result = _execute(
            _connection(bind),
            _RECEIVE_COOP,
            {
                "queue": self.name,
                "consumer": consumer,
                "subconsumer": subconsumer,
                "max_messages": max_messages,
                "dead_seconds": None if dead_interval is None else as_seconds(dead_interval),
            },
            _READER,
        )
        return messages_from_rows(result.fetchall())

    def ack(self, bind: Session | Connection | scoped_session[Any], batch_id: int) -> int:
        """Finish a batch: 1, or 0 when the batch is unknown or already finished."""
        return _scalar_int(_execute(_connection(bind), _ACK, {"batch_id": batch_id}, _READER))

    def nack(
        self,
        bind: Session | Connection | scoped_session[Any],
        msg: Message,
        *,
        retry_after: Duration = 60,
        reason: str | None = None,
    ) -> int:
        """Schedule ``msg`` for redelivery after ``retry_after`` (a :data:`Duration`).

        Past the queue's ``max_retries`` the message goes to the dead-letter queue with
        ``reason``. The batch stays open: ack it afterwards.
        """
        params = {
            "batch_id": msg.batch_id,
            "msg_id": msg.msg_id,
            "type": msg.type,
            "payload": msg.raw_payload,
            "retry_count": msg.retry_count,
            "created_at": msg.created_at,
            "extra1": msg.extra1,
            "extra2": msg.extra2,
            "extra3": msg.extra3,
            "extra4": msg.extra4,
            "retry_seconds": as_seconds(retry_after),
            "reason": reason,
        }
        return _scalar_int(_execute(_connection(bind), _NACK, params, _READER))

    def subscribe(self, bind: Session | Connection | scoped_session[Any], consumer: str) -> bool:
        """Subscribe ``consumer``; ``True`` if new. It sees events sent from now on."""
        consumer = _check_name("consumer", consumer)
        params = {"queue": self.name, "consumer": consumer}
        return _scalar_int(_execute(_connection(bind), _SUBSCRIBE, params, _READER)) == 1

    def unsubscribe(self, bind: Session | Connection | scoped_session[Any], consumer: str) -> bool:
        """Remove the subscription and its pending retries; ``True`` if it existed."""
        params = {"queue": self.name, "consumer": consumer}
        return _scalar_int(_execute(_connection(bind), _UNSUBSCRIBE, params, _READER)) >= 1

    def subscribe_subconsumer(
        self,
        bind: Session | Connection | scoped_session[Any],
        consumer: str,
        subconsumer: str,
        *,
        convert_normal: bool = False,
    ) -> bool:
        """Register ``subconsumer`` in the cooperative group ``consumer``; ``True`` if new.

        The group is created if ``consumer`` is not subscribed. A normal consumer of that
        name raises :class:`ConsumerModeConflict` unless ``convert_normal`` is true; then
        it becomes the group, keeping its position in the queue.
        """
        params = {"queue": self.name, "consumer": consumer, "subconsumer": subconsumer,
                  "convert": convert_normal}
        return _scalar_int(_execute(_connection(bind), _SUBSCRIBE_SUB, params, _READER)) == 1

    def unsubscribe_subconsumer(
        self,
        bind: Session | Connection | scoped_session[Any],
        consumer: str,
        subconsumer: str,
        batch_handling: int = 0,
    ) -> bool:
        """Remove a group member; ``True`` if it was registered.

        A member holding an open batch raises :class:`BatchInProgress` with
        ``batch_handling=0``; with ``batch_handling=1`` the batch's messages go to retry
        (in 60 s), or to the dead-letter queue once out of retries.
        """
        if batch_handling not in (0, 1):
            raise ValueError(f"batch_handling must be 0 or 1, got {batch_handling!r}")
        params = {
            "queue": self.name,
            "consumer": consumer,
            "subconsumer": subconsumer,
            "batch_handling": batch_handling,
        }
        return _scalar_int(_execute(_connection(bind), _UNSUBSCRIBE_SUB, params, _READER)) == 1

    def touch_subconsumer(
        self, bind: Session | Connection | scoped_session[Any], consumer: str, subconsumer: str
    ) -> int:
        """Heartbeat of a group member holding a long batch; the number of rows touched."""
        params = {"queue": self.name, "consumer": consumer, "subconsumer": subconsumer}
        return _scalar_int(_execute(_connection(bind), _TOUCH_SUB, params, _READER))

    def force_next_tick(self, bind: Session | Connection | scoped_session[Any]) -> int | None:
        """Make the next :meth:`ticker` call tick; returns the latest existing tick id."""
        result = _execute(_connection(bind), _FORCE_NEXT_TICK, {"queue": self.name}, _ADMIN)
        tick_id: int | None = result.scalar_one()
        return tick_id

    def ticker(self, bind: Session | Connection | scoped_session[Any]) -> int | None:
        """Tick the queue if its thresholds say so; the new tick id or ``None``."""
        result = _execute(_connection(bind), _TICKER, {"queue": self.name}, _ADMIN)
        tick_id: int | None = result.scalar_one()
        return tick_id


class QueueRegistry:
    """The queues an application declares, for Alembic autogenerate.

    ::

        registry = QueueRegistry()
        orders_q = Queue("orders", consumers=["order_worker"], registry=registry)
    """

    def __init__(self, queues: Iterable[Queue] = ()) -> None:
        self._queues: dict[str, Queue] = {}
        for q in queues:
            self.add(q)

    def add(self, queue: Queue) -> Queue:
        """Collect ``queue``; a second queue with the same name is an error."""
        existing = self._queues.get(queue.name)
        if existing is not None and existing is not queue:
            raise InvalidName(f"queue {queue.name!r} is declared twice in this registry")
        self._queues[queue.name] = queue
        return queue

    def __iter__(self) -> Iterator[Queue]:
        return iter(sorted(self._queues.values(), key=lambda q: q.name))

    def __len__(self) -> int:
        return len(self._queues)

    def __contains__(self, name: object) -> bool:
        return name in self._queues

    def __getitem__(self, name: str) -> Queue:
        return self._queues[name]


# -- statements ---------------------------------------------------------------------
# Built once; SQLAlchemy caches their compiled form per dialect. Payloads are JSON text
# cast to jsonb in SQL: that picks the jsonb overloads of send/send_batch and stores
# the canonical jsonb text, as pgque-py does. Many payloads travel as ONE JSON array
# text, split by the server: drivers dump a text[] of 1,000 strings far slower (psycopg:
# ~15 ms of client CPU) than one string, and every payload is valid JSON already.

_NOTIFY = f"pg_notify('{WAKE_CHANNEL}', :queue)"
_SEND_SQL = "SELECT pgque.send(:queue, :type, CAST(:payload AS jsonb))"
_SEND = text(_SEND_SQL)
_SEND_WAKE = text(f"{_SEND_SQL}, {_NOTIFY}")
_SEND_BATCH_SQL = (
    "SELECT pgque.send_batch(:queue, :type, ARRAY(SELECT p.value "
    "FROM jsonb_array_elements(CAST(:payloads AS jsonb)) WITH ORDINALITY AS p(value, n) "
    "ORDER BY p.n))"
)
_SEND_BATCH = text(_SEND_BATCH_SQL)
_SEND_BATCH_WAKE = text(f"{_SEND_BATCH_SQL}, {_NOTIFY}")
_INSERT_EVENT_SQL = (
    "SELECT pgque.insert_event(:queue, :type, CAST(CAST(:payload AS jsonb) AS text), "
    ":extra1, :extra2, :extra3, :extra4)"
)
_INSERT_EVENT = text(_INSERT_EVENT_SQL)
_INSERT_EVENT_WAKE = text(f"{_INSERT_EVENT_SQL}, {_NOTIFY}")
# Mixed queues, types or extras: one statement inserting every event in recorded order.
# Each element of :events is [queue, type, extra1, extra2, extra3, extra4, payload].
_INSERT_MIXED_SQL = (
    "SELECT pgque.insert_event(e.value ->> 0, e.value ->> 1, CAST(e.value -> 6 AS text), "
    "e.value ->> 2, e.value ->> 3, e.value ->> 4, e.value ->> 5){wake} "
    "FROM jsonb_array_elements(CAST(:events AS jsonb)) WITH ORDINALITY AS e(value, n) "
    "ORDER BY e.n"
)
_INSERT_MIXED = text(_INSERT_MIXED_SQL.format(wake=""))
_INSERT_MIXED_WAKE = text(
    _INSERT_MIXED_SQL.format(
        wake=f", (SELECT count(pg_notify('{WAKE_CHANNEL}', w)) "
        "FROM unnest(CAST(:wake AS text[])) AS w)"
    )
)
_RECEIVE = text("SELECT * FROM pgque.receive(:queue, :consumer, :max_messages)")
_RECEIVE_COOP = text(
    "SELECT * FROM pgque.receive_coop(:queue, :consumer, :subconsumer, :max_messages, "
    "make_interval(secs => CAST(:dead_seconds AS double precision)))"
)
_ACK = text("SELECT pgque.ack(:batch_id)")
_NACK = text(
    "SELECT pgque.nack(:batch_id, ROW(CAST(:msg_id AS bigint), CAST(:batch_id AS bigint), "
    "CAST(:type AS text), CAST(:payload AS text), CAST(:retry_count AS integer), "
    "CAST(:created_at AS timestamptz), CAST(:extra1 AS text), CAST(:extra2 AS text), "
    "CAST(:extra3 AS text), CAST(:extra4 AS text))::pgque.message, "
    "make_interval(secs => CAST(:retry_seconds AS double precision)), CAST(:reason AS text))"
)
_SUBSCRIBE = text("SELECT pgque.subscribe(:queue, :consumer)")
_UNSUBSCRIBE = text("SELECT pgque.unsubscribe(:queue, :consumer)")
_SUBSCRIBE_SUB = text(
    "SELECT pgque.subscribe_subconsumer(:queue, :consumer, :subconsumer, "
    "CAST(:convert AS boolean))"
)
_UNSUBSCRIBE_SUB = text(
    "SELECT pgque.unsubscribe_subconsumer(:queue, :consumer, :subconsumer, "
    "CAST(:batch_handling AS integer))"
)
_TOUCH_SUB = text("SELECT pgque.touch_subconsumer(:queue, :consumer, :subconsumer)")
_FORCE_NEXT_TICK = text("SELECT pgque.force_next_tick(:queue)")
_TICKER = text("SELECT pgque.ticker(:queue)")


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


def _connection(bind: Session | Connection | scoped_session[Any]) -> Connection:
    if isinstance(bind, Connection):
        return bind
    if isinstance(bind, Session):
        return bind.connection()
    if isinstance(bind, scoped_session):
        current: Session = bind()
        return current.connection()
    raise TypeError(
        f"expected a Session or Connection, got {type(bind).__name__}; with an AsyncSession "
        f"use `await session.run_sync(lambda s: queue.method(s, ...))`"
    )


def _execute(
    conn: Connection, stmt: TextClause, params: Mapping[str, object], role: str
) -> CursorResult[Any]:
    try:
        return conn.execute(stmt, params)
    except DBAPIError as exc:
        queue = params.get("queue")
        error = translate(
            exc, required_role=role, queue=queue if isinstance(queue, str) else None
        )
        if error is None:
            raise
        raise error from exc


def _scalar_int(result: CursorResult[Any]) -> int:
    value = result.scalar_one()
    return int(value) if value is not None else 0


# -- the outbox: pending events of one Session ---------------------------------------


class _Outbox:
    """Events of one Session's current transaction: waiting, and emitted but uncommitted."""

    __slots__ = ("emitted", "pending", "released")

    def __init__(self) -> None:
        self.pending: list[PendingEvent] = []
        self.emitted: list[PendingEvent] = []
        # The SAVEPOINT being released right now, between its after_commit and its end.
        self.released: SessionTransaction | None = None


_OUTBOX_KEY: Final = "sqlalchemy_pgque.outbox"
_listeners_lock = threading.Lock()
_listeners_installed = False


def _sync_session(session: Session | AsyncSession | scoped_session[Any]) -> Session:
    if isinstance(session, Session):
        return session
    sync = getattr(session, "sync_session", None)
    if isinstance(sync, Session):
        return sync
    if isinstance(session, scoped_session):
        current: Session = session()
        return current
    raise TypeError(
        f"expected a Session or AsyncSession, got {type(session).__name__}; "
        f"to send on a Connection use Queue.send_now()"
    )


def _outbox(session: Session) -> _Outbox:
    outbox: _Outbox | None = session.info.get(_OUTBOX_KEY)
    if outbox is None:
        if not _listeners_installed:
            _install_listeners()
        outbox = session.info[_OUTBOX_KEY] = _Outbox()
    return outbox


def _install_listeners() -> None:
    global _listeners_installed
    with _listeners_lock:
        if _listeners_installed:
            return
        # Class-level listeners reach every Session, including those made before this
        # point and the sync sessions inside AsyncSession; sessions without an outbox
        # pay one dict lookup per event.
        event.listen(Session, "after_flush_postexec", _after_flush_postexec)
        event.listen(Session, "before_commit", _before_commit)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        _listeners_installed = True


def _current_transaction(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def _within(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def _after_flush_postexec(session: Session, flush_context: object) -> None:
    _emit_pending(session)


def _before_commit(session: Session) -> None:
    outbox: _Outbox | None = session.info.get(_OUTBOX_KEY)
    if outbox is None or not outbox.pending:
        return
    # The commit's own flush comes after this hook, and a session without ORM changes
    # never flushes: flush here so the events follow the ORM's INSERTs, then emit what
    # that flush did not.
    session.flush()
    _emit_pending(session)


def _after_commit(session: Session) -> None:
    outbox: _Outbox | None = session.info.get(_OUTBOX_KEY)
    if outbox is None:
        return
    # after_commit also fires when a SAVEPOINT is released (the nested transaction is
    # still the current one then); only the root commit is final.
    savepoint = session.get_nested_transaction()
    if savepoint is not None:
        outbox.released = savepoint
        return
    for pending in outbox.emitted:
        # Committed handles keep their id but must not keep the Session alive.
        pending._recorded_in = pending._emitted_in = None
    outbox.emitted.clear()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        outbox: _Outbox | None = session.info.pop(_OUTBOX_KEY, None)
        if outbox is not None:
            # Still listed after the root transaction ended means it was not committed.
            for pending in outbox.emitted:
                pending.event_id = None
        return
    outbox = session.info.get(_OUTBOX_KEY)
    if outbox is None or not transaction.nested:
        return
    if outbox.released is transaction:
        outbox.released = None
        return
    # A SAVEPOINT that ended without being released was rolled back (explicitly, or by
    # a failed flush and then closed). Events recorded inside it are dropped; events
    # recorded outside it but emitted inside it were undone by the database, so they
    # wait again for the next flush or the commit.
    undone: list[PendingEvent] = []
    kept: list[PendingEvent] = []
    for pending in outbox.emitted:
        if _within(pending._emitted_in, transaction):
            pending.event_id = None
            pending._emitted_in = None
            if not _within(pending._recorded_in, transaction):
                undone.append(pending)
        else:
            kept.append(pending)
    outbox.emitted = kept
    outbox.pending = undone + [
        p for p in outbox.pending if not _within(p._recorded_in, transaction)
    ]


def _emit_pending(session: Session) -> None:
    outbox: _Outbox | None = session.info.get(_OUTBOX_KEY)
    if outbox is None or not outbox.pending:
        return
    events = outbox.pending
    outbox.pending = []
    try:
        conn = session.connection()
        ids = _insert_events(conn, events)
    except BaseException:
        outbox.pending = events + outbox.pending
        raise
    emitted_in = _current_transaction(session)
    for pending, event_id in zip(events, ids, strict=True):
        pending.event_id = event_id
        pending._emitted_in = emitted_in
    outbox.emitted.extend(events)


_encode_row = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _insert_events(conn: Connection, events: Sequence[PendingEvent]) -> list[int]:
    """Insert ``events`` in order with one statement; their ids in the same order."""
    payloads = [pending._payload_text() for pending in events]
    first = events[0]
    key = first._key
    queue_name, type_name, extras = key
    uniform = all(pending._key == key for pending in events)
    params: dict[str, object]
    if uniform and extras is None:
        wake = first.queue.wake
        if len(events) == 1:
            stmt = _SEND_WAKE if wake else _SEND
            params = {"queue": queue_name, "type": type_name, "payload": payloads[0]}
            return [_execute(conn, stmt, params, _WRITER).scalar_one()]
        stmt = _SEND_BATCH_WAKE if wake else _SEND_BATCH
        params = {"queue": queue_name, "type": type_name, "payloads": f"[{','.join(payloads)}]"}
        return list(_execute(conn, stmt, params, _WRITER).scalar_one())
    rows = []
    for pending, payload in zip(events, payloads, strict=True):
        name, type_name, extras = pending._key
        head = _encode_row([name, type_name, *(extras or _NO_EXTRAS)])
        rows.append(f"{head[:-1]},{payload}]")
    params = {"events": f"[{','.join(rows)}]"}
    wake_queues = sorted({p.queue.name for p in events if p.queue.wake})
    if wake_queues:
        params["wake"] = wake_queues
    stmt = _INSERT_MIXED_WAKE if wake_queues else _INSERT_MIXED
    return [row[0] for row in _execute(conn, stmt, params, _WRITER)]

