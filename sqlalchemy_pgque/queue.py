"""Queue: a declaration of a PgQue queue and the calls made on it.

``Queue("orders")`` does no I/O. Declared consumers and queue settings are what the
Alembic autogenerate comparator (``alembic_ops``) compares with the database when the
queue is collected in a :class:`QueueRegistry`.

The first stop on a message's way. Sending is part of the unit of work:
:meth:`Queue.send` records an event on the Session, and the outbox (``_outbox.py``)
emits it on the Session's own connection, in its own transaction, when it flushes or
commits. Receiving, acknowledging and the other consumer-side calls are immediate, one
statement each (``_statements.py``); the consumer (``consumer.py``) is built on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from sqlalchemy.orm import Session, scoped_session

from . import _trace
from ._duration import Duration, as_seconds
from ._outbox import (
    NO_EXTRAS,
    PendingEvent,
    SendOptions,
    current_transaction,
    record,
    sync_session,
)
from ._statements import (
    ACK,
    ADMIN,
    FORCE_NEXT_TICK,
    INSERT_EVENT,
    INSERT_EVENT_WAKE,
    NACK,
    READER,
    RECEIVE,
    RECEIVE_COOP,
    SEND,
    SEND_WAKE,
    SUBSCRIBE,
    SUBSCRIBE_SUBCONSUMER,
    TICKER,
    TOUCH_SUBCONSUMER,
    UNSUBSCRIBE,
    UNSUBSCRIBE_SUBCONSUMER,
    WAKE_CHANNEL,
    WRITER,
    Bind,
    bind_connection,
    execute,
    scalar_int,
)
from .errors import InvalidName
from .message import Message, encode_payload, messages_from_rows

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "MAX_MESSAGES",
    "QUEUE_PARAMETERS",
    "WAKE_CHANNEL",
    "ConfigValue",
    "PendingEvent",
    "Queue",
    "QueueRegistry",
]

# The notify channel is 'pgque_' || name and channel names are identifiers of at most
# 63 bytes, hence PgQue's 57-byte limit on queue names.
MAX_QUEUE_NAME_BYTES = 57

#: ``receive``'s default: take the whole batch.
MAX_MESSAGES: Final = 2_147_483_647


ConfigValue: TypeAlias = str | int | float | bool | timedelta | None
"""A queue setting as accepted by ``Queue(config=)`` and the migration operations;
PgQue receives it as text."""

# The parameters pgque.set_queue_config accepts (ENGINE.md §3.4), with the column type a
# value is checked against and the column default.
QUEUE_PARAMETERS: Final[Mapping[str, tuple[str, str | None]]] = {
    "ticker_max_count": ("integer", "500"),
    "ticker_max_lag": ("interval", "3 seconds"),
    "ticker_idle_period": ("interval", "1 minute"),
    "ticker_paused": ("boolean", "false"),
    "rotation_period": ("interval", "2 hours"),
    "external_ticker": ("boolean", "false"),
    "max_retries": ("integer", None),
}
_BOOLEAN_TEXTS: Final = frozenset({"true", "false", "t", "f", "yes", "no", "y", "n",
                                   "on", "off", "1", "0"})


def _parameter_name(param: str) -> str:
    """``param`` without the optional ``queue_`` prefix, checked against PgQue's list."""
    name = param.removeprefix("queue_")
    if name not in QUEUE_PARAMETERS:
        raise ValueError(
            f"unknown PgQue queue parameter {param!r}; "
            f"set_queue_config accepts {', '.join(QUEUE_PARAMETERS)}"
        )
    return name


