"""Cooperative consumers (subconsumers) of the engine: ENGINE.md §3.9 and §4.12.

One logical consumer (a ``coop_main`` row) is shared by member rows named
``<consumer>.<sub>``; each committed event goes to exactly one member, a member's batch
is re-fetched until acked, and a stalled member's window can be taken over.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import pgque
import psycopg
import pytest
from conftest import Database
from engine_helpers import Conn, Row, ack, make_queue, nack, receive, scalar, tick, wait_until
from psycopg import sql
from sqlalchemy import create_engine

from sqlalchemy_pgque import schema

QUEUE = "coopq"
GROUP = "grp"


class Msg(NamedTuple):
    """A ``pgque.message`` row; a tuple still, as ``nack`` takes it."""

    msg_id: int
    batch_id: int
    type: str | None
    payload: str | None
    retry_count: int | None
    created_at: datetime
    extra1: str | None
    extra2: str | None
    extra3: str | None
    extra4: str | None


@dataclass(frozen=True)
class SubRow:
    sub_id: int
    role: str
    last_tick: int | None
    next_tick: int | None
    batch: int | None
    active: datetime


def as_msgs(rows: list[Row]) -> list[Msg]:
    return [Msg(*r) for r in rows]


def send_window(conn: Conn, count: int, tag: str, queue: str = QUEUE) -> list[int]:
    """Send ``count`` events, each committed, and close the window with a tick."""
    ids = [int(scalar(conn, "select pgque.send(%s, %s::text)", queue, f"{tag}-{i}"))
           for i in range(count)]
    tick(conn, queue)
    return ids


def receive_coop(conn: Conn, sub: str, *, consumer: str = GROUP, queue: str = QUEUE,
                 max_return: int = 100, dead_interval: str | None = None) -> list[Msg]:
    rows = conn.execute(
        "select * from pgque.receive_coop(%s, %s, %s, %s, %s::interval)",
        (queue, consumer, sub, max_return, dead_interval),
    ).fetchall()
    return as_msgs(rows)


def register(conn: Conn, sub: str, *, consumer: str = GROUP, queue: str = QUEUE,
             convert: bool = False) -> int:
    row = conn.execute("select pgque.register_subconsumer(%s, %s, %s, %s)",
                       (queue, consumer, sub, convert)).fetchone()
    assert row is not None
    return int(row[0])


def unregister(conn: Conn, sub: str, handling: int = 0, *, consumer: str = GROUP,
               queue: str = QUEUE) -> int:
    row = conn.execute("select pgque.unregister_subconsumer(%s, %s, %s, %s)",
                       (queue, consumer, sub, handling)).fetchone()
    assert row is not None
    return int(row[0])


def sub_row(conn: Conn, consumer: str, queue: str = QUEUE) -> SubRow | None:
    row = conn.execute(
        "select s.sub_id, s.sub_role, s.sub_last_tick, s.sub_next_tick, s.sub_batch,"
        "       s.sub_active"
        "  from pgque.subscription s"
        "  join pgque.consumer c on c.co_id = s.sub_consumer"
        "  join pgque.queue q on q.queue_id = s.sub_queue"
        " where q.queue_name = %s and c.co_name = %s",
        (queue, consumer),
    ).fetchone()
    return SubRow(*row) if row is not None else None


def group_sub_id(conn: Conn, consumer: str = GROUP) -> int:
    main = sub_row(conn, consumer)
    assert main is not None
    return main.sub_id


def single_batch(msgs: list[Msg]) -> int:
    assert msgs
    batch_ids = {m.batch_id for m in msgs}
    assert len(batch_ids) == 1
    return batch_ids.pop()


@pytest.fixture
def queue(conn: Conn) -> Iterator[Conn]:
    """``conn`` with queue ``coopq`` created and members ``grp.a`` and ``grp.b``."""
    make_queue(conn, QUEUE)
    assert register(conn, "a") == 1
    assert register(conn, "b") == 1
    yield conn


# --- registration --------------------------------------------------------------------

def test_register_creates_main_and_members_sharing_sub_id(conn: Conn) -> None:
    make_queue(conn, QUEUE)
    assert register(conn, "a") == 1
    assert register(conn, "b") == 1
    assert register(conn, "a") == 0
    assert conn.execute("select pgque.subscribe_subconsumer(%s, %s, %s)",
                        (QUEUE, GROUP, "b")).fetchone() == (0,)

    main, a, b = sub_row(conn, GROUP), sub_row(conn, "grp.a"), sub_row(conn, "grp.b")
    assert main is not None and a is not None and b is not None
    assert (main.role, a.role, b.role) == ("coop_main", "coop_member", "coop_member")
    assert main.sub_id == a.sub_id == b.sub_id
    latest = conn.execute("select max(tick_id) from pgque.tick").fetchone()
    assert latest is not None
    assert main.last_tick == latest[0]
    assert (a.last_tick, a.next_tick, a.batch) == (None, None, None)


def test_register_requires_existing_queue(conn: Conn) -> None:
    with pytest.raises(psycopg.Error, match="Event queue not created yet"):
        register(conn, "a", queue="missing")


@pytest.mark.parametrize(
    ("queue_name", "consumer", "sub", "message"),
    [
        ("", "grp", "a", "queue name must not be empty"),
        (None, "grp", "a", "queue name must not be empty"),
        (QUEUE, "", "a", "consumer name must not be empty"),
        (QUEUE, None, "a", "consumer name must not be empty"),
        (QUEUE, "grp", "", "subconsumer name must not be empty"),
        (QUEUE, "grp", None, "subconsumer name must not be empty"),
        (QUEUE, "g.rp", "a", "cooperative consumer name must not contain dot: g.rp"),
        (QUEUE, "grp", "a.1", "cooperative subconsumer name must not contain dot: a.1"),
    ],
)
def test_names_are_validated(conn: Conn, queue_name: str | None, consumer: str | None,
                             sub: str | None, message: str) -> None:
    make_queue(conn, QUEUE)
    for call in ("select pgque.register_subconsumer(%s, %s, %s)",
                 "select * from pgque.receive_coop(%s, %s, %s)"):
        with pytest.raises(psycopg.Error, match=message.replace(".", r"\.")):
            conn.execute(call, (queue_name, consumer, sub))
    assert conn.execute("select count(*) from pgque.subscription").fetchone() == (0,)


def test_converting_a_normal_consumer_needs_explicit_flag(conn: Conn) -> None:
    make_queue(conn, QUEUE)
    conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, GROUP))
    normal = sub_row(conn, GROUP)
    assert normal is not None and normal.role == "normal"

    with pytest.raises(psycopg.Error, match=(
            "consumer grp on queue coopq is already a normal consumer; "
            "explicit conversion is required")):
        register(conn, "a")
    # The allocator auto-registers, but never converts.
    with pytest.raises(psycopg.Error, match="explicit conversion is required"):
        receive_coop(conn, "a")

    # A normal consumer holding an open batch cannot be converted.
    send_window(conn, 1, "x")
    batch = single_batch(as_msgs(receive(conn, QUEUE, GROUP)))
    with pytest.raises(psycopg.Error, match="cannot convert active normal consumer"):
        register(conn, "a", convert=True)
    assert ack(conn, batch) == 1

    assert register(conn, "a", convert=True) == 1
    main, member = sub_row(conn, GROUP), sub_row(conn, "grp.a")
    assert main is not None and member is not None
    assert (main.role, main.sub_id) == ("coop_main", normal.sub_id)
    assert (member.role, member.sub_id) == ("coop_member", normal.sub_id)
    # The group continues from the normal consumer's cursor.
    later = send_window(conn, 2, "y")
    assert [m.msg_id for m in receive_coop(conn, "a")] == later


def test_member_name_taken_by_other_subscription_is_incompatible(conn: Conn) -> None:
    make_queue(conn, QUEUE)
    conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, "grp.a"))
    with pytest.raises(psycopg.Error,
                       match=r"consumer name grp\.a on queue coopq is already registered "
                             "incompatibly"):
        register(conn, "a")


# --- allocation ----------------------------------------------------------------------

def test_members_split_the_events(queue: Conn) -> None:
    conn = queue
    first = send_window(conn, 3, "w1")
    second = send_window(conn, 2, "w2")

    got_a = receive_coop(conn, "a")
    got_b = receive_coop(conn, "b")
    assert [m.msg_id for m in got_a] == first
    assert [m.msg_id for m in got_b] == second
    assert [m.payload for m in got_a] == ["w1-0", "w1-1", "w1-2"]
    assert single_batch(got_a) != single_batch(got_b)

    # Each member keeps its own window; once acked, no third window exists.
    assert receive_coop(conn, "a") == got_a
    assert ack(conn, single_batch(got_a)) == 1
    assert receive_coop(conn, "a") == []
    assert ack(conn, single_batch(got_b)) == 1
    assert receive_coop(conn, "b") == []


def test_open_batch_is_refetched_until_ack(queue: Conn) -> None:
    conn = queue
    ids = send_window(conn, 3, "r")
    first = receive_coop(conn, "a")
    batch = single_batch(first)
    assert [m.msg_id for m in first] == ids

    again = receive_coop(conn, "a")
    assert again == first
    row = conn.execute("select pgque.next_batch(%s, %s, %s)", (QUEUE, GROUP, "a")).fetchone()
    assert row == (batch,)
    row = conn.execute(
        "select batch_id from pgque.next_batch_custom(%s, %s, %s, null, null, null)",
        (QUEUE, GROUP, "a")).fetchone()
    assert row == (batch,)

    # A partial read leaves the batch open and restarts at its first row.
    assert receive_coop(conn, "a", max_return=2) == first[:2]
    assert receive_coop(conn, "a") == first


def test_ack_clears_member_window_and_main_already_moved(queue: Conn) -> None:
    conn = queue
    start = sub_row(conn, GROUP)
    assert start is not None and start.last_tick is not None
    send_window(conn, 2, "m")
    end_tick = tick(conn, QUEUE)  # a second, empty window after the first one

    batch = single_batch(receive_coop(conn, "a"))
    main, member = sub_row(conn, GROUP), sub_row(conn, "grp.a")
    assert main is not None and member is not None
    # The group cursor moved at allocation; the window lives in the member row.
    assert main.batch is None
    assert member.last_tick == start.last_tick
    assert member.batch == batch
    assert main.last_tick == member.next_tick
    assert member.next_tick is not None and member.next_tick < end_tick

    assert ack(conn, batch) == 1
    after = sub_row(conn, "grp.a")
    assert after is not None
    assert (after.last_tick, after.next_tick, after.batch) == (None, None, None)
    assert ack(conn, batch) == 0

    # The empty second window is allocated and released inside receive_coop.
    assert receive_coop(conn, "b") == []
    main = sub_row(conn, GROUP)
    b = sub_row(conn, "grp.b")
    assert main is not None and b is not None
    assert main.last_tick == end_tick
    assert (b.last_tick, b.next_tick, b.batch) == (None, None, None)
    assert conn.execute("select pgque.next_batch(%s, %s, %s)",
                        (QUEUE, GROUP, "b")).fetchone() == (None,)


def test_allocation_thresholds(queue: Conn) -> None:
    """min_count / min_interval / min_lag pick the end tick from the group cursor
    (ENGINE.md §4.5 steps 3-4), with ticks placed exactly by the external ticker."""
    conn = queue
    conn.execute("select pgque.set_queue_config(%s, 'external_ticker', 'true')", (QUEUE,))
    row = conn.execute(
        "select tick_id, tick_event_seq, tick_time from pgque.tick"
        " order by tick_id desc limit 1").fetchone()
    assert row is not None
    tick_id, seq, base = row

    def ext_tick(new_id: int, seq_delta: int, seconds: int) -> None:
        conn.execute("select pgque.ticker(%s, %s::bigint, %s::timestamptz + %s::interval,"
                     " %s::bigint)", (QUEUE, new_id, base, f"{seconds} seconds",
                                      seq + seq_delta))

    def allocate(member: str, min_lag: str | None, min_count: int | None,
                 min_interval: str | None) -> tuple[int | None, int | None, int | None]:
        got = conn.execute(
            "select batch_id, prev_tick_id, next_tick_id from pgque.next_batch_custom("
            "%s, %s, %s, %s::interval, %s::integer, %s::interval)",
            (QUEUE, GROUP, member, min_lag, min_count, min_interval)).fetchone()
        assert got is not None
        return got[0], got[1], got[2]

    idle = sub_row(conn, "grp.a")
    assert idle is not None
    ext_tick(tick_id + 1, 2, 1)
    assert allocate("a", None, 3, None) == (None, None, None)
    assert allocate("a", None, None, "10 seconds") == (None, None, None)
    assert allocate("a", None, 3, "10 seconds") == (None, None, None)
    unchanged = sub_row(conn, "grp.a")
    assert unchanged is not None and unchanged.active == idle.active

    ext_tick(tick_id + 2, 3, 2)
    batch, prev, nxt = allocate("a", None, 3, None)
    assert batch is not None and (prev, nxt) == (tick_id, tick_id + 2)
    assert ack(conn, batch) == 1

    # Far behind (count > 2 * min_count): stop at the first tick meeting the threshold.
    ext_tick(tick_id + 3, 4, 3)
    ext_tick(tick_id + 4, 7, 4)
    ext_tick(tick_id + 5, 20, 5)
    batch, prev, nxt = allocate("b", None, 3, None)
    assert batch is not None and (prev, nxt) == (tick_id + 2, tick_id + 4)
    assert ack(conn, batch) == 1

    # The same with time: 20 s > 2 * 5 s, the first tick 5 s after the cursor wins.
    ext_tick(tick_id + 6, 21, 8)
    ext_tick(tick_id + 7, 22, 10)
    ext_tick(tick_id + 8, 23, 30)
    batch, prev, nxt = allocate("a", None, None, "5 seconds")
    assert batch is not None and (prev, nxt) == (tick_id + 4, tick_id + 7)
    assert ack(conn, batch) == 1

    # min_lag: the end tick must be at least that old.
    conn.execute("select pgque.ticker(%s, %s::bigint, now(), %s::bigint)",
                 (QUEUE, tick_id + 9, seq + 24))
    assert allocate("a", None, None, None)[2] == tick_id + 8
    row = conn.execute("select pgque.next_batch(%s, %s, %s)", (QUEUE, GROUP, "a")).fetchone()
    assert row is not None and ack(conn, row[0]) == 1
    assert allocate("a", "1 hour", None, None) == (None, None, None)
    assert allocate("a", "0 seconds", None, None)[2] == tick_id + 9


def test_receive_coop_rejects_bad_max_return(queue: Conn) -> None:
    for bad in (0, -5):
        with pytest.raises(psycopg.Error,
                           match=f"pgque.receive_coop: max_return must be >= 1, got {bad}"):
            receive_coop(queue, "a", max_return=bad)


def test_receive_coop_auto_registers(conn: Conn) -> None:
    make_queue(conn, QUEUE)
    assert receive_coop(conn, "solo") == []
    member = sub_row(conn, "grp.solo")
    assert member is not None and member.role == "coop_member"
    ids = send_window(conn, 2, "auto")
    assert [m.msg_id for m in receive_coop(conn, "solo")] == ids


def test_normal_consumer_still_sees_every_event(queue: Conn) -> None:
    conn = queue
    conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, "audit"))
    first = send_window(conn, 2, "f1")
    second = send_window(conn, 2, "f2")

    got_a = receive_coop(conn, "a")
    got_b = receive_coop(conn, "b")
    assert {m.msg_id for m in got_a} | {m.msg_id for m in got_b} == set(first + second)
    assert ack(conn, single_batch(got_a)) == 1
    assert ack(conn, single_batch(got_b)) == 1

    seen: list[int] = []
    for _ in range(3):
        msgs = as_msgs(receive(conn, QUEUE, "audit"))
        if msgs:
            seen += [m.msg_id for m in msgs]
            assert ack(conn, single_batch(msgs)) == 1
    assert seen == first + second


def test_legacy_calls_on_group_rows_are_refused(queue: Conn) -> None:
    conn = queue
    send_window(conn, 1, "legacy")
    with pytest.raises(psycopg.Error, match="is a cooperative main consumer"):
        as_msgs(receive(conn, QUEUE, GROUP))
    with pytest.raises(psycopg.Error, match="is a cooperative main consumer"):
        conn.execute("select pgque.next_batch(%s, %s)", (QUEUE, GROUP))
    with pytest.raises(psycopg.Error, match="is a cooperative subconsumer"):
        as_msgs(receive(conn, QUEUE, "grp.a"))
    main = sub_row(conn, GROUP)
    assert main is not None and main.batch is None

    # Untyped literals still resolve: 2 and 5 arguments reach the legacy forms.
    with pytest.raises(psycopg.Error, match="is a cooperative main consumer"):
        conn.execute("select pgque.next_batch('coopq', 'grp')")
    with pytest.raises(psycopg.Error, match="Not subscriber to queue: coopq/nobody"):
        conn.execute("select * from pgque.next_batch_custom('coopq', 'nobody', null, null, null)")
    row = conn.execute("select pgque.next_batch('coopq', 'grp', 'a')").fetchone()
    assert row is not None and row[0] is not None
    assert conn.execute("select batch_id from pgque.next_batch_custom("
                        "'coopq', 'grp', 'a', null, null, null, null)").fetchone() == row


# --- takeover and heartbeat ----------------------------------------------------------

def test_dead_interval_takeover_uses_fresh_batch_id(queue: Conn) -> None:
    conn = queue
    ids = send_window(conn, 3, "dead")
    victim = receive_coop(conn, "a")
    old_batch = single_batch(victim)

    # b with no dead_interval, or a non-stale a, gets nothing.
    assert receive_coop(conn, "b") == []
    assert receive_coop(conn, "b", dead_interval="5 minutes") == []

    conn.execute(
        "update pgque.subscription set sub_active = now() - interval '1 hour'"
        " where sub_consumer = (select co_id from pgque.consumer where co_name = 'grp.a')")
    taken = receive_coop(conn, "b", dead_interval="5 minutes")
    new_batch = single_batch(taken)
    assert new_batch != old_batch
    assert [m.msg_id for m in taken] == ids

    a, b = sub_row(conn, "grp.a"), sub_row(conn, "grp.b")
    assert a is not None and b is not None
    assert (a.last_tick, a.next_tick, a.batch) == (None, None, None)
    assert b.batch == new_batch

    # The victim's token is dead: ack finds nothing and nack raises.
    assert ack(conn, old_batch) == 0
    with pytest.raises(psycopg.Error, match=f"batch not found: {old_batch}"):
        nack(conn, victim[0], retry_after="60 seconds")
    assert ack(conn, new_batch) == 1
    assert receive_coop(conn, "a") == []


def test_touch_subconsumer(queue: Conn) -> None:
    conn = queue
    conn.execute(
        "update pgque.subscription set sub_active = now() - interval '1 hour'"
        " where sub_consumer = (select co_id from pgque.consumer where co_name = 'grp.a')")
    before = sub_row(conn, "grp.a")
    assert before is not None
    assert conn.execute("select pgque.touch_subconsumer(%s, %s, %s)",
                        (QUEUE, GROUP, "a")).fetchone() == (1,)
    after = sub_row(conn, "grp.a")
    assert after is not None and after.active > before.active

    # Never creates rows.
    for args in ((QUEUE, GROUP, "ghost"), (QUEUE, "nogroup", "a"), ("noqueue", GROUP, "a")):
        assert conn.execute("select pgque.touch_subconsumer(%s, %s, %s)",
                            args).fetchone() == (0,)
    assert sub_row(conn, "grp.ghost") is None


def test_touch_keeps_a_slow_member_from_being_taken_over(queue: Conn) -> None:
    conn = queue
    send_window(conn, 1, "slow")
    batch = single_batch(receive_coop(conn, "a"))
    conn.execute(
        "update pgque.subscription set sub_active = now() - interval '1 hour'"
        " where sub_consumer = (select co_id from pgque.consumer where co_name = 'grp.a')")
    conn.execute("select pgque.touch_subconsumer(%s, %s, %s)", (QUEUE, GROUP, "a"))
    assert receive_coop(conn, "b", dead_interval="10 minutes") == []
    a = sub_row(conn, "grp.a")
    assert a is not None and a.batch == batch


# --- retry, DLQ and unregistering ----------------------------------------------------

def test_member_nack_goes_to_group_retry(queue: Conn) -> None:
    conn = queue
    conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, "audit"))
    ids = send_window(conn, 2, "n")
    msgs = receive_coop(conn, "a")
    assert nack(conn, msgs[0]) == 1
    assert ack(conn, single_batch(msgs)) == 1

    group = group_sub_id(conn)
    retry = conn.execute("select ev_id, ev_owner, ev_retry from pgque.retry_queue").fetchall()
    assert retry == [(ids[0], group, 1)]

    moved = 0
    while (row := conn.execute("select pgque.maint_retry_events()").fetchone()) and row[0]:
        moved += row[0]
    assert moved == 1
    tick(conn, QUEUE)

    back = receive_coop(conn, "b")
    assert [(m.msg_id, m.retry_count, m.payload) for m in back] == [(ids[0], 1, "n-0")]
    assert ack(conn, single_batch(back)) == 1

    # The retry copy belongs to the group only; the normal consumer saw each event once.
    seen: list[int] = []
    for _ in range(3):
        got = as_msgs(receive(conn, QUEUE, "audit"))
        if got:
            seen += [m.msg_id for m in got]
            assert ack(conn, single_batch(got)) == 1
    assert seen == ids


def test_unregister_member_with_open_batch(queue: Conn) -> None:
    conn = queue
    ids = send_window(conn, 2, "u")
    batch = single_batch(receive_coop(conn, "a"))

    with pytest.raises(psycopg.Error, match="unsupported batch_handling value: 2"):
        unregister(conn, "a", 2)
    with pytest.raises(psycopg.Error, match=(
            "cannot unregister active cooperative subconsumer coopq/grp/a "
            "without batch_handling = 1")):
        unregister(conn, "a", 0)

    assert unregister(conn, "a", 1) == 1
    assert sub_row(conn, "grp.a") is None
    assert conn.execute("select count(*) from pgque.consumer where co_name = 'grp.a'"
                        ).fetchone() == (0,)
    retry = conn.execute(
        "select ev_id, ev_owner, ev_retry,"
        "       extract(epoch from ev_retry_after - now())::int"
        "  from pgque.retry_queue order by ev_id").fetchall()
    group = group_sub_id(conn)
    assert [(r[0], r[1], r[2]) for r in retry] == [(i, group, 1) for i in ids]
    assert all(55 <= r[3] <= 65 for r in retry)
    assert ack(conn, batch) == 0

    # b remains, so the main stays cooperative.
    main = sub_row(conn, GROUP)
    assert main is not None and main.role == "coop_main"
    assert unregister(conn, "a", 1) == 0


def test_unregister_dead_letters_exhausted_events(queue: Conn) -> None:
    conn = queue
    conn.execute("update pgque.queue set queue_max_retries = 0 where queue_name = %s", (QUEUE,))
    ids = send_window(conn, 2, "d")
    receive_coop(conn, "a")

    assert unregister(conn, "a", 1) == 1
    dead = conn.execute(
        "select d.ev_id, c.co_name, d.dl_reason, d.ev_data"
        "  from pgque.dead_letter d join pgque.consumer c on c.co_id = d.dl_consumer_id"
        " order by d.ev_id").fetchall()
    assert dead == [(ids[0], GROUP, "subconsumer unregistered", "d-0"),
                    (ids[1], GROUP, "subconsumer unregistered", "d-1")]
    assert conn.execute("select count(*) from pgque.retry_queue").fetchone() == (0,)


def test_last_member_leaving_demotes_main(queue: Conn) -> None:
    conn = queue
    assert unregister(conn, "a") == 1
    main = sub_row(conn, GROUP)
    assert main is not None and main.role == "coop_main"
    assert conn.execute("select pgque.unsubscribe_subconsumer(%s, %s, %s, %s)",
                        (QUEUE, GROUP, "b", 0)).fetchone() == (1,)
    main = sub_row(conn, GROUP)
    assert main is not None and main.role == "normal"

    # Back to a plain consumer that continues from the group cursor.
    ids = send_window(conn, 2, "plain")
    assert [m.msg_id for m in as_msgs(receive(conn, QUEUE, GROUP))] == ids

    assert unregister(conn, "b") == 0
    assert unregister(conn, "a", queue="noqueue") == 0
    assert unregister(conn, "a", consumer="nobody") == 0


def test_unregister_consumer_rules_for_groups(queue: Conn) -> None:
    conn = queue
    send_window(conn, 1, "uc")
    batch = single_batch(receive_coop(conn, "a"))
    with pytest.raises(psycopg.Error, match=(
            "cannot unregister cooperative consumer with active subconsumer batches")):
        conn.execute("select pgque.unregister_consumer(%s, %s)", (QUEUE, GROUP))
    with pytest.raises(psycopg.Error, match=(
            "cannot unregister active cooperative subconsumer without forced batch handling")):
        conn.execute("select pgque.unregister_consumer(%s, %s)", (QUEUE, "grp.a"))
    assert ack(conn, batch) == 1
    with pytest.raises(psycopg.Error, match=(
            "cannot unregister cooperative main consumer with registered subconsumers")):
        conn.execute("select pgque.unregister_consumer(%s, %s)", (QUEUE, GROUP))

    assert conn.execute("select pgque.unregister_consumer(%s, %s)",
                        (QUEUE, "grp.b")).fetchone() == (1,)
    assert sub_row(conn, "grp.b") is None
    main = sub_row(conn, GROUP)
    assert main is not None and main.role == "coop_main"
    assert conn.execute("select pgque.unregister_consumer(%s, %s)",
                        (QUEUE, "grp.a")).fetchone() == (1,)
    main = sub_row(conn, GROUP)
    assert main is not None and main.role == "normal"


def test_drop_queue_force_fails_while_members_exist(queue: Conn) -> None:
    conn = queue
    with pytest.raises(psycopg.Error,
                       match="cannot unregister cooperative main consumer with registered"):
        conn.execute("select pgque.drop_queue(%s, true)", (QUEUE,))
    assert unregister(conn, "a") == 1
    assert unregister(conn, "b") == 1
    assert conn.execute("select pgque.drop_queue(%s, true)", (QUEUE,)).fetchone() == (1,)
    assert conn.execute("select count(*) from pgque.queue").fetchone() == (0,)


def test_member_window_pins_rotation(queue: Conn) -> None:
    conn = queue
    send_window(conn, 2, "pin")
    held = receive_coop(conn, "a")
    for i in range(3):
        send_window(conn, 1, f"later{i}")
        assert ack(conn, single_batch(receive_coop(conn, "b"))) == 1

    def rotate() -> int:
        conn.execute("update pgque.queue set queue_switch_time = now() - interval '1 day'"
                     " where queue_name = %s", (QUEUE,))
        conn.execute("select pgque.maint_rotate_tables_step1(%s)", (QUEUE,))
        conn.execute("select pgque.maint_rotate_tables_step2()")
        row = conn.execute("select queue_cur_table from pgque.queue where queue_name = %s",
                           (QUEUE,)).fetchone()
        assert row is not None
        return int(row[0])

    # a's window starts at the queue's first tick although the group cursor moved on.
    assert rotate() == 0
    assert receive_coop(conn, "a") == held
    assert ack(conn, single_batch(held)) == 1

    # Once released, the table can rotate. Transactions elsewhere on the server may hold
    # the snapshot horizon back for a moment, so keep the cursor moving until it does.
    deadline = time.monotonic() + 30
    current = rotate()
    while current == 0 and time.monotonic() < deadline:
        send_window(conn, 1, "more")
        assert ack(conn, single_batch(receive_coop(conn, "b"))) == 1
        current = rotate()
    assert current == 1


def test_consumer_info_lists_members(queue: Conn) -> None:
    conn = queue
    send_window(conn, 1, "info")
    batch = single_batch(receive_coop(conn, "a"))
    rows = conn.execute(
        "select consumer_name, current_batch, last_tick"
        "  from pgque.get_consumer_info(%s)", (QUEUE,)).fetchall()
    names = [r[0] for r in rows]
    assert names == ["grp", "grp.a", "grp.b"]
    by_name = {r[0]: r for r in rows}
    assert by_name["grp.a"][1] == batch
    assert by_name["grp.b"][1:] == (None, None)
    assert by_name["grp"][1] is None


# --- concurrency ---------------------------------------------------------------------

def test_members_hold_distinct_batches_at_once(db: Database, queue: Conn) -> None:
    conn = queue
    assert register(conn, "c") == 1
    windows = [send_window(conn, 2, f"par{i}") for i in range(3)]
    barrier = threading.Barrier(3, timeout=30)
    results: dict[str, list[Msg]] = {}
    errors: list[BaseException] = []

    def member(sub: str) -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as own:
                msgs = receive_coop(own, sub)
                results[sub] = msgs
                # All three members hold an open batch at this point.
                barrier.wait()
                assert ack(own, single_batch(msgs)) == 1
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=member, args=(s,)) for s in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(sorted(m.msg_id for m in msgs) for msgs in results.values()) == windows
    assert len({single_batch(msgs) for msgs in results.values()}) == 3


def test_concurrent_members_receive_every_event_once(db: Database, queue: Conn) -> None:
    conn = queue
    members = ("a", "b", "c")
    assert register(conn, "c") == 1
    windows, per_window = 25, 4
    produced: list[int] = []
    received: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    production_done = threading.Event()
    all_received = threading.Event()
    errors: list[BaseException] = []
    deadline = time.monotonic() + 120

    def producer() -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as own:
                for w in range(windows):
                    ids = send_window(own, per_window, f"c{w}")
                    with lock:
                        produced.extend(ids)
        except BaseException as exc:
            errors.append(exc)
        finally:
            production_done.set()

    def member(sub: str) -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as own:
                while not all_received.is_set() and time.monotonic() < deadline:
                    with lock:
                        if production_done.is_set() and len(received) >= len(produced):
                            all_received.set()
                            break
                    msgs = receive_coop(own, sub)
                    if not msgs:
                        all_received.wait(0.005)
                        continue
                    batch = single_batch(msgs)
                    with lock:
                        received.extend((sub, batch, m.msg_id) for m in msgs)
                    assert ack(own, batch) == 1
        except BaseException as exc:
            errors.append(exc)
            all_received.set()

    threads = [threading.Thread(target=producer)]
    threads += [threading.Thread(target=member, args=(s,)) for s in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert all_received.is_set(), f"received {len(received)} of {windows * per_window}"

    got = [ev for _, _, ev in received]
    assert sorted(got) == sorted(produced)
    assert len(set(got)) == len(got)
    # A batch belongs to exactly one member.
    owner: dict[int, str] = {}
    for sub, batch, _ in received:
        assert owner.setdefault(batch, sub) == sub
    for sub in members:
        row = sub_row(conn, f"grp.{sub}")
        assert row is not None and row.batch is None


# --- the pgque-py client -------------------------------------------------------------

def test_pgque_py_client_cooperative_api(db: Database, conn: Conn) -> None:
    make_queue(conn, QUEUE)
    with pgque.connect(db.dsn, autocommit=True) as client:
        assert client.subscribe_subconsumer(QUEUE, GROUP, "w1") == 1
        assert client.subscribe_subconsumer(QUEUE, GROUP, "w1") == 0
        assert client.subscribe_subconsumer(QUEUE, GROUP, "w2") == 1
        assert client.receive_coop(QUEUE, GROUP, "w1") == []

        first = client.send(QUEUE, {"n": 1}, type="job")
        second = client.send(QUEUE, {"n": 2}, type="job")
        client.force_next_tick(QUEUE)
        assert client.ticker(QUEUE) is not None

        msgs = client.receive_coop(QUEUE, GROUP, "w1", max_messages=10)
        assert [m.msg_id for m in msgs] == [first, second]
        assert {m.type for m in msgs} == {"job"}
        assert client.touch_subconsumer(QUEUE, GROUP, "w1") == 1
        assert client.touch_subconsumer(QUEUE, GROUP, "nobody") == 0

        # w2 takes over once w1 looks stalled; w1's token stops working.
        conn.execute(
            "update pgque.subscription set sub_active = now() - interval '1 hour'"
            " where sub_consumer = (select co_id from pgque.consumer where co_name = 'grp.w1')")
        taken = client.receive_coop(QUEUE, GROUP, "w2", dead_interval="5 minutes")
        assert [m.msg_id for m in taken] == [first, second]
        assert taken[0].batch_id != msgs[0].batch_id
        with pytest.raises(pgque.PgqueBatchNotFound):
            client.nack(msgs[0].batch_id, msgs[0])
        assert client.ack(msgs[0].batch_id) == 0

        with pytest.raises(pgque.PgqueError, match="without batch_handling = 1"):
            client.unsubscribe_subconsumer(QUEUE, GROUP, "w2")
        assert client.unsubscribe_subconsumer(QUEUE, GROUP, "w2", batch_handling=1) == 1
        assert client.unsubscribe_subconsumer(QUEUE, GROUP, "w1") == 1
        assert client.unsubscribe_subconsumer(QUEUE, GROUP, "w1") == 0

    retry = conn.execute("select ev_id from pgque.retry_queue order by ev_id").fetchall()
    assert retry == [(first,), (second,)]
    main = sub_row(conn, GROUP)
    assert main is not None and main.role == "normal"


def test_allocation_holds_main_row_until_commit(db: Database, queue: Conn) -> None:
    """The group cursor moves inside the receiving transaction, so a member that keeps
    that transaction open (e.g. receive + handlers + ack in one transaction) holds off
    every other member of its group until it commits."""
    conn = queue
    first = send_window(conn, 1, "hold1")
    second = send_window(conn, 1, "hold2")
    with psycopg.connect(db.dsn) as holder, psycopg.connect(db.dsn, autocommit=True) as other:
        assert [m.msg_id for m in receive_coop(holder, "a")] == first
        other.execute("set lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            receive_coop(other, "b")
        holder.commit()
        assert [m.msg_id for m in receive_coop(other, "b")] == second


def test_reader_role_runs_the_cooperative_cycle(conn: Conn) -> None:
    make_queue(conn, QUEUE)
    role = sql.Identifier(f"pgque_t{os.getpid()}_{uuid.uuid4().hex[:8]}_coop")
    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN IN ROLE pgque_reader").format(role))
    try:
        conn.execute(sql.SQL("SET ROLE {}").format(role))
        assert register(conn, "a") == 1
        conn.execute("RESET ROLE")
        ids = send_window(conn, 2, "reader")

        conn.execute(sql.SQL("SET ROLE {}").format(role))
        msgs = receive_coop(conn, "a", dead_interval="1 minute")
        assert [m.msg_id for m in msgs] == ids
        assert conn.execute("select pgque.touch_subconsumer(%s, %s, %s)",
                            (QUEUE, GROUP, "a")).fetchone() == (1,)
        assert nack(conn, msgs[0], retry_after="60 seconds") == 1
        assert unregister(conn, "a", 1) == 1
        conn.execute("RESET ROLE")
        assert conn.execute("select ev_id from pgque.retry_queue order by ev_id"
                            ).fetchall() == [(i,) for i in ids]
    finally:
        conn.execute("RESET ROLE")
        conn.execute(sql.SQL("DROP ROLE {}").format(role))


def test_reinstall_keeps_groups(db: Database, queue: Conn) -> None:
    conn = queue
    ids = send_window(conn, 2, "re")
    batch = single_batch(receive_coop(conn, "a"))
    engine = create_engine(db.url)
    try:
        with engine.begin() as sa_conn:
            schema.install(sa_conn)
    finally:
        engine.dispose()
    again = receive_coop(conn, "a")
    assert single_batch(again) == batch
    assert [m.msg_id for m in again] == ids
    assert ack(conn, batch) == 1
    b = sub_row(conn, "grp.b")
    assert b is not None and b.role == "coop_member"


def test_pgque_py_consumers_in_cooperative_mode(db: Database, conn: Conn) -> None:
    make_queue(conn, QUEUE)
    progress = threading.Condition()
    handled: list[tuple[str, int]] = []
    consumers: list[pgque.Consumer] = []
    for sub in ("w1", "w2"):
        assert register(conn, sub) == 1
        consumer = pgque.Consumer(db.dsn, queue=QUEUE, name=GROUP, subconsumer=sub,
                                  dead_interval="5 minutes", poll_interval=1)

        def handle(msg: pgque.Message, sub: str = sub) -> None:
            with progress:
                handled.append((sub, msg.msg_id))
                progress.notify_all()

        consumer.on("*")(handle)
        consumers.append(consumer)

    threads = [threading.Thread(target=c.start) for c in consumers]
    for t in threads:
        t.start()
    produced: list[int] = []
    try:
        for w in range(10):
            produced += send_window(conn, 3, f"py{w}")
        with progress:
            progress.wait_for(lambda: len(handled) >= len(produced), timeout=60)
    finally:
        for c in consumers:
            c.stop()
        for t in threads:
            t.join(30)
    assert sorted(ev for _, ev in handled) == sorted(produced)
    for sub in ("w1", "w2"):
        row = sub_row(conn, f"grp.{sub}")
        assert row is not None and row.batch is None


def test_unregistering_a_member_locks_the_main_row_first(conn: Conn, db: Database) -> None:
    """Lock order main -> member, as the allocator takes them: no deadlock between the two.

    The holder plays an allocator that has locked the group's main row and next wants
    the member row. The unregistering session must wait on the main row without having
    locked the member row first.
    """
    make_queue(conn, QUEUE)
    assert conn.execute("select pgque.subscribe_subconsumer(%s, %s, 's')",
                        (QUEUE, GROUP)).fetchone() == (1,)
    member = f"{GROUP}.s"
    lock_rows = (
        "select 1 from pgque.subscription s join pgque.consumer c on c.co_id = s.sub_consumer "
        "where c.co_name = %s for update of s"
    )
    with psycopg.connect(db.dsn) as holder, psycopg.connect(db.dsn, autocommit=True) as other:
        holder.execute(lock_rows, (GROUP,))
        pid = other.info.backend_pid
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(other.execute(
            "select pgque.unregister_consumer(%s, %s)", (QUEUE, member)).fetchone()))
        worker.start()
        wait_until(lambda: scalar(conn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                        " where pid = %s", pid),
                   timeout=10, what="unregister_consumer to wait on a lock")
        # The member row is free: the unregistering session waits on the main row only.
        holder.execute("set local lock_timeout = '2s'")
        holder.execute(lock_rows, (member,))
        holder.rollback()
        worker.join(10)
    assert result == [(1,)]
