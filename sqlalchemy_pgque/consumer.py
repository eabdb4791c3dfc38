"""Consumers: handlers for a queue's messages, run one short Session per batch.

::

    consumer = Consumer(SessionLocal, queue=orders_q, name="order_worker")

    @consumer.on("order.created")
    def ship(msg: Message, session: Session) -> None:
        session.add(Shipment(order_id=msg.payload["order_id"]))

    consumer.run()          # or: python -m sqlalchemy_pgque.worker myapp.workers:consumer

On a message's way from ``send`` to ``ack``, this is the stop after the ticker: the
tick's NOTIFY wakes the consumer on its LISTEN connection (:mod:`._listen`); it
receives the batch, runs each message's handler, nacks the messages whose handler
failed, acks the batch and commits, the handlers' writes and the ack together.
:class:`AsyncConsumer` does the same over an ``async_sessionmaker`` or an
``AsyncEngine``, with ``async def`` handlers.

The policy is written once, in :class:`_ConsumerBase`, as steps that
:class:`Consumer` drives in a thread and :class:`AsyncConsumer` on an event loop
(``_runloop.py`` says how, and why not SQLAlchemy's greenlet bridge).
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import psycopg
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from . import _statements as statements
from . import schema
from ._duration import Duration, as_seconds
from ._listen import AsyncListener, Listener, closed_quietly
from ._runloop import (
    Outage,
    Step,
    Steps,
    Waker,
    adrive,
    blocking_run,
    drive,
    in_main_thread,
    within,
)
from .errors import (
    BatchNotFound,
    ConsumerModeConflict,
    ConsumerNotSubscribed,
    EngineNotInstalled,
    InvalidName,
    PermissionDenied,
    PgqueError,
    QueueNotFound,
    _first_line,
    _is_connection_lost,
    _sqlstate,
    _translate,
)
from .logs import _bind_fields, _unbind_fields
from .message import Message
from .queue import MAX_MESSAGES, Queue, _check_cooperative_name

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

__all__ = ["AsyncConsumer", "Consumer", "ConsumerObserver", "Outcome", "UnknownHandlerPolicy"]

log = logging.getLogger(__name__)

UnknownHandlerPolicy = Literal["nack", "ack"]

Outcome = Literal["handled", "nacked", "dead_lettered", "unknown_type", "failed"]
"""What became of one delivery of a message: its handler returned (``handled``); it
raised and the message was scheduled for a retry (``nacked``) or, out of retries,
moved to the dead-letter queue (``dead_lettered``); no handler took its type
(``unknown_type``, nacked or acked by ``unknown_handler_policy``); or the batch failed
as a whole, a database failure or an abandon on shutdown, and comes back (``failed``)."""

# Configuration problems: retrying cannot fix them, so run() raises them. Anything
# else that fails a batch (the database or the network going away, a pool that stayed
# exhausted, a failing commit hook) leaves the batch to be redelivered whole, and the
# loop backs off and tries again: a worker never exits on them.
_FATAL_ERRORS: tuple[type[PgqueError], ...] = (
    EngineNotInstalled,
    QueueNotFound,
    ConsumerNotSubscribed,
    ConsumerModeConflict,
    InvalidName,
    PermissionDenied,
)

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
"""A handler function; the decorator hands it back unchanged."""

ConsumerT = TypeVar("ConsumerT", bound="_ConsumerBase")


@dataclass(frozen=True)
class _Handler:
    function: Callable[..., Any]
    takes_session: bool


def _takes_session(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is ``(msg, session)`` rather than ``(msg)``.

    Only positional parameters without a default count: ``def h(msg, tag=t)`` binds
    ``tag`` for itself and must not be handed the Session.
    """
    required = 0
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ) and parameter.default is inspect.Parameter.empty:
            required += 1
    if required == 0:
        raise TypeError(f"handler {function!r} must accept (msg) or (msg, session)")
    return required >= 2


def _asyncio_ext() -> Any:
    """``sqlalchemy.ext.asyncio``, imported on first use: it needs greenlet (the asyncio
    extra), which sync-only installs do not have."""
    try:
        return importlib.import_module("sqlalchemy.ext.asyncio")
    except ImportError as exc:
        raise ImportError(
            "AsyncConsumer needs greenlet: pip install 'sqlalchemy-pgque[asyncio]'"
        ) from exc


def _is_async_factory(obj: object) -> bool:
    # An AsyncEngine or async_sessionmaker exists only if its module was imported.
    asyncio_ext = sys.modules.get("sqlalchemy.ext.asyncio")
    return asyncio_ext is not None and isinstance(
        obj, (asyncio_ext.AsyncEngine, asyncio_ext.async_sessionmaker)
    )


class _BatchLost(Exception):
    """``ack`` or ``nack`` found no open batch: another subconsumer took the batch over."""


class _BatchAbandoned(Exception):
    """The batch in progress is given up on shutdown: it rolls back and comes back whole."""


class _DatabaseFailure(Exception):
    """A handler failed because the batch's connection or transaction is gone.

    That is the database's failure, not the handler's: the message is not nacked (the
    nack could not be written anyway), the whole batch rolls back and comes back.
    """

    def __init__(self, message: Message, error: BaseException) -> None:
        super().__init__(_first_line(error))
        self.message = message
        self.error = error


def _transaction_usable(session: Session) -> bool:
    """Whether the batch transaction on ``session`` can still run statements.

    A handler may have swallowed the error of a dead connection and raised its own, so
    the connection is asked rather than the exception. No round trip: the state is
    what SQLAlchemy and the driver already know.
    """
    try:
        connection = session.connection()
    except Exception:
        return False  # PendingRollbackError and its kin: the transaction is invalid
    if connection.invalidated:
        return False
    driver = connection.connection.driver_connection
    if isinstance(driver, (psycopg.Connection, psycopg.AsyncConnection)):
        return not (driver.closed or driver.broken) and (
            driver.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        )
    return True


@dataclass(frozen=True)
class _BatchInProgress:
    batch_id: int
    size: int
    first_msg_id: int


_CANCEL_TIMEOUT = 5.0


def _cancel_quietly(connection: Any, label: str) -> None:
    # cancel_safe() waits for the server with the GIL released; the older cancel()
    # holds it in libpq's blocking call, freezing every thread of the process for as
    # long as an unreachable server takes to time out.
    try:
        if isinstance(connection, psycopg.AsyncConnection):
            asyncio.run(connection.cancel_safe(timeout=_CANCEL_TIMEOUT))
        elif isinstance(connection, psycopg.Connection):
            connection.cancel_safe(timeout=_CANCEL_TIMEOUT)
        else:
            connection.cancel()
    except Exception:
        log.debug("%s: cancelling the batch's statement failed", label, exc_info=True)


