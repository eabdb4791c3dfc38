"""The outbox: events recorded on a Session, emitted when it flushes or commits.

The second stop on a message's way. ``Queue.send`` (``queue.py``) records a
:class:`PendingEvent` here, on the Session, without I/O. Class-level Session event
hooks emit the recorded events on the Session's own connection, in its transaction,
after the ORM's INSERTs of a flush (``after_flush_postexec``) or at commit
(``before_commit``), with the ``pgque.send`` / ``send_batch`` statements of
``_statements.py``; the engine's ``send`` (``sql/20_events.sql``) stores them. A
rollback discards them, and a SAVEPOINT rolled back undoes what was recorded or
emitted inside it. Next stop: the ticker (``ticker.py``), woken by the commit.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from . import _trace
from ._statements import (
    INSERT_MIXED,
    INSERT_MIXED_WAKE,
    SEND,
    SEND_AT,
    SEND_AT_EXTRAS,
    SEND_AT_EXTRAS_WAKE,
    SEND_AT_WAKE,
    SEND_BATCH,
    SEND_BATCH_WAKE,
    SEND_IDEM,
    SEND_IDEM_WAKE,
    SEND_WAKE,
    WRITER,
    execute,
)
from .errors import PayloadError
from .message import encode_payload

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .queue import Queue

__all__ = [
    "NO_EXTRAS", "PendingEvent", "SendOptions", "current_transaction", "record", "sync_session",
]

NO_EXTRAS: Final = (None, None, None, None)


@dataclass(frozen=True)
class SendOptions:
    """How one event is sent, beyond queue, type, payload and extras: checked by
    ``Queue.send``, each making the event go out with its own statement."""

    deliver_at: datetime | None = None
    """Aware; ``None`` with ``delay`` set (the due time is then taken on the server)."""
    delay: float | None = None
    """Seconds after the statement that sends the event."""
    idempotency_key: str | None = None
    key_ttl: float | None = None
    """Seconds the key stays claimed; ``None``: the engine's default (1 hour)."""

    @property
    def delayed(self) -> bool:
        return self.deliver_at is not None or self.delay is not None


class PendingEvent:
    """An event recorded by :meth:`Queue.send`, waiting for the Session to emit it.

    ``event_id`` is ``None`` until the Session flushes or commits, then the id PgQue
    assigned. It returns to ``None`` if the transaction (or the SAVEPOINT) that
    emitted it rolls back.

    An event sent with ``idempotency_key`` whose key was already claimed inserts
    nothing: after the flush ``deduplicated`` is ``True`` and ``event_id`` is the id of
    the event the key was first sent with. A delayed event (``deliver_at`` or
    ``delay``) due later waits in the engine's holding storage: ``delayed_id`` is its
    id there and ``event_id`` stays ``None`` (the event gets its id when it is moved
    into the queue at its due time); one already due is sent at once and gets an
    ``event_id``.
    """

    __slots__ = ("_emitted_in", "_factory", "_key", "_options", "_recorded_in", "_text",
                 "deduplicated", "delayed_id", "event_id", "queue")

    def __init__(
        self,
        queue: Queue,
        key: tuple[str, str, tuple[str | None, ...] | None],
        text: str | None,
        factory: Callable[[], object] | None,
        recorded_in: SessionTransaction | None,
        options: SendOptions | None = None,
    ) -> None:
        self.queue = queue
        self.event_id: int | None = None
        self.deduplicated: bool | None = None
        """After the flush, for an event sent with ``idempotency_key``: whether its key
        was already claimed, so nothing was inserted; ``None`` otherwise."""
        self.delayed_id: int | None = None
        """After the flush, for a delayed event not yet due: its holding-row id."""
        self._options = options
        self._key = key
        self._text = text
        self._factory = factory
        self._recorded_in = recorded_in
        self._emitted_in: SessionTransaction | None = None

    def _emitted(self, event_id: int | None, deduplicated: bool | None = None,
                 delayed_id: int | None = None) -> None:
        self.event_id, self.deduplicated, self.delayed_id = event_id, deduplicated, delayed_id

    def _undone(self) -> None:
        self.event_id = self.deduplicated = self.delayed_id = None

    @property
    def type(self) -> str:
        """The event type."""
        return self._key[1]

    @property
    def extras(self) -> tuple[str | None, str | None, str | None, str | None]:
        """``(extra1, extra2, extra3, extra4)``."""
        extras = self._key[2]
        if extras is None:
            return NO_EXTRAS
        return (extras[0], extras[1], extras[2], extras[3])

    def _set_extra(self, index: int, value: str) -> bool:
        """Put ``value`` in ``extra<index + 1>`` unless the sender gave that field a
        value of its own; whether it was put there."""
        if self._options is not None and self._options.idempotency_key is not None:
            # The engine's idempotent send has no field left for it: such an event
            # goes without the sender's trace context, silently.
            return True
        name, type_name, extras = self._key
        fields = list(extras or NO_EXTRAS)
        if fields[index] is not None:
            return False
        fields[index] = value
        self._key = (name, type_name, tuple(fields))
        return True

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
        more = ""
        if self.deduplicated:
            more = " deduplicated"
        if self.delayed_id is not None:
            more = f" delayed_id={self.delayed_id}"
        return (f"<PendingEvent {self.queue.name!r} type={self.type!r} "
                f"event_id={self.event_id}{more}>")


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


