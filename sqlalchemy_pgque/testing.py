"""Testing your handlers: a real database for each test, and queued events delivered
synchronously.

A pytest plugin, loaded automatically once sqlalchemy-pgque is installed (its
``pytest11`` entry point ``sqlalchemy_pgque.testing``; with
``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, load it with ``-p sqlalchemy_pgque.testing``).
It does nothing until a test asks for one of its fixtures:

``pgque_url``
    A :class:`~sqlalchemy.engine.URL` of a fresh database with the engine installed,
    dropped after the test. Each one is cloned from a template database
    (``CREATE DATABASE ... TEMPLATE``), prepared once per session, so a test pays
    milliseconds, not an install; two threads of the plugin's copy the next tests'
    databases while a test runs, and drop each after its test. The server is the one
    ``PGQUE_TEST_DSN`` names (a libpq string or a URL), or else an embedded
    PostgreSQL started once per session (``pip install "sqlalchemy-pgque[embedded]"``;
    it runs with ``fsync`` off, being thrown away at the end). A configured
    ``PGQUE_TEST_DSN`` that does not answer is an error, never a reason to start the
    embedded one.
``pgque_engine``
    An :class:`~sqlalchemy.Engine` on ``pgque_url``, disposed after the test.
``pgque_async_engine``
    An ``AsyncEngine`` on ``pgque_url`` (needs greenlet: the ``asyncio`` extra),
    without a connection pool, so that no connection outlives the event loop of the
    test that opened it.
``pgque_template_setup``
    How the template is prepared: a session-scoped fixture returning a function of the
    template's URL. The default installs the engine. Override it in your
    ``conftest.py`` (at session scope) to run your migrations instead, so that every
    test starts from your schema::

        @pytest.fixture(scope="session")
        def pgque_template_setup() -> Callable[[URL], None]:
            def migrate(url: URL) -> None:
                config = Config("alembic.ini")
                config.set_main_option(
                    "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
                command.upgrade(config, "head")    # op.pgque_install() among them
            return migrate

And helpers, usable with or without the fixtures:

* :func:`deliver` (:func:`adeliver` for an :class:`~sqlalchemy_pgque.AsyncConsumer`)
  runs consumers' handlers in the calling thread until nothing is pending for them and
  returns a :class:`DeliveryReport`; a handler's exception fails the test.
* :func:`sent` and :func:`assert_sent` read what was sent to a queue, without
  consuming it; :func:`dlq` lists the dead letters.

::

    def test_an_order_ships(pgque_engine: Engine) -> None:
        with Session(pgque_engine) as session, session.begin():
            place_order(session, "ada", 4200)
        assert_sent(pgque_engine, orders_q, type="order.created")
        report = deliver(consumer, engine=pgque_engine)
        assert report.outcomes == ["handled"]
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psycopg
import pytest
from psycopg import conninfo, sql
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.pool import NullPool

from . import _statements as statements
from . import admin, schema
from ._listen import url_from_conninfo
from ._runloop import Steps, adrive, drive
from ._statements import Bind
from .consumer import AsyncConsumer, Consumer, ConsumerObserver, Outcome, _ConsumerBase
from .errors import EngineFeatureMissing, PermissionDenied, QueueNotFound
from .message import Message, messages_from_rows
from .queue import Queue

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .embedded import EmbeddedPostgres

__all__ = [
    "Delivery",
    "DeliveryReport",
    "adeliver",
    "assert_sent",
    "deliver",
    "dlq",
    "sent",
]

T = TypeVar("T")
ConsumerT = TypeVar("ConsumerT", bound=_ConsumerBase)


# -- what deliver() reports ----------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One delivery of one message to one consumer during :func:`deliver`."""

    consumer: str
    """The consumer's label, ``queue/consumer`` (``queue/consumer.subconsumer``)."""
    message: Message
    outcome: Outcome
    """``handled``, ``nacked`` (its handler raised; it comes back after the
    consumer's ``retry_after``), ``dead_lettered`` (its handler raised and it was out
    of retries) or ``unknown_type`` (no handler took it; nacked or acked by the
    consumer's ``unknown_handler_policy``)."""
    error: BaseException | None = None
    """What the handler raised, for ``nacked`` and ``dead_lettered``."""

    @property
    def msg_id(self) -> int:
        return self.message.msg_id

    @property
    def type(self) -> str:
        return self.message.type

    @property
    def payload(self) -> Any:
        return self.message.payload

    def __str__(self) -> str:
        error = f": {self.error!r}" if self.error is not None else ""
        return (f"{self.consumer} message {self.msg_id} ({self.type!r}, retry "
                f"{self.message.retry_count}) {self.outcome}{error}")


