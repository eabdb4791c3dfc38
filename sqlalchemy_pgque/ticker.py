"""An in-process ticker and maintenance loop, for databases without pg_cron.

PgQue delivers nothing until something calls ``pgque.ticker()``. :class:`Ticker` does
that at the configured tick period, runs the retry mover and ``maint()`` every 30 s and
``maint_rotate_tables_step2()`` in a later transaction, moves delayed events into their
queues at their due time (engines with PgQue 0.3's delayed delivery), and, when woken by a commit
(``Queue.send`` NOTIFYs ``sqlalchemy_pgque_wake`` with the queue name inside the
producer's transaction), ticks that queue at once so its consumers get the event
within milliseconds. Any number of processes may run one: a PostgreSQL advisory lock
elects the single process that ticks, and another takes over when it dies.

A woken tick is one call, ``pgque.tick_now(queue)``, where the engine is ours; on
another PgQue install it is PgQue 0.2's ``force_next_tick(queue)`` and then
``ticker(queue)``, each in a transaction of its own. Likewise the periodic pass goes in
steps of ``pgque.ticker_step`` on our engine, so its locks stay bounded with thousands of
queues, and is one ``ticker()`` elsewhere.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from . import _statements as statements
from . import schema
from ._listen import Listener, close_quietly, connect_autocommit
from ._pooler import goes_through_pooler
from ._runloop import Outage, Waker, blocking_run
from .errors import (
    EngineNotInstalled,
    PermissionDenied,
    _first_line,
    _is_connection_lost,
    _is_transient,
    _sqlstate,
    _translate,
)

__all__ = ["TICKER_LOCK_KEY", "Ticker"]

log = logging.getLogger(__name__)

TICKER_LOCK_KEY = (0x70677175, 0x7469636B)
"""``pg_try_advisory_lock(classid, objid)`` key held by the ticking process."""

_DEFAULT_TICK_PERIOD = 0.1
# Queues per step of a stepped pass: a step holds about two lock-table entries per queue
# it covers (see pgque._tick_due), a small share of the default shared lock table.
_QUEUES_PER_STEP = 500
_RETRY_MOVER_BATCH = 10
# What the ticker calls, all granted to pgque_admin.
_TICKER_FUNCTIONS = (
    "pgque.ticker()",
    "pgque.ticker(text)",
    "pgque.force_next_tick(text)",
    "pgque.maint()",
    "pgque.maint_retry_events()",
    "pgque.maint_rotate_tables_step2()",
)


def _configuration_error(exc: BaseException) -> Exception | None:
    """The error to stop the ticker with, when ``exc`` is one waiting cannot cure."""
    state = _sqlstate(exc.orig if isinstance(exc, DBAPIError) else exc)
    if state == "42501":  # insufficient_privilege
        return PermissionDenied(_first_line(exc), statements.ADMIN)
    if state in ("42883", "3F000") and "pgque" in str(exc):  # undefined function / schema
        return EngineNotInstalled(_first_line(exc))
    return None


class Ticker:
    """Ticks every queue of one database and runs its periodic maintenance.

    :param engine: the database; the ticker keeps one dedicated connection from it,
        whose server session holds the ticker lock and its LISTEN: straight to
        PostgreSQL, or through a pool in session mode, never in transaction mode (it
        logs a warning when it finds a pooler, and leaves synchronous_commit alone).
    :param tick_period: seconds between ``pgque.ticker()`` calls; ``None`` reads
        ``pgque.config.tick_period_ms`` (100 ms by default).
    :param maint_interval: seconds between maintenance rounds (``maint_retry_events()``
        until it moves fewer than 10 rows, then ``maint()``, then
        ``maint_rotate_tables_step2()`` in its own transaction).
    :param rotate_step2_interval: seconds between extra ``maint_rotate_tables_step2()``
        calls, so a rotation completes without waiting a full maintenance round.
    :param wake: listen for commit wake-ups and tick the committed-to queue at once
        (``tick_now(queue)``; on an engine without it ``force_next_tick`` in one
        transaction, ``ticker(queue)`` in the next).
    :param coalesce_window: at most one wake-up tick per queue in this many seconds;
        commits arriving closer together share the next tick, so a busy queue still
        ticks in batches. The first commit after a quiet spell ticks immediately.
    :param lock_retry_interval: how often a process that does not hold the ticker
        lock tries to take it.

    Apart from ``tick_now``, used only where it exists, ticks are plain PgQue 0.2
    calls, so any PgQue install works. The periodic ``ticker()`` remains the floor for
    producers that do not go through ``Queue.send``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        tick_period: float | None = None,
        maint_interval: float = 30.0,
        rotate_step2_interval: float = 10.0,
        wake: bool = True,
        coalesce_window: float = 0.005,
        lock_retry_interval: float = 1.0,
    ) -> None:
        if tick_period is not None and tick_period <= 0:
            raise ValueError(f"tick_period must be > 0, got {tick_period}")
        self.engine = engine
        self.tick_period = tick_period
        self.maint_interval = maint_interval
        self.rotate_step2_interval = rotate_step2_interval
        self.wake = wake
        self.coalesce_window = coalesce_window
        self.lock_retry_interval = lock_retry_interval
        self.leading = threading.Event()
        """Set while this process holds the ticker lock and ticks."""
        self.progress_at: float | None = None
        """``time.monotonic()`` when the run loop last completed a round (ticked and
        waited while leading, or tried the lock while another process leads); ``None``
        before. A health check compares it with the clock: a loop stuck in an outage
        or in a slow statement stops moving it."""
        self._stopping = threading.Event()
        self._waker: Waker | None = None
        self._tick_in_one_call = False
        self._tick_in_steps = False
        self._warned_pooled = False

    def __repr__(self) -> str:
        return f"Ticker({self.engine.url.render_as_string(hide_password=True)!r})"

    def stop(self) -> None:
        """Ask :meth:`run` to return; safe from any thread or signal handler."""
        self._stopping.set()
        waker = self._waker
        if waker is not None:
            waker.wake()

    def check(self) -> None:
        """Raise :class:`EngineNotInstalled` or :class:`PermissionDenied` (naming
        ``pgque_admin``) when this database user cannot tick: the configuration errors
        :meth:`run` cannot recover from."""
        with self.engine.connect() as connection:
            try:
                schema._require_installed(connection)
                missing = [
                    function for function in _TICKER_FUNCTIONS
                    if not connection.exec_driver_sql(
                        statements.HAS_EXECUTE_PRIVILEGE,
                        {"function": function},
                    ).scalar_one()
                ]
            except DBAPIError as exc:
                error = _translate(exc, required_role=statements.ADMIN)
                if error is None:
                    raise
                raise error from exc
        if missing:
            raise PermissionDenied(f"no EXECUTE on {', '.join(missing)}", statements.ADMIN)

    def run(self, *, install_signal_handlers: bool | None = None) -> None:
        """Tick until :meth:`stop`, SIGTERM or SIGINT, reconnecting after errors.

        A lost connection, a server restart or any other transient error is waited out
        with backoff; :class:`PermissionDenied` and :class:`EngineNotInstalled` are
        raised.

        Signal handlers are installed when ``install_signal_handlers`` is true, or
        when it is ``None`` and this is the main thread.
        """
        with blocking_run(install_signal_handlers, lambda sig: self.stop()) as waker:
            self._waker = waker
            try:
                self._run(waker)
            finally:
                self._waker = None
                self._stopping.clear()

    def _run(self, waker: Waker) -> None:
        outage = Outage("ticker", log)
        while not self._stopping.is_set():
            connection: psycopg.Connection[Any] | None = None
            try:
                connection = connect_autocommit(self.engine)
                pooled = goes_through_pooler(connection)
                if pooled:
                    # Else its statements are prepared on one server connection and run
                    # on another (PgBouncer before 1.21 or without max_prepared_statements).
                    connection.prepare_threshold = None
                    self._warn_pooled()
                # A pooler keeps application_name with its client (PgBouncer does), so
                # this one cannot leak to another client.
                connection.execute(
                    statements.SET_APPLICATION_NAME,
                    (f"sqlalchemy_pgque ticker {os.getpid()}",),
                )
                if not pooled:
                    # Nothing this connection commits needs to wait for its WAL flush: a
                    # consumer's ack that depends on a tick commits later and flushes the
                    # WAL past it, and a tick, retry move or rotation lost whole in a
                    # crash is simply done again. The flush was most of a woken tick's
                    # latency. Never through a pooler: in transaction mode the setting
                    # stays on a server connection that then commits other clients'
                    # transactions, which would return before their WAL is flushed.
                    connection.execute(statements.SYNCHRONOUS_COMMIT_OFF)
                if self._acquire_lock(connection, outage):
                    self._lead(Listener(connection, waker), outage)
            except Exception as exc:
                error = _configuration_error(exc)
                if error is not None:
                    raise error from exc
                if not _is_transient(exc):
                    log.error("ticker: unexpected error", exc_info=exc)
                self._stopping.wait(outage.failed(_first_line(exc)))
            finally:
                if self.leading.is_set():
                    log.info("ticker: released the ticker lock")
                self.leading.clear()
                if connection is not None:
                    close_quietly(connection.close)

    def _warn_pooled(self) -> None:
        if self._warned_pooled:
            return
        self._warned_pooled = True
        log.warning(
            "ticker: its connection goes through a connection pooler; the ticker lock, its "
            "wake-ups (LISTEN) and its session settings need a server session of their own "
            "for the connection's life: through a pool in transaction mode several tickers "
            "lead at once, a lock stays behind on a server connection and wake-ups are "
            "lost. Connect the ticker straight to PostgreSQL or through a pool in session "
            "mode (the worker: --direct-url)")

    def _acquire_lock(self, connection: psycopg.Connection[Any], outage: Outage) -> bool:
        """Wait for the lock on ``connection``; ``False`` when stopped first."""
        while not self._stopping.is_set():
            row = connection.execute(statements.TRY_ADVISORY_LOCK, TICKER_LOCK_KEY).fetchone()
            if row is not None and row[0]:
                # Only a tick proves the outage over: ticking may fail where
                # connecting works (a read-only server, a full disk).
                return True
            outage.succeeded()
            self.progress_at = time.monotonic()
            self._stopping.wait(self.lock_retry_interval)
        return False

    def _lead(self, listener: Listener, outage: Outage) -> None:
        connection = listener.connection
        period = self.tick_period or _configured_tick_period(connection)
        delayed = _DelayedDelivery.open(connection)
        self._tick_in_one_call = _may_execute(connection, "pgque.tick_now(text)")
        self._tick_in_steps = _may_execute(connection, "pgque.ticker_step(integer,integer)")
        if self.wake:
            listener.listen(statements.WAKE_CHANNEL)
            if delayed is not None:
                listener.listen(statements.DELAYED_WAKE_CHANNEL)
            self._catch_up(connection)
        self.leading.set()
        log.info("ticker: holding the ticker lock; ticking every %.3f s%s", period,
                 ", and on commit wake-ups" if self.wake else "")
        now = time.monotonic()
        next_tick = next_maint = now
        next_step2 = now + self.rotate_step2_interval
        last_wake_tick: dict[str, float] = {}
        deferred: dict[str, float] = {}

        def serve_wake_ups(timeout: float) -> None:
            """Tick the queues whose commits woke us (waiting up to ``timeout`` for the
            first wake-up), at most once per ``coalesce_window`` each."""
            woken: set[str] = set()
            for notify in listener.wait(timeout):
                if notify.channel == statements.DELAYED_WAKE_CHANNEL:
                    assert delayed is not None
                    delayed.look_again(connection)
                else:
                    woken.add(notify.payload)
            now = time.monotonic()
            for queue_name in sorted(woken):
                if queue_name in deferred:
                    continue
                ready_at = last_wake_tick.get(queue_name, -math.inf) + self.coalesce_window
                if ready_at <= now:
                    last_wake_tick[queue_name] = now
                    self._tick_now(connection, queue_name)
                else:
                    deferred[queue_name] = ready_at

        # Over thousands of queues a periodic pass takes tens of milliseconds (one
        # sequence read per queue); the wake-ups that arrive meanwhile are served
        # between its steps, so a commit's delivery does not wait for the whole pass.
        between_steps = (lambda: serve_wake_ups(0.0)) if self.wake else None
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_tick:
                self._tick_all(connection, delayed, between_steps)
                outage.succeeded()
                next_tick += period
                if next_tick <= now:
                    next_tick = now + period
            if delayed is not None and delayed.due_at <= now:
                # The mover notifies WAKE_CHANNEL with each queue it delivered to; a
                # ticker not listening there looks for new events instead.
                if delayed.deliver(connection) and not self.wake:
                    self._catch_up(connection)
                delayed.look_again(connection)
            if now >= next_maint:
                self._maintain(connection)
                next_maint = time.monotonic() + self.maint_interval
                next_step2 = time.monotonic() + self.rotate_step2_interval
            elif now >= next_step2:
                connection.execute(statements.MAINT_ROTATE_STEP2)
                next_step2 = now + self.rotate_step2_interval
            for queue_name, due in list(deferred.items()):
                if due <= now:
                    del deferred[queue_name]
                    last_wake_tick[queue_name] = now
                    self._tick_now(connection, queue_name)
            deadline = min(next_tick, next_maint, next_step2, *deferred.values())
            if delayed is not None:
                deadline = min(deadline, delayed.due_at)
            serve_wake_ups(max(0.0, deadline - time.monotonic()))
            self.progress_at = time.monotonic()

    def _tick_all(self, connection: psycopg.Connection[Any],
                  delayed: _DelayedDelivery | None,
                  between_steps: Callable[[], None] | None = None) -> None:
        """One periodic pass over every queue: ``ticker()``, or on our engine steps of
        ``ticker_step``, each its own transaction. With a delayed-delivery schedule, the
        pass also reads, in the same round trip, the next due time: the floor for delayed
        events sent by other clients, which notify nobody. ``between_steps`` runs after
        each step but the last."""
        if not self._tick_in_steps:
            if delayed is None:
                connection.execute(statements.TICK_ALL)
            else:
                row = connection.execute(statements.TICK_ALL_AND_NEXT_DELAYED).fetchone()
                delayed.due_in(row[1] if row else None)
            return
        statement = statements.TICK_STEP if delayed is None else \
            statements.TICK_STEP_AND_NEXT_DELAYED
        after: int | None = 0
        while after is not None:
            row = connection.execute(statement, (after, _QUEUES_PER_STEP)).fetchone()
            after = row[1] if row else None
            if after is not None and between_steps is not None:
                between_steps()
        if delayed is not None:
            delayed.due_in(row[2] if row else None)

    def _catch_up(self, connection: psycopg.Connection[Any]) -> None:
        """Tick the queues that have events since their last tick.

        Commits made while no ticker listened (this process starting, reconnecting
        after a fault, or taking over from a dead leader) woke nobody; without this
        their events would wait for the periodic ticker's thresholds (``ticker_max_lag``,
        3 s by default) instead of being delivered at once.
        """
        after = 0
        while True:
            try:
                rows = connection.execute(statements.QUEUES_WITH_NEW_EVENTS,
                                          (after, _QUEUES_PER_STEP)).fetchall()
            except psycopg.Error as exc:
                if _is_connection_lost(exc):
                    raise
                log.debug("ticker: no catch-up tick: %s", _first_line(exc))
                return
            for _, queue_name, has_new_events in rows:
                if has_new_events:
                    self._tick_now(connection, queue_name)
            if len(rows) < _QUEUES_PER_STEP:
                return
            after = rows[-1][0]

    def _tick_now(self, connection: psycopg.Connection[Any], queue_name: str) -> None:
        """Tick ``queue_name`` whatever its thresholds, each call its own transaction."""
        try:
            if self._tick_in_one_call:
                connection.execute(statements.TICK_NOW, (queue_name,))
            else:
                connection.execute(statements.FORCE_TICK_QUEUE, (queue_name,))
                connection.execute(statements.TICK_QUEUE, (queue_name,))
        except psycopg.Error as exc:
            if _is_connection_lost(exc) or _configuration_error(exc) is not None:
                raise
            # A paused, external or dropped queue: the periodic ticker decides for it.
            log.debug("ticker: wake-up tick of %r skipped: %s", queue_name, _first_line(exc))

    def _maintain(self, connection: psycopg.Connection[Any]) -> None:
        moved = _RETRY_MOVER_BATCH
        while moved >= _RETRY_MOVER_BATCH and not self._stopping.is_set():
            row = connection.execute(statements.MAINT_RETRY_EVENTS).fetchone()
            moved = int(row[0]) if row and row[0] is not None else 0
        connection.execute(statements.MAINT)
        connection.execute(statements.MAINT_ROTATE_STEP2)