def _listener_in_doubt(exc: BaseException) -> bool:
    """Whether a failed round may have lost the LISTEN connection too (then reopen it)."""
    return isinstance(exc, _DatabaseFailure) or _is_connection_lost(exc)


def _discard_connection(session: Session) -> None:
    """Invalidate the batch's connection instead of returning it to the pool: a cancel
    sent for this batch may still arrive, and must not hit another statement."""
    try:
        session.connection().invalidate()
    except Exception:
        log.debug("invalidating the batch's connection failed", exc_info=True)


class _Shutdown:
    """One run's shutdown: the stop deadline, and abandoning the batch in progress.

    A batch reported abandoned must never commit, and a batch whose commit is already
    on its way must not be cancelled: both decisions are taken under one lock, which is
    never held across I/O and never taken in a signal handler (the interrupted thread
    may hold it). Abandoning cancels the statement a handler is waiting on, from a
    thread of its own: psycopg's ``cancel()`` opens a connection to the server and, on
    a partitioned network, blocks for seconds. A connection that was sent a cancel is
    invalidated rather than returned to the pool, so that a late cancel never reaches
    another statement.
    """

    def __init__(self, label: str) -> None:
        self._label = label
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.running = False
        """Set by ``run()``: outside a run there is nothing to time or abandon."""
        self.abandoning = False
        self.batch: _BatchInProgress | None = None
        self.committing = False
        """The batch's COMMIT is on its way: it commits whole or not at all."""
        self._connection: Any = None
        self._cancel_sent = False

    def batch_started(self, messages: list[Message], connection: Any) -> None:
        with self._lock:
            self.batch = _BatchInProgress(messages[0].batch_id, len(messages),
                                          messages[0].msg_id)
            self._connection = connection
            self.committing = False
            self._cancel_sent = False
        self.check()

    def check(self) -> None:
        """Raise :class:`_BatchAbandoned` once the batch in progress is given up."""
        if self.abandoning:
            raise _BatchAbandoned()

    def release_connection(self) -> bool:
        """The batch's connection is about to go back to the pool: never cancel on it.
        ``True`` when a cancel was already sent on it (discard it, then)."""
        with self._lock:
            self._connection = None
            return self._cancel_sent

    def commit_starts(self) -> None:
        """Commit the batch unless it was abandoned first (then raise)."""
        with self._lock:
            self.check()
            self.committing = True
            self._connection = None

    def batch_ended(self) -> None:
        with self._lock:
            self.batch = None
            self._connection = None
            self.committing = False

    def stop_requested(self, timeout: float | None) -> None:
        """Start counting the shutdown timeout (seconds; ``None``: no limit), once."""
        if not self.running or timeout is None or self._timer is not None:
            return
        if timeout <= 0:
            self.abandon()
            return
        self._timer = threading.Timer(timeout, self._timed_out, (timeout,))
        self._timer.daemon = True
        self._timer.start()

    def _timed_out(self, timeout: float) -> None:
        with self._lock:
            batch, committing = self.batch, self.committing
        if batch is not None and not self.abandoning:
            if committing:
                log.info("%s: shutdown timeout of %g s reached while batch %s commits; "
                         "the commit goes on", self._label, timeout, batch.batch_id)
            else:
                log.warning("%s: shutdown timeout of %g s reached in batch %s; "
                            "abandoning it", self._label, timeout, batch.batch_id)
        self.abandon()

    def abandon(self) -> None:
        """Give up the batch in progress (from any thread but a signal handler's)."""
        if not self.running:
            return
        with self._lock:
            if self.abandoning:
                return
            self.abandoning = True
            connection = None if self.committing else self._connection
            self._cancel_sent = connection is not None
        if connection is not None:
            # Ends at once a handler statement waiting on a lock or a slow query.
            threading.Thread(target=_cancel_quietly, args=(connection, self._label),
                             name=f"{self._label} cancel", daemon=True).start()

    def close(self) -> None:
        self.running = False
        if self._timer is not None:
            self._timer.cancel()


_CONSUMER_IN_USE = ("55P03", "40001")  # lock_not_available, serialization_failure


def _check_subscription(
    connection: Connection, queue: str, consumer: str, subconsumer: str | None = None
) -> None:
    """Raise :class:`EngineNotInstalled`, :class:`QueueNotFound`,
    :class:`ConsumerNotSubscribed` or :class:`ConsumerModeConflict` unless ``consumer``
    (or its subconsumer ``subconsumer``, if given) can receive from
    ``queue``; :class:`PermissionDenied` when the database user may not consume."""
    try:
        _verify_subscription(connection, queue, consumer, subconsumer)
    except DBAPIError as exc:
        error = _translate(exc, required_role=statements.READER, queue=queue)
        if error is None:
            raise
        raise error from exc


def _verify_subscription(
    connection: Connection, queue: str, consumer: str, subconsumer: str | None
) -> None:
    schema._require_installed(connection)
    if connection.execute(statements.QUEUE_EXISTS, {"queue": queue}).first() is None:
        raise QueueNotFound(f"queue not found: {queue}; create it with pgque.create_queue()")
    subscribed = {"queue": queue, "consumer": consumer}
    if connection.execute(statements.CONSUMER_INFO, subscribed).first() is None:
        if subconsumer is None:
            advice = (f"Queue({queue!r}).subscribe(session, {consumer!r}) "
                      "or op.pgque_subscribe()")
        else:
            advice = (f"Queue({queue!r}).subscribe_subconsumer(session, {consumer!r}, "
                      f"{subconsumer!r}) or op.pgque_subscribe_subconsumer()")
        raise ConsumerNotSubscribed(
            f"consumer {consumer!r} is not subscribed to queue {queue!r}; subscribe it "
            f"with {advice}"
        )
    # Trying the first call of the consumer's loop, then undoing it, finds a consumer
    # of the wrong kind (a cooperative consumer run as a normal one, or the reverse)
    # before run()
    # starts; names alone cannot tell, since normal consumer names may contain dots.
    # The trial needs a transaction to undo it in (without one, run() reports a wrong
    # kind on its first receive) and must not queue behind a process that is using the
    # consumer right now: that process holds its rows, and proves the kind is in use.
    # A trial next_batch may use up a batch id; ids are gappy anyway.
    if getattr(connection.connection.dbapi_connection, "autocommit", False):
        return
    trial = connection.begin_nested()
    try:
        connection.execute(statements.TRIAL_LOCK_TIMEOUT)
        _try_first_call(connection, queue, consumer, subconsumer)
    except DBAPIError as exc:
        if _sqlstate(exc.orig) not in _CONSUMER_IN_USE:
            raise
    finally:
        trial.rollback()


