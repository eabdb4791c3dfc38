"""True pending figures under commit-woken ticking.

``force_next_tick`` moves a queue's event sequence 2 * ticker_max_count + 1000 past a
wasted value, and PgQue 0.2 reports backlog as a sequence distance, so a ticker that
forces a tick on every commit would inflate ``get_consumer_info().pending_events`` and
``get_queue_info()``'s ``ev_new`` / ``ev_per_sec`` by about 2000 per commit. Our engine
subtracts the values forced ticks skipped (``queue.queue_seq_skipped``,
``tick.tick_seq_skipped``; see 30_ticker.sql); without forced ticks the figures stay the
spec's sequence distances. These are extensions of the 0.2 reference, so the module is
skipped when another PgQue install is under test (``PGQUE_SCHEMA_SQL``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import Database
from engine_helpers import (
    BATCH_ID,
    Conn,
    drain,
    ids,
    is_our_engine,
    make_queue,
    receive,
    receive_and_ack,
    scalar,
    send_many,
    tick,
    wait_until,
)
from sqlalchemy import Engine

from sqlalchemy_pgque import schema

MAX_COUNT = 500  # the default ticker_max_count: each forced tick skips 2 * 500 + 1001


@pytest.fixture(autouse=True)
def _our_engine_only(conn: Conn) -> Iterator[None]:
    if not is_our_engine(conn):
        pytest.skip("pending figures net of forced ticks are an extension of PgQue 0.2")
    yield


def pending(conn: Conn, consumer: str, queue: str = "q") -> int:
    """pending_events of one subscription, checked equal through all three overloads."""
    def rows(query: str, *params: object) -> list[tuple[Any, ...]]:
        return conn.execute(query, params).fetchall()

    figures = {
        int(r[1]) for r in
        rows("select consumer_name, pending_events from pgque.get_consumer_info(%s, %s)",
             queue, consumer)
        + [r for r in rows("select consumer_name, pending_events"
                           " from pgque.get_consumer_info(%s)", queue) if r[0] == consumer]
        + [r for r in rows("select consumer_name, pending_events, queue_name"
                           " from pgque.get_consumer_info()")
           if r[0] == consumer and r[2] == queue]
    }
    assert len(figures) == 1, figures
    return figures.pop()


def ev_new(conn: Conn, queue: str = "q") -> int:
    return int(scalar(conn, "select ev_new from pgque.get_queue_info(%s)", queue))


def raw_distance(conn: Conn, consumer: str, queue: str = "q") -> int:
    """The spec's sequence distance from the consumer's cursor tick to the latest tick."""
    return int(scalar(
        conn,
        "select latest.tick_event_seq - cur.tick_event_seq"
        "  from pgque.subscription s join pgque.queue q on q.queue_id = s.sub_queue"
        "  join pgque.consumer c on c.co_id = s.sub_consumer"
        "  join pgque.tick cur on cur.tick_queue = s.sub_queue and cur.tick_id = s.sub_last_tick"
        "  cross join lateral (select t.tick_event_seq from pgque.tick t"
        "        where t.tick_queue = s.sub_queue order by t.tick_id desc limit 1) latest"
        " where q.queue_name = %s and c.co_name = %s", queue, consumer))


# --- commit-woken ticking, one session ------------------------------------------------


@pytest.mark.parametrize("forced_first", [False, True],
                         ids=["first-event-before-first-force", "first-force-before-events"])
def test_pending_events_count_events_not_forced_ticks(conn: Conn, forced_first: bool) -> None:
    """300 events in 100 commits, each commit followed by force_next_tick + ticker(q):
    pending_events is 300, though the sequence moved 100 forced jumps further."""
    make_queue(conn, "q", "c")
    if forced_first:
        tick(conn)  # the sequence's first value goes to the forced tick
    sent: list[int] = []
    late_joiner_from = 0
    for commit in range(100):
        sent.extend(send_many(conn, "q", 3))
        tick(conn)
        if commit == 59:
            assert scalar(conn, "select pgque.subscribe('q', 'late')") == 1
            late_joiner_from = len(sent)
    assert pending(conn, "c") == 300
    assert pending(conn, "late") == 300 - late_joiner_from
    assert raw_distance(conn, "c") > 100 * (2 * MAX_COUNT + 1000)  # what 0.2 reports
    assert ev_new(conn) == 0

    first_window = receive_and_ack(conn, "q", "c")
    assert [int(r[0]) for r in first_window] == sent[:3]
    assert pending(conn, "c") == 300 - 3
    # An open batch does not move the cursor: the figure drops at ack.
    rows = receive(conn, "q", "c", max_return=2)
    assert len(rows) == 2
    assert pending(conn, "c") == 297
    assert scalar(conn, "select pgque.ack(%s)", rows[0][BATCH_ID]) == 1
    assert pending(conn, "c") == 294

    assert ids(drain(conn, "q", "c")) == sent[6:]
    assert pending(conn, "c") == 0
    assert pending(conn, "late") == 300 - late_joiner_from


def test_tick_now_keeps_the_figures_true_beside_forced_ticks(conn: Conn) -> None:
    """tick_now, the worker's one-call woken tick, ticks without a forced jump: mixed
    with force_next_tick + ticker, pending_events and ev_new still count events, and
    its ticks add nothing to the skipped count."""
    make_queue(conn, "q", "c")
    tick(conn)  # the sequence's first value goes to a forced tick: every event counts
    sent: list[int] = []
    for commit in range(60):
        sent.extend(send_many(conn, "q", 3))
        if commit % 2:
            tick(conn)
        else:
            conn.execute("select pgque.tick_now('q')")
    assert pending(conn, "c") == 180
    assert ev_new(conn) == 0
    skipped = scalar(conn, "select queue_seq_skipped from pgque.queue")
    sent.extend(send_many(conn, "q", 5))
    assert ev_new(conn) == 5
    assert scalar(conn, "select pgque.tick_now('q')") is not None
    assert ev_new(conn) == 0
    assert pending(conn, "c") == 185
    assert scalar(conn, "select queue_seq_skipped from pgque.queue") == skipped
    assert ids(drain(conn, "q", "c")) == sent
    assert pending(conn, "c") == 0


def test_ev_new_counts_events_since_the_latest_tick(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    tick(conn)
    assert ev_new(conn) == 0
    # force_next_tick alone: the sequence jumped, no event was inserted.
    conn.execute("select pgque.force_next_tick('q')")
    assert ev_new(conn) == 0
    assert conn.execute("select queue_name from pgque.get_queue_info()"
                        " where ev_new > 0").fetchall() == []
    send_many(conn, "q", 5)
    assert ev_new(conn) == 5
    conn.execute("select pgque.force_next_tick('q')")
    assert ev_new(conn) == 5
    # A different ticker_max_count changes the size of the next jump.
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_count', '7')")
    conn.execute("select pgque.force_next_tick('q')")
    send_many(conn, "q", 2)
    assert ev_new(conn) == 7
    assert scalar(conn, "select pgque.ticker('q')") is not None
    assert ev_new(conn) == 0
    assert pending(conn, "c") == 7
    send_many(conn, "q", 4)
    assert ev_new(conn) == 4


def test_ev_per_sec_counts_events_not_forced_ticks(conn: Conn) -> None:
    make_queue(conn, "q")
    tick(conn)
    for _ in range(30):
        send_many(conn, "q", 2)
        tick(conn)
        time.sleep(0.002)
    # Over the latest tick and the oldest one with id >= latest - 20: 20 commits of 2.
    row = conn.execute(
        "select i.ev_per_sec, extract(epoch from latest.tick_time - oldest.tick_time)"
        "  from pgque.get_queue_info('q') i, pgque.queue q,"
        "  lateral (select * from pgque.tick t where t.tick_queue = q.queue_id"
        "           order by t.tick_id desc limit 1) latest,"
        "  lateral (select * from pgque.tick t where t.tick_queue = q.queue_id"
        "           and t.tick_id >= latest.tick_id - 20 order by t.tick_id limit 1) oldest"
        " where q.queue_name = 'q'").fetchone()
    assert row is not None
    rate, span = float(row[0]), float(row[1])
    assert rate * span == pytest.approx(40)


# --- without forced ticks the figures are the spec's sequence distances ---------------


def test_figures_without_forced_ticks_are_sequence_distances(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_count', '5')")
    conn.execute("select pgque.set_queue_config('q', 'ticker_max_lag', '1 hour')")
    ticks = 0
    for _ in range(23):
        send_many(conn, "q", 1)
        if scalar(conn, "select pgque.ticker('q')") is not None:
            ticks += 1
    assert ticks >= 4
    assert scalar(conn, "select sum(queue_seq_skipped) from pgque.queue") == 0
    latest_seq = int(scalar(conn, "select max(tick_event_seq) from pgque.tick"))
    # Event ids run 1..23 without gaps; the latest tick covers 1..latest_seq. The queue's
    # first event does not move last_value (spec §6.5), so it goes uncounted.
    assert pending(conn, "c") == raw_distance(conn, "c") == latest_seq - 1
    assert ev_new(conn) == 23 - latest_seq
    assert len(drain(conn, "q", "c")) == latest_seq
    assert pending(conn, "c") == 0


def test_external_ticks_keep_sequence_distances(conn: Conn) -> None:
    make_queue(conn, "x", "c")
    tick(conn, "x")
    send_many(conn, "x", 3)
    tick(conn, "x")
    conn.execute("select pgque.set_queue_config('x', 'external_ticker', 'true')")
    latest = int(scalar(conn, "select max(tick_id) from pgque.tick"
                              " join pgque.queue on queue_id = tick_queue"
                              " where queue_name = 'x'"))
    seq = int(scalar(conn, "select max(tick_event_seq) from pgque.tick"
                           " join pgque.queue on queue_id = tick_queue"
                           " where queue_name = 'x'"))
    conn.execute("select pgque.ticker('x', %s, now(), %s)", (latest + 10, seq + 40))
    # The source says 40 more; the forced jumps before it are still left out.
    assert pending(conn, "c", "x") == 3 + 40


# --- force_next_tick and a concurrent tick ---------------------------------------------


def test_a_tick_waits_for_the_transaction_that_forced_it(conn: Conn, db: Database) -> None:
    """force_next_tick holds the queue-row lock that ticks take first, so a tick never
    sees the jumped sequence without the skipped count that goes with it."""
    make_queue(conn, "q", "c")
    tick(conn)
    send_many(conn, "q", 4)
    result: dict[str, Any] = {}
    with psycopg.connect(db.dsn) as forcing, psycopg.connect(db.dsn, autocommit=True) as ticking:
        forcing.execute("select pgque.force_next_tick('q')")
        ticking_pid = ticking.info.backend_pid

        def concurrent_tick() -> None:
            result["tick"] = scalar(ticking, "select pgque.ticker('q')")

        waiter = threading.Thread(target=concurrent_tick)
        waiter.start()
        wait_until(lambda: scalar(conn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                        " where pid = %s", ticking_pid),
                   timeout=15, what="the tick to wait for the lock")
        forcing.commit()
        waiter.join(timeout=30)
        assert not waiter.is_alive()
    assert result["tick"] is not None
    assert pending(conn, "c") == 4
    assert ev_new(conn) == 0


# --- upgrade in place -------------------------------------------------------------------


def test_install_upgrades_an_older_engine_in_place(conn: Conn, engine: Engine) -> None:
    """An install made before the skipped-value columns existed (simulated by dropping
    them) is upgraded by schema.install: events, cursors and open batches stay, the new
    columns start at 0, and forced ticks from then on are not counted. Installing again
    changes nothing."""
    make_queue(conn, "q", "c", "d")
    old_ids: list[int] = []
    for _ in range(3):
        old_ids.extend(send_many(conn, "q", 2))
        tick(conn)
    open_batch = receive(conn, "q", "d")
    assert len(open_batch) == 2
    conn.execute("alter table pgque.tick drop column tick_seq_skipped")
    conn.execute("alter table pgque.queue drop column queue_seq_skipped")
    # Queued at upgrade time: sent on the older engine, not ticked yet.
    queued = send_many(conn, "q", 3)
    # What the older engine reports for c: its forced jumps counted as events.
    inflated = raw_distance(conn, "c")
    assert inflated > 3 * (2 * MAX_COUNT + 1000)

    def install() -> None:
        with engine.begin() as sa_conn:
            schema.install(sa_conn, os.environ.get("PGQUE_SCHEMA_SQL") or None)

    install()
    assert scalar(conn, "select queue_seq_skipped from pgque.queue") == 0
    assert scalar(conn, "select count(*) from pgque.tick where tick_seq_skipped <> 0") == 0
    # Ticks taken before the upgrade keep their figures (nothing recorded their jumps)...
    assert pending(conn, "c") == inflated
    assert ev_new(conn) == 3
    # ...and forced ticks from now on add only their events.
    for _ in range(4):
        tick(conn)
        queued.extend(send_many(conn, "q", 1))
    tick(conn)
    assert pending(conn, "c") == inflated + len(queued)
    assert scalar(conn, "select pgque.subscribe('q', 'e')") == 1
    for _ in range(5):
        send_many(conn, "q", 2)
        tick(conn)
    assert pending(conn, "e") == 10
    assert ev_new(conn) == 0

    queue_before = conn.execute("select * from pgque.queue order by queue_id").fetchall()
    ticks_before = conn.execute("select * from pgque.tick order by tick_queue, tick_id").fetchall()
    install()
    assert conn.execute("select * from pgque.queue order by queue_id").fetchall() == queue_before
    assert conn.execute(
        "select * from pgque.tick order by tick_queue, tick_id").fetchall() == ticks_before

    # Nothing queued was lost, the open batch included.
    assert receive(conn, "q", "d") == open_batch
    assert scalar(conn, "select pgque.ack(%s)", open_batch[0][BATCH_ID]) == 1
    later = ids(drain(conn, "q", "e"))
    assert len(later) == 10
    assert ids(drain(conn, "q", "c")) == old_ids + queued + later
    assert ids(drain(conn, "q", "d")) == old_ids[2:] + queued + later
    assert pending(conn, "c") == pending(conn, "d") == pending(conn, "e") == 0


# --- concurrency ------------------------------------------------------------------------


def test_pending_events_stay_true_under_concurrent_sends_and_forced_ticks(
        conn: Conn, db: Database) -> None:
    """Producer threads commit while another session forces and takes ticks in a loop,
    the way the commit-woken ticker does; pending_events ends within 1 % of the number
    of events the consumer has not received (a producer drawing a sequence value inside
    a force_next_tick is the only source of error, see 30_ticker.sql)."""
    make_queue(conn, "q", "c")
    producers, commits = 4, 150
    sent: list[int] = []
    sent_lock = threading.Lock()
    producing_done = threading.Event()
    errors: list[BaseException] = []
    forced = [0]

    def produce(worker: int) -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as c:
                for i in range(commits):
                    if i % 3 == 0:
                        new_ids = send_many(c, "q", 3)
                    else:
                        new_ids = [int(scalar(c, "select pgque.send('q', %s::text)",
                                              f"{worker}-{i}"))]
                    with sent_lock:
                        sent.extend(new_ids)
        except BaseException as exc:
            errors.append(exc)

    def commit_woken_ticker() -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as c:
                while not producing_done.is_set():
                    tick(c)
                    forced[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    ticker = threading.Thread(target=commit_woken_ticker)
    ticker.start()
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive(), "producers did not finish"
    finally:
        producing_done.set()
        ticker.join(timeout=30)
    assert errors == []
    tick(conn)
    assert forced[0] >= 10, "the ticker loop hardly ran"

    true_count = len(sent)
    assert true_count == producers * (commits // 3 * 3 + commits - commits // 3)
    figure = pending(conn, "c")
    assert abs(figure - true_count) <= true_count / 100, (figure, true_count)
    assert raw_distance(conn, "c") > forced[0] * (2 * MAX_COUNT + 1000)
    assert abs(ev_new(conn)) <= true_count / 100
    received = ids(drain(conn, "q", "c"))
    assert sorted(received) == sorted(sent)
    assert pending(conn, "c") == 0