class _DelayedDelivery:
    """When the engine's delayed-delivery mover must run next.

    ``pgque.maint()`` moves due delayed events every 30 s; the ticker moves them at their
    due time instead, read with ``pgque.next_delayed_due()`` after each tick period,
    each move and each delayed send of ``Queue.send`` (which notifies
    ``DELAYED_WAKE_CHANNEL``); the mover's own notifications on ``WAKE_CHANNEL`` then
    get the queues that received events ticked like a commit wake-up.
    """

    def __init__(self) -> None:
        self.due_at = math.inf
        """``time.monotonic()`` when the earliest held event is due; ``inf``: none."""

    @classmethod
    def open(cls, connection: psycopg.Connection[Any]) -> _DelayedDelivery | None:
        """The schedule, or ``None`` when the engine has no delayed delivery (a PgQue
        0.2 install) or this user may not run its mover."""
        if not _may_execute(connection, "pgque.maint_deliver_delayed()",
                            "pgque.next_delayed_due()"):
            return None
        delivery = cls()
        delivery.look_again(connection)
        return delivery

    def look_again(self, connection: psycopg.Connection[Any]) -> None:
        row = connection.execute(statements.SECONDS_TO_NEXT_DELAYED).fetchone()
        self.due_in(row[0] if row else None)

    def due_in(self, seconds: float | None) -> None:
        """The next event is due in ``seconds`` (``None``: none is held)."""
        # The server's clock decides when an event is due; only the wait is local.
        self.due_at = math.inf if seconds is None else time.monotonic() + max(0.0, float(seconds))

    def deliver(self, connection: psycopg.Connection[Any]) -> int:
        """Move the due events into their queues; how many."""
        row = connection.execute(statements.MAINT_DELIVER_DELAYED).fetchone()
        return int(row[0]) if row and row[0] is not None else 0


def _may_execute(connection: psycopg.Connection[Any], *functions: str) -> bool:
    """Whether this user may call each of our engine's ``functions`` (regprocedure
    signatures); ``False`` on another PgQue install, which lacks them."""
    try:
        row = connection.execute(statements.MAY_EXECUTE_ALL, (list(functions),)).fetchone()
    except psycopg.Error as exc:
        if _is_connection_lost(exc):
            raise
        log.debug("ticker: not using %s: %s", ", ".join(functions), _first_line(exc))
        return False
    return bool(row and row[0])


def _configured_tick_period(connection: psycopg.Connection[Any]) -> float:
    try:
        row = connection.execute(statements.TICK_PERIOD_MS).fetchone()
    except psycopg.Error as exc:
        if _is_connection_lost(exc):
            raise
        # Another PgQue install may keep its settings elsewhere, or not let us read them.
        return _DEFAULT_TICK_PERIOD
    return row[0] / 1000.0 if row and row[0] and row[0] > 0 else _DEFAULT_TICK_PERIOD
