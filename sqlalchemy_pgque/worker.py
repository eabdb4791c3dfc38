"""Run consumers (and optionally the ticker) as a process.

::

    python -m sqlalchemy_pgque.worker myapp.workers:consumer [more:consumers ...]
        [--url postgresql+psycopg://...] [--direct-url postgresql+psycopg://...]
        [--ticker] [--concurrency N] [--log-level INFO]

Each ``module:attribute`` names a :class:`~sqlalchemy_pgque.Consumer`, an
:class:`~sqlalchemy_pgque.AsyncConsumer`, or a list of them; each consumer runs in its
own thread. ``--url`` (or ``DATABASE_URL``) rebinds every consumer to that database;
without it each consumer uses the engine its session factory is bound to.
``--ticker`` also runs the :class:`~sqlalchemy_pgque.ticker.Ticker` (one process among
all those started with it ticks, elected by an advisory lock); ``--tick-period``
overrides ``pgque.config.tick_period_ms`` and ``--no-wake`` turns off ticking on
commit wake-ups.

``--direct-url`` (or ``DIRECT_DATABASE_URL``) is for ``--url`` going through a
connection pooler in transaction mode (PgBouncer): the batches go through ``--url``,
while the connections that need a server session of their own, each consumer's
LISTEN and the ticker's (its lock election, wake-ups and settings), connect to
``--direct-url``, straight to PostgreSQL or to a pool in session mode. Without it,
when ``--url`` goes through a pooler, the consumers poll every ``poll_interval``
instead of listening and ``--ticker`` is refused (exit code 2). Connections found to
go through a pooler never use psycopg's prepared statements.

``--concurrency N`` runs every cooperative consumer (one given ``subconsumer=``) as N
subconsumers, ``<subconsumer>-1`` … ``<subconsumer>-N``, each in its own thread (see
:meth:`~sqlalchemy_pgque.Consumer.as_subconsumer`); ``--subconsumer NAME`` replaces
the subconsumer name set in code, so that worker processes started from one command
line can be given names of their own.

``--metrics-port PORT`` (on ``--metrics-host``, 0.0.0.0 by default; port 0 takes a
free port, logged as ``serving metrics on http://...``) serves Prometheus metrics on
``/metrics``, ``/healthz`` (503 once a consumer loop or the ticker made no progress
for ``--health-timeout`` seconds beyond its idle wait) and ``/readyz`` (503 until
every consumer listens and while the database does not answer); it needs the
``metrics`` extra (see :mod:`sqlalchemy_pgque.metrics`).

SIGTERM or SIGINT stops the consumers after their current batch, for at most
``--shutdown-timeout`` seconds (25 by default): then the batch is abandoned (rolled
back, redelivered whole later); a second SIGTERM or SIGINT abandons it at once. The
exit code is then 0.

At start the worker checks the database; while the database cannot be reached (it is
restarting, or not up yet) it tries again with backoff for ``--startup-timeout``
seconds (60 by default). Configuration problems (import path, URL, engine not
installed, consumer not subscribed, a missing pgque role) print one line on stderr and
exit with code 2; a database still unreachable after the startup timeout exits with
code 1. Once running, losing the database is never a reason to exit: every consumer
and the ticker reconnect by themselves. A consumer failing on a configuration problem
later (say, unsubscribed while running) stops the process with code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from ._duration import as_seconds
from ._pooler import goes_through_pooler, prepare_pooled_connection
from ._runloop import Outage, stop_signals_handled
from ._statements import SERVER_KEEPALIVES
from .consumer import AsyncConsumer, Consumer, _check_subscription
from .errors import InvalidName, PgqueError, _first_line, _is_transient
from .logs import configure_logging
from .ticker import Ticker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .metrics import MetricsServer

__all__ = ["main"]

log = logging.getLogger("sqlalchemy_pgque.worker")

EXIT_CONFIG_ERROR = 2
EXIT_RUNTIME_ERROR = 1

DEFAULT_SHUTDOWN_TIMEOUT = 25.0
"""Seconds a stopping worker gives the batches in progress. Kubernetes, ECS and
Heroku kill 30 s after SIGTERM: this leaves 5 s to roll back, log and exit cleanly."""
DEFAULT_STARTUP_TIMEOUT = 60.0

# After the shutdown timeout, how long the batches being abandoned get to roll back
# before the process exits without them (their transactions die with the process).
_ABANDON_GRACE = 3.0

# libpq settings for the connections of the engines the worker makes: TCP keepalives
# and a timeout on unacknowledged data, so that a connection to a host that vanished
# (a partition, a failed-over address) fails in about half a minute instead of
# hanging until the kernel gives up two hours later; and a bound on each connection
# attempt, which otherwise waits for the kernel's SYN retries (about two minutes).
# Keepalives are ignored on Unix sockets. A setting given in the URL wins.
_CLIENT_SETTINGS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}

AnyConsumer = Consumer | AsyncConsumer


class ConfigError(Exception):
    """A problem to report in one line before anything runs."""


class DatabaseUnavailable(Exception):
    """The database could not be reached within the startup timeout."""


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived before the worker started."""


