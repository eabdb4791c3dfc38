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
    wait_until,
)


def make_ticking_queue(conn: Conn, queue: str, *consumers: str) -> None:
    """A queue whose plain ticker() (``tick(conn, queue, force=False)``) ticks at each
    event; its first event is sent and ticked before the consumers subscribe (PgQue
    does not count a queue's very first event in sequence distances, a kept 0.2 quirk)."""
    make_queue(conn, queue, ticker_max_count=1)
    send_many(conn, queue, 1, type="warm-up")
    tick(conn, queue, force=False)
    subscribe(conn, queue, *consumers)


def orders_and_mail(conn: Conn) -> None:
    """What the status tools are shown: orders, where 'fast' drained 40 events and
    'slow' has them all to do, 2 dead letters of fast's and 3 events not ticked yet;
    mail, idle."""
    make_ticking_queue(conn, "orders", "fast", "slow")
    make_ticking_queue(conn, "mail", "sender")
    send_many(conn, "orders", 40)
    tick(conn, "orders", force=False)
    assert len(drain(conn, "orders", "fast")) == 40
    dead_letter(conn, "orders", "fast", 2, "order.created", reason="boom")
    drain(conn, "mail", "sender")
    send_many(conn, "orders", 3)


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
    keep_up_past_rotation(conn, "r", "worker")


def keep_up_past_rotation(conn: Conn, queue: str, *consumers: str) -> None:
    """Tick and drain ``consumers`` until each one's cursor tick lies past the queue's
    last rotation. A tick's snapshot carries the xmin of the whole server: a
    transaction still open anywhere (another database on a shared test server) when
    the tick was taken keeps that tick, and a consumer on it, behind the rotation."""

    def past() -> bool:
        return bool(scalar(
            conn,
            "select bool_and(pg_snapshot_xmin(t.tick_snapshot)::text::bigint"
            "                > q.queue_switch_step2)"
            "  from pgque.queue q"
            "  join pgque.subscription s on s.sub_queue = q.queue_id"
            "  join pgque.consumer c on c.co_id = s.sub_consumer"
            "  join pgque.tick t on t.tick_queue = q.queue_id and t.tick_id = s.sub_last_tick"
            " where q.queue_name = %s and c.co_name = any(%s)", queue, list(consumers)))

    def another_round_unless_past() -> bool:
        if past():
            return True
        send_many(conn, queue, 1)
        tick(conn, queue, force=False)
        for consumer in consumers:
            drain(conn, queue, consumer)
        return False

    wait_until(another_round_unless_past, what=f"{consumers} past the rotation of {queue!r}")