def _try_first_call(
    connection: Connection, queue: str, consumer: str, subconsumer: str | None
) -> None:
    if subconsumer is None:
        try:
            connection.execute(statements.NEXT_BATCH, {"queue": queue, "consumer": consumer})
        except DBAPIError as exc:
            error = _translate(exc)
            if not isinstance(error, ConsumerModeConflict):
                raise
            raise ConsumerModeConflict(
                f"{error}; give the Consumer subconsumer=<name> to run it as one of "
                "its subconsumers"
            ) from exc
        return
    try:
        # receive_coop registers the subconsumer on first use.
        Queue(queue).subscribe_subconsumer(connection, consumer, subconsumer)
    except ConsumerModeConflict as exc:
        raise ConsumerModeConflict(
            f"{exc}; to make the normal consumer {consumer!r} a cooperative one, "
            f"register a subconsumer with convert_normal=True once, e.g. "
            f"op.pgque_subscribe_subconsumer({queue!r}, {consumer!r}, {subconsumer!r}, "
            "convert_normal=True) in a migration"
        ) from exc


def _check_cooperative_names(consumer: str, subconsumer: str) -> None:
    _check_cooperative_name("consumer", consumer)
    _check_cooperative_name("subconsumer", subconsumer)


class ConsumerObserver:
    """Hooks a consumer calls as it works: what metrics and tracing watch.

    Subclass it, override the hooks you need and register an instance with
    :meth:`Consumer.observe`. The hooks run in the consumer's own thread or task,
    between its steps, so a context set in :meth:`handler_started` (a tracing span)
    is the handler's context; they must be quick. An exception raised by a hook is
    logged and ignored: observing never breaks consuming.
    """

    def handler_started(self, consumer: _ConsumerBase, message: Message) -> Any:
        """A handler is about to run on ``message``; the result is handed back to
        :meth:`handler_finished`."""
        return None

    def handler_finished(self, consumer: _ConsumerBase, message: Message, state: Any,
                         outcome: Outcome, error: BaseException | None,
                         seconds: float) -> None:
        """The handler of ``message`` returned or raised (``error``) after ``seconds``;
        ``outcome`` is what became of the message (``failed`` when its failure was
        the database's). Nothing is committed yet."""

    def batch_finished(self, consumer: _ConsumerBase, outcomes: Sequence[tuple[Message, Outcome]],
                       seconds: float, committed: bool) -> None:
        """A batch ended: committed with these outcomes, or rolled back whole
        (``committed`` false, every outcome ``failed``: its messages come back)."""


@dataclass
class _BatchRecord:
    """What the observers are told about the batch in progress."""

    messages: list[Message]
    started: float
    outcomes: list[tuple[Message, Outcome]] = field(default_factory=list)
    max_retries: int | None = None