@dataclass(frozen=True)
class DeliveryReport:
    """What :func:`deliver` did: every delivery, in order, and the batches they came in.

    A message nacked and delivered again (``include_retries=True``) appears once per
    delivery. A batch that failed as a whole (the database went away) is not in a
    report: :func:`deliver` raises its error.
    """

    deliveries: tuple[Delivery, ...]
    batches: int
    """Batches handled (those with messages)."""

    def _with(self, *outcomes: Outcome) -> list[Delivery]:
        return [d for d in self.deliveries if d.outcome in outcomes]

    @property
    def outcomes(self) -> list[Outcome]:
        """The outcome of each delivery, in order: ``assert report.outcomes == ["handled"]``."""
        return [d.outcome for d in self.deliveries]

    @property
    def handled(self) -> list[Delivery]:
        return self._with("handled")

    @property
    def nacked(self) -> list[Delivery]:
        return self._with("nacked")

    @property
    def dead_lettered(self) -> list[Delivery]:
        return self._with("dead_lettered")

    @property
    def unknown_type(self) -> list[Delivery]:
        return self._with("unknown_type")

    @property
    def failed(self) -> list[Delivery]:
        """The deliveries whose handler raised: nacked or dead-lettered."""
        return self._with("nacked", "dead_lettered")

    @property
    def errors(self) -> list[BaseException]:
        """What the handlers raised, in order."""
        return [d.error for d in self.deliveries if d.error is not None]

    def __len__(self) -> int:
        return len(self.deliveries)

    def __iter__(self) -> Iterator[Delivery]:
        return iter(self.deliveries)

    def __str__(self) -> str:
        if not self.deliveries:
            return "no deliveries"
        lines = [f"{len(self.deliveries)} deliveries in {self.batches} batches:"]
        lines += [f"  {delivery}" for delivery in self.deliveries]
        return "\n".join(lines)


class _Recorder(ConsumerObserver):
    """Collects what one consumer did while :func:`deliver` runs it.

    One recorder is attached to a consumer for good (observers cannot be removed) and
    records only while a delivery is in progress, into that delivery's list. It
    ignores other consumers: a copy made by ``as_subconsumer`` shares its original's
    observers, and gets a recorder of its own.
    """

    def __init__(self, owner: _ConsumerBase) -> None:
        self._owner = weakref.ref(owner)
        self.into: list[Delivery] | None = None
        self._errors: dict[int, BaseException] = {}

    def handler_finished(self, consumer: _ConsumerBase, message: Message, state: Any,
                         outcome: Outcome, error: BaseException | None,
                         seconds: float) -> None:
        if consumer is self._owner() and self.into is not None and error is not None:
            self._errors[message.msg_id] = error

    def batch_finished(self, consumer: _ConsumerBase,
                       outcomes: Sequence[tuple[Message, Outcome]], seconds: float,
                       committed: bool) -> None:
        if consumer is not self._owner():
            return
        errors, self._errors = self._errors, {}
        if self.into is None or not committed:
            return  # a batch rolled back comes back whole: nothing of it happened
        for message, outcome in outcomes:
            self.into.append(
                Delivery(consumer.label, message, outcome, errors.get(message.msg_id)))


_recorders: weakref.WeakKeyDictionary[_ConsumerBase, _Recorder] = weakref.WeakKeyDictionary()
_recorders_lock = threading.Lock()


def _recorder(consumer: _ConsumerBase) -> _Recorder:
    with _recorders_lock:
        recorder = _recorders.get(consumer)
        if recorder is None:
            recorder = _recorders[consumer] = _Recorder(consumer)
            consumer.observe(recorder)
        return recorder


# -- deliver() -------------------------------------------------------------------------

# A guard against handlers that keep feeding each other (or themselves) forever: no
# test needs that many rounds of tick-and-drain, and a hang would be worse than this.
_MAX_ROUNDS: Final = 1000


