"""Real traffic for the operating tests (admin API, command line, metrics), in plain SQL:
queues whose plain ``ticker()`` ticks at every event, so that no forced tick moves the
sequences the figures under test are read from."""

from __future__ import annotations

from engine_helpers import (
    BATCH_ID,
    MSG_ID,
    PAYLOAD,
    TYPE,
    Conn,
    ack,
    drain,
    make_queue,
    receive,
    scalar,
    send_many,
    subscribe,
    tick,
)


def make_ticking_queue(conn: Conn, queue: str, *consumers: str) -> None:
    """A queue whose plain ticker() (``tick(conn, queue, force=False)``) ticks at each
    event; its first event is sent and ticked before the consumers subscribe (PgQue
    does not count a queue's very first event in sequence distances, a kept 0.2 quirk)."""
    make_queue(conn, queue, ticker_max_count=1)
    send_many(conn, queue, 1, type="warm-up")
    tick(conn, queue, force=False)
    subscribe(conn, queue, *consumers)


def dead_letter(conn: Conn, queue: str, consumer: str, count: int, type_: str,
                reason: str = "handler gave up") -> None:
    """Dead-letter ``count`` new events the way a consumer does: event_dead in its batch."""
    send_many(conn, queue, count, type=type_)
    tick(conn, queue, force=False)
    with conn.transaction():
        rows = receive(conn, queue, consumer)
        assert len(rows) == count
        for row in rows:
            conn.execute(
                "select pgque.event_dead(%s, %s, %s, now(), NULL, 5, %s, %s)",
                (row[BATCH_ID], row[MSG_ID], reason, row[TYPE], row[PAYLOAD]))
        assert ack(conn, rows[0][BATCH_ID]) == 1


def rotation_blocked_by_a_stopped_consumer(conn: Conn) -> None:
    """Queue ``r``: ``worker`` keeps up through three rotation rounds while
    ``forgotten`` stays at its first tick, so the next rotation is due and blocked."""
    make_ticking_queue(conn, "r", "worker", "forgotten")
    conn.execute("select pgque.set_queue_config('r', 'rotation_period', '1 millisecond')")
    send_many(conn, "r", 2)
    tick(conn, "r", force=False)
    drain(conn, "r", "forgotten")  # its cursor stays at this tick from now on
    for _ in range(3):
        send_many(conn, "r", 2)
        scalar(conn, "select pgque.maint_rotate_tables_step1('r')")
        scalar(conn, "select pgque.maint_rotate_tables_step2()")
        tick(conn, "r", force=False)
        drain(conn, "r", "worker")
