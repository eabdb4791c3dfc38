"""Event-table rotation (maint_rotate_tables_step1 / step2) through the public SQL API.

Rotation needs step 1 and step 2 in separate transactions and a cursor tick taken after
the last step 2, so every round here is a sequence of autocommit statements. Snapshots
are cluster-wide: a transaction left open elsewhere on a shared server can hold a
rotation back for a while, so rotations are awaited with a deadline, not assumed.
"""

from __future__ import annotations

import time

import pytest
from engine_helpers import Conn, drain, ids, make_queue, scalar, send_many, tick, wait_until

# Every round's step 1 finds a rotation due.
AT_ONCE = "1 millisecond"


def queue_id_of(conn: Conn, queue: str) -> int:
    return int(scalar(conn, "select queue_id from pgque.queue where queue_name = %s", queue))


def cur_table(conn: Conn, queue: str) -> int:
    return int(scalar(conn, "select queue_cur_table from pgque.queue where queue_name = %s",
                      queue))


def rotation_round(conn: Conn, queue: str, consumers: list[str],
                   sent: list[int], received: dict[str, list[int]]) -> None:
    """Send around both rotation steps, tick after step 2, let ``consumers`` catch up."""
    sent += send_many(conn, queue, 3)
    assert scalar(conn, "select pgque.maint_rotate_tables_step1(%s)", queue) == 0
    sent += send_many(conn, queue, 2)
    assert scalar(conn, "select pgque.maint_rotate_tables_step2()") == 0
    sent += send_many(conn, queue, 2)
    tick(conn, queue)
    for consumer in consumers:
        received[consumer] += ids(drain(conn, queue, consumer))


def rotate_times(conn: Conn, queue: str, consumers: list[str], times: int,
                 sent: list[int], received: dict[str, list[int]],
                 timeout: float = 30.0) -> None:
    rotations = 0
    deadline = time.monotonic() + timeout
    previous = cur_table(conn, queue)
    while rotations < times:
        if time.monotonic() > deadline:
            pytest.fail(f"only {rotations} of {times} rotations within {timeout} s")
        rotation_round(conn, queue, consumers, sent, received)
        now = cur_table(conn, queue)
        if now != previous:
            assert now == (previous + 1) % 3
            rotations += 1
            previous = now


