"""Connections, LISTEN, wake-ups and signals shared by the consumer, ticker and worker.

A LISTEN must live on a connection that stays open and idle between notifications,
so it cannot come from a pool that hands connections to other work. The connection is
taken out of the engine's own pool (``detach``) when the engine runs on psycopg, so
whatever the application configured (connect_args, a ``creator``, connect events)
applies to it too; other drivers fall back to a libpq string built from the URL.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from sqlalchemy import URL, Engine

if TYPE_CHECKING:
    # Only annotations: importing sqlalchemy.ext.asyncio needs greenlet (the asyncio extra).
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "AsyncListener",
    "Backoff",
    "Listener",
    "Outage",
    "Waker",
    "aclose_quietly",
    "close_quietly",
    "connect_autocommit",
    "connect_autocommit_async",
    "conninfo_from_url",
    "stop_signals_handled",
    "url_from_conninfo",
]

log = logging.getLogger(__name__)

_LIBPQ_KEYWORDS = frozenset(
    option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()
)


def conninfo_from_url(url: URL) -> str:
    """A libpq connection string for ``url``, whatever its SQLAlchemy driver."""
    params: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    for key, value in url.query.items():
        if key in _LIBPQ_KEYWORDS:
            params[key] = value if isinstance(value, str) else ",".join(value)
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})


def url_from_conninfo(conninfo: str) -> URL:
    """The SQLAlchemy ``postgresql+psycopg`` URL of a libpq connection string.

    A Unix socket directory as ``host`` goes into the query string, where psycopg
    reads it back; other libpq options travel there too.
    """
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    host = str(params.pop("host", "") or "")
    query = {
        key: str(value)
        for key, value in params.items()
        if key not in {"user", "password", "port", "dbname"}
    }
    if host.startswith("/"):
        query["host"], host = host, ""
    return URL.create(
        "postgresql+psycopg",
        username=str(params["user"]) if params.get("user") else None,
        password=str(params["password"]) if params.get("password") else None,
        host=host or None,
        port=int(str(params["port"])) if params.get("port") else None,
        database=str(params["dbname"]) if params.get("dbname") else None,
        query=query,
    )


def connect_autocommit(engine: Engine) -> psycopg.Connection[Any]:
    """A new autocommit psycopg connection owned by the caller (close it when done)."""
    pooled = engine.raw_connection()
    driver_conn = pooled.driver_connection
    if isinstance(driver_conn, psycopg.Connection):
        pooled.detach()
        driver_conn.rollback()
        driver_conn.autocommit = True
        return driver_conn
    pooled.close()
    return psycopg.connect(conninfo_from_url(engine.url), autocommit=True)


async def connect_autocommit_async(engine: AsyncEngine) -> psycopg.AsyncConnection[Any]:
    """The asyncio counterpart of :func:`connect_autocommit`."""
    pooled = await engine.raw_connection()
    driver_conn = pooled.driver_connection
    if isinstance(driver_conn, psycopg.AsyncConnection):
        pooled.detach()
        await driver_conn.rollback()
        await driver_conn.set_autocommit(True)
        return driver_conn
    pooled.close()
    return await psycopg.AsyncConnection.connect(
        conninfo_from_url(engine.url), autocommit=True
    )


class Backoff:
    """Delays between reconnection attempts: from 0.1 s, doubling, capped at 2 s.

    Each delay is drawn from the upper half of its step, so that processes that lost
    the server together do not come back in lockstep. The cap is low on purpose: an
    attempt against a server that is down costs next to nothing, and a worker should
    be delivering again within a couple of seconds of the server's return.
    """

    FIRST = 0.1
    MAX = 2.0

    def __init__(self, first: float = FIRST, cap: float = MAX) -> None:
        self._first = first
        self._cap = cap
        self._step = first

    def next(self) -> float:
        step = self._step
        self._step = min(step * 2, self._cap)
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        self._step = self._first


class Outage:
    """Backoff and logging for a loop that lost its database.

    The first failure is logged with its error; while the failures go on, one line
    every :attr:`REPEAT_LOG_INTERVAL` seconds says how long it has lasted, so a
    restarting server does not flood the log; the recovery is logged once.
    """

    REPEAT_LOG_INTERVAL = 30.0

    def __init__(self, label: str, logger: logging.Logger) -> None:
        self.label = label
        self._log = logger
        self.backoff = Backoff()
        self.started: float | None = None
        """``time.monotonic()`` of the first failure of the outage in progress."""
        self.failures = 0
        self._next_log = 0.0

    def failed(self, description: str, action: str = "reconnecting") -> float:
        """Record a failure described by ``description``; the delay before ``action``."""
        now = time.monotonic()
        delay = self.backoff.next()
        self.failures += 1
        if self.started is None:
            self.started = now
            self._next_log = now + self.REPEAT_LOG_INTERVAL
            self._log.warning("%s: %s; %s in %.2f s", self.label, description, action, delay)
        elif now >= self._next_log:
            self._next_log = now + self.REPEAT_LOG_INTERVAL
            self._log.warning("%s: still failing after %.0f s and %d attempts: %s",
                              self.label, now - self.started, self.failures, description)
        else:
            self._log.debug("%s: %s; %s in %.2f s", self.label, description, action, delay)
        return delay

    def succeeded(self) -> None:
        """Record a success; ends (and logs the end of) the outage in progress."""
        if self.started is None:
            return
        self._log.info("%s: database back after %.1f s (%d failed attempts)",
                       self.label, time.monotonic() - self.started, self.failures)
        self.started = None
        self.failures = 0
        self.backoff.reset()


def listen_statement(channel: str) -> sql.Composed:
    """``LISTEN "<channel>"`` with the channel quoted (queue names keep their case)."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel))


