"""What the Queue tests capture: the statements a Session sends, and wake NOTIFYs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, event

from sqlalchemy_pgque import WAKE_CHANNEL


@contextmanager
def captured_statements(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement sent to the server while the block runs, in order."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sync_engine = getattr(engine, "sync_engine", engine)
    event.listen(sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(sync_engine, "before_cursor_execute", record)


def pgque_calls(statements: list[str]) -> list[str]:
    return [s for s in statements if "pgque." in s]


@contextmanager
def wake_listener(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {WAKE_CHANNEL}")
        yield conn


def wait_wakes(
    conn: psycopg.Connection[tuple[object, ...]], count: int, timeout: float = 10.0
) -> list[str]:
    """Payloads of wake notifications, waiting up to ``timeout`` s for ``count`` of them.

    Everything received is returned, also beyond ``count`` when it arrived together.
    """
    notifies = list(conn.notifies(timeout=timeout, stop_after=count))
    assert all(n.channel == WAKE_CHANNEL for n in notifies)
    return [n.payload for n in notifies]