class _ConsumerBase:
    """The consumer policy, written once; :class:`Consumer` and :class:`AsyncConsumer`
    are its two faces.

    Everything that talks to the database is a generator of steps (see
    :mod:`._runloop`); a face only says how a step touches the Session
    (:meth:`_on_session`), how the loop waits (:meth:`_open_listener`,
    :meth:`_pause`, :meth:`_wake`) and drives the steps, in its public methods.
    """

    def __init__(
        self,
        session_factory: Callable[..., Any],
        *,
        queue: Queue | str,
        name: str,
        max_messages: int,
        poll_interval: float,
        retry_after: Duration,
        unknown_handler_policy: UnknownHandlerPolicy,
        subconsumer: str | None,
        dead_interval: Duration | None,
        shutdown_timeout: Duration | None,
        listen: Any,
    ) -> None:
        if unknown_handler_policy not in ("nack", "ack"):
            raise ValueError(
                f"unknown_handler_policy must be 'nack' or 'ack', got {unknown_handler_policy!r}"
            )
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        if subconsumer is not None:
            _check_cooperative_names(name, subconsumer)
        elif dead_interval is not None:
            raise ValueError(
                "dead_interval applies to cooperative consumers only: give subconsumer= too"
            )
        if as_seconds(retry_after) < 0:
            raise ValueError(f"retry_after must be >= 0, got {retry_after!r}")
        if dead_interval is not None and as_seconds(dead_interval) <= 0:
            raise ValueError(f"dead_interval must be > 0, got {dead_interval!r}")
        if shutdown_timeout is not None and as_seconds(shutdown_timeout) < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {shutdown_timeout!r}")
        self._session_factory = session_factory
        self._engine_override: Any = None
        self.queue = queue if isinstance(queue, Queue) else Queue(queue)
        self.name = name
        self.max_messages = max_messages
        self.poll_interval = poll_interval
        self.retry_after = retry_after
        self.unknown_handler_policy: UnknownHandlerPolicy = unknown_handler_policy
        self.subconsumer = subconsumer
        self.dead_interval = dead_interval
        self.shutdown_timeout = shutdown_timeout
        self.listen = listen
        """Where the LISTEN connection comes from: ``True`` (the consumer's engine,
        unless it goes through a connection pooler), an engine, or ``False`` (none:
        poll). The worker's ``--direct-url`` sets it."""
        self.listening = threading.Event()
        """Set while the consumer is connected and waiting for ticks: listening, or
        polling where it does not listen."""
        self._handlers: dict[str, _Handler] = {}
        self._stopping = threading.Event()
        self._shutdown = self._new_shutdown()
        self._commit_failed_for: int | None = None
        """First message id of a batch whose COMMIT failed on a handler's writes."""
        from .tracing import default_observers  # tracing.py builds on this module
        self._observers: list[ConsumerObserver] = []
        self._handler_hooks: tuple[ConsumerObserver, ...] = ()
        self._batch_hooks: tuple[ConsumerObserver, ...] = ()
        for observer in default_observers():
            self.observe(observer)
        self._record: _BatchRecord | None = None
        self.progress_at: float | None = None
        """``time.monotonic()`` when the run loop last completed a round (handled a
        batch, or found none and waited); ``None`` before. A health check compares it
        with the clock: a loop stuck in an outage or in a handler stops moving it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"

    def _clear_run_state(self) -> None:
        self.listening = threading.Event()
        self._stopping = threading.Event()
        self._shutdown = self._new_shutdown()
        self._commit_failed_for = None
        self._record = None
        self.progress_at = None

    def _new_shutdown(self) -> _Shutdown:
        return _Shutdown(self.label)

    def _request_stop(self, abandon: bool) -> None:
        self._stopping.set()
        if abandon:
            self._shutdown.abandon()
        else:
            timeout = self.shutdown_timeout
            self._shutdown.stop_requested(None if timeout is None else as_seconds(timeout))

    def _run_ended(self) -> None:
        self._shutdown.close()
        self._shutdown = self._new_shutdown()
        self._stopping.clear()

    @property
    def label(self) -> str:
        """``queue/consumer`` (``queue/consumer.subconsumer`` in cooperative mode)."""
        suffix = f".{self.subconsumer}" if self.subconsumer else ""
        return f"{self.queue.name}/{self.name}{suffix}"

    @property
    def channel(self) -> str:
        """The notify channel the engine signals new ticks of the queue on."""
        return f"pgque_{self.queue.name}"

    def on(self, *types: str) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as the handler of these message types.

        ``"*"`` catches every type without its own handler. The function takes
        ``(msg)`` or ``(msg, session)``, decided once here from its signature. Only a
        handler that takes the session runs inside a SAVEPOINT, since only it can
        write through the batch's transaction; SQLAlchemy emits that SAVEPOINT when
        the handler first uses the session, so a handler that does not costs no round
        trip.
        """
        if not types:
            raise TypeError("on() needs at least one message type")

        def register(function: HandlerT) -> HandlerT:
            self._check_handler(function)
            handler = _Handler(function, _takes_session(function))
            for type_ in types:
                if type_ in self._handlers:
                    raise ValueError(f"{self!r} already has a handler for type {type_!r}")
            for type_ in types:
                self._handlers[type_] = handler
            return function

        return register

    def as_subconsumer(self: ConsumerT, subconsumer: str) -> ConsumerT:
        """A copy of this consumer running as subconsumer ``subconsumer`` of the
        cooperative consumer ``self.name``.

        The copy shares the handlers (one registry: a handler added later to either
        applies to both) and the settings, ``dead_interval`` included, but has its own
        run state. That is how several subconsumers of one cooperative consumer run in
        one process, each with its own :meth:`run` (in its own thread, or side by side
        on one event loop for :class:`AsyncConsumer`); the worker's ``--concurrency``
        does it. Raises :class:`~sqlalchemy_pgque.errors.InvalidName` for a name that
        is empty or contains a dot.
        """
        _check_cooperative_names(self.name, subconsumer)
        twin = copy.copy(self)
        twin.subconsumer = subconsumer
        twin._clear_run_state()
        return twin

    def stop(self, *, abandon: bool = False) -> None:
        """Ask ``run()`` to return; safe from any thread.

        The batch in progress is finished first, for at most ``shutdown_timeout``;
        with ``abandon=True`` (or once the timeout runs out) it is abandoned instead:
        rolled back, with its statement in progress cancelled, and redelivered whole
        later. A handler busy in its own code keeps running until it returns, but
        nothing of the abandoned batch commits.
        """
        self._request_stop(abandon)
        self._wake()

    def observe(self, observer: ConsumerObserver) -> None:
        """Call ``observer``'s hooks from now on (see :class:`ConsumerObserver`)."""
        self._observers = [*self._observers, observer]
        # Per message, only the observers that override a handler hook are called.
        kind = type(observer)
        if kind.handler_started is not ConsumerObserver.handler_started \
                or kind.handler_finished is not ConsumerObserver.handler_finished:
            self._handler_hooks = (*self._handler_hooks, observer)
        if kind.batch_finished is not ConsumerObserver.batch_finished:
            self._batch_hooks = (*self._batch_hooks, observer)

    # -- what a face provides ------------------------------------------------------

    def _check_handler(self, function: Callable[..., Any]) -> None:
        raise NotImplementedError

    def _on_session(self, session: Any, function: Callable[..., Any], *args: Any) -> Step:
        """The step calling ``function(session, *args)`` with the batch's sync Session."""
        raise NotImplementedError

    def _open_listener(self, engine: Any, unless_pooled: bool) -> Step:
        """The step opening a LISTEN connection of ``engine``; it gives ``None`` when
        ``unless_pooled`` and the connection goes through a connection pooler."""
        raise NotImplementedError

    def _pause(self, delay: float) -> Step:
        """The step waiting ``delay`` s, or until :meth:`stop`."""
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    @property
    def engine(self) -> Any:
        """The engine sessions are bound to, or ``None`` when it cannot be found."""
        if self._engine_override is not None:
            return self._engine_override
        return getattr(self._session_factory, "kw", {}).get("bind")

    def _session(self) -> Any:
        if self._engine_override is not None:
            return self._session_factory(bind=self._engine_override)
        return self._session_factory()

    # -- the policy ------------------------------------------------------------------

    def _check_steps(self) -> Steps[None]:
        session = self._session()
        yield from within(session, _one(self._on_session(session, self._check_subscribed)))

    def _check_subscribed(self, session: Session) -> None:
        _check_subscription(session.connection(), self.queue.name, self.name, self.subconsumer)

    def _process_batch_steps(self) -> Steps[int]:
        token = self._bind_log_fields()
        try:
            return (yield from self._batch())[0]
        except _DatabaseFailure as failure:
            raise failure.error from None
        finally:
            self._shutdown.batch_ended()
            _unbind_fields(token)

    def _bind_log_fields(self) -> Any:
        fields: dict[str, Any] = {"queue": self.queue.name, "consumer": self.name}
        if self.subconsumer is not None:
            fields["subconsumer"] = self.subconsumer
        return _bind_fields(**fields)

    def _batch(self) -> Steps[tuple[int, bool]]:
        """``(messages handled, whether another batch may be ready at once)``.

        Raises what failed the batch, after rolling it back; :class:`_BatchAbandoned`
        when it was abandoned on shutdown.
        """
        session = self._session()
        try:
            return (yield from within(session, self._batch_in(session)))
        except BaseException:
            self._batch_failed()
            raise

    def _batch_in(self, session: Any) -> Steps[tuple[int, bool]]:
        try:
            messages, more = yield from within(session.begin(), self._receive_first(session))
            if not messages:
                return 0, more
            if self.subconsumer is not None:
                # The cooperative allocation moved the cooperative consumer's cursor
                # under a lock on its row: committing it at once lets the other
                # subconsumers allocate while this one works. The batch stays assigned
                # to this subconsumer until its ack; handler writes and the ack still
                # commit together.
                yield from within(session.begin(), self._handle_batch(session, messages))
        except _BatchLost as lost:
            size = self._shutdown.batch.size if self._shutdown.batch else 0
            self._batch_failed()
            self._log_batch_lost(lost)
            self._shutdown.batch_ended()
            return size, True
        self._batch_committed(messages)
        return len(messages), True

    def _receive_first(self, session: Any) -> Steps[tuple[list[Message], bool]]:
        """Receive in the first transaction, and handle there unless cooperative."""
        messages = yield self._on_session(session, self._receive)
        if not messages:
            return messages, (yield self._on_session(session, self._behind))
        if self.subconsumer is None:
            yield from self._handle_batch(session, messages)
        return messages, True

    def _handle_batch(self, session: Any, messages: list[Message]) -> Steps[None]:
        """Handle and ack the batch; on return the caller's transaction commits it."""
        shutdown = self._shutdown
        token = _bind_fields(batch_id=messages[0].batch_id)
        try:
            yield self._on_session(session, self._batch_started, messages)
            if self.subconsumer is not None:
                yield self._on_session(session, self._hold_subconsumer_row, messages[0].batch_id)
            self._warn_if_truncated(messages)
            check_constraints = self._commit_failed_for == messages[0].msg_id
            for message in messages:
                shutdown.check()
                yield from self._handle(session, message, check_constraints)
            shutdown.check()
            yield self._on_session(session, self._ack, messages[0].batch_id)
            shutdown.commit_starts()
        except BaseException as exc:
            if shutdown.release_connection():
                yield self._on_session(session, _discard_connection)
            if shutdown.abandoning and isinstance(exc, Exception) \
                    and not isinstance(exc, (_BatchAbandoned, _BatchLost)):
                raise _BatchAbandoned() from exc
            raise
        finally:
            _unbind_fields(token)

    def _handle(self, session: Any, message: Message, check_constraints: bool) -> Steps[None]:
        handler = self._handler_for(message.type)
        token = _bind_fields(msg_id=message.msg_id)
        try:
            if handler is None:
                if self.unknown_handler_policy == "nack":
                    yield self._on_session(session, self._nack_unknown, message)
                self._outcome(message, "unknown_type")
                return
            hooks = self._handler_hooks
            started = time.perf_counter() if hooks else 0.0
            states = self._handler_started(hooks, message) if hooks else ()
            outcome: Outcome = "failed"
            error: BaseException | None = None
            try:
                if handler.takes_session:
                    yield from within(session.begin_nested(), self._call_handler(
                        handler, message, session, check_constraints))
                else:
                    yield partial(handler.function, message)
                outcome = "handled"
            except Exception as exc:
                error = exc
                yield self._on_session(session, self._raise_unless_handler_failure, message,
                                       exc)
                try:
                    dead = yield self._on_session(session, self._nack, message, repr(exc))
                except BaseException:
                    self._log_handler_failure(message, exc, None)
                    raise
                outcome = "dead_lettered" if dead else "nacked"
                self._log_handler_failure(message, exc, outcome)
            finally:
                if hooks:
                    self._handler_finished(hooks, states, message, outcome, error,
                                           time.perf_counter() - started)
            self._outcome(message, outcome)
        finally:
            _unbind_fields(token)

    @staticmethod
    def _call_handler(handler: _Handler, message: Message, session: Any,
                      check_constraints: bool) -> Steps[None]:
        yield partial(handler.function, message, session)
        if check_constraints:
            yield partial(session.execute, statements.CHECK_DEFERRED_CONSTRAINTS)

    def _run_steps(self) -> Steps[None]:
        engine = self.engine
        if engine is None:
            raise PgqueError(f"{self!r} has no engine: bind its session factory to one, or "
                             "pass an engine")
        self._shutdown.running = True
        token = self._bind_log_fields()
        try:
            yield from self._consume(engine)
        finally:
            self._run_ended()
            _unbind_fields(token)

    def _consume(self, engine: Any) -> Steps[None]:
        outage = Outage(self.label, log)
        listener: Listener | AsyncListener | None = None
        # An engine given for the LISTEN is trusted to keep a session; the consumer's
        # own (the batches') may go through a pooler in transaction mode.
        listen_engine = engine if self.listen is True else self.listen or None
        unless_pooled = self.listen is True
        try:
            while not self._stopping.is_set():
                try:
                    if listener is None and listen_engine is not None:
                        listener = yield self._open_listener(listen_engine, unless_pooled)
                        if listener is None:
                            listen_engine = None
                            log.warning(
                                "%s: its connection goes through a connection pooler, where "
                                "a LISTEN in transaction mode never hears a tick: polling every "
                                "%g s instead (to be woken at once, LISTEN on a connection "
                                "straight to PostgreSQL: Consumer(listen=engine), or the "
                                "worker's --direct-url)", self.label, self.poll_interval)
                        else:
                            self.listening.set()
                            log.info("%s: listening on %s", self.label, self.channel)
                    _, more = yield from self._batch()
                    outage.succeeded()
                    self.progress_at = time.monotonic()
                    if listener is None:
                        self.listening.set()  # polling, and the database answers
                    if not more:
                        if listener is None:
                            yield self._pause(self.poll_interval)
                        else:
                            yield partial(listener.wait, self.poll_interval)
                        self.progress_at = time.monotonic()
                except _FATAL_ERRORS:
                    raise
                except _BatchAbandoned:
                    self._log_abandoned()
                except Exception as exc:
                    if _listener_in_doubt(exc):
                        self.listening.clear()
                        if listener is not None:
                            yield from closed_quietly(listener)
                            listener = None
                    yield self._pause(self._failed_round(exc, outage))
        finally:
            self.listening.clear()
            if listener is not None:
                yield from closed_quietly(listener)
            log.info("%s: stopped", self.label)

    # -- the decisions the steps call --------------------------------------------------

    def _handler_for(self, message_type: str | None) -> _Handler | None:
        handler = self._handlers.get(message_type) if message_type is not None else None
        return handler if handler is not None else self._handlers.get("*")

    def _receive(self, session: Session) -> list[Message]:
        if self.subconsumer is None:
            return self.queue.receive(session, self.name, self.max_messages)
        return self.queue.receive_coop(
            session, self.name, self.subconsumer, self.max_messages,
            dead_interval=self.dead_interval,
        )

    def _behind(self, session: Session) -> bool:
        """Whether ticks past the consumer's cursor hold events.

        An empty receive only says the next tick's window was empty: a later window
        may be ready, and its notification may have fired before we listened.
        """
        pending = statements.execute(
            statements.bind_connection(session), statements.CONSUMER_INFO,
            {"queue": self.queue.name, "consumer": self.name}, statements.READER,
        ).scalar()
        return bool(pending and pending > 0)

    def _warn_if_truncated(self, messages: list[Message]) -> None:
        if len(messages) >= self.max_messages:
            log.warning(
                "%s: batch %s filled max_messages=%d; events of the batch past that "
                "limit are skipped by its ack (raise max_messages)",
                self.label, messages[0].batch_id, self.max_messages,
            )

    def _nack(self, session: Session, message: Message, reason: str) -> bool:
        """Nack ``message``; whether it went to the dead-letter queue rather than to a
        retry (the engine's rule: its retries reached the queue's ``max_retries``)."""
        record = self._record
        if record is not None and record.max_retries is None:
            record.max_retries = int(statements.execute(
                statements.bind_connection(session), statements.MAX_RETRIES,
                {"queue": self.queue.name}, statements.READER).scalar_one())
        try:
            self.queue.nack(session, message, retry_after=self.retry_after, reason=reason)
        except BatchNotFound:
            raise _BatchLost(message.batch_id) from None
        return record is not None and (message.retry_count or 0) >= (record.max_retries or 0)

    def _nack_unknown(self, session: Session, message: Message) -> None:
        log.warning("%s: no handler for type %r (message %s); nacked",
                    self.label, message.type, message.msg_id)
        self._nack(session, message, f"no handler for message type {message.type!r}")

    def _ack(self, session: Session, batch_id: int) -> None:
        if self.queue.ack(session, batch_id) == 0:
            raise _BatchLost(batch_id)

    def _hold_subconsumer_row(self, session: Session, batch_id: int) -> None:
        """Lock this subconsumer's row until the handling transaction ends, and make
        sure it still holds ``batch_id`` (else raise :class:`_BatchLost`).

        Peers take a stalled subconsumer's batch over only if they can lock its row
        (``FOR UPDATE SKIP LOCKED``), so while the lock is held no ``dead_interval``
        can take the batch away, however long the handlers run. The touch itself is
        not seen by others before commit; a periodic heartbeat in this transaction
        would add nothing. If this process dies, the lock goes with its connection
        and the batch is re-fetched by this subconsumer or taken over after
        ``dead_interval``.

        Between the allocation's commit and this lock the batch is unguarded: a peer
        may take it over, or a second process using this subconsumer name may finish
        it.
        Checking under the lock means no handler runs for a batch that is not ours.
        """
        assert self.subconsumer is not None
        try:
            self.queue.touch_subconsumer(session, self.name, self.subconsumer)
        except DBAPIError as exc:
            # Under REPEATABLE READ, a peer's change to the row we waited for (a
            # takeover) is a serialization failure: the batch is gone all the same.
            if _sqlstate(exc.orig) == "40001":
                raise _BatchLost(batch_id) from None
            raise
        row_name = f"{self.name}.{self.subconsumer}"
        row = statements.execute(
            statements.bind_connection(session), statements.CONSUMER_INFO,
            {"queue": self.queue.name, "consumer": row_name}, statements.READER,
        ).first()
        held = None if row is None else row.current_batch
        if held != batch_id:
            raise _BatchLost(batch_id)

    def _log_batch_lost(self, lost: _BatchLost) -> None:
        log.warning("%s: batch %s was taken over by another subconsumer; rolled back",
                    self.label, lost.args[0])

    def _on_signal(self, sig: signal.Signals) -> None:
        # A signal handler runs between two bytecodes of the main thread, which may be
        # holding the locks that stop() takes: hand the work to a thread.
        abandon = self._stopping.is_set()
        self._stopping.set()
        if abandon:
            log.info("%s: %s received again; abandoning the current batch", self.label,
                     sig.name)
        else:
            log.info("%s: %s received; finishing the current batch", self.label, sig.name)
        threading.Thread(target=self.stop, kwargs={"abandon": abandon},
                         name=f"{self.label} stop", daemon=True).start()

    def _batch_started(self, session: Session, messages: list[Message]) -> None:
        connection = session.connection().connection.driver_connection
        self._record = _BatchRecord(messages, time.perf_counter())
        self._shutdown.batch_started(messages, connection)

    def _outcome(self, message: Message, outcome: Outcome) -> None:
        if self._record is not None and self._batch_hooks:
            self._record.outcomes.append((message, outcome))

    def _observer_failed(self, observer: ConsumerObserver, hook: str) -> None:
        log.warning("%s: observer %r failed in %s", self.label, observer, hook, exc_info=True)

    def _handler_started(self, hooks: tuple[ConsumerObserver, ...],
                         message: Message) -> list[Any]:
        states = []
        for observer in hooks:
            try:
                states.append(observer.handler_started(self, message))
            except Exception:
                self._observer_failed(observer, "handler_started")
                states.append(None)
        return states

    def _handler_finished(self, hooks: tuple[ConsumerObserver, ...], states: Sequence[Any],
                          message: Message, outcome: Outcome, error: BaseException | None,
                          seconds: float) -> None:
        for observer, state in zip(hooks, states, strict=True):
            try:
                observer.handler_finished(self, message, state, outcome, error, seconds)
            except Exception:
                self._observer_failed(observer, "handler_finished")

    def _batch_finished(self, outcomes: Sequence[tuple[Message, Outcome]], seconds: float,
                        committed: bool) -> None:
        for observer in self._batch_hooks:
            try:
                observer.batch_finished(self, outcomes, seconds, committed)
            except Exception:
                self._observer_failed(observer, "batch_finished")

    def _batch_failed(self) -> None:
        """Tell the observers the batch in progress rolled back; it comes back whole."""
        record, self._record = self._record, None
        if record is not None and self._batch_hooks:
            self._batch_finished([(m, "failed") for m in record.messages],
                                 time.perf_counter() - record.started, False)

    def _raise_unless_handler_failure(
        self, session: Session, message: Message, exc: BaseException
    ) -> None:
        """Tell a handler's own failure (nack the message, go on with the batch) from
        the loss of the batch's connection or transaction (raise: the batch is over).

        Only the batch's own connection decides: an error the handler got from another
        database or service is the handler's, however it looks.
        """
        if self._shutdown.abandoning:
            # Most likely the handler's statement was cancelled to abandon the batch.
            raise _BatchAbandoned() from exc
        if not _transaction_usable(session):
            raise _DatabaseFailure(message, exc) from exc

    def _log_handler_failure(self, message: Message, exc: BaseException,
                             outcome: Outcome | None) -> None:
        if outcome == "nacked":
            result = f"nacked for retry in {as_seconds(self.retry_after):g} s"
        elif outcome == "dead_lettered":
            result = "out of retries, moved to the dead-letter queue"
        else:
            result = "its nack failed, so the batch is rolled back"
        log.error("%s: handler for %r failed on message %s (retry %s); %s", self.label,
                  message.type, message.msg_id, message.retry_count or 0, result,
                  exc_info=exc)

    def _describe_failure(self, exc: BaseException) -> str:
        """The log line of a failed round of the run loop: what broke and what it cost."""
        batch = self._shutdown.batch
        if batch is None:
            cost = ""
        elif self._shutdown.committing:
            cost = (f"; batch {batch.batch_id} was committing: it committed whole, or its "
                    f"{batch.size} messages will be redelivered")
        else:
            cost = (f"; batch {batch.batch_id} rolled back, its {batch.size} messages will "
                    "be redelivered")
        if isinstance(exc, _DatabaseFailure):
            return (f"database connection lost in the handler of message "
                    f"{exc.message.msg_id} ({exc}){cost}")
        if _is_connection_lost(exc):
            return f"database connection lost ({_first_line(exc)}){cost}"
        return f"{type(exc).__name__}: {_first_line(exc)}{cost}"

    def _failed_round(self, exc: Exception, outage: Outage) -> float:
        """Log a failed round of the run loop; the delay before the next one."""
        batch, committing = self._shutdown.batch, self._shutdown.committing
        lost = isinstance(exc, _DatabaseFailure) or _is_connection_lost(exc)
        state = _sqlstate(exc.orig) if isinstance(exc, DBAPIError) else None
        if committing and not lost and batch is not None and state and state.startswith("23"):
            # A handler's writes broke a deferred constraint, which only COMMIT checks:
            # rolled back and redelivered as it is, the batch would fail forever. The
            # next time, each handler's SAVEPOINT checks the constraints itself, so the
            # message at fault is nacked like any handler failure.
            self._commit_failed_for = batch.first_msg_id
            log.error("%s: batch %s failed at commit: %s; handling it again with "
                      "constraints checked after each handler", self.label, batch.batch_id,
                      _first_line(exc))
        elif not lost and not isinstance(exc, (DBAPIError, PgqueError)):
            # Not the database: a bug or a failing hook of the application, shown whole.
            log.error("%s: unexpected error in the run loop", self.label, exc_info=exc)
        delay = outage.failed(self._describe_failure(exc),
                              "reconnecting" if lost else "retrying")
        self._shutdown.batch_ended()
        return delay

    def _batch_committed(self, messages: list[Message]) -> None:
        if self._commit_failed_for == messages[0].msg_id:
            self._commit_failed_for = None
        self._shutdown.batch_ended()
        record, self._record = self._record, None
        if record is not None and self._batch_hooks:
            self._batch_finished(record.outcomes,
                                 time.perf_counter() - record.started, True)

    def _log_abandoned(self) -> None:
        batch = self._shutdown.batch
        if batch is None:
            return
        log.warning("%s: batch %s abandoned on shutdown: rolled back, its %d messages will "
                    "be redelivered", self.label, batch.batch_id, batch.size)
        self._shutdown.batch_ended()