# --shutdown-timeout not given (None is given: "inf", no limit).
_UNSET: Any = object()


def load_consumers(target: str) -> list[AnyConsumer]:
    """The consumers named by ``module:attribute`` (a consumer or a list of them)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{target!r} is not of the form module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no attribute {attribute!r}") from None
    consumers: list[AnyConsumer] = []
    for item in list(obj) if isinstance(obj, (list, tuple)) else [obj]:
        if not isinstance(item, (Consumer, AsyncConsumer)):
            raise ConfigError(
                f"{target!r} is {type(item).__name__}, not a Consumer or a list of them"
            )
        consumers.append(item)
    return consumers


def expand_subconsumers(
    consumers: list[AnyConsumer], concurrency: int, subconsumer: str | None
) -> list[AnyConsumer]:
    """``consumers`` with each cooperative one replaced by the subconsumers to run."""
    if (concurrency > 1 or subconsumer) and all(c.subconsumer is None for c in consumers):
        raise ConfigError(
            "--concurrency and --subconsumer apply to cooperative consumers, and none is: "
            "give the Consumer a subconsumer= (it then runs as that subconsumer of a "
            "cooperative consumer, sharing its batches with the other subconsumers)"
        )
    expanded: list[AnyConsumer] = []
    for consumer in consumers:
        if consumer.subconsumer is None:
            expanded.append(consumer)
            continue
        base = consumer.subconsumer if subconsumer is None else subconsumer
        names = [base] if concurrency == 1 else [f"{base}-{n}" for n in range(1, concurrency + 1)]
        if names == [consumer.subconsumer]:
            expanded.append(consumer)
            continue
        try:
            expanded.extend(consumer.as_subconsumer(name) for name in names)
        except InvalidName as exc:
            raise ConfigError(str(exc)) from None
    return expanded


@dataclass
class _Engines:
    """The engines the worker makes from --url (the sync one also serves checks) and
    from --direct-url (the connections that need a server session of their own)."""

    url: URL | None
    direct_url: URL | None = None
    sync: Engine | None = None
    asynchronous: AsyncEngine | None = None
    direct_sync: Engine | None = None
    direct_async: AsyncEngine | None = None
    pool_size: int = 5
    """Connections each --url engine keeps: one per consumer (their LISTEN connections
    are separate), so that --concurrency never leaves a subconsumer waiting for one."""

    def sync_engine(self) -> Engine:
        assert self.url is not None
        if self.sync is None:
            self.sync = _make_engine(self.url, pool_size=self.pool_size)
        return self.sync

    def async_engine(self) -> AsyncEngine:
        assert self.url is not None
        if self.asynchronous is None:
            self.asynchronous = _make_async_engine(self.url, pool_size=self.pool_size)
        return self.asynchronous

    def direct_sync_engine(self) -> Engine:
        assert self.direct_url is not None
        if self.direct_sync is None:
            self.direct_sync = _make_engine(self.direct_url, pool_size=None)
        return self.direct_sync

    def direct_async_engine(self) -> AsyncEngine:
        assert self.direct_url is not None
        if self.direct_async is None:
            self.direct_async = _make_async_engine(self.direct_url, pool_size=None)
        return self.direct_async

    def dispose_sync(self) -> None:
        for engine in (self.sync, self.direct_sync):
            if engine is not None:
                engine.dispose()

    async def dispose_async(self) -> None:
        for engine in (self.asynchronous, self.direct_async):
            if engine is not None:
                await engine.dispose()


def _pool_args(pool_size: int | None) -> dict[str, Any]:
    # Without a pool for --direct-url: each of its connections (a LISTEN, the ticker's)
    # is taken out of the pool for good, so an idle one kept there would only hold a
    # server connection for nothing.
    return {"poolclass": NullPool} if pool_size is None else {"pool_size": pool_size}


def _make_engine(url: URL, *, pool_size: int | None) -> Engine:
    engine = create_engine(_sync_url(url), connect_args=_connect_args(url),
                           **_pool_args(pool_size))
    event.listen(engine.pool, "connect", _prepare_connection)
    return engine


def _make_async_engine(url: URL, *, pool_size: int | None) -> AsyncEngine:
    from sqlalchemy.ext.asyncio import create_async_engine  # needs greenlet

    engine = create_async_engine(url, connect_args=_connect_args(url), **_pool_args(pool_size))
    event.listen(engine.sync_engine.pool, "connect", _prepare_connection)
    return engine


def _connect_args(url: URL) -> dict[str, str]:
    """Worker connection settings the URL does not set itself."""
    wanted = {**_CLIENT_SETTINGS, "application_name": f"sqlalchemy_pgque worker {os.getpid()}"}
    return {key: value for key, value in wanted.items() if key not in url.query}


def _prepare_connection(dbapi_connection: Any, connection_record: object) -> None:
    if not prepare_pooled_connection(dbapi_connection):
        # The keepalives of _CLIENT_SETTINGS on the server's side of the connection, so
        # that a backend left behind by a partitioned worker ends, with its transaction
        # and locks, instead of holding the consumer's batch until the server's own
        # keepalive gives up. Not through a pooler: the server's peer is the pooler
        # then, and in transaction mode the settings would stay on a server connection
        # that other clients use.
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(SERVER_KEEPALIVES)
        finally:
            cursor.close()
    # Leave no transaction open behind the pool's back (psycopg starts one implicitly).
    dbapi_connection.rollback()


def _sync_url(url: URL) -> URL:
    """``url`` with psycopg's synchronous driver, for the ticker and the checks."""
    return url.set(drivername="postgresql+psycopg")


