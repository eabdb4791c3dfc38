"""Helpers shared by the Queue tests: queue setup, delivery, statement and NOTIFY capture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, event, text

from sqlalchemy_pgque import WAKE_CHANNEL, Message, Queue


def create_queue(engine: Engine, queue: Queue, *consumers: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("SELECT pgque.create_queue(:q)"), {"q": queue.name})
        for consumer in consumers:
            queue.subscribe(conn, consumer)


def deliver(engine: Engine, queue: Queue, consumer: str) -> list[Message]:
    """Tick in a transaction after the producer's commit, then receive and ack the batch."""
    with engine.begin() as conn:
        queue.force_next_tick(conn)
        assert queue.ticker(conn) is not None
    with engine.begin() as conn:
        messages = queue.receive(conn, consumer)
        if messages:
            assert queue.ack(conn, messages[0].batch_id) == 1
    return messages


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
