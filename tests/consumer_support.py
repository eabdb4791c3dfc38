"""What the consumer, ticker and worker tests share beyond engine_helpers: the table their
handlers write to, consumers run in threads, and what they read of a consumer's cursor,
of LISTEN and ticker sessions and of a worker's output."""

from __future__ import annotations

import threading
from typing import Any

from engine_helpers import Conn

from sqlalchemy_pgque import Consumer

Running = list[tuple[Consumer, threading.Thread]]
"""The consumers a test started in threads, for its fixture to stop and join."""

HANDLED_TABLE = """
CREATE TABLE handled (
    msg_id bigint NOT NULL,
    type text,
    retry_count int NOT NULL,
    handled_by text,
    handled_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


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


def start(running: Running, consumer: Consumer) -> threading.Thread:
    """Run ``consumer`` in a thread, once it listens; it joins ``running``."""
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    running.append((consumer, thread))
    assert consumer.listening.wait(10)
    return thread


def ticker_sessions(conn: Conn) -> int:
    """The database's connections that tickers hold (by their application_name)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'sqlalchemy_pgque ticker %'"
    ).fetchone()
    return int(row[0]) if row else 0


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