def _parse_url(raw: str) -> URL:
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(f"bad database URL: {exc}") from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"bad database URL: {url.get_backend_name()!r} is not PostgreSQL")
    if url.drivername == "postgresql":
        # The package depends on psycopg; SQLAlchemy's default would be psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    return url


def _bind(consumers: list[AnyConsumer], engines: _Engines) -> None:
    for consumer in consumers:
        if engines.url is not None:
            try:
                if isinstance(consumer, AsyncConsumer):
                    consumer.use_engine(engines.async_engine())
                else:
                    consumer.use_engine(engines.sync_engine())
            except (ArgumentError, ImportError) as exc:
                raise ConfigError(f"bad database URL: {exc}") from None
        elif consumer.engine is None:
            raise ConfigError(
                f"{consumer!r} has no database: give --url or set DATABASE_URL, "
                "or bind its session factory to an engine"
            )
        # A consumer told in code not to listen keeps polling.
        if engines.direct_url is not None and consumer.listen is not False:
            try:
                if isinstance(consumer, AsyncConsumer):
                    consumer.listen = engines.direct_async_engine()
                else:
                    consumer.listen = engines.direct_sync_engine()
            except (ArgumentError, ImportError) as exc:
                raise ConfigError(f"bad --direct-url: {exc}") from None


