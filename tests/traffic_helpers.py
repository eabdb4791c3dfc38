"""Real traffic for the operating tests (admin API, command line, metrics), in plain SQL."""

from __future__ import annotations

from typing import Any

from engine_helpers import Conn, scalar

BATCH_ID = 1


def send(conn: Conn, queue: str, count: int, type_: str = "t") -> None:
    for i in range(count):
        conn.execute("select pgque.send(%s, %s, %s::jsonb)", (queue, type_, f'{{"n": {i}}}'))


def tick(conn: Conn, queue: str) -> None:
    """A plain ticker() pass (no forced sequence jump); ticks under make_queue's settings."""
    assert scalar(conn, "select pgque.ticker(%s)", queue) is not None


def make_queue(conn: Conn, queue: str, *consumers: str) -> None:
    """A queue whose plain ticker() ticks at each event; its first event is sent and
    ticked before the consumers subscribe (PgQue does not count a queue's very first
    event in sequence distances, a kept 0.2 quirk)."""
    assert scalar(conn, "select pgque.create_queue(%s)", queue) == 1
    conn.execute("select pgque.set_queue_config(%s, 'ticker_max_count', '1')", (queue,))
    send(conn, queue, 1, "warm-up")
    tick(conn, queue)
    for consumer in consumers:
        assert scalar(conn, "select pgque.subscribe(%s, %s)", queue, consumer) == 1


def drain(conn: Conn, queue: str, consumer: str) -> list[tuple[Any, ...]]:
    """Receive and ack batches until ``consumer`` has nothing left; the rows it got."""
    got: list[tuple[Any, ...]] = []
    while rows := conn.execute("select * from pgque.receive(%s, %s, 1000)",
                               (queue, consumer)).fetchall():
        got += rows
        assert scalar(conn, "select pgque.ack(%s)", rows[0][BATCH_ID]) == 1
    return got


def dead_letter(conn: Conn, queue: str, consumer: str, count: int, type_: str,
                reason: str = "handler gave up") -> None:
    """Dead-letter ``count`` new events the way a consumer does: event_dead in its batch."""
    send(conn, queue, count, type_)
    tick(conn, queue)
    with conn.transaction():
        rows = conn.execute(
            "select msg_id, batch_id, type, payload::text from pgque.receive(%s, %s, 1000)",
            (queue, consumer)).fetchall()
        assert len(rows) == count
        for msg_id, batch_id, type_got, payload in rows:
            conn.execute(
                "select pgque.event_dead(%s, %s, %s, now(), NULL, 5, %s, %s)",
                (batch_id, msg_id, reason, type_got, payload))
        assert scalar(conn, "select pgque.ack(%s)", rows[0][BATCH_ID]) == 1


def rotation_blocked_by_a_stopped_consumer(conn: Conn) -> None:
    """Queue ``r``: ``worker`` keeps up through three rotation rounds while
    ``forgotten`` stays at its first tick, so the next rotation is due and blocked."""
    make_queue(conn, "r", "worker", "forgotten")
    conn.execute("select pgque.set_queue_config('r', 'rotation_period', '1 millisecond')")
    send(conn, "r", 2)
    tick(conn, "r")
    drain(conn, "r", "forgotten")  # its cursor stays at this tick from now on
    for _ in range(3):
        send(conn, "r", 2)
        scalar(conn, "select pgque.maint_rotate_tables_step1('r')")
        scalar(conn, "select pgque.maint_rotate_tables_step2()")
        tick(conn, "r")
        drain(conn, "r", "worker")
