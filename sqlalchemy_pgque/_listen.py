"""LISTEN connections, shared by the consumers and the ticker.

A LISTEN must live on a connection that stays open and idle between notifications,
so it cannot come from a pool that hands connections to other work. The connection is
taken out of the engine's own pool (``detach``) when the engine runs on psycopg, so
whatever the application configured (connect_args, a ``creator``, connect events)
applies to it too; other drivers fall back to a libpq string built from the URL.

A LISTEN also needs the connection's server session to itself: through a pooler in
transaction mode (PgBouncer's usual setting) the LISTEN registers on whichever server
connection ran it, which then serves other clients, and the notifications never reach
this one (PgBouncer drops them: "got packet 'A' from server when not linked"). A
consumer that was not given a connection for its LISTEN explicitly therefore checks
(``unless_pooled``) and polls instead where it finds a pooler (see ``_pooler.py``).
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import URL, Engine

from . import _statements as statements
from ._pooler import pooler_steps
from ._runloop import Steps, Waker, adrive, drive

if TYPE_CHECKING:
    # Only annotations: importing sqlalchemy.ext.asyncio needs greenlet (the asyncio extra).
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "AsyncListener",
    "Listener",
    "close_quietly",
    "closed_quietly",
    "connect_autocommit",
    "conninfo_from_url",
    "url_from_conninfo",
]

log = logging.getLogger(__name__)

_LIBPQ_KEYWORDS = frozenset(
    option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()
)


def conninfo_from_url(url: URL) -> str:
    """A libpq connection string for ``url``, whatever its SQLAlchemy driver.

    The URL is read as the psycopg dialect reads it, so that its multi-host form
    (``?host=h1:p1&host=h2:p2``, or ``?host=h1,h2&port=p1,p2``) becomes libpq's
    ``host=h1,h2 port=p1,p2`` here too; options libpq does not know (another
    driver's) are left out.
    """
    dialect = url.set(drivername="postgresql+psycopg").get_dialect()()
    _, params = dialect.create_connect_args(url)
    return psycopg.conninfo.make_conninfo(**{
        key: value if isinstance(value, str) else
        ",".join(value) if isinstance(value, (list, tuple)) else str(value)
        for key, value in params.items()
        if key in _LIBPQ_KEYWORDS
    })


def url_from_conninfo(conninfo: str) -> URL:
    """The SQLAlchemy ``postgresql+psycopg`` URL of a libpq connection string.

    A Unix socket directory as ``host`` goes into the query string, where psycopg
    reads it back; several hosts (``host=h1,h2 port=p1,p2``) go there as SQLAlchemy's
    ``host=h1:p1&host=h2:p2``; other libpq options travel there too.
    """
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    host = str(params.pop("host", "") or "")
    port = str(params.pop("port", "") or "")
    query: dict[str, str | tuple[str, ...]] = {
        key: str(value)
        for key, value in params.items()
        if key not in {"user", "password", "dbname"}
    }
    if "," in host:
        hosts = host.split(",")
        # libpq takes one port for every host, or one per host.
        ports = port.split(",") if "," in port else [port] * len(hosts)
        if len(ports) != len(hosts):
            raise ValueError(f"{len(hosts)} hosts but {len(ports)} ports in {conninfo!r}")
        query["host"] = tuple(f"{h}:{p}" if p else h for h, p in zip(hosts, ports, strict=True))
        host = port = ""
    elif host.startswith("/"):
        query["host"], host = host, ""
    return URL.create(
        "postgresql+psycopg",
        username=str(params["user"]) if params.get("user") else None,
        password=str(params["password"]) if params.get("password") else None,
        host=host or None,
        port=int(port) if port else None,
        database=str(params["dbname"]) if params.get("dbname") else None,
        query=query,
    )


def _autocommit_connection(engine: Any, connect: Callable[..., Any]) -> Steps[Any]:
    """A new autocommit psycopg connection owned by the caller (close it when done),
    as steps over an ``Engine`` (``connect``: ``psycopg.connect``) or an
    ``AsyncEngine`` (``psycopg.AsyncConnection.connect``)."""
    pooled = yield engine.raw_connection
    driver_conn = pooled.driver_connection
    if isinstance(driver_conn, (psycopg.Connection, psycopg.AsyncConnection)):
        pooled.detach()
        yield driver_conn.rollback
        yield partial(driver_conn.set_autocommit, True)
        return driver_conn
    pooled.close()
    return (yield partial(connect, conninfo_from_url(engine.url), autocommit=True))


def connect_autocommit(engine: Engine) -> psycopg.Connection[Any]:
    """A new autocommit psycopg connection owned by the caller (close it when done)."""
    connection: psycopg.Connection[Any] = drive(_autocommit_connection(engine, psycopg.connect))
    return connection


def _listening(engine: Any, channels: list[str], connect: Callable[..., Any],
               unless_pooled: bool) -> Steps[Any]:
    """The connection listening on ``channels``; ``None`` (and nothing left open) when
    ``unless_pooled`` and it goes through a connection pooler."""
    connection = yield from _autocommit_connection(engine, connect)
    try:
        if unless_pooled and (yield from pooler_steps(connection)):
            yield connection.close
            return None
        for channel in channels:
            yield partial(connection.execute, statements.listen(channel))
    except BaseException:
        yield connection.close
        raise
    return connection


def close_quietly(close: Callable[[], object]) -> None:
    """Call ``close`` of a connection that may already be broken; failures are only logged."""
    try:
        close()
    except Exception:
        log.debug("closing a broken connection failed", exc_info=True)


def closed_quietly(listener: Listener | AsyncListener) -> Steps[None]:
    """:func:`close_quietly` as a step, for either kind of listener."""
    try:
        yield listener.close
    except Exception:
        log.debug("closing a broken connection failed", exc_info=True)


class Listener:
    """An autocommit connection listening on channels, waited on with a timeout.

    Only the thread that opened it may use it; other threads (and signal handlers)
    interrupt a wait through the :class:`Waker`.
    """

    def __init__(self, connection: psycopg.Connection[Any], waker: Waker) -> None:
        self.connection = connection
        self._waker = waker

    @classmethod
    def open(cls, engine: Engine, channels: list[str], waker: Waker, *,
             unless_pooled: bool = False) -> Listener | None:
        """A connection of ``engine`` listening on ``channels``; ``None`` when
        ``unless_pooled`` and the connection goes through a connection pooler."""
        connection = drive(_listening(engine, channels, psycopg.connect, unless_pooled))
        return None if connection is None else cls(connection, waker)

    def listen(self, channel: str) -> None:
        self.connection.execute(statements.listen(channel))

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

    def __init__(self, connection: psycopg.AsyncConnection[Any],
                 wake_event: asyncio.Event) -> None:
        self.connection = connection
        self._wake_event = wake_event

    @classmethod
    async def open(cls, engine: AsyncEngine, channels: list[str], wake_event: asyncio.Event,
                   *, unless_pooled: bool = False) -> AsyncListener | None:
        """See :meth:`Listener.open`."""
        connect = psycopg.AsyncConnection.connect
        connection = await adrive(_listening(engine, channels, connect, unless_pooled))
        return None if connection is None else cls(connection, wake_event)

    async def pending(self) -> list[psycopg.Notify]:
        return [n async for n in self.connection.notifies(timeout=0)]

    async def wait(self, timeout: float) -> list[psycopg.Notify]:
        received = await self.pending()
        if received or timeout <= 0 or self._wake_event.is_set():
            return received
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        fd = self.connection.fileno()
        loop.add_reader(fd, on_readable)
        woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake_event.wait())
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