def deliver(
    consumer: Consumer,
    *consumers: Consumer,
    max_batches: int | None = None,
    raise_errors: bool = True,
    include_retries: bool = False,
    include_delayed: bool = False,
    engine: Engine | None = None,
) -> DeliveryReport:
    """Run the consumers' handlers in this thread until nothing is pending for them.

    Each round ticks every queue of the given consumers and then lets each consumer
    handle batches (:meth:`Consumer.process_batch`, exactly what the worker does: one
    transaction per batch, handlers in SAVEPOINTs, nacks, the ack) until it has caught
    up with the latest tick. Rounds repeat while they deliver something, so events
    that handlers send to these consumers are delivered too.

    The ticks follow PgQue's snapshot rule for you: ``force_next_tick`` in one
    committed transaction, ``ticker`` in the next, both of their own. A batch holds
    only the events of transactions committed before its tick, so an event sent in a
    transaction that is still open (your test's own Session, for instance) is not
    delivered, exactly as in production; commit it, then deliver.

    :param max_batches: stop after this many batches (of all the consumers together)
        even if more are pending; ``None``: until nothing is pending.
    :param raise_errors: when a handler raises, finish its batch the way the worker
        does (the message is nacked, the others handled, the batch acked and
        committed), then raise the handler's exception here, so the test fails with
        the handler's own traceback. ``False`` records the error in the report and
        goes on.
    :param include_retries: also deliver the messages that nacks sent back, again and
        again until they are handled or dead-lettered. A test-only shortcut: the
        consumers' parked retries are made due at once, by setting their
        ``ev_retry_after`` in ``pgque.retry_queue`` to now, and moved back into the
        queue with ``pgque.maint_retry_events()``, so a ``retry_after`` of a minute
        never makes a test wait. The database user needs write access to
        ``pgque.retry_queue`` (the owner of the engine, or ``pgque_admin``).
    :param include_delayed: also deliver the consumers' delayed events
        (``Queue.send(..., delay=...)``) that are not due yet, as if their time had
        come: their due time is set to now (``pgque.delayed_events``) and the mover
        (``pgque.maint_deliver_delayed()``) moves them into the queue, so a test of a
        "remind me in 24 hours" handler runs at once. Delayed events already due are
        moved by every round anyway, when the engine has delayed delivery and the
        database user may run its mover (``pgque_admin``).
    :param engine: bind the consumers' sessions to this engine for the duration of
        the call (a consumer declared with an unbound ``sessionmaker()``, as the
        worker's ``--url`` would); by default each consumer's own binding is used.
        The ticks run on the same engine.

    Raises ``ValueError`` for a consumer that has no engine, and whatever fails a
    batch as a whole (engine missing, consumer not subscribed, a lost connection),
    after that batch rolled back.
    """
    __tracebackhide__ = True  # pytest shows the test's line and the handler's, not ours
    targets = _targets(Consumer, "deliver", consumer, consumers)
    with _bound(targets, engine):
        ticking = {id(c): _engine_of(c, engine) for c in targets}
        return drive(_delivery(targets, ticking, _run_in_transaction, max_batches,
                               raise_errors, include_retries, include_delayed))


async def adeliver(
    consumer: AsyncConsumer,
    *consumers: AsyncConsumer,
    max_batches: int | None = None,
    raise_errors: bool = True,
    include_retries: bool = False,
    include_delayed: bool = False,
    engine: AsyncEngine | None = None,
) -> DeliveryReport:
    """:func:`deliver` for :class:`~sqlalchemy_pgque.AsyncConsumer`: the same rounds
    and parameters, awaited on the running event loop; ``engine`` is an
    ``AsyncEngine``."""
    __tracebackhide__ = True
    targets = _targets(AsyncConsumer, "adeliver", consumer, consumers)
    with _bound(targets, engine):
        ticking = {id(c): _engine_of(c, engine) for c in targets}
        return await adrive(_delivery(targets, ticking, _arun_in_transaction, max_batches,
                                      raise_errors, include_retries, include_delayed))


def _targets(kind: type[ConsumerT], function: str, first: ConsumerT,
             more: Sequence[ConsumerT]) -> list[ConsumerT]:
    targets: list[ConsumerT] = []
    for consumer in (first, *more):
        if not isinstance(consumer, kind):
            other = "adeliver" if function == "deliver" else "deliver"
            raise TypeError(f"{function}() takes {kind.__name__} objects, got "
                            f"{consumer!r}; use {other}() for it")
        if not any(consumer is seen for seen in targets):
            targets.append(consumer)
    return targets