def close_quietly(close: Callable[[], object]) -> None:
    """Call ``close`` of a connection that may already be broken; failures are only logged."""
    try:
        close()
    except Exception:
        log.debug("closing a broken connection failed", exc_info=True)


async def aclose_quietly(close: Callable[[], Awaitable[object]]) -> None:
    """The asyncio counterpart of :func:`close_quietly`."""
    try:
        await close()
    except Exception:
        log.debug("closing a broken connection failed", exc_info=True)


@contextmanager
def stop_signals_handled(on_signal: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``on_signal`` inside the block, then restore the
    previous handlers (installing a handler is allowed in the main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal(signal.Signals(signum))

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Waker:
    """Wakes a thread blocked in :meth:`Listener.wait` from any thread or signal handler.

    A socket pair rather than a pipe, so that ``select`` accepts it on every platform.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            # A full buffer already holds a pending wake-up; a closed one has no waiter.
            pass

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class Listener:
    """An autocommit connection listening on channels, waited on with a timeout.

    Only the thread that opened it may use it; other threads (and signal handlers)
    interrupt a wait through the :class:`Waker`.
    """

    def __init__(self, connection: psycopg.Connection[Any], waker: Waker) -> None:
        self.connection = connection
        self._waker = waker

    @classmethod
    def open(cls, engine: Engine, channels: list[str], waker: Waker) -> Listener:
        listener = cls(connect_autocommit(engine), waker)
        try:
            for channel in channels:
                listener.listen(channel)
        except BaseException:
            listener.close()
            raise
        return listener

    def listen(self, channel: str) -> None:
        self.connection.execute(listen_statement(channel))

    def pending(self) -> list[psycopg.Notify]:
        """Notifications already received, without waiting."""
        return list(self.connection.notifies(timeout=0))

    def wait(self, timeout: float) -> list[psycopg.Notify]:
        """Notifications, waiting up to ``timeout`` s for the first; ``[]`` on timeout or wake."""
        received = self.pending()
        if received or timeout <= 0:
            return received
        waker_fd = self._waker.fileno()
        readable, _, _ = select.select([self.connection.fileno(), waker_fd], [], [], timeout)
        if waker_fd in readable:
            self._waker.drain()
        return self.pending()

    def close(self) -> None:
        self.connection.close()


class AsyncListener:
    """The asyncio counterpart of :class:`Listener`; a set ``wake_event`` ends a wait."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.connection = connection

    @classmethod
    async def open(cls, engine: AsyncEngine, channels: list[str]) -> AsyncListener:
        connection = await connect_autocommit_async(engine)
        try:
            for channel in channels:
                await connection.execute(listen_statement(channel))
        except BaseException:
            await connection.close()
            raise
        return cls(connection)

    async def pending(self) -> list[psycopg.Notify]:
        return [n async for n in self.connection.notifies(timeout=0)]

    async def wait(self, timeout: float, wake_event: asyncio.Event) -> list[psycopg.Notify]:
        received = await self.pending()
        if received or timeout <= 0 or wake_event.is_set():
            return received
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        fd = self.connection.fileno()
        loop.add_reader(fd, on_readable)
        woken: asyncio.Future[Any] = asyncio.ensure_future(wake_event.wait())
        try:
            await asyncio.wait({readable, woken}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fd)
            woken.cancel()
            readable.cancel()
        return await self.pending()

    async def close(self) -> None:
        await self.connection.close()
