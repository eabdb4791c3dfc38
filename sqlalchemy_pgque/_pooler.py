"""Telling a connection pooler (PgBouncer and its kin) from PostgreSQL itself.

At login PostgreSQL gives the client its process id and a secret key, for cancel
requests. A pooler in the middle cannot pass the server's on, since the client may be
served by any of its server connections: it answers with a key of its own. So the
process id a connection announced differs from the ``pg_backend_pid()`` of the
server process running its statements exactly when a pooler sits in between; directly
connected, or through a plain TCP proxy, the two are equal.

The test cannot tell a pool in transaction mode from one in session mode (their logins
look alike), and only a pool in session mode keeps session state (LISTEN, advisory
locks, ``set_config(..., false)``) with one client. What needs session state therefore
avoids a pooled connection unless it was given one explicitly, and psycopg's prepared
statements, which live in one server session, are turned off on every pooled
connection: through PgBouncer older than 1.21 (or without ``max_prepared_statements``)
in transaction mode, a statement prepared on one server connection is executed on
another, where it is missing, or where another client prepared a statement of the same
name ('bind message supplies 2 parameters, but prepared statement "_pg3_1" requires 4').
"""

from __future__ import annotations

from functools import partial
from typing import Any

import psycopg

from . import _statements as statements
from ._runloop import Steps, drive

__all__ = [
    "goes_through_pooler",
    "on_pool_connect",
    "pooler_steps",
    "prepare_pooled_connection",
]


def pooler_steps(
    connection: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> Steps[bool]:
    """:func:`goes_through_pooler` as steps, for a sync or an async psycopg connection.

    Runs one statement: on a connection that is not in autocommit mode it leaves a
    transaction open, for the caller to end.
    """
    cursor = yield partial(connection.execute, statements.BACKEND_PID)
    row = yield cursor.fetchone
    return row is not None and row[0] != connection.info.backend_pid


def goes_through_pooler(connection: psycopg.Connection[Any]) -> bool:
    """Whether ``connection`` reaches PostgreSQL through a connection pooler."""
    return drive(pooler_steps(connection))


def prepare_pooled_connection(dbapi_connection: Any) -> bool:
    """On a new DB-API connection of an engine (a pool ``connect`` event): turn
    psycopg's prepared statements off when it goes through a pooler; whether it does.

    Works on SQLAlchemy's adapted async connections too (their cursors are driven
    in the event's greenlet). Leaves the transaction the check opened to the caller.
    """
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if not isinstance(driver, (psycopg.Connection, psycopg.AsyncConnection)):
        return False
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statements.BACKEND_PID)
        row = cursor.fetchone()
    finally:
        cursor.close()
    pooled = row is not None and row[0] != driver.info.backend_pid
    if pooled:
        driver.prepare_threshold = None
    return pooled


def on_pool_connect(dbapi_connection: Any, connection_record: object) -> None:
    """A pool ``connect`` event: :func:`prepare_pooled_connection`, then no transaction
    left open behind the pool's back (through a pooler in transaction mode it would
    also keep a server connection to itself)."""
    prepare_pooled_connection(dbapi_connection)
    dbapi_connection.rollback()