@contextmanager
def _bound(consumers: Sequence[_ConsumerBase], engine: Any) -> Iterator[None]:
    """Bind ``consumers`` to ``engine`` for a while, then give them back their own
    binding: a consumer declared once at module level must not stay bound to the
    database of the test that delivered last."""
    if engine is None:
        yield
        return
    previous = [consumer._engine_override for consumer in consumers]
    for consumer in consumers:
        consumer._engine_override = engine
    try:
        yield
    finally:
        for consumer, override in zip(consumers, previous, strict=True):
            consumer._engine_override = override


def _engine_of(consumer: _ConsumerBase, engine: Any) -> Any:
    bound = engine if engine is not None else consumer.engine
    if bound is None:
        raise ValueError(f"{consumer!r} has no engine to deliver with: bind its session "
                         "factory to one, or pass engine=")
    return bound


def _run_in_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    with engine.begin() as connection:
        return work(connection)


async def _arun_in_transaction(engine: AsyncEngine, work: Callable[[Connection], T]) -> T:
    async with engine.begin() as connection:
        return await connection.run_sync(work)


def _delivery(
    consumers: Sequence[Consumer] | Sequence[AsyncConsumer],
    engines: dict[int, Any],
    in_transaction: Callable[[Any, Callable[[Connection], Any]], Any],
    max_batches: int | None,
    raise_errors: bool,
    include_retries: bool,
    include_delayed: bool = False,
) -> Steps[DeliveryReport]:
    """The rounds of :func:`deliver`, as steps (``_runloop``) for either face."""
    __tracebackhide__ = True
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    deliveries: list[Delivery] = []
    recorders = [_recorder(consumer) for consumer in consumers]
    for recorder in recorders:
        recorder.into = deliveries
    batches = 0

    def report() -> DeliveryReport:
        return DeliveryReport(tuple(deliveries), batches)

    def on(consumer: _ConsumerBase, work: Callable[[Connection], Any]) -> Any:
        return partial(in_transaction, engines[id(consumer)], work)

    try:
        moves_delayed = bool((yield on(consumers[0], partial(
            _can_move_delayed, include_delayed))))
        for _ in range(_MAX_ROUNDS):
            moved = 0
            if moves_delayed:
                for consumer in consumers:
                    moved += yield on(consumer, partial(
                        _delayed_now, consumer.queue.name if include_delayed else None))
            if include_retries:
                for consumer in consumers:
                    moved += yield on(consumer, partial(
                        _retries_now, consumer.queue.name, consumer.name))
            ticked: set[tuple[int, str]] = set()
            for consumer in consumers:
                queue = (id(engines[id(consumer)]), consumer.queue.name)
                if queue not in ticked:
                    ticked.add(queue)
                    # Two transactions: a tick only takes in what committed before it.
                    yield on(consumer, consumer.queue.force_next_tick)
                    yield on(consumer, consumer.queue.ticker)
            received = 0
            for consumer in consumers:
                while True:
                    if max_batches is not None and batches >= max_batches:
                        return report()
                    first = len(deliveries)
                    count = yield consumer.process_batch
                    if count:
                        batches += 1
                        received += count
                        if raise_errors:
                            _raise_first_error(deliveries[first:])
                    elif not (yield on(consumer, partial(
                            _behind, consumer.queue.name, consumer.name))):
                        break
            if not received and not moved:
                return report()
        raise RuntimeError(
            f"deliver() gave up after {_MAX_ROUNDS} rounds: the handlers keep sending "
            "events to the consumers being delivered; pass max_batches= to bound it"
        )
    finally:
        for recorder in recorders:
            recorder.into = None


def _raise_first_error(deliveries: Sequence[Delivery]) -> None:
    __tracebackhide__ = True
    for delivery in deliveries:
        if delivery.error is not None:
            error = delivery.error
            what = ("moved to the dead-letter queue" if delivery.outcome == "dead_lettered"
                    else "nacked for a retry")
            add_note = getattr(error, "add_note", None)  # Python 3.11+
            if add_note is not None:
                add_note(f"raised by deliver(): the handler of {delivery.consumer} failed "
                         f"on message {delivery.msg_id} ({delivery.type!r}); the message "
                         f"was {what} and its batch committed. Pass raise_errors=False to "
                         "record handler errors in the DeliveryReport instead.")
            raise error


