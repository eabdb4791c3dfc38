"""Helpers shared by every tier of the suite that talks to the engine in plain psycopg:
queue setup, sending, ticking, receiving and acking, polling, and the engine's SQL files
read as text.

Positional arguments follow the SQL functions' own order (the queue, then the
consumer); everything else is a keyword. Each call is its own transaction on the
autocommit ``conn`` fixture, which is what the snapshot rule needs between producing,
ticking and consuming.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import psycopg

T = TypeVar("T")

Conn = psycopg.Connection[tuple[Any, ...]]
ConnectAs = Callable[[str], Conn]
"""The ``role_conn`` fixture: a connection acting as a fresh member of a pgque role."""

Row = tuple[Any, ...]
"""A ``pgque.message`` row: msg_id, batch_id, type, payload, retry_count, created_at,
extra1..4."""
MSG_ID, BATCH_ID, TYPE, PAYLOAD, RETRY_COUNT, CREATED_AT = range(6)

# A receive returns at most max_return rows of a window, and acking the batch then
# skips the rest for good: the helpers that ack read whole windows.
WHOLE_WINDOW = 1_000_000

NACK_SQL = (
    "select pgque.nack(%s, ROW(%s::bigint, %s::bigint, %s::text, %s::text, %s::int4,"
    " %s::timestamptz, %s::text, %s::text, %s::text, %s::text)::pgque.message,"
    " %s::interval, %s)"
)


def scalar(conn: Conn, query: str, *params: object) -> Any:
    """The first column of the one row ``query`` returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def tick(conn: Conn, queue: str = "q", *, force: bool = True) -> int:
    """Tick ``queue`` and return the tick's id. Forced (the default): whatever the
    queue's thresholds, in two transactions (``conn`` is autocommit),
    ``force_next_tick`` then ``ticker``, so that the tick's snapshot sees every event
    committed before the call. ``force=False``: one plain ``ticker()`` pass, which
    must tick under the queue's own thresholds (and moves no sequence forward)."""
    if force:
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


def make_queue(conn: Conn, name: str = "q", *consumers: str, **config: object) -> None:
    """Create queue ``name``, apply ``config`` (``set_queue_config``, e.g.
    ``rotation_period="1 millisecond"``) and subscribe ``consumers``, each call
    asserting it was new."""
    assert scalar(conn, "select pgque.create_queue(%s)", name) == 1
    for param, value in config.items():
        assert scalar(conn, "select pgque.set_queue_config(%s, %s, %s)",
                      name, param, str(value)) == 1
    subscribe(conn, name, *consumers)


def subscribe(conn: Conn, queue: str, *consumers: str) -> None:
    """Subscribe ``consumers`` to ``queue``, each call asserting it was new."""
    for consumer in consumers:
        assert scalar(conn, "select pgque.subscribe(%s, %s)", queue, consumer) == 1


def send(conn: Conn, queue: str, payload: str = "{}", *, type: str = "default") -> int:
    """Send one event (``payload`` is JSON text); its id."""
    return int(scalar(conn, "select pgque.send(%s, %s, %s::jsonb)", queue, type, payload))


def send_many(conn: Conn, queue: str, count: int, *, type: str = "default") -> list[int]:
    """Send ``count`` events ``{"n": i}`` with one ``send_batch``, so in one
    transaction; their ids."""
    batch = [f'{{"n": {i}}}' for i in range(count)]
    sent = scalar(conn, "select pgque.send_batch(%s, %s, %s::jsonb[])", queue, type, batch)
    return [int(i) for i in sent]


def send_batches(conn: Conn, queue: str = "q", *, batches: int, size: int) -> list[int]:
    """``batches`` windows of ``size`` events: each ``send_many`` is followed by a
    forced tick; their ids."""
    sent: list[int] = []
    for _ in range(batches):
        sent += send_many(conn, queue, size)
        tick(conn, queue)
    return sent


def receive(conn: Conn, queue: str, consumer: str, *, max_return: int = 1000) -> list[Row]:
    """``pgque.receive``: the rows of ``consumer``'s current window, batch left open."""
    return conn.execute("select * from pgque.receive(%s, %s, %s)",
                        (queue, consumer, max_return)).fetchall()


def ack(conn: Conn, batch_id: int) -> int:
    """``pgque.ack``: 1 if the batch was open, 0 if not."""
    return int(scalar(conn, "select pgque.ack(%s)", batch_id))


def nack(conn: Conn, msg: Sequence[Any], *, retry_after: str = "0 seconds",
         reason: str | None = None, batch_id: int | None = None) -> int:
    """``pgque.nack`` of ``msg`` (a message row, all ten columns) in its own batch, or in
    ``batch_id``: 1 once it is parked for a retry or dead-lettered."""
    batch = msg[BATCH_ID] if batch_id is None else batch_id
    return int(scalar(conn, NACK_SQL, batch, *msg, retry_after, reason))


def receive_and_ack(conn: Conn, queue: str, consumer: str) -> list[Row]:
    """The next window of ``consumer`` that holds events, acked; its rows, or none when
    no tick past its cursor holds any (a window without events is finished by
    ``receive`` itself, so an empty receive alone does not mean caught up)."""
    while True:
        rows = receive(conn, queue, consumer, max_return=WHOLE_WINDOW)
        if rows:
            assert ack(conn, rows[0][BATCH_ID]) == 1
            return rows
        if scalar(conn, "select pgque.next_batch(%s, %s)", queue, consumer) is None:
            return []


def drain(conn: Conn, queue: str, consumer: str) -> list[Row]:
    """Receive and ack every window up to the latest tick; the rows received."""
    got: list[Row] = []
    while rows := receive_and_ack(conn, queue, consumer):
        got += rows
    return got


def ids(rows: Sequence[Row]) -> list[int]:
    return [int(row[MSG_ID]) for row in rows]


def payloads(rows: Sequence[Row]) -> list[Any]:
    return [row[PAYLOAD] for row in rows]


def move_retries(conn: Conn) -> int:
    """Run ``maint_retry_events`` until it moves nothing (it takes a few rows a call);
    how many due retries went back into their queues."""
    total = 0
    while moved := scalar(conn, "select pgque.maint_retry_events()"):
        total += int(moved)
    return total


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