def _check_pooler(engine: Engine, consumers: list[AnyConsumer], *, ticker: bool,
                  rebound: bool) -> None:
    """Without --direct-url: keep what needs a server session of its own off a pooled
    ``engine``. The ticker cannot do without one (raise :class:`ConfigError`); the
    consumers, when ``rebound`` to it by --url, poll instead of listening."""
    connection = engine.raw_connection()
    try:
        driver = connection.driver_connection
        pooled = isinstance(driver, psycopg.Connection) and goes_through_pooler(driver)
    finally:
        connection.close()
    if not pooled:
        return
    source = "--url" if rebound else f"the database of {consumers[0]!r}"
    if ticker:
        raise ConfigError(
            f"--ticker: {source} goes through a connection pooler, and the ticker's lock "
            "election and wake-ups need a server session of their own (through a pool in "
            "transaction mode several tickers lead at once): give --direct-url, a URL "
            "straight to PostgreSQL (or to a pool in session mode: then the same URL)"
        )
    # Those given an engine of their own for their LISTEN in code keep it.
    polling = [c for c in consumers if rebound and c.listen is True]
    for consumer in polling:
        consumer.listen = False
    if polling:
        log.warning(
            "--url goes through a connection pooler, where a LISTEN in transaction mode "
            "never hears a tick: the consumers poll every poll_interval instead (give "
            "--direct-url, a URL straight to PostgreSQL, to wake them at once)")


def _check(consumer: AnyConsumer, engines: _Engines) -> None:
    """Raise what the consumer cannot recover from at run time (or a transient error)."""
    if isinstance(consumer, Consumer):
        consumer.check()
        return
    # Checked on a synchronous engine: an asyncio.run() here would leave the async
    # engine's pool holding connections of a closed event loop.
    if engines.url is not None:
        engine, own = engines.sync_engine(), False
    else:
        async_engine = consumer.engine
        assert async_engine is not None
        engine, own = create_engine(_sync_url(async_engine.url)), True
    try:
        with engine.connect() as connection:
            _check_subscription(connection, consumer.queue.name, consumer.name,
                               consumer.subconsumer)
    finally:
        if own:
            engine.dispose()


def _start_up(
    checks: list[tuple[str, Callable[[], None]]], timeout: float, stopping: threading.Event
) -> None:
    """Run ``checks`` in order, waiting out a database that is not reachable yet.

    Configuration errors raise :class:`ConfigError` at once; transient errors (the
    server restarting, refusing connections, out of connection slots) are retried with
    backoff until ``timeout`` seconds have passed, then :class:`DatabaseUnavailable`.
    """
    deadline = time.monotonic() + timeout
    outage = Outage("worker start-up", log)
    for label, check in checks:
        while True:
            try:
                check()
                break
            except ConfigError:
                raise
            except PgqueError as exc:
                raise ConfigError(f"{label}: {exc}") from None
            except Exception as exc:
                detail = _first_line(getattr(exc, "orig", None) or exc)
                if not _is_transient(exc):
                    raise ConfigError(f"{label}: cannot use the database: {detail}") from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DatabaseUnavailable(
                        f"{label}: the database did not answer within the startup timeout "
                        f"of {timeout:g} s (--startup-timeout): {detail}"
                    ) from None
                delay = outage.failed(f"{label}: waiting for the database: {detail}",
                                      "trying again")
                if stopping.wait(min(delay, remaining)):
                    raise _Stopped() from None
        if stopping.is_set():
            raise _Stopped()
    outage.succeeded()


def _ticker_engine(consumers: list[AnyConsumer], engines: _Engines) -> Engine:
    if engines.url is None:
        first = consumers[0]
        if isinstance(first, Consumer):
            engine = first.engine
            assert engine is not None
            return engine
        async_engine = first.engine
        assert async_engine is not None
        engines.url = async_engine.url
    return engines.sync_engine()