def _retries_now(queue: str, consumer: str, connection: Connection) -> int:
    """Make ``consumer``'s parked retries due and move every due retry back into its
    queue; how many were moved."""
    params = {"queue": queue, "consumer": consumer}
    statements.execute(connection, statements.RETRIES_DUE_NOW, params, statements.ADMIN)
    total = 0
    while True:  # the mover takes at most 10 a call
        moved = statements.scalar_int(statements.execute(
            connection, statements.MOVE_RETRIES, {}, statements.ADMIN))
        if not moved:
            return total
        total += moved


def _can_move_delayed(required: bool, connection: Connection) -> bool:
    """Whether the engine has delayed delivery and this user may run its mover; when
    ``required`` (``include_delayed=True``) and not, the error that says why."""
    has_function, may_execute = connection.execute(statements.CAN_MOVE_DELAYED).one()
    if required and not has_function:
        raise EngineFeatureMissing("maint_deliver_delayed")
    if required and not may_execute:
        raise PermissionDenied("deliver(include_delayed=True) runs "
                               "pgque.maint_deliver_delayed()", statements.ADMIN)
    return bool(may_execute)


def _delayed_now(queue: str | None, connection: Connection) -> int:
    """Make ``queue``'s held delayed events due now (none when ``queue`` is ``None``),
    then move every due one into its queue; how many were moved."""
    if queue is not None:
        statements.execute(connection, statements.DELAYED_DUE_NOW, {"queue": queue},
                           statements.ADMIN)
    return statements.scalar_int(statements.execute(
        connection, statements.MOVE_DELAYED, {}, statements.ADMIN))


def _behind(queue: str, consumer: str, connection: Connection) -> bool:
    """Whether ticks past ``consumer``'s cursor hold events: an empty receive only says
    that the next tick's window was empty."""
    pending = statements.execute(
        connection, statements.CONSUMER_INFO, {"queue": queue, "consumer": consumer},
        statements.READER,
    ).scalar()
    return bool(pending and pending > 0)


# -- sent(), assert_sent(), dlq() ---------------------------------------------------


class _Unset:
    def __repr__(self) -> str:
        return "<any payload>"


_ANY_PAYLOAD: Final = _Unset()

# Per database and queue, the ids of the events an assertion helper has already
# returned. Kept in the test process: marks written to the database would vanish with
# the rollback of the transaction a test asserts in.
_seen: dict[tuple[str, int, int], set[int]] = {}
_seen_lock = threading.Lock()


@contextmanager
def _reading(bind: Engine | Bind) -> Iterator[Connection]:
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            yield connection
        return
    session = bind() if isinstance(bind, scoped_session) else bind
    if isinstance(session, Session) and session.autoflush:
        session.flush()  # like a query would: what the test did so far is visible
    yield statements.bind_connection(bind)


def _queue_name(queue: Queue | str) -> str:
    return queue.name if isinstance(queue, Queue) else queue


def _unseen(connection: Connection, queue: str) -> tuple[tuple[str, int, int], list[Message]]:
    params = {"queue": queue}
    row = statements.execute(connection, statements.SENT_EVENTS_KEY, params,
                             statements.READER).first()
    if row is None:
        raise QueueNotFound(f"queue not found: {queue}")
    key = (connection.engine.url.render_as_string(hide_password=True), int(row.datoid),
           int(row.queue_id))
    events = messages_from_rows(
        statements.execute(connection, statements.SENT_EVENTS, params, statements.READER))
    with _seen_lock:
        seen = _seen.get(key, set())
        return key, [event for event in events if event.msg_id not in seen]


def _mark_seen(key: tuple[str, int, int], events: Sequence[Message]) -> None:
    with _seen_lock:
        _seen.setdefault(key, set()).update(event.msg_id for event in events)


def sent(bind: Engine | Bind, queue: Queue | str, type: str | None = None) -> list[Message]:
    """The events sent to ``queue`` (of ``type``, if given) that no assertion helper has
    returned yet, oldest first; they count as seen from now on.

    The events are read from the queue's event tables, whatever the ticks and batches:
    no consumer is involved, so real consumers still get every event, and an event
    counts as sent as soon as it is in the database. On an ``Engine`` that means
    committed; on your Session or Connection it includes what your open transaction
    sent (a Session with ``autoflush`` is flushed first, as a query would be; events
    recorded on a Session without ORM changes reach the database at commit). Retries
    of nacked events are not new sends and are left out; a dead letter replayed with
    ``dlq_replay`` is a new event and is in.

    Each message has ``batch_id`` 0 (it is in no batch) and ``retry_count`` 0. For an
    ``AsyncSession``: ``await session.run_sync(lambda s: sent(s, queue))``. Raises
    :class:`~sqlalchemy_pgque.QueueNotFound` for a queue that does not exist.
    """
    name = _queue_name(queue)
    with _reading(bind) as connection:
        key, events = _unseen(connection, name)
    if type is not None:
        events = [event for event in events if event.type == type]
    _mark_seen(key, events)
    return events