class Consumer(_ConsumerBase):
    """Runs handlers for the messages of one queue's consumer, a batch at a time.

    :param session_factory: a ``sessionmaker`` (or any callable returning a
        :class:`~sqlalchemy.orm.Session`), or an :class:`~sqlalchemy.Engine` to make
        one from. The worker's ``--url`` rebinds it through :meth:`use_engine`.
    :param queue: the :class:`~sqlalchemy_pgque.Queue` or its name.
    :param name: the consumer name; it must be subscribed to the queue.
    :param max_messages: receive limit per batch. PgQue's ``ack`` skips events of a
        batch beyond what was received, so keep it above the largest batch.
    :param poll_interval: seconds between receives when no tick notification arrives.
    :param retry_after: delay before a nacked message comes back (seconds, a
        timedelta, or text such as ``"5 minutes"``).
    :param unknown_handler_policy: ``"nack"`` (default) a message whose type has no
        handler and no ``"*"`` handler, or ``"ack"`` it (drop it).
    :param subconsumer: run as this subconsumer of ``name``, a cooperative consumer
        (``receive_coop``), sharing its batches with the other subconsumers; see
        :meth:`as_subconsumer`.
    :param dead_interval: cooperative mode: take over the batch of a subconsumer that
        has been silent this long.
    :param shutdown_timeout: how long :meth:`stop` lets the batch in progress run
        before abandoning it (a :data:`Duration`; ``None``, the default, waits for it).
    :param listen: where the consumer LISTENs for the queue's ticks between polls.
        ``True`` (the default): on a connection of its own engine, unless that
        connection goes through a connection pooler such as PgBouncer, where a LISTEN
        in transaction mode never hears anything: then it polls every
        ``poll_interval`` and logs a warning once. An :class:`~sqlalchemy.Engine`: on
        a connection of that engine, trusted to keep a session of its own (straight to
        PostgreSQL, or through a pool in session mode), while the batches go through
        the session factory's. ``False``: it never listens, and polls.

    Each batch runs in one short Session and transaction: ``receive``, then each
    message's handler, then ``ack``, then commit. A handler taking ``(msg, session)``
    runs inside a SAVEPOINT; when it raises, its writes roll back and the message is
    nacked (retried after ``retry_after``, dead-lettered after the queue's
    ``max_retries``). The handlers' writes and the ack commit together: a crash
    before the commit redelivers the whole batch with none of its writes. If a nack
    fails, the batch is rolled back and redelivered rather than acked.

    A handler's exception is a *handler failure* only while the batch's connection
    and transaction are still good (an IntegrityError or a statement timeout the
    handler ran into, or any error of its own). When the connection is lost or the
    transaction is no longer usable, it is a *database failure*: nothing is nacked,
    the whole batch rolls back and comes back, and :meth:`run` reconnects.

    A subconsumer commits its ``receive_coop`` at once, because allocating a batch
    locks the cooperative consumer's row until commit, then handles and acks the batch
    in a second transaction, so the subconsumers work in parallel. The batch stays
    assigned to the subconsumer meanwhile: after a crash it gets the batch again, or
    another subconsumer with ``dead_interval`` takes it over; while it is alive and
    handling the batch, its row is locked and no other subconsumer can.

    :meth:`run` blocks, waking on the queue's tick notifications (LISTEN) and at
    least every ``poll_interval``, reconnecting with backoff after database errors,
    until :meth:`stop` (from any thread) or SIGTERM / SIGINT; it finishes the batch in
    progress first, for at most ``shutdown_timeout``. Handlers must not commit the
    session themselves.
    """

    def __init__(
        self,
        session_factory: Callable[..., Session] | Engine,
        *,
        queue: Queue | str,
        name: str,
        max_messages: int = MAX_MESSAGES,
        poll_interval: float = 1.0,
        retry_after: Duration = 60.0,
        unknown_handler_policy: UnknownHandlerPolicy = "nack",
        subconsumer: str | None = None,
        dead_interval: Duration | None = None,
        shutdown_timeout: Duration | None = None,
        listen: bool | Engine = True,
    ) -> None:
        if _is_async_factory(session_factory):
            raise TypeError("use AsyncConsumer with an AsyncEngine or async_sessionmaker")
        super().__init__(
            sessionmaker(session_factory) if isinstance(session_factory, Engine)
            else session_factory,
            queue=queue, name=name, max_messages=max_messages, poll_interval=poll_interval,
            retry_after=retry_after, unknown_handler_policy=unknown_handler_policy,
            subconsumer=subconsumer, dead_interval=dead_interval,
            shutdown_timeout=shutdown_timeout, listen=listen,
        )
        self.listen: bool | Engine
        self._waker: Waker | None = None

    @property
    def engine(self) -> Engine | None:
        """The engine sessions are bound to, or ``None`` when it cannot be found."""
        bind = super().engine
        if bind is None:
            try:
                # Opens no connection: nothing to close.
                bind = self._session_factory().get_bind()
            except Exception:
                return None
        if isinstance(bind, Connection):
            bind = bind.engine
        return bind if isinstance(bind, Engine) else None

    def use_engine(self, engine: Engine) -> None:
        """Bind this consumer's sessions to ``engine`` (and its LISTEN connection, unless
        ``listen`` names an engine of its own)."""
        self._engine_override = engine

    def check(self) -> None:
        """Raise if the engine is missing, the queue does not exist or the consumer is
        not subscribed: the configuration errors :meth:`run` cannot recover from."""
        drive(self._check_steps())

    def process_batch(self) -> int:
        """Receive and handle one batch; return how many messages it had (0: none).

        When the batch fails as a whole (the connection is lost, the ack fails), it is
        rolled back and the error is raised.
        """
        return drive(self._process_batch_steps())

    def run(self, *, install_signal_handlers: bool | None = None) -> None:
        """Consume until :meth:`stop`, SIGTERM or SIGINT.

        Signal handlers are installed when ``install_signal_handlers`` is true, or when
        it is ``None`` and this is the main thread; the previous ones are restored on
        return; a second SIGTERM or SIGINT abandons the batch in progress. Configuration
        errors (engine missing, queue unknown, consumer not subscribed, missing role)
        are raised; anything else that fails a batch (a lost connection, a server
        restart) rolls the batch back, is logged, and is retried after a backoff that
        starts near 0.1 s and doubles up to 2 s (jittered): run() does not return on it.
        """
        with blocking_run(install_signal_handlers, self._on_signal) as waker:
            self._waker = waker
            try:
                drive(self._run_steps())
            finally:
                self._waker = None

    def _clear_run_state(self) -> None:
        super()._clear_run_state()
        self._waker = None

    def _check_handler(self, function: Callable[..., Any]) -> None:
        if inspect.iscoroutinefunction(function):
            raise TypeError(f"{function!r} is async: register it on an AsyncConsumer")

    def _on_session(self, session: Any, function: Callable[..., Any], *args: Any) -> Step:
        return partial(function, session, *args)

    def _open_listener(self, engine: Any, unless_pooled: bool) -> Step:
        assert self._waker is not None
        return partial(Listener.open, engine, [self.channel], self._waker,
                       unless_pooled=unless_pooled)

    def _pause(self, delay: float) -> Step:
        return partial(self._stopping.wait, delay)

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()


