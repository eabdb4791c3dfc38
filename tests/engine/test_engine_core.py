"""Core engine behaviour through the public PgQue 0.2 SQL API.

Every test talks to a real PostgreSQL through ``pgque.*`` functions and the tables the
spec names as observable (``queue``, ``tick``, ``subscription``), so the suite also
checks another PgQue 0.2 install (``PGQUE_SCHEMA_SQL=...``). Producing, ticking and
consuming must happen in separate transactions: the ``conn`` fixture is autocommit, so
each statement is one transaction unless a test opens one explicitly.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from engine_helpers import (
    Conn,
    drain,
    ids,
    make_queue,
    payloads,
    receive,
    scalar,
    tick,
    wait_until,
)
from psycopg import sql

from sqlalchemy_pgque import schema


def tick_times(conn: Conn, queue: str = "q") -> list[tuple[int, datetime]]:
    rows = conn.execute(
        "select t.tick_id, t.tick_time from pgque.tick t join pgque.queue q"
        " on q.queue_id = t.tick_queue where q.queue_name = %s order by t.tick_id",
        (queue,)).fetchall()
    return [(int(str(r[0])), r[1]) for r in rows]


# --- snapshot rule -------------------------------------------------------------------


def test_own_events_stay_out_of_a_tick_after_newer_transactions_finished(
        conn: Conn, db: Any) -> None:
    """A later transaction that finishes first moves snapshot xmax past our own xid.

    pg_current_snapshot() leaves the caller's own xid out of its in-progress list, so
    without care the tick taken in the sending transaction would count our own,
    uncommitted events as committed.
    """
    make_queue(conn, "q", "c")
    with psycopg.connect(db.dsn, autocommit=True) as other, conn.transaction():
        sent = scalar(conn, "select pgque.send('q', %s::jsonb)", json.dumps({"n": 1}))
        other.execute("select pg_current_xact_id()")  # a newer xid, committed at once
        conn.execute("select pgque.force_next_tick('q')")
        assert scalar(conn, "select pgque.ticker('q')") is not None
        assert receive(conn, "q", "c") == []
    tick(conn)
    assert ids(receive(conn, "q", "c")) == [sent]


def test_send_tick_receive_in_one_transaction_returns_nothing(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    with conn.transaction():
        sent = scalar(conn, "select pgque.send('q', %s::jsonb)", json.dumps({"n": 1}))
        conn.execute("select pgque.force_next_tick('q')")
        assert scalar(conn, "select pgque.ticker('q')") is not None
        assert receive(conn, "q", "c") == []
    # The event falls into the next window once its transaction has committed.
    tick(conn)
    rows = receive(conn, "q", "c")
    assert ids(rows) == [sent]
    assert json.loads(str(rows[0][3])) == {"n": 1}


def test_committed_send_is_received_after_a_tick(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    sent = scalar(conn, "select pgque.send('q', 'order.created', %s::jsonb)", '{"id": 7}')
    assert receive(conn, "q", "c") == []  # no tick yet, no delivery
    tick(conn)
    rows = receive(conn, "q", "c")
    assert len(rows) == 1
    msg_id, batch_id, ev_type, payload, retry, created, *extras = rows[0]
    assert msg_id == sent
    assert isinstance(batch_id, int)
    assert ev_type == "order.created"
    assert json.loads(str(payload)) == {"id": 7}
    assert retry is None
    assert isinstance(created, datetime)
    assert extras == [None, None, None, None]
    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 1


def test_rolled_back_send_never_appears(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("begin")
    conn.execute("select pgque.send('q', 'lost'::text)")
    conn.execute("rollback")
    kept = scalar(conn, "select pgque.send('q', 'kept'::text)")
    tick(conn)
    rows = receive(conn, "q", "c")
    assert payloads(rows) == ["kept"]
    assert ids(rows) == [kept]
    conn.execute("select pgque.ack(%s)", (rows[0][1],))
    tick(conn)
    assert receive(conn, "q", "c") == []


def test_transaction_open_across_a_tick_lands_in_a_later_batch(conn: Conn, db: Any) -> None:
    make_queue(conn, "q", "c")
    dsn = db.dsn
    with psycopg.connect(dsn) as producer:
        early = scalar(producer, "select pgque.send('q', 'in-flight'::text)")
        # Ticks taken while the producer is open must not include nor lose the event.
        tick(conn)
        assert receive(conn, "q", "c") == []
        later = scalar(conn, "select pgque.send('q', 'after'::text)")
        tick(conn)
        rows = receive(conn, "q", "c")
        assert ids(rows) == [later]
        conn.execute("select pgque.ack(%s)", (rows[0][1],))
        producer.commit()
    tick(conn)
    rows = receive(conn, "q", "c")
    assert ids(rows) == [early]
    assert payloads(rows) == ["in-flight"]


# --- delivery ------------------------------------------------------------------------


def test_fan_out_every_subscriber_sees_every_event(conn: Conn) -> None:
    make_queue(conn, "q", "a", "b", "c")
    sent = [scalar(conn, "select pgque.send('q', %s::jsonb)", json.dumps({"i": i}))
            for i in range(5)]
    tick(conn)
    batches = set()
    for consumer in ("a", "b", "c"):
        rows = receive(conn, "q", consumer)
        assert ids(rows) == sent
        batches.add(rows[0][1])
        assert scalar(conn, "select pgque.ack(%s)", rows[0][1]) == 1
    assert len(batches) == 3  # one batch token per subscription


def test_new_subscriber_starts_at_the_latest_tick(conn: Conn) -> None:
    make_queue(conn, "q", "early")
    conn.execute("select pgque.send('q', 'before'::text)")
    tick(conn)
    assert scalar(conn, "select pgque.subscribe('q', 'late')") == 1
    assert scalar(conn, "select pgque.subscribe('q', 'late')") == 0
    conn.execute("select pgque.send('q', 'after'::text)")
    tick(conn)
    assert payloads(receive(conn, "q", "late")) == ["after"]
    assert payloads(receive(conn, "q", "early")) == ["before"]


def test_ack_returns_one_then_zero_with_warning(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.send('q', 'x'::text)")
    tick(conn)
    batch_id = receive(conn, "q", "c")[0][1]
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(str(diag.message_primary)))
    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 1
    assert notices == []
    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 0
    assert any("not found" in n and str(batch_id) in n for n in notices)
    assert scalar(conn, "select pgque.finish_batch(%s)", batch_id) == 0


def test_receive_restreams_the_open_batch_until_ack(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    sent = scalar(conn, "select pgque.send_batch('q', %s::text[])", ["1", "2", "3"])
    tick(conn)
    first = receive(conn, "q", "c")
    conn.execute("select pgque.send('q', '4'::text)")
    tick(conn)
    second = receive(conn, "q", "c")
    assert first == second  # same batch, same rows, nothing from the newer tick
    assert ids(first) == sent
    assert scalar(conn, "select pgque.ack(%s)", first[0][1]) == 1
    assert payloads(receive(conn, "q", "c")) == ["4"]


def test_max_return_limits_rows_and_ack_skips_the_unread_rest(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    sent = scalar(conn, "select pgque.send_batch('q', %s::text[])",
                  [str(i) for i in range(5)])
    assert isinstance(sent, list)
    tick(conn)
    part = receive(conn, "q", "c", max_return=2)
    assert ids(part) == sent[:2]
    # A partial batch stays open: the next receive restarts at its first row.
    again = receive(conn, "q", "c", max_return=3)
    assert ids(again) == sent[:3]
    assert {r[1] for r in part} == {r[1] for r in again}
    assert scalar(conn, "select pgque.ack(%s)", part[0][1]) == 1
    tick(conn)
    assert receive(conn, "q", "c") == []


def test_empty_window_is_finished_by_receive(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    tick(conn)
    assert receive(conn, "q", "c") == []
    open_batch = scalar(
        conn,
        "select s.sub_batch from pgque.subscription s join pgque.consumer c"
        " on c.co_id = s.sub_consumer where c.co_name = 'c'")
    assert open_batch is None
    conn.execute("select pgque.send('q', 'next'::text)")
    tick(conn)
    assert payloads(receive(conn, "q", "c")) == ["next"]


def test_next_batch_returns_same_id_until_finished(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    assert scalar(conn, "select pgque.next_batch('q', 'c')") is None
    conn.execute("select pgque.send('q', 'x'::text)")
    prev_tick = tick_times(conn)[-1][0]
    new_tick = tick(conn)
    batch_id = scalar(conn, "select pgque.next_batch('q', 'c')")
    assert isinstance(batch_id, int)
    assert scalar(conn, "select pgque.next_batch('q', 'c')") == batch_id
    info = conn.execute("select * from pgque.next_batch_info('q', 'c')").fetchone()
    assert info is not None
    assert info[0] == batch_id
    assert info[1:3] == (new_tick, prev_tick)
    events = conn.execute("select ev_id, ev_type, ev_data from pgque.get_batch_events(%s)",
                          (batch_id,)).fetchall()
    assert [(e[1], e[2]) for e in events] == [("default", "x")]
    assert scalar(conn, "select pgque.finish_batch(%s)", batch_id) == 1
    assert scalar(conn, "select pgque.next_batch('q', 'c')") is None


def test_batch_ids_are_unique_across_queues(conn: Conn) -> None:
    make_queue(conn, "q1", "c")
    make_queue(conn, "q2", "c")
    seen = []
    for _ in range(3):
        for q in ("q1", "q2"):
            conn.execute("select pgque.send(%s, 'x'::text)", (q,))
            tick(conn, q)
            rows = receive(conn, q, "c")
            seen.append(rows[0][1])
            conn.execute("select pgque.ack(%s)", (rows[0][1],))
    assert len(set(seen)) == len(seen)


def test_unsubscribe_and_resubscribe(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.send('q', 'old'::text)")
    tick(conn)
    assert scalar(conn, "select pgque.unsubscribe('q', 'c')") == 1
    assert scalar(conn, "select pgque.unsubscribe('q', 'c')") == 0
    with pytest.raises(psycopg.ProgrammingError, match="Not subscriber to queue: q/c"):
        receive(conn, "q", "c")
    assert scalar(conn, "select pgque.subscribe('q', 'c')") == 1
    conn.execute("select pgque.send('q', 'new'::text)")
    tick(conn)
    assert payloads(receive(conn, "q", "c")) == ["new"]


def test_register_consumer_at_repositions_the_cursor(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    start = tick_times(conn)[-1][0]
    conn.execute("select pgque.send('q', 'one'::text)")
    tick(conn)
    rows = receive(conn, "q", "c")
    assert payloads(rows) == ["one"]
    conn.execute("select pgque.ack(%s)", (rows[0][1],))
    # Moving back to the earlier tick replays the window after it.
    assert scalar(conn, "select pgque.register_consumer_at('q', 'c', %s)", start) == 0
    assert payloads(receive(conn, "q", "c")) == ["one"]
    with pytest.raises(psycopg.ProgrammingError, match="tick not found: 999999"):
        conn.execute("select pgque.register_consumer_at('q', 'c', 999999)")


# --- producing -----------------------------------------------------------------------


def test_send_batch_returns_ids_in_input_order(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    data = [json.dumps({"i": i}) for i in range(20)]
    batch_ids = scalar(conn, "select pgque.send_batch('q', 'bulk', %s::jsonb[])", data)
    assert isinstance(batch_ids, list) and len(batch_ids) == 20
    assert batch_ids == sorted(batch_ids) and len(set(batch_ids)) == 20
    single = scalar(conn, "select pgque.send('q', 'x'::text)")
    assert isinstance(single, int) and single > batch_ids[-1]
    tick(conn)
    rows = receive(conn, "q", "c")
    by_id = {r[0]: r for r in rows}
    for event_id, text in zip(batch_ids, data, strict=True):
        assert by_id[event_id][2] == "bulk"
        assert json.loads(str(by_id[event_id][3])) == json.loads(text)
    assert ids(rows) == [*batch_ids, single]


def test_send_batch_overloads_and_null_elements(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    text_ids = scalar(conn, "select pgque.send_batch('q', %s::text[])", ["{\"a\":1}", None])
    typed_ids = scalar(conn, "select pgque.send_batch('q', 't', %s::text[])", ["raw"])
    json_ids = scalar(conn, "select pgque.send_batch('q', %s::jsonb[])", ['{"b":  2}'])
    assert scalar(conn, "select pgque.send_batch('nosuch', '{}'::jsonb[])") == []
    assert scalar(conn, "select pgque.send_batch('q', 't', '{}'::text[])") == []
    tick(conn)
    rows = receive(conn, "q", "c")
    got = [(r[0], r[2], r[3]) for r in rows]
    assert got == [
        (text_ids[0], "default", '{"a":1}'),
        (text_ids[1], "default", None),
        (typed_ids[0], "t", "raw"),
        (json_ids[0], "default", '{"b": 2}'),
    ]


def test_jsonb_is_canonical_and_text_is_verbatim(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    messy = '{"b":1,   "a":[1,2]}'
    conn.execute("select pgque.send('q', %s::jsonb)", (messy,))
    conn.execute("select pgque.send('q', %s::text)", (messy,))
    conn.execute("select pgque.send('q', 'typed', %s::text)", ("not json at all",))
    conn.execute("select pgque.send('q', 'typed', %s::jsonb)", ("[1,  2]",))
    conn.execute("select pgque.send('q', 'untyped literal')")  # resolves to the text form
    conn.execute("select pgque.send('q', null::jsonb)")
    tick(conn)
    rows = receive(conn, "q", "c")
    assert [(r[2], r[3]) for r in rows] == [
        ("default", '{"a": [1, 2], "b": 1}'),
        ("default", messy),
        ("typed", "not json at all"),
        ("typed", "[1, 2]"),
        ("default", "untyped literal"),
        ("default", None),
    ]


def test_insert_event_extras_reach_the_message(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    seven = scalar(conn, "select pgque.insert_event('q', 'ty', 'da', 'e1', 'e2', 'e3', 'e4')")
    three = scalar(conn, "select pgque.insert_event('q', 'ty3', 'da3')")
    tick(conn)
    rows = receive(conn, "q", "c")
    assert rows[0][0] == seven and rows[0][2:4] == ("ty", "da")
    assert list(rows[0][6:10]) == ["e1", "e2", "e3", "e4"]
    assert rows[1][0] == three and list(rows[1][6:10]) == [None, None, None, None]


# --- ticker --------------------------------------------------------------------------


def test_pending_events_tick_at_max_count(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_lag', '1 hour')")
    tick(conn)
    conn.execute("select pgque.send_batch('q', %s::text[])", ([str(i) for i in range(499)],))
    assert scalar(conn, "select pgque.ticker('q')") is None
    conn.execute("select pgque.send('q', 'last'::text)")
    assert scalar(conn, "select pgque.ticker('q')") is not None
    assert len(drain(conn, "q", "c")) == 500

    conn.execute("select pgque.set_queue_config('q', 'ticker_max_count', '5')")
    conn.execute("select pgque.send_batch('q', %s::text[])", (["a", "b", "c", "d"],))
    assert scalar(conn, "select pgque.ticker('q')") is None
    conn.execute("select pgque.send('q', 'e'::text)")
    assert scalar(conn, "select pgque.ticker('q')") is not None


def test_pending_events_tick_once_max_lag_passed(conn: Conn) -> None:
    make_queue(conn, "q")
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_lag', '1 second')")
    tick(conn)
    conn.execute("select pgque.subscribe('q', 'c')")
    conn.execute("select pgque.send('q', 'x'::text)")
    # Thresholds are checked against the latest tick: one pending event and almost no
    # lag means no tick yet.
    assert scalar(conn, "select pgque.ticker('q')") is None
    wait_until(lambda: scalar(conn, "select pgque.ticker('q')"), timeout=15,
               what="a tick")
    (_, before), (_, after) = tick_times(conn)[-2:]
    assert after - before >= timedelta(seconds=1)
    assert payloads(receive(conn, "q", "c")) == ["x"]


def test_idle_queue_backs_off(conn: Conn) -> None:
    make_queue(conn, "q")
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_lag', '400 milliseconds')")
    # A fresh queue ticks again at the next call; right after that, an idle queue waits.
    assert scalar(conn, "select pgque.ticker('q')") is not None
    assert scalar(conn, "select pgque.ticker('q')") is None
    for _ in range(2):
        wait_until(lambda: scalar(conn, "select pgque.ticker('q')"), timeout=15,
               what="a tick")
    times = [t for _, t in tick_times(conn)]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert gaps[0] >= timedelta(milliseconds=200)  # max_lag / 2
    assert gaps[1] >= 2 * gaps[0]  # spacing doubles while idle


def test_force_next_tick_makes_the_next_ticker_call_tick(conn: Conn) -> None:
    make_queue(conn, "q")
    conn.execute("select pgque.ticker('q')")
    assert scalar(conn, "select pgque.ticker('q')") is None
    latest = tick_times(conn)[-1][0]
    assert scalar(conn, "select pgque.force_next_tick('q')") == latest
    assert scalar(conn, "select pgque.ticker('q')") == latest + 1
    assert scalar(conn, "select pgque.force_tick('q')") == latest + 1
    assert scalar(conn, "select pgque.ticker('q')") == latest + 2


def test_ticker_all_counts_ticked_queues(conn: Conn) -> None:
    for name in ("q1", "q2", "q3"):
        make_queue(conn, name)
    assert scalar(conn, "select pgque.ticker()") == 3  # fresh queues tick at once
    assert scalar(conn, "select pgque.ticker()") == 0
    conn.execute("select pgque.force_next_tick('q2')")
    assert scalar(conn, "select pgque.ticker()") == 1
    conn.execute("select pgque.force_next_tick('q3')")
    conn.execute("select pgque.set_queue_config('q3', 'ticker_paused', 'true')")
    conn.execute("select pgque.set_queue_config('q1', 'external_ticker', 'true')")
    conn.execute("select pgque.force_next_tick('q2')")
    assert scalar(conn, "select pgque.ticker()") == 1
    conn.execute("select pgque.set_queue_config('q3', 'ticker_paused', 'false')")
    assert scalar(conn, "select pgque.ticker()") == 1


def test_tick_notifies_the_queue_channel(conn: Conn, db: Any) -> None:
    make_queue(conn, "Mixed Case")
    with psycopg.connect(db.dsn, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier("pgque_Mixed Case")))
        tick_id = tick(conn, "Mixed Case")
        got = list(listener.notifies(timeout=10, stop_after=1))
    assert [(n.channel, n.payload) for n in got] == [("pgque_Mixed Case", str(tick_id))]


def test_paused_and_external_queues_refuse_local_ticks(conn: Conn) -> None:
    make_queue(conn, "p")
    make_queue(conn, "x")
    conn.execute("select pgque.set_queue_config('p', 'ticker_paused', 'true')")
    conn.execute("select pgque.set_queue_config('x', 'queue_external_ticker', 'true')")
    with pytest.raises(psycopg.ProgrammingError, match="paused"):
        conn.execute("select pgque.ticker('p')")
    with pytest.raises(psycopg.ProgrammingError, match="external tick source"):
        conn.execute("select pgque.ticker('x')")
    with pytest.raises(psycopg.ProgrammingError, match="paused"):
        conn.execute("select pgque.force_next_tick('p')")
    with pytest.raises(psycopg.ProgrammingError, match="external"):
        conn.execute("select pgque.force_next_tick('x')")


def test_external_ticker(conn: Conn) -> None:
    make_queue(conn, "x", "c")
    conn.execute("select pgque.set_queue_config('x', 'external_ticker', 'true')")
    stamp = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert scalar(conn, "select pgque.ticker('x', 10, %s, 100)", stamp) == 10
    row = conn.execute(
        "select t.tick_time, t.tick_event_seq from pgque.tick t join pgque.queue q"
        " on q.queue_id = t.tick_queue where q.queue_name = 'x' and t.tick_id = 10").fetchone()
    assert row == (stamp, 100)
    # The event sequence follows the external event_seq, so new ids sort after it.
    sent = scalar(conn, "select pgque.send('x', 'e'::text)")
    assert isinstance(sent, int) and sent > 100
    assert scalar(conn, "select pgque.ticker('x', 11, %s, %s)", stamp, sent) == 11
    assert receive(conn, "x", "c") == []  # window 1..10 is empty and gets finished
    assert payloads(receive(conn, "x", "c")) == ["e"]
    with pytest.raises(psycopg.ProgrammingError, match="tick_id"):
        conn.execute("select pgque.ticker('x', 11, now(), %s)", (sent,))
    with pytest.raises(psycopg.ProgrammingError, match="event_seq"):
        conn.execute("select pgque.ticker('x', 12, now(), 5)")
    make_queue(conn, "local")
    with pytest.raises(psycopg.ProgrammingError,
                       match="is not configured for external ticker"):
        conn.execute("select pgque.ticker('local', 50, now(), 50)")
    with pytest.raises(psycopg.ProgrammingError, match="queue not found: nosuch"):
        conn.execute("select pgque.ticker('nosuch', 50, now(), 50)")


# --- queue management ----------------------------------------------------------------


def test_create_and_drop_queue(conn: Conn) -> None:
    assert scalar(conn, "select pgque.create_queue('q')") == 1
    assert scalar(conn, "select pgque.create_queue('q')") == 0
    assert scalar(conn, "select count(*) from pgque.tick t join pgque.queue q"
                        " on q.queue_id = t.tick_queue where q.queue_name = 'q'") == 1
    conn.execute("select pgque.subscribe('q', 'c')")
    with pytest.raises(psycopg.ProgrammingError,
                       match="cannot drop queue, consumers still attached"):
        conn.execute("select pgque.drop_queue('q')")
    assert scalar(conn, "select pgque.drop_queue('q', true)") == 1
    assert scalar(conn, "select count(*) from pgque.queue") == 0
    assert scalar(conn, "select count(*) from pgque.subscription") == 0
    assert scalar(conn, "select count(*) from pgque.tick") == 0
    with pytest.raises(psycopg.ProgrammingError, match="No such event queue"):
        conn.execute("select pgque.drop_queue('q')")
    # The name is free again and the new queue works from scratch.
    make_queue(conn, "q", "c")
    conn.execute("select pgque.send('q', 'again'::text)")
    tick(conn)
    assert payloads(receive(conn, "q", "c")) == ["again"]


def test_set_queue_config_updates_and_resets(conn: Conn) -> None:
    make_queue(conn, "q")

    def column(name: str) -> object:
        return scalar(conn, sql.SQL("select {} from pgque.queue where queue_name = 'q'")
                      .format(sql.Identifier(name)).as_string(conn))

    assert scalar(conn, "select pgque.set_queue_config('q', 'ticker_max_count', '7')") == 1
    assert column("queue_ticker_max_count") == 7
    conn.execute("select pgque.set_queue_config('q', 'queue_ticker_max_lag', '250 ms')")
    assert column("queue_ticker_max_lag") == timedelta(milliseconds=250)
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '2')")
    assert column("queue_max_retries") == 2
    conn.execute("select pgque.set_queue_config('q', 'rotation_period', '5 minutes')")
    assert column("queue_rotation_period") == timedelta(minutes=5)
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_count', null)")
    assert column("queue_ticker_max_count") == 500
    conn.execute("select pgque.set_queue_config('q', 'max_retries', null)")
    assert column("queue_max_retries") is None


# --- concurrency ---------------------------------------------------------------------


def _is_our_engine(conn: Conn) -> bool:
    comment = scalar(conn, "select obj_description(oid, 'pg_namespace') from pg_namespace"
                           " where nspname = 'pgque'")
    return str(comment or "").startswith("sqlalchemy-pgque ")


@pytest.mark.parametrize("tickers", [1, 3])
def test_concurrent_producers_deliver_every_event_once(
        conn: Conn, db: Any, tickers: int) -> None:
    if tickers > 1 and not _is_our_engine(conn):
        pytest.skip("serialised concurrent ticker(queue) calls are an optional hardening")
    dsn = db.dsn
    make_queue(conn, "q", "c")
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_count', '7')")
    producers, per_producer = 4, 60
    sent: list[int] = []
    sent_lock = threading.Lock()
    producing_done = threading.Event()
    errors: list[BaseException] = []

    def produce(worker: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                for i in range(per_producer):
                    if i % 3 == 0:
                        with c.transaction():
                            got = scalar(c, "select pgque.send_batch('q', %s::text[])",
                                         [f"{worker}-{i}-a", f"{worker}-{i}-b"])
                        assert isinstance(got, list)
                        new_ids = [int(x) for x in got]
                    else:
                        new_ids = [int(str(scalar(c, "select pgque.send('q', %s::text)",
                                                  f"{worker}-{i}")))]
                    with sent_lock:
                        sent.extend(new_ids)
        except BaseException as exc:
            errors.append(exc)

    def run_ticker() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                while not producing_done.is_set():
                    c.execute("select pgque.ticker('q')")
                    time.sleep(0.001)
                for _ in range(2):
                    c.execute("select pgque.force_next_tick('q')")
                    c.execute("select pgque.ticker('q')")
        except BaseException as exc:
            errors.append(exc)

    producer_threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    ticker_threads = [threading.Thread(target=run_ticker) for _ in range(tickers)]
    for t in producer_threads + ticker_threads:
        t.start()
    received: list[int] = []
    deadline = time.monotonic() + 120
    try:
        while any(t.is_alive() for t in producer_threads):
            if time.monotonic() > deadline:
                pytest.fail("producers did not finish")
            rows = receive(conn, "q", "c")
            received.extend(int(str(r[0])) for r in rows)
            if rows:
                conn.execute("select pgque.ack(%s)", (rows[0][1],))
    finally:
        producing_done.set()
        for t in producer_threads + ticker_threads:
            t.join()
    assert errors == []
    tick(conn)
    received.extend(ids(drain(conn, "q", "c")))
    assert len(sent) == producers * per_producer * 4 // 3
    duplicates = [i for i, n in Counter(received).items() if n > 1]
    assert duplicates == []
    assert sorted(received) == sorted(sent)

    ticks = conn.execute(
        "select t.tick_id, t.tick_event_seq, pg_snapshot_xmin(t.tick_snapshot)::text::bigint,"
        " pg_snapshot_xmax(t.tick_snapshot)::text::bigint from pgque.tick t"
        " join pgque.queue q on q.queue_id = t.tick_queue where q.queue_name = 'q'"
        " order by t.tick_id").fetchall()
    for earlier, later in itertools.pairwise(ticks):
        assert later[1] >= earlier[1]
        assert later[2] >= earlier[2] and later[3] >= earlier[3]


def test_get_batch_cursor_fetches_quick_rows_then_the_rest(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    sent = scalar(conn, "select pgque.send_batch('q', %s::text[])",
                  [str(i) for i in range(5)])
    assert isinstance(sent, list)
    tick(conn)
    batch_id = scalar(conn, "select pgque.next_batch('q', 'c')")
    with conn.transaction():
        quick = conn.execute("select ev_id from pgque.get_batch_cursor(%s, 'evs', 2)",
                             (batch_id,)).fetchall()
        rest = conn.execute("fetch all from evs").fetchall()
    assert [r[0] for r in quick + rest] == sent
    with conn.transaction():
        odd = conn.execute(
            "select ev_data from pgque.get_batch_cursor(%s, 'odd', 10, 'ev_data::int %% 2 = 1')",
            (batch_id,)).fetchall()
    assert odd == [("1",), ("3",)]


def test_reinstall_keeps_queues_cursors_and_events(conn: Conn, engine: Any) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.send('q', 'before'::text)")
    tick(conn)
    open_batch = receive(conn, "q", "c")
    conn.execute("select pgque.send('q', 'pending'::text)")
    with engine.begin() as sa_conn:
        schema.install(sa_conn, os.environ.get("PGQUE_SCHEMA_SQL") or None)
    assert receive(conn, "q", "c") == open_batch
    conn.execute("select pgque.ack(%s)", (open_batch[0][1],))
    tick(conn)
    assert payloads(receive(conn, "q", "c")) == ["pending"]
    conn.execute("set role pgque_writer")
    try:
        conn.execute("select pgque.send('q', 'as writer'::text)")
    finally:
        conn.execute("reset role")


def test_concurrent_receives_of_one_consumer_serialise(conn: Conn, db: Any) -> None:
    make_queue(conn, "q", "c")
    sent = scalar(conn, "select pgque.send('q', 'x'::text)")
    tick(conn)
    results: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(db.dsn) as first, psycopg.connect(db.dsn, autocommit=True) as second:
        first_rows = receive(first, "q", "c")  # transaction stays open, holding the cursor row
        second_pid = second.info.backend_pid

        def second_receive() -> None:
            results["second"] = receive(second, "q", "c")

        waiter = threading.Thread(target=second_receive)
        waiter.start()
        wait_until(lambda: scalar(conn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                  " where pid = %s", second_pid))
        assert "second" not in results
        first.commit()
        waiter.join(timeout=30)
        assert not waiter.is_alive()
    assert ids(first_rows) == [sent]
    assert results["second"] == first_rows  # same open batch, re-streamed


def test_sessions_keep_sending_while_other_sessions_create_and_drop_queues(
        conn: Conn, db: Any) -> None:
    """A producer session that has sent before (and so may hold cached plans for the
    event tables of every queue) still routes each event to the right queue after
    another session dropped one queue and created others, and a queue created in a
    REPEATABLE READ transaction that could not see a concurrently created one leaves
    both usable."""
    make_queue(conn, "q1", "c")
    make_queue(conn, "q2", "c")
    sent: dict[str, list[int]] = {"q1": [], "q3": [], "qa": [], "qb": []}
    with psycopg.connect(db.dsn, autocommit=True) as producer:
        sent["q1"].append(scalar(producer, "select pgque.send('q1', 'before'::text)"))
        scalar(producer, "select pgque.send('q2', 'before'::text)")
        sent["q1"].append(scalar(producer, "select pgque.insert_event('q1', 't', 'extras',"
                                           " 'a', 'b', 'c', 'd')"))

        assert scalar(conn, "select pgque.drop_queue('q2', true)") == 1
        make_queue(conn, "q3", "c")

        sent["q1"].append(scalar(producer, "select pgque.send('q1', 'after'::text)"))
        sent["q3"].append(scalar(producer, "select pgque.send('q3', 't', '{\"n\": 3}'::jsonb)"))
        with pytest.raises(psycopg.ProgrammingError, match="queue not found: q2"):
            producer.execute("select pgque.send('q2', 'gone'::text)")

        with psycopg.connect(db.dsn) as snapshot_holder:
            snapshot_holder.execute("set transaction isolation level repeatable read")
            snapshot_holder.execute("select 1")
            make_queue(conn, "qa", "c")
            assert scalar(snapshot_holder, "select pgque.create_queue('qb')") == 1
            snapshot_holder.commit()
        conn.execute("select pgque.subscribe('qb', 'c')")
        for queue in ("qa", "qb", "q3", "q1"):
            sent[queue].append(scalar(producer, "select pgque.send(%s, %s::text)",
                                      queue, f"late {queue}"))

    received: dict[str, list[tuple[object, ...]]] = {}
    for queue in sent:
        tick(conn, queue)
        received[queue] = receive(conn, queue, "c")
    assert {queue: ids(rows) for queue, rows in received.items()} == sent
    assert payloads(received["q1"]) == ["before", "extras", "after", "late q1"]
    assert list(received["q1"][1][6:10]) == ["a", "b", "c", "d"]
    assert payloads(received["q3"]) == ['{"n": 3}', "late q3"]
    assert payloads(received["qa"]) == ["late qa"]