def assert_sent(
    bind: Engine | Bind,
    queue: Queue | str,
    *,
    type: str | None = None,
    payload: Any = _ANY_PAYLOAD,
    count: int | None = None,
) -> list[Message]:
    """Assert that events matching ``type`` and ``payload`` were sent to ``queue``, and
    return them; they count as seen from now on (see :func:`sent`).

    ``payload`` is compared with ``==`` to the decoded payload, so
    ``unittest.mock.ANY`` works for values you do not care about
    (``payload={"order_id": 7, "at": ANY}``). With ``count``, exactly that many
    unseen events must match; without it, at least one. Only unseen events are
    considered, so a test can assert a second send of the same event after asserting
    the first.

    On failure, raises ``AssertionError`` listing every unseen event of the queue, and
    marks nothing as seen.
    """
    __tracebackhide__ = True  # the failure is the test's line, not ours
    name = _queue_name(queue)
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    with _reading(bind) as connection:
        key, events = _unseen(connection, name)
    matching = [
        event for event in events
        if (type is None or event.type == type)
        and (isinstance(payload, _Unset) or event.payload == payload)
    ]
    if (len(matching) != count) if count is not None else not matching:
        raise AssertionError(_not_sent_message(name, type, payload, count, matching, events))
    _mark_seen(key, matching)
    return matching


def _not_sent_message(queue: str, type: str | None, payload: Any, count: int | None,
                      matching: Sequence[Message], events: Sequence[Message]) -> str:
    what = "an event" if count is None else f"{count} event{'' if count == 1 else 's'}"
    if type is not None:
        what += f" of type {type!r}"
    if not isinstance(payload, _Unset):
        what += f" with payload {payload!r}"
    lines = [f"expected {what} sent to queue {queue!r}, found {len(matching)}"]
    if events:
        lines.append(f"events sent to {queue!r} and not yet seen by an assertion helper "
                     f"({len(events)}):")
        lines += [f"  {_describe(event)}" for event in events]
    else:
        lines.append(f"no event sent to {queue!r} that an assertion helper has not "
                     "already seen")
    return "\n".join(lines)


def _describe(event: Message) -> str:
    try:
        shown = json.dumps(event.payload, sort_keys=True, default=str)
    except ValueError:
        shown = repr(event.payload)
    if len(shown) > 200:
        shown = shown[:197] + "..."
    return f"#{event.msg_id} {event.type!r} {shown}"


def dlq(bind: Engine | Bind, queue: Queue | str | None = None) -> list[admin.DeadLetter]:
    """Every dead letter (of ``queue``, if given), oldest first: the messages their
    consumers gave up on after the queue's ``max_retries``."""
    return admin.dlq_list(bind, None if queue is None else _queue_name(queue), limit=None)


# -- the server, the template and the per-test databases --------------------------------

_DSN_VARIABLE: Final = "PGQUE_TEST_DSN"

# A throwaway server holds nothing worth a flush to disk; without these, every commit
# and every CREATE DATABASE waits for fsync.
_EMBEDDED_SETTINGS: Final = {"fsync": "off", "full_page_writes": "off",
                             "synchronous_commit": "off"}