class AsyncConsumer(_ConsumerBase):
    """:class:`Consumer` for asyncio: ``async def`` handlers and an :class:`AsyncSession`.

    :param session_factory: an ``async_sessionmaker`` or an
        :class:`~sqlalchemy.ext.asyncio.AsyncEngine` to make one from.
    :param listen: as for :class:`Consumer`, with an ``AsyncEngine``.

    The other parameters, the per-batch transaction, the SAVEPOINT around handlers
    taking ``(msg, session)`` and the wake-up and reconnect behaviour are those of
    :class:`Consumer`: both run the same code. ``await consumer.run()`` runs in the
    calling event loop; :meth:`stop` may be called from any thread.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession] | AsyncEngine,
        *,
        queue: Queue | str,
        name: str,
        max_messages: int = MAX_MESSAGES,
        poll_interval: float = 1.0,
        retry_after: Duration = 60.0,
        unknown_handler_policy: UnknownHandlerPolicy = "nack",
        subconsumer: str | None = None,
        dead_interval: Duration | None = None,
        shutdown_timeout: Duration | None = None,
        listen: bool | AsyncEngine = True,
    ) -> None:
        asyncio_ext = _asyncio_ext()
        if isinstance(session_factory, (Engine, sessionmaker)):
            raise TypeError("use Consumer with an Engine or sessionmaker")
        if isinstance(session_factory, asyncio_ext.AsyncEngine):
            session_factory = asyncio_ext.async_sessionmaker(session_factory)
        super().__init__(
            cast("async_sessionmaker[AsyncSession]", session_factory),
            queue=queue, name=name, max_messages=max_messages, poll_interval=poll_interval,
            retry_after=retry_after, unknown_handler_policy=unknown_handler_policy,
            subconsumer=subconsumer, dead_interval=dead_interval,
            shutdown_timeout=shutdown_timeout, listen=listen,
        )
        self.listen: bool | AsyncEngine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_event: asyncio.Event | None = None

    @property
    def engine(self) -> AsyncEngine | None:
        """The async engine sessions are bound to, or ``None`` when it cannot be found."""
        bind = super().engine
        return bind if isinstance(bind, _asyncio_ext().AsyncEngine) else None

    def use_engine(self, engine: AsyncEngine) -> None:
        """Bind this consumer's sessions to ``engine`` (and its LISTEN connection, unless
        ``listen`` names an engine of its own)."""
        self._engine_override = engine

    async def check(self) -> None:
        """See :meth:`Consumer.check`."""
        await adrive(self._check_steps())

    async def process_batch(self) -> int:
        """See :meth:`Consumer.process_batch`."""
        return await adrive(self._process_batch_steps())

    async def run(self, *, install_signal_handlers: bool | None = None) -> None:
        """Consume until :meth:`stop`, SIGTERM or SIGINT; see :meth:`Consumer.run`.

        Signal handlers go on the running loop (``loop.add_signal_handler``) when
        ``install_signal_handlers`` is true, or ``None`` in the main thread.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._wake_event = asyncio.Event()
        if self._stopping.is_set():
            self._wake_event.set()
        if install_signal_handlers is None:
            install_signal_handlers = in_main_thread()
        signals = (signal.SIGTERM, signal.SIGINT) if install_signal_handlers else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await adrive(self._run_steps())
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._loop = None
            self._wake_event = None

    def _clear_run_state(self) -> None:
        super()._clear_run_state()
        self._loop = None
        self._wake_event = None

    def _check_handler(self, function: Callable[..., Any]) -> None:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"{function!r} is not async: AsyncConsumer handlers are async def")

    def _on_session(self, session: Any, function: Callable[..., Any], *args: Any) -> Step:
        return partial(session.run_sync, function, *args)

    def _open_listener(self, engine: Any, unless_pooled: bool) -> Step:
        assert self._wake_event is not None
        return partial(AsyncListener.open, engine, [self.channel], self._wake_event,
                       unless_pooled=unless_pooled)

    def _pause(self, delay: float) -> Step:
        assert self._wake_event is not None
        return partial(_wait_for_event, self._wake_event, delay)

    def _wake(self) -> None:
        loop, wake_event = self._loop, self._wake_event
        if loop is not None and wake_event is not None:
            try:
                loop.call_soon_threadsafe(wake_event.set)
            except RuntimeError:
                pass  # the loop has already closed: run() has returned


async def _wait_for_event(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass


def _one(step: Step) -> Steps[Any]:
    """A single step as steps."""
    return (yield step)
