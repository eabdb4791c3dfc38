"""Helpers for the consumer, ticker and worker tests: queue setup and polling."""

from __future__ import annotations

from typing import Any

import psycopg
from engine_helpers import tick as tick
from engine_helpers import wait_until as wait_until

Conn = psycopg.Connection[Any]

HANDLED_TABLE = """
CREATE TABLE handled (
    msg_id bigint NOT NULL,
    type text,
    retry_count int NOT NULL,
    handled_by text,
    handled_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def setup_queue(conn: Conn, queue: str = "q", consumer: str = "c",
                **config: object) -> None:
    """Create ``queue``, apply ``config`` (set_queue_config) and subscribe ``consumer``."""
    conn.execute("SELECT pgque.create_queue(%s)", (queue,))
    for param, value in config.items():
        conn.execute("SELECT pgque.set_queue_config(%s, %s, %s)", (queue, param, str(value)))
    conn.execute("SELECT pgque.subscribe(%s, %s)", (queue, consumer))


def send(conn: Conn, queue: str, payload: str = "{}", type: str = "default") -> int:
    row = conn.execute("SELECT pgque.send(%s, %s, %s::jsonb)", (queue, type, payload)).fetchone()
    assert row is not None
    return int(row[0])


def send_many(conn: Conn, queue: str, count: int, type: str = "default") -> list[int]:
    payloads = [f'{{"n": {i}}}' for i in range(count)]
    row = conn.execute(
        "SELECT pgque.send_batch(%s, %s, %s::jsonb[])", (queue, type, payloads)
    ).fetchone()
    assert row is not None
    return [int(i) for i in row[0]]


def send_batches(conn: Conn, batches: int, size: int, queue: str = "q") -> list[int]:
    """Send ``batches`` batches of ``size`` events, each ticked; their ids."""
    ids: list[int] = []
    for _ in range(batches):
        ids += send_many(conn, queue, size)
        tick(conn, queue)
    return ids


def move_retries(conn: Conn) -> int:
    total, moved = 0, 1
    while moved:
        row = conn.execute("SELECT pgque.maint_retry_events()").fetchone()
        assert row is not None
        moved = int(row[0])
        total += moved
    return total


def handled_counts(conn: Conn) -> dict[int, int]:
    rows = conn.execute("SELECT msg_id, count(*) FROM handled GROUP BY msg_id").fetchall()
    return {int(msg_id): int(n) for msg_id, n in rows}


def open_batch(conn: Conn, queue: str, consumer: str) -> int | None:
    row = conn.execute(
        "SELECT current_batch FROM pgque.get_consumer_info(%s, %s) WHERE consumer_name = %s",
        (queue, consumer, consumer),
    ).fetchone()
    assert row is not None, f"{consumer} is not subscribed to {queue}"
    return None if row[0] is None else int(row[0])


def listening(conn: Conn, channel: str = "pgque_q") -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = %s",
        (f'LISTEN "{channel}"',),
    ).fetchone()
    return int(row[0]) if row else 0


def one_error_line(worker: Any) -> str:
    code = worker.wait()
    output = worker.output()
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]