def _libpq_dsn(configured: str) -> str:
    """``PGQUE_TEST_DSN`` as a libpq string: SQLAlchemy URLs name their driver, libpq
    URIs do not."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", configured.strip())


class _NoServer(Exception):
    """No server, or no engine, to test with: the message says what to do, and is all
    the test reports (a traceback into the plugin would only hide it)."""


class _Server:
    """The session's PostgreSQL: where test databases are created and dropped."""

    def __init__(self, dsn: str, embedded: EmbeddedPostgres | None) -> None:
        self.dsn = dsn
        self._embedded = embedded
        self._admin = self.connect_admin()
        self._names = itertools.count()
        self.prefix = f"pgque_test_{uuid.uuid4().hex[:8]}"
        major = self._admin.info.server_version // 10000
        if embedded is not None:
            # Ours, set at start; asking could race with the reload that applies it.
            fsync_off = _EMBEDDED_SETTINGS["fsync"] == "off"
        else:
            fsync = self._admin.execute("SELECT current_setting('fsync')").fetchone()
            fsync_off = fsync is not None and fsync[0] == "off"
        # Measured on PostgreSQL 18 (bench/bench_testing.py): copying the template's
        # files beats WAL-logging it block by block when fsync is off, and loses when
        # the copy's two checkpoints must reach the disk.
        self._file_copy = major >= 15 and fsync_off

    @classmethod
    def start(cls) -> _Server:
        configured = os.environ.get(_DSN_VARIABLE, "").strip()
        if configured:
            dsn = _libpq_dsn(configured)
            try:
                return cls(dsn, None)
            except psycopg.Error as exc:
                raise _NoServer(
                    f"{_DSN_VARIABLE} names a server that does not answer "
                    f"({' '.join(str(exc).split())}); fix it, or unset {_DSN_VARIABLE} "
                    "to use the embedded PostgreSQL"
                ) from exc
        from .embedded import EmbeddedPostgres

        try:
            embedded = EmbeddedPostgres().start()
        except RuntimeError as exc:
            raise _NoServer(f"{exc}; or set {_DSN_VARIABLE} to a PostgreSQL server for "
                            "the tests") from exc
        try:
            with psycopg.connect(embedded.dsn, autocommit=True) as connection:
                for setting, value in _EMBEDDED_SETTINGS.items():
                    connection.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(setting), sql.Literal(value)))
                connection.execute("SELECT pg_reload_conf()")
            return cls(embedded.dsn, embedded)
        except BaseException:
            embedded.stop()
            raise

    def connect_admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        """An autocommit connection for CREATE and DROP DATABASE, to the database the
        DSN names, else ``postgres`` (libpq would pick one named after the user)."""
        dsn = self.dsn
        if not conninfo.conninfo_to_dict(dsn).get("dbname"):
            dsn = conninfo.make_conninfo(dsn, dbname="postgres")
        return psycopg.connect(dsn, autocommit=True)

    def close(self) -> None:
        self._admin.close()
        if self._embedded is not None:
            self._embedded.stop()

    def url(self, name: str) -> URL:
        return url_from_conninfo(conninfo.make_conninfo(self.dsn, dbname=name))

    def new_name(self, label: str) -> str:
        return f"{self.prefix}_{label}{next(self._names)}"

    def create(self, name: str, template: str | None = None,
               admin: psycopg.Connection[tuple[Any, ...]] | None = None) -> None:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
            if self._file_copy:
                statement = sql.SQL("{} STRATEGY FILE_COPY").format(statement)
        (admin or self._admin).execute(statement)

    def drop(self, name: str, admin: psycopg.Connection[tuple[Any, ...]] | None = None) -> None:
        # FORCE: connections a test left open (a pool it did not dispose) must not
        # keep its database alive.
        (admin or self._admin).execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def seal(self, name: str) -> None:
        """Close database ``name`` to connections: a template that anyone is connected
        to cannot be copied. Autovacuum workers count too, and CREATE DATABASE waits
        for them in steps of 100 ms; they leave alone a database that allows no
        connections."""
        self._admin.execute(sql.SQL(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = {} AND pid <> pg_backend_pid()").format(sql.Literal(name)))
        self._admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
            sql.Identifier(name)))