def sync_session(session: Session | AsyncSession | scoped_session[Any]) -> Session:
    """The ``Session`` to record on: ``session`` itself, or the one behind an
    ``AsyncSession`` or a ``scoped_session``."""
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


def record(session: Session, events: Sequence[PendingEvent]) -> None:
    """Add ``events``, recorded by one send call, to ``session``'s outbox, to be emitted
    at its next flush or commit; with tracing on, they carry the send's trace context."""
    _trace.created(events)
    _outbox(session).pending.extend(events)


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


def current_transaction(session: Session) -> SessionTransaction | None:
    """The innermost transaction of ``session``: its SAVEPOINT if one is open."""
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
                pending._undone()
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
            pending._undone()
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
        # Plain events go out together; a delayed or idempotent one needs its own
        # function call, which splits the run so the recorded order holds.
        plain: list[PendingEvent] = []
        for pending in events:
            if pending._options is None:
                plain.append(pending)
                continue
            if plain:
                _emit_plain(conn, plain)
                plain = []
            _emit_with_options(conn, pending, pending._options)
        if plain:
            _emit_plain(conn, plain)
    except BaseException:
        for pending in events:
            pending._undone()
        outbox.pending = events + outbox.pending
        raise
    emitted_in = current_transaction(session)
    for pending in events:
        pending._emitted_in = emitted_in
    outbox.emitted.extend(events)


def _emit_plain(conn: Connection, events: Sequence[PendingEvent]) -> None:
    for pending, event_id in zip(events, _insert_events(conn, events), strict=True):
        pending._emitted(event_id)


def _emit_with_options(conn: Connection, pending: PendingEvent, options: SendOptions) -> None:
    queue_name, type_name, extras = pending._key
    params: dict[str, object] = {
        "queue": queue_name, "type": type_name, "payload": pending._payload_text()}
    if options.idempotency_key is not None:
        fields = extras or NO_EXTRAS
        params.update(key=options.idempotency_key, ttl=options.key_ttl,
                      partition_key=fields[0])
        stmt = SEND_IDEM_WAKE if pending.queue.wake else SEND_IDEM
        event_id, deduplicated = tuple(execute(conn, stmt, params, WRITER).one())[:2]
        pending._emitted(event_id, deduplicated=bool(deduplicated))
        return
    params.update(deliver_at=options.deliver_at, delay=options.delay)
    if extras is None:
        stmt = SEND_AT_WAKE if pending.queue.wake else SEND_AT
    else:
        stmt = SEND_AT_EXTRAS_WAKE if pending.queue.wake else SEND_AT_EXTRAS
        params.update(zip(("extra1", "extra2", "extra3", "extra4"), extras, strict=True))
    sent_id, due = tuple(execute(conn, stmt, params, WRITER).one())[:2]
    if due:  # send_at inserted the event at once: an event id
        pending._emitted(sent_id)
    else:
        pending._emitted(None, delayed_id=sent_id)


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
            stmt = SEND_WAKE if wake else SEND
            params = {"queue": queue_name, "type": type_name, "payload": payloads[0]}
            return [execute(conn, stmt, params, WRITER).scalar_one()]
        stmt = SEND_BATCH_WAKE if wake else SEND_BATCH
        params = {"queue": queue_name, "type": type_name, "payloads": f"[{','.join(payloads)}]"}
        return list(execute(conn, stmt, params, WRITER).scalar_one())
    rows = []
    for pending, payload in zip(events, payloads, strict=True):
        name, type_name, extras = pending._key
        head = _encode_row([name, type_name, *(extras or NO_EXTRAS)])
        rows.append(f"{head[:-1]},{payload}]")
    params = {"events": f"[{','.join(rows)}]"}
    wake_queues = sorted({p.queue.name for p in events if p.queue.wake})
    if wake_queues:
        params["wake"] = wake_queues
    stmt = INSERT_MIXED_WAKE if wake_queues else INSERT_MIXED
    return [row[0] for row in execute(conn, stmt, params, WRITER)]