class _Runner:
    """Threads running the consumers and the ticker, stopped together.

    Every async consumer runs in one thread's event loop, so an async engine they
    share never sees two loops.
    """

    def __init__(
        self, consumers: list[AnyConsumer], ticker: Ticker | None, engines: _Engines
    ) -> None:
        self.consumers = consumers
        self.ticker = ticker
        self.engines = engines
        self.failed = threading.Event()
        self.metrics_server: MetricsServer | None = None
        self.deadline: float | None = None
        """``time.monotonic()`` after which the process exits without the threads left."""
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def stop(self, *, abandon: bool = False) -> None:
        """Stop everything: finish the batches in progress within their shutdown
        timeout, or (``abandon``) roll them back now."""
        timeouts = [c.shutdown_timeout for c in self.consumers]
        if abandon or None not in timeouts:
            # Without a limit for some consumer, the process waits for it as long as it
            # takes (until a second signal).
            grace = 0.0 if abandon else max(
                (as_seconds(t) for t in timeouts if t is not None), default=0.0)
            with self._lock:
                deadline = time.monotonic() + grace + _ABANDON_GRACE
                if self.deadline is None or deadline < self.deadline:
                    self.deadline = deadline
        for consumer in self.consumers:
            consumer.stop(abandon=abandon)
        if self.ticker is not None:
            self.ticker.stop()

    def _failure(self, label: str, exc: Exception) -> None:
        log.error("%s failed: %s", label, exc, exc_info=not isinstance(exc, PgqueError))
        self.failed.set()
        self.stop()

    def _run_blocking(self, label: str, target: Consumer | Ticker) -> None:
        try:
            target.run(install_signal_handlers=False)
        except Exception as exc:
            self._failure(label, exc)

    async def _run_one_async(self, consumer: AsyncConsumer) -> None:
        try:
            await consumer.run(install_signal_handlers=False)
        except Exception as exc:
            self._failure(consumer.label, exc)

    async def _run_all_async(self, consumers: list[AsyncConsumer]) -> None:
        try:
            await asyncio.gather(*(self._run_one_async(c) for c in consumers))
        finally:
            await self.engines.dispose_async()

    def _spawn(self, name: str, target: Callable[[], object]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def start(self) -> None:
        async_consumers = [c for c in self.consumers if isinstance(c, AsyncConsumer)]
        for consumer in self.consumers:
            if isinstance(consumer, Consumer):
                self._spawn(consumer.label, partial(self._run_blocking, consumer.label, consumer))
        if async_consumers:
            self._spawn("asyncio", partial(asyncio.run, self._run_all_async(async_consumers)))
        if self.ticker is not None:
            self._spawn("ticker", partial(self._run_blocking, "ticker", self.ticker))

    def join(self) -> bool:
        """Wait for the threads; ``False`` when the stop deadline passed first."""
        for thread in self._threads:
            while thread.is_alive():
                # Short joins: the deadline is set by a signal handler meanwhile.
                thread.join(0.2)
                deadline = self.deadline
                if deadline is not None and time.monotonic() > deadline and thread.is_alive():
                    return False
        return True

    def report_left_behind(self) -> None:
        """Say what exiting now leaves behind: threads still busy, and their batches."""
        for consumer in self.consumers:
            shutdown = consumer._shutdown
            batch = shutdown.batch
            if batch is None:
                continue
            if shutdown.committing:
                log.warning("%s: batch %s was committing when the process exited: it "
                            "committed whole, or its %d messages will be redelivered",
                            consumer.label, batch.batch_id, batch.size)
            else:
                log.warning("%s: still in a handler after the shutdown timeout; exiting "
                            "without it: batch %s rolls back with its connection and its %d "
                            "messages will be redelivered", consumer.label, batch.batch_id,
                            batch.size)
        busy = [thread.name for thread in self._threads if thread.is_alive()]
        log.warning("exiting without the threads that did not stop in time: %s",
                    ", ".join(busy))


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {raw}")
    return value


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {raw!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, got {value}")
    return value


def _seconds_or_no_limit(raw: str) -> float | None:
    """Seconds, or ``inf`` / ``none`` for no limit."""
    if raw.strip().lower() in ("inf", "none"):
        return None
    return _seconds(raw)


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_pgque.worker",
        description="Run sqlalchemy-pgque consumers until SIGTERM or SIGINT.",
    )
    parser.add_argument("targets", nargs="+", metavar="module:attribute",
                        help="a Consumer, an AsyncConsumer or a list of them")
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"),
                        help="SQLAlchemy database URL (default: $DATABASE_URL); rebinds "
                             "every consumer to it")
    parser.add_argument("--direct-url", default=os.environ.get("DIRECT_DATABASE_URL"),
                        metavar="URL",
                        help="database URL straight to PostgreSQL (or to a pool in session "
                             "mode) for the connections that need a server session of their "
                             "own, when --url goes through a pooler in transaction mode: the "
                             "consumers' LISTEN and the ticker (default: "
                             "$DIRECT_DATABASE_URL)")
    parser.add_argument("--ticker", action="store_true",
                        help="also tick the database's queues and run their maintenance "
                             "(one process among those started with --ticker ticks)")
    parser.add_argument("--tick-period", type=float, default=None, metavar="SECONDS",
                        help="ticker period (default: pgque.config.tick_period_ms)")
    parser.add_argument("--no-wake", action="store_true",
                        help="the ticker ticks on its period only, not on commit wake-ups")
    parser.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                        help="run each cooperative consumer as N subconsumers, in N "
                             "threads (default: 1)")
    parser.add_argument("--subconsumer", default=None, metavar="NAME",
                        help="subconsumer name of the cooperative consumers (NAME-1 … "
                             "NAME-N with --concurrency), instead of the one set in code")
    parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                        help="serve /metrics, /healthz and /readyz on this port (0: any "
                             "free port, logged); needs sqlalchemy-pgque[metrics]")
    parser.add_argument("--metrics-host", default="0.0.0.0", metavar="HOST",
                        help="address of --metrics-port (default: 0.0.0.0)")
    parser.add_argument("--health-timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="/healthz fails once a consumer loop or the ticker made no "
                             "progress for this long beyond its idle wait (default: 60, "
                             "longer than a batch and the outages the worker rides out)")
    parser.add_argument("--shutdown-timeout", type=_seconds_or_no_limit, default=_UNSET,
                        metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long the batches in progress may "
                             "still run before they are abandoned and redelivered later; "
                             "'inf' waits for them (default: each consumer's "
                             f"shutdown_timeout, else {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    parser.add_argument("--startup-timeout", type=_seconds,
                        default=DEFAULT_STARTUP_TIMEOUT, metavar="SECONDS",
                        help="how long to wait at start for a database that cannot be "
                             f"reached yet (default: {DEFAULT_STARTUP_TIMEOUT:g})")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line, with queue, consumer, subconsumer, "
                             "batch_id and msg_id fields where they apply")
    return parser.parse_args(list(argv) if argv is not None else None)