def _config_text(value: ConfigValue) -> str | None:
    """The text PgQue receives for ``value``; ``None`` stays NULL (the column default)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        return f"{int(seconds)} seconds" if seconds.is_integer() else f"{seconds!r} seconds"
    return str(value)


def _check_setting(param: str, value: ConfigValue) -> tuple[str, str]:
    """``(parameter, text)`` of one declared setting; ``ValueError`` naming what is wrong
    with either. The database has the last word (autogenerate casts the text), but a
    typo should fail where it is written, not at the next migration."""
    name = _parameter_name(param)
    text = _config_text(value)
    type_ = QUEUE_PARAMETERS[name][0]
    if text is None:
        raise ValueError(f"{param}=None is not a setting: leave {param} out to keep the "
                         "engine's default")
    try:
        if type_ == "integer":
            int(text)
        elif type_ == "boolean" and text.strip().lower() not in _BOOLEAN_TEXTS:
            raise ValueError(text)
        elif type_ == "interval":
            as_seconds(text)
    except ValueError:
        raise ValueError(f"declared {param}={value!r} is not a valid {type_}") from None
    return name, text


def _check_name(kind: str, name: object, max_bytes: int | None = None) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{kind} name must be a non-empty string, got {name!r}")
    if max_bytes is not None and len(name.encode()) > max_bytes:
        raise InvalidName(
            f"{kind} name too long: {len(name.encode())} bytes (max {max_bytes}): {name!r}"
        )
    return name


def _check_cooperative_name(kind: str, name: object) -> str:
    checked = _check_name(kind, name)
    if "." in checked:
        raise InvalidName(
            f"cooperative {kind} name must not contain a dot (subconsumers are stored "
            f"as <consumer>.<subconsumer>): {checked!r}"
        )
    return checked


def _send_options(
    deliver_at: datetime | None,
    delay: Duration | None,
    idempotency_key: str | None,
    key_ttl: Duration | None,
    extras: tuple[str | None, ...],
) -> SendOptions | None:
    """The checked options of one send; ``None`` for a plain send. Raises before
    anything is recorded."""
    if deliver_at is not None and delay is not None:
        raise ValueError("give deliver_at or delay, not both")
    if deliver_at is not None:
        if not isinstance(deliver_at, datetime):
            raise TypeError(f"deliver_at must be a datetime, got {deliver_at!r}")
        if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
            raise ValueError(
                f"deliver_at must be timezone-aware, got the naive {deliver_at!r}: a naive "
                "time means a different instant on every server; use for example "
                "datetime.now(timezone.utc) + timedelta(hours=24)"
            )
    delay_seconds = None if delay is None else as_seconds(delay)
    if delay_seconds is not None and delay_seconds <= 0:
        delay_seconds = None  # due already: a plain send
    ttl_seconds = None if key_ttl is None else as_seconds(key_ttl)
    if idempotency_key is None:
        if ttl_seconds is not None:
            raise ValueError("key_ttl is given without an idempotency_key")
        if deliver_at is None and delay_seconds is None:
            return None
        return SendOptions(deliver_at=deliver_at, delay=delay_seconds)
    if not isinstance(idempotency_key, str):
        raise TypeError(f"idempotency_key must be a str, got {idempotency_key!r}")
    if deliver_at is not None or delay is not None:
        raise ValueError(
            "idempotency_key cannot be combined with deliver_at or delay: the engine's "
            "idempotent send inserts the event at once"
        )
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise ValueError(f"key_ttl must be a positive duration, got {key_ttl!r}")
    if any(field is not None for field in extras[1:]):
        raise ValueError(
            "an idempotent send takes no extra2, extra3 or extra4: the engine stores the "
            "idempotency key in extra2 (extra1 is its partition key)"
        )
    return SendOptions(idempotency_key=idempotency_key, key_ttl=ttl_seconds)


class Queue:
    """A PgQue queue, declared by name.

    :param name: the queue name (at most 57 bytes).
    :param consumers: consumer names that should be subscribed; used by Alembic
        autogenerate, never subscribed implicitly at run time.
    :param cooperative: cooperative consumers that should be subscribed, each mapped
        to the name of the subconsumer that creates it (``{"shipping": "w"}``); used by
        autogenerate, which registers that subconsumer (converting a normal consumer of
        the same name). Further subconsumers register themselves when they first
        receive.
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
        config: Mapping[str, ConfigValue] | None = None,
        registry: QueueRegistry | None = None,
        wake: bool = True,
    ) -> None:
        self.name = _check_name("queue", name, MAX_QUEUE_NAME_BYTES)
        self.consumers: tuple[str, ...] = tuple(_check_name("consumer", c) for c in consumers)
        self.cooperative: dict[str, str] = {
            _check_cooperative_name("consumer", consumer): _check_cooperative_name(
                "subconsumer", subconsumer)
            for consumer, subconsumer in (cooperative or {}).items()
        }
        both = sorted(set(self.consumers) & set(self.cooperative))
        if both:
            raise InvalidName(
                f"queue {name!r}: {', '.join(map(repr, both))} declared both as a normal "
                "and as a cooperative consumer"
            )
        try:
            self.config: dict[str, str] = dict(
                _check_setting(k, v) for k, v in (config or {}).items()
            )
        except ValueError as exc:
            raise ValueError(f"queue {name!r}: {exc}") from None
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
        deliver_at: datetime | None = None,
        delay: Duration | None = None,
        idempotency_key: str | None = None,
        key_ttl: Duration | None = None,
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

        With OpenTelemetry tracing on (:mod:`sqlalchemy_pgque.tracing`), the call
        records a PRODUCER span and the event carries its trace context in ``extra4``,
        unless given an ``extra4`` of its own.

        **Delayed delivery**: ``deliver_at`` (a timezone-aware ``datetime``) or ``delay``
        (a :data:`Duration` counted from the sending statement, on the server's clock)
        holds the event back until then; it still commits or rolls back with the
        session's transaction. A due time already past sends it at once. A worker
        running the ticker delivers it within milliseconds of its due time; without
        one, ``pgque.maint()`` moves it (every 30 s under pg_cron).

        **Idempotent send**: ``idempotency_key`` sends the event only if no event was
        sent to this queue with the same key within the last ``key_ttl`` (1 hour by
        default); otherwise nothing is inserted, and after the flush
        :attr:`PendingEvent.deduplicated` is ``True`` and ``event_id`` the id of the
        first event. The key names the *effect*, not the entity: ``f"charge:{order.id}"``
        and ``f"receipt:{order.id}"`` are two keys, and a second charge for the same
        order after a refund needs a new one (``f"charge:{order.id}:{attempt}"``). The
        engine stores the key in ``extra2`` and a given ``extra1`` as its partition key,
        so an idempotent event takes no ``extra2``, ``extra3`` or ``extra4``. Concurrent
        senders of one key serialize in the database: exactly one event is sent.

        Both need the engine's PgQue 0.3 functions (the bundled engine has them);
        against a PgQue 0.2 install the flush raises
        :class:`~sqlalchemy_pgque.errors.EngineFeatureMissing`.
        """
        sync = sync_session(session)
        extras = (extra1, extra2, extra3, extra4)
        options = _send_options(deliver_at, delay, idempotency_key, key_ttl, extras)
        pending = self._pending_event(
            sync, payload, type, None if extras == NO_EXTRAS else extras, options)
        record(sync, [pending])
        return pending

    def send_batch(
        self,
        session: Session | AsyncSession | scoped_session[Any],
        payloads: Iterable[object],
        *,
        type: str = "default",
        deliver_at: datetime | None = None,
        delay: Duration | None = None,
    ) -> list[PendingEvent]:
        """Record several events of one type, as :meth:`send` does for each, due at
        ``deliver_at`` or after ``delay`` when given.

        All payloads are validated first; if one cannot be encoded, nothing is recorded.
        """
        sync = sync_session(session)
        options = _send_options(deliver_at, delay, None, None, NO_EXTRAS)
        events = [self._pending_event(sync, payload, type, None, options) for payload in payloads]
        record(sync, events)
        return events

    def _pending_event(
        self,
        session: Session,
        payload: object,
        type: str,
        extras: tuple[str | None, ...] | None,
        options: SendOptions | None,
    ) -> PendingEvent:
        if not isinstance(type, str):
            raise TypeError(f"event type must be a str, got {type!r}")
        if callable(payload):
            payload_text, factory = None, payload
        else:
            payload_text, factory = encode_payload(payload), None
        return PendingEvent(
            self, (self.name, type, extras), payload_text, factory, current_transaction(session),
            options,
        )

    def send_now(
        self,
        bind: Bind,
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
        insert = partial(self._insert_now, bind, type, payload_text)
        return _trace.sent_now(self.name, type, (extra1, extra2, extra3, extra4), insert)

    def _insert_now(self, bind: Bind, type: str, payload_text: str,
                    extras: tuple[str | None, ...]) -> int:
        params: dict[str, object] = {"queue": self.name, "type": type, "payload": payload_text}
        if extras == NO_EXTRAS:
            stmt = SEND_WAKE if self.wake else SEND
        else:
            stmt = INSERT_EVENT_WAKE if self.wake else INSERT_EVENT
            params.update(zip(("extra1", "extra2", "extra3", "extra4"), extras, strict=True))
        event_id: int = execute(bind_connection(bind), stmt, params, WRITER).scalar_one()
        return event_id

    # -- immediate calls -----------------------------------------------------------

    def receive(
        self,
        bind: Bind,
        consumer: str,
        max_messages: int = MAX_MESSAGES,
    ) -> list[Message]:
        """Open (or re-open) the consumer's next batch and return its messages.

        An empty list means no batch is ready (nothing to ack). Otherwise every message
        carries the ``batch_id`` to pass to :meth:`ack` once they are processed, in the
        same transaction as the processing for exactly-once effects.
        """
        result = execute(
            bind_connection(bind),
            RECEIVE,
            {"queue": self.name, "consumer": consumer, "max_messages": max_messages},
            READER,
        )
        return messages_from_rows(result.fetchall())

    def receive_coop(
        self,
        bind: Bind,
        consumer: str,
        subconsumer: str,
        max_messages: int = MAX_MESSAGES,
        dead_interval: Duration | None = None,
    ) -> list[Message]:
        """Receive a batch for ``subconsumer`` of the cooperative consumer ``consumer``.

        ``dead_interval`` (a :data:`Duration`) lets it take over the batch of another
        subconsumer that has not been seen for that long. Experimental in PgQue.
        """
        result = execute(
            bind_connection(bind),
            RECEIVE_COOP,
            {
                "queue": self.name,
                "consumer": consumer,
                "subconsumer": subconsumer,
                "max_messages": max_messages,
                "dead_seconds": None if dead_interval is None else as_seconds(dead_interval),
            },
            READER,
        )
        return messages_from_rows(result.fetchall())

    def ack(self, bind: Bind, batch_id: int) -> int:
        """Finish a batch: 1, or 0 when the batch is unknown or already finished."""
        return scalar_int(execute(bind_connection(bind), ACK, {"batch_id": batch_id}, READER))

    def nack(
        self,
        bind: Bind,
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
        return scalar_int(execute(bind_connection(bind), NACK, params, READER))

    def subscribe(self, bind: Bind, consumer: str) -> bool:
        """Subscribe ``consumer``; ``True`` if new. It sees events sent from now on."""
        consumer = _check_name("consumer", consumer)
        params = {"queue": self.name, "consumer": consumer}
        return scalar_int(execute(bind_connection(bind), SUBSCRIBE, params, READER)) == 1

    def unsubscribe(self, bind: Bind, consumer: str) -> bool:
        """Remove the subscription and its pending retries; ``True`` if it existed."""
        params = {"queue": self.name, "consumer": consumer}
        return scalar_int(execute(bind_connection(bind), UNSUBSCRIBE, params, READER)) >= 1

    def subscribe_subconsumer(
        self,
        bind: Bind,
        consumer: str,
        subconsumer: str,
        *,
        convert_normal: bool = False,
    ) -> bool:
        """Register ``subconsumer`` of cooperative consumer ``consumer``; ``True`` if new.

        ``consumer`` is subscribed as a cooperative consumer if it is not subscribed
        yet. A normal consumer of that name raises :class:`ConsumerModeConflict` unless
        ``convert_normal`` is true; then it becomes cooperative, keeping its position
        in the queue.
        """
        params = {"queue": self.name, "consumer": consumer, "subconsumer": subconsumer,
                  "convert": convert_normal}
        result = execute(bind_connection(bind), SUBSCRIBE_SUBCONSUMER, params, READER)
        return scalar_int(result) == 1

    def unsubscribe_subconsumer(
        self,
        bind: Bind,
        consumer: str,
        subconsumer: str,
        batch_handling: int = 0,
    ) -> bool:
        """Remove ``subconsumer`` of ``consumer``; ``True`` if it was registered.

        A subconsumer holding an open batch raises :class:`BatchInProgress` with
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
        result = execute(bind_connection(bind), UNSUBSCRIBE_SUBCONSUMER, params, READER)
        return scalar_int(result) == 1

    def touch_subconsumer(
        self, bind: Bind, consumer: str, subconsumer: str
    ) -> int:
        """Heartbeat of a subconsumer holding a long batch; the number of rows touched."""
        params = {"queue": self.name, "consumer": consumer, "subconsumer": subconsumer}
        return scalar_int(execute(bind_connection(bind), TOUCH_SUBCONSUMER, params, READER))

    def force_next_tick(self, bind: Bind) -> int | None:
        """Make the next :meth:`ticker` call tick; returns the latest existing tick id."""
        result = execute(bind_connection(bind), FORCE_NEXT_TICK, {"queue": self.name}, ADMIN)
        tick_id: int | None = result.scalar_one()
        return tick_id

    def ticker(self, bind: Bind) -> int | None:
        """Tick the queue if its thresholds say so; the new tick id or ``None``."""
        result = execute(bind_connection(bind), TICKER, {"queue": self.name}, ADMIN)
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
