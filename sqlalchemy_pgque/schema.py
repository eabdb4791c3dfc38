"""Install, upgrade and remove the PgQue engine.

The engine is the set of plain ``.sql`` files in ``sqlalchemy_pgque/sql``, run in name
order in one transaction. Installing is idempotent: running it again keeps queues,
subscriptions, cursors and queued events, and upgrades functions in place. A PgQue SQL
file of the user's choosing can be installed instead with ``sql_path``.

Command line (:mod:`sqlalchemy_pgque.cli`)::

    sqlalchemy-pgque install --url postgresql+psycopg://...
    sqlalchemy-pgque sql > pgque.sql     # the script, for psql or review
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from ._statements import ENGINE_SCHEMA_COMMENT, HAS_VERSION_FUNCTION, TAKE_OVER, UNINSTALL, VERSION
from .errors import EngineNotInstalled, ForeignSchemaError, _translate

__all__ = [
    "engine_build",
    "engine_sql",
    "install",
    "installed_version",
    "uninstall",
]


def engine_sql() -> str:
    """The bundled engine as one SQL script, in install order."""
    sql_dir = resources.files("sqlalchemy_pgque") / "sql"
    names = sorted(p.name for p in sql_dir.iterdir() if p.name.endswith(".sql"))
    return "\n".join((sql_dir / name).read_text(encoding="utf-8") for name in names)


def _run_script(conn: Connection, script: str) -> None:
    # The driver cursor runs a parameterless multi-statement script in one round trip,
    # inside the transaction SQLAlchemy has open on this connection.
    dbapi_conn = conn.connection.driver_connection
    assert dbapi_conn is not None
    with dbapi_conn.cursor() as cur:
        cur.execute(script)


def install(
    conn: Connection,
    sql_path: str | os.PathLike[str] | None = None,
    *,
    take_over: bool = False,
) -> None:
    """Install or upgrade the engine on ``conn``, in its transaction.

    ``sql_path`` installs that PgQue SQL file instead of the bundled engine.
    ``take_over=True`` allows replacing the functions of a ``pgque`` schema that
    another tool created; without it such a schema raises :class:`ForeignSchemaError`.
    The caller commits (``engine.begin()`` does); an error leaves the database as it was.
    """
    script = Path(sql_path).read_text(encoding="utf-8") if sql_path else engine_sql()
    with conn.begin_nested() if conn.in_transaction() else conn.begin():
        if take_over:
            conn.execute(TAKE_OVER)
        try:
            _run_script(conn, script)
        except psycopg.Error as exc:
            # The script ran on the driver cursor, so wrap the driver error the way
            # SQLAlchemy would have for a statement it executed itself.
            wrapped = DBAPIError.instance(script[:200], None, exc, psycopg.Error)
            # Only a non-DB-API original would give a bare StatementError.
            assert isinstance(wrapped, DBAPIError)
            # The script's guard against a foreign pgque schema, known by its SQLSTATE.
            foreign = _translate(wrapped)
            if isinstance(foreign, ForeignSchemaError):
                raise foreign from wrapped
            raise wrapped from exc


def uninstall(conn: Connection) -> None:
    """Remove the engine (``pgque.uninstall()``): every queue and event is dropped.

    The roles ``pgque_reader``, ``pgque_writer`` and ``pgque_admin`` are kept, since
    they are shared by every database of the cluster. Does nothing if not installed.
    """
    with conn.begin_nested() if conn.in_transaction() else conn.begin():
        if installed_version(conn) is not None:
            conn.execute(UNINSTALL)


def installed_version(conn: Connection) -> str | None:
    """``pgque.version()`` of the installed engine, or ``None`` when not installed."""
    present = conn.execute(HAS_VERSION_FUNCTION).first()
    if present is None:
        return None
    return conn.execute(VERSION).scalar_one()  # type: ignore[no-any-return]


def engine_build(conn: Connection) -> str | None:
    """Which implementation is installed: our build string, or ``None`` for another engine."""
    comment = conn.execute(ENGINE_SCHEMA_COMMENT).scalar()
    if comment is None or not str(comment).startswith("sqlalchemy-pgque "):
        return None
    return str(comment)


def _require_installed(conn: Connection) -> str:
    """Return the installed version or raise :class:`EngineNotInstalled`."""
    version = installed_version(conn)
    if version is None:
        raise EngineNotInstalled()
    return version
