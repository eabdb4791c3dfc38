"""Helpers shared by the engine tests (``test_engine_*.py``): plain psycopg calls, and
the engine's SQL files read as text."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")

Conn = psycopg.Connection[tuple[Any, ...]]
ConnectAs = Callable[[str], Conn]
"""The ``role_conn`` fixture: a connection acting as a fresh member of a pgque role."""


def scalar(conn: Conn, query: str, *params: object) -> Any:
    """The first column of the one row ``query`` returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def tick(conn: Conn, queue: str = "q") -> int:
    """Tick ``queue`` now, whatever its thresholds, and return the tick's id: two
    transactions (``conn`` is autocommit), ``force_next_tick`` then ``ticker``, so that
    the tick's snapshot sees every event committed before the call."""
    conn.execute("select pgque.force_next_tick(%s)", (queue,))
    tick_id = scalar(conn, "select pgque.ticker(%s)", queue)
    assert tick_id is not None, f"no tick for queue {queue!r}"
    return int(tick_id)


def wait_until(predicate: Callable[[], T | None], timeout: float = 10.0,
               what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def make_queue(conn: Conn, name: str = "q", *consumers: str) -> None:
    """Create queue ``name`` and subscribe ``consumers``, each call asserting it was new."""
    assert scalar(conn, "select pgque.create_queue(%s)", name) == 1
    for consumer in consumers:
        assert scalar(conn, "select pgque.subscribe(%s, %s)", name, consumer) == 1


def is_our_engine(conn: Conn) -> bool:
    """Whether the installed engine is ours, not another PgQue 0.2 install
    (``PGQUE_SCHEMA_SQL=...``): for behaviour beyond the 0.2 reference."""
    comment = scalar(conn, "select obj_description(oid, 'pg_namespace') from pg_namespace"
                           " where nspname = 'pgque'")
    return str(comment or "").startswith("sqlalchemy-pgque ")


def engine_files() -> dict[str, str]:
    """The bundled engine's SQL files by name, in install order."""
    sql_dir = resources.files("sqlalchemy_pgque") / "sql"
    names = sorted(p.name for p in sql_dir.iterdir() if p.name.endswith(".sql"))
    return {name: (sql_dir / name).read_text(encoding="utf-8") for name in names}


def raise_exception_statements(source: str) -> list[str]:
    """Every statement of ``source`` that raises an error, up to its semicolon:
    ``RAISE EXCEPTION``, or ``RAISE`` without a level (which means the same); not a bare
    ``RAISE;``, which re-raises the error being handled with its own code."""
    source = re.sub(r"^\s*--.*$", "", source, flags=re.MULTILINE)
    statements = []
    error = r"\bRAISE\b(?!\s*;)(?!\s+(?:DEBUG|LOG|INFO|NOTICE|WARNING)\b)"
    for match in re.finditer(error, source, re.IGNORECASE):
        # A semicolon inside a quoted message does not end the statement.
        quoted = False
        end = match.end()
        while quoted or source[end] != ";":
            quoted ^= source[end] == "'"
            end += 1
        statements.append(source[match.start():end])
    return statements


def documented_error_codes() -> dict[str, str]:
    """The SQLSTATE table at the top of the first engine file: code -> meaning."""
    header = next(iter(engine_files().values())).split("\n\n", 1)[0]
    return dict(re.findall(r"^--   ([0-9A-Z]{5})  (.+)$", header, re.MULTILINE))