@dataclass
class _Signals:
    """The stop signals received so far, and what they reach."""

    starting: threading.Event = field(default_factory=threading.Event)
    runner: _Runner | None = None
    received: int = 0

    def __call__(self, sig: signal.Signals) -> None:
        self.received += 1
        self.starting.set()
        runner = self.runner
        if runner is None:
            log.info("%s received during start-up: exiting", sig.name)
            return
        abandon = self.received > 1
        if abandon:
            log.info("%s received again: abandoning the current batches", sig.name)
        else:
            log.info("%s received: stopping after the current batches", sig.name)
        # Not in the handler itself: it interrupts the main thread anywhere, maybe
        # inside a lock that stopping takes.
        threading.Thread(target=runner.stop, kwargs={"abandon": abandon},
                         name="stop", daemon=True).start()


def main(argv: Iterable[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the process exit code."""
    args = _parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    engines = _Engines(url=None)
    signals = _Signals()
    try:
        with stop_signals_handled(signals):
            try:
                runner = _prepare(args, engines, signals.starting)
            except ConfigError as exc:
                print(f"sqlalchemy_pgque.worker: error: {exc}", file=sys.stderr)
                return EXIT_CONFIG_ERROR
            except DatabaseUnavailable as exc:
                print(f"sqlalchemy_pgque.worker: error: {exc}", file=sys.stderr)
                return EXIT_RUNTIME_ERROR
            except _Stopped:
                return 0
            signals.runner = runner
            if signals.starting.is_set():
                return 0  # a signal arrived while the last check ran
            return _run(runner)
    finally:
        engines.dispose_sync()


def _prepare(args: argparse.Namespace, engines: _Engines, stopping: threading.Event) -> _Runner:
    """Load, bind and check the consumers (and the ticker) of the command line."""
    if args.url:
        engines.url = _parse_url(args.url)
    if args.direct_url:
        engines.direct_url = _parse_url(args.direct_url)
    if args.metrics_port is not None:
        _import_metrics()  # a missing extra is reported before waiting for the database
    consumers = [c for target in args.targets for c in load_consumers(target)]
    consumers = expand_subconsumers(consumers, args.concurrency, args.subconsumer)
    for consumer in consumers:
        if args.shutdown_timeout is not _UNSET:
            consumer.shutdown_timeout = args.shutdown_timeout
        elif consumer.shutdown_timeout is None:
            consumer.shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT
    engines.pool_size = max(engines.pool_size, len(consumers) + 1)
    _bind(consumers, engines)
    checks: list[tuple[str, Callable[[], None]]] = [
        (consumer.label, partial(_check, consumer, engines)) for consumer in consumers
    ]
    rebound = engines.url is not None
    if engines.direct_url is None and (rebound or args.ticker):
        engine = engines.sync_engine() if rebound else _ticker_engine(consumers, engines)
        checks.append(("connection pooler", partial(_check_pooler, engine, consumers,
                                                    ticker=args.ticker, rebound=rebound)))
    ticker = None
    if args.ticker:
        ticker_engine = engines.direct_sync_engine() if engines.direct_url is not None \
            else _ticker_engine(consumers, engines)
        ticker = Ticker(ticker_engine, tick_period=args.tick_period, wake=not args.no_wake)
        checks.append(("ticker", ticker.check))
    _start_up(checks, args.startup_timeout, stopping)
    runner = _Runner(consumers, ticker, engines)
    if args.metrics_port is not None:
        runner.metrics_server = _metrics_server(args, runner, engines)
    return runner


def _import_metrics() -> Any:
    try:
        from . import metrics
    except ImportError as exc:
        if exc.name != "prometheus_client":
            raise
        raise ConfigError("--metrics-port needs prometheus-client: "
                          "pip install 'sqlalchemy-pgque[metrics]'") from None
    return metrics


def _metrics_server(args: argparse.Namespace, runner: _Runner,
                    engines: _Engines) -> MetricsServer:
    """The metrics of ``runner``'s consumers and ticker, on a bound (not yet serving) port."""
    metrics = _import_metrics()
    health_timeout = args.health_timeout
    if health_timeout is None:
        health_timeout = metrics.DEFAULT_HEALTH_TIMEOUT
    # The database's figures are read on the sync engine the ticker would use.
    watched = metrics.Metrics(_ticker_engine(runner.consumers, engines),
                              health_timeout=health_timeout)
    watched.watch(runner.consumers, runner.ticker)
    try:
        server: MetricsServer = metrics.MetricsServer(watched, args.metrics_host,
                                                      args.metrics_port)
    except OSError as exc:
        raise ConfigError(f"--metrics-port: cannot listen on {args.metrics_host} port "
                          f"{args.metrics_port}: {exc.strerror or exc}") from None
    return server


def _run(runner: _Runner) -> int:
    consumers, ticker = runner.consumers, runner.ticker
    log.info("worker started: %s%s", ", ".join(c.label for c in consumers),
             " and the ticker" if ticker else "")
    server = runner.metrics_server
    if server is not None:
        server.start()
        server.metrics.worker_running(True)
        log.info("serving metrics on %s (/metrics, /healthz, /readyz)", server.url)
    runner.start()
    try:
        stopped = runner.join()
    finally:
        if server is not None:
            server.metrics.worker_running(False)
            server.stop()
    if not stopped:
        runner.report_left_behind()
    if runner.failed.is_set():
        return EXIT_RUNTIME_ERROR
    log.info("worker stopped" if stopped else "worker exiting")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