def event_table_stats(conn: Conn, queue_id: int) -> list[tuple[str, int, int, int]]:
    return [(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(
        "select relname, n_tup_ins, n_live_tup, n_dead_tup from pg_stat_user_tables"
        " where schemaname = 'pgque' and relname like %s order by relname",
        (f"event\\_{queue_id}\\_%",)).fetchall()]


def flush_stats(conn: Conn) -> None:
    if conn.info.server_version >= 150000:
        conn.execute("select pg_stat_force_next_flush()")


def test_rotation_recycles_tables_without_dead_tuples(conn: Conn) -> None:
    make_queue(conn, "q", "fast", rotation_period=AT_ONCE)
    queue_id = queue_id_of(conn, "q")
    sent: list[int] = []
    received: dict[str, list[int]] = {"fast": []}

    rotate_times(conn, "q", ["fast"], 4, sent, received)

    assert received["fast"] == sent
    # Rotation 3 truncated the table the first events were written to.
    present = {int(r[0]) for r in conn.execute(f"select ev_id from pgque.event_{queue_id}")}
    assert sent[0] not in present
    assert present <= set(sent)
    # Ticks older than a rotation are deleted with it.
    assert int(scalar(conn, "select min(tick_id) from pgque.tick where tick_queue = %s",
                      queue_id)) > 1

    flush_stats(conn)

    left = [int(scalar(conn, f"select count(*) from pgque.event_{queue_id}_{n}"))
            for n in range(3)]

    def flushed() -> list[tuple[str, int, int, int]] | None:
        # The inserting and the truncating backends report their counts separately,
        # each when it flushes its statistics: wait for both.
        stats = event_table_stats(conn, queue_id)
        complete = (sum(ins for _, ins, _, _ in stats) == len(sent)
                    and [live for _, _, live, _ in stats] == left)
        return stats if complete else None

    stats = wait_until(flushed, timeout=30, what="the event tables' statistics")
    assert len(stats) == 3
    # Truncation is what emptied the recycled tables (live counts match what is left,
    # above), and nothing was deleted or updated.
    assert [dead for _, _, _, dead in stats] == [0, 0, 0]


def test_step1_needs_step2_and_a_cursor_past_it(conn: Conn) -> None:
    make_queue(conn, "q", "c", rotation_period=AT_ONCE)
    sent: list[int] = []
    received: list[int] = []

    def consume_then_step1() -> int:
        nonlocal sent
        sent += send_many(conn, "q", 2)
        tick(conn, "q")
        received.extend(ids(drain(conn, "q", "c")))
        assert scalar(conn, "select pgque.maint_rotate_tables_step1('q')") == 0
        return cur_table(conn, "q")

    deadline = time.monotonic() + 30
    while consume_then_step1() == 0:
        assert time.monotonic() < deadline, "first rotation not reached"
    assert scalar(conn, "select queue_switch_step2 from pgque.queue") is None

    # Between the two steps the queue never rotates again.
    assert consume_then_step1() == 1
    assert consume_then_step1() == 1

    assert scalar(conn, "select pgque.maint_rotate_tables_step2()") == 0
    assert scalar(conn, "select queue_switch_step2 from pgque.queue") is not None
    # The consumer's cursor tick predates step 2, so it may still read table 0.
    assert scalar(conn, "select pgque.maint_rotate_tables_step1('q')") == 0
    assert cur_table(conn, "q") == 1

    while consume_then_step1() == 1:
        assert time.monotonic() < deadline, "second rotation not reached"
    assert cur_table(conn, "q") == 2
    assert received == sent


def test_rotation_not_due_does_nothing(conn: Conn) -> None:
    make_queue(conn, "q", "c", rotation_period="1 hour")
    sent = send_many(conn, "q", 3)
    tick(conn, "q")
    assert ids(drain(conn, "q", "c")) == sent
    for _ in range(3):
        assert scalar(conn, "select pgque.maint_rotate_tables_step1('q')") == 0
        assert scalar(conn, "select pgque.maint_rotate_tables_step2()") == 0
    assert cur_table(conn, "q") == 0
    assert scalar(conn, "select pgque.maint_rotate_tables_step1('no_such_queue')") == 0


def test_lagging_consumer_blocks_rotation_and_loses_nothing(conn: Conn) -> None:
    make_queue(conn, "q", "fast", "lagging", rotation_period=AT_ONCE)
    sent: list[int] = []
    received: dict[str, list[int]] = {"fast": [], "lagging": []}

    for _ in range(6):
        rotation_round(conn, "q", ["fast"], sent, received)
        assert cur_table(conn, "q") == 0
    assert received["fast"] == sent

    received["lagging"] = ids(drain(conn, "q", "lagging"))
    assert received["lagging"] == sent

    # Caught up, it no longer holds the tables back.
    rotate_times(conn, "q", ["fast", "lagging"], 3, sent, received)
    assert received["fast"] == sent
    assert received["lagging"] == sent


def test_consumer_stalled_after_a_rotation_still_gets_every_event(conn: Conn) -> None:
    make_queue(conn, "q", "fast", "slow", rotation_period=AT_ONCE)
    sent: list[int] = []
    received: dict[str, list[int]] = {"fast": [], "slow": []}
    rotate_times(conn, "q", ["fast", "slow"], 2, sent, received)
    assert received["slow"] == sent
    stalled_at = len(sent)
    table = cur_table(conn, "q")

    for _ in range(6):
        rotation_round(conn, "q", ["fast"], sent, received)
    # With three tables, at most one more switch can happen past the stalled cursor.
    assert cur_table(conn, "q") in {table, (table + 1) % 3}

    received["slow"] += ids(drain(conn, "q", "slow"))
    assert received["slow"] == sent
    assert len(sent) > stalled_at