class _Clones:
    """The per-test copies of the template, each made ahead of its need.

    A copy costs the server tens of milliseconds. Threads of their own, each on a
    connection of its own, copy the template for the next tests while the current one
    runs, and drop each database after its test, so a test waits only for what its
    predecessors did not leave time to prepare.
    """

    AHEAD: Final = 2
    """Copies in the making at any time, each by its own thread: two server processes
    copy side by side, which a test suite of quick tests keeps busy."""

    def __init__(self, server: _Server, template: str) -> None:
        self._server = server
        self._template = template
        self._local = threading.local()
        self._connections: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(max_workers=self.AHEAD,
                                           thread_name_prefix="pgque-test-databases")
        self._drops: list[Future[None]] = []
        self._ready = deque(self._workers.submit(self._copy) for _ in range(self.AHEAD))

    def _admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        connection: psycopg.Connection[tuple[Any, ...]] | None = getattr(
            self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._server.connect_admin()
            with self._lock:
                self._connections.append(connection)
        return connection

    def _copy(self) -> str:
        name = self._server.new_name("db")
        self._server.create(name, self._template, self._admin())
        return name

    def _drop(self, name: str) -> None:
        self._server.drop(name, self._admin())

    def take(self) -> str:
        """A fresh copy of the template, for one test; :meth:`give_back` it after."""
        self._raise_failed_drops()
        name = self._ready.popleft().result()
        self._ready.append(self._workers.submit(self._copy))
        return name

    def give_back(self, name: str) -> None:
        self._drops.append(self._workers.submit(self._drop, name))

    def _raise_failed_drops(self) -> None:
        done = [drop for drop in self._drops if drop.done()]
        self._drops = [drop for drop in self._drops if not drop.done()]
        for drop in done:
            drop.result()

    def close(self) -> None:
        try:
            for copy in self._ready:
                if copy.exception() is None:
                    self._drops.append(self._workers.submit(self._drop, copy.result()))
        finally:
            self._workers.shutdown(wait=True)
            for connection in self._connections:
                connection.close()
        self._raise_failed_drops()


def _install_engine(url: URL) -> None:
    """The default template setup: the bundled engine, or ``PGQUE_SCHEMA_SQL``'s."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            schema.install(connection, os.environ.get("PGQUE_SCHEMA_SQL") or None)
    finally:
        engine.dispose()


def _check_installed(url: URL) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            version = schema.installed_version(connection)
    finally:
        engine.dispose()
    if version is None:
        raise _NoServer(
            "pgque_template_setup did not install the engine into the template "
            "database: install it there (op.pgque_install() in your migrations, or "
            "sqlalchemy_pgque.schema.install(connection))"
        )


@pytest.fixture(scope="session")
def pgque_template_setup() -> Callable[[URL], None]:
    """How the session's template database is prepared, once: a function of its URL.

    Every ``pgque_url`` database is a copy of the template. The default installs
    the engine (the bundled one, or the PgQue SQL file named by ``PGQUE_SCHEMA_SQL``).
    Override this fixture at session scope in your ``conftest.py`` to run your
    Alembic migrations (including ``op.pgque_install()``) or ``metadata.create_all``
    instead; the function must leave the engine installed, and its connections closed
    (any left open are ended).
    """
    return _install_engine


@pytest.fixture(scope="session")
def _pgque_server() -> Iterator[_Server]:
    try:
        server = _Server.start()
    except _NoServer as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def _pgque_clones(
    _pgque_server: _Server, pgque_template_setup: Callable[[URL], None]
) -> Iterator[_Clones]:
    template = _pgque_server.new_name("template")
    _pgque_server.create(template)
    try:
        url = _pgque_server.url(template)
        pgque_template_setup(url)
        try:
            _check_installed(url)
        except _NoServer as exc:
            pytest.fail(str(exc), pytrace=False)
        _pgque_server.seal(template)
        clones = _Clones(_pgque_server, template)
        try:
            yield clones
        finally:
            clones.close()
    finally:
        _pgque_server.drop(template)


@pytest.fixture
def pgque_url(_pgque_server: _Server, _pgque_clones: _Clones) -> Iterator[URL]:
    """A fresh database with the engine installed (and whatever
    ``pgque_template_setup`` put there), dropped after the test."""
    name = _pgque_clones.take()
    try:
        yield _pgque_server.url(name)
    finally:
        _pgque_clones.give_back(name)


@pytest.fixture
def pgque_engine(pgque_url: URL) -> Iterator[Engine]:
    """An :class:`~sqlalchemy.Engine` on ``pgque_url``, disposed after the test."""
    engine = create_engine(pgque_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def pgque_async_engine(pgque_url: URL) -> Iterator[AsyncEngine]:
    """An ``AsyncEngine`` on ``pgque_url``, without a pool (each connection closes when
    released, so none outlives the event loop of the test that opened it)."""
    if importlib.util.find_spec("greenlet") is None:
        pytest.fail("pgque_async_engine needs greenlet: pip install "
                    "'sqlalchemy-pgque[asyncio]'", pytrace=False)
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(pgque_url, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.sync_engine.dispose()
