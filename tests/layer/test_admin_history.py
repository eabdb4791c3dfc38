"""The admin API's figures over time (throughput, retries, dead letters) and the
dashboard's DLQ filters, against a real database with real traffic."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from engine_helpers import (
    Conn,
    drain,
    is_our_engine,
    make_queue,
    move_retries,
    nack,
    receive,
    scalar,
    send_many,
    tick,
    wait_until,
)
from queue_helpers import captured_statements
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session
from traffic_helpers import dead_letter, make_ticking_queue

from sqlalchemy_pgque import Queue, QueueNotFound, admin
from sqlalchemy_pgque.ticker import Ticker

QUIET = {"ticker_max_lag": "1 hour", "ticker_idle_period": "1 hour"}


def total(points: list[admin.RatePoint]) -> int:
    return sum(point.events for point in points)


def move_ticks_back(conn: Conn, queue: str, seconds: int) -> None:
    """Date every tick of ``queue`` so far ``seconds`` earlier, as if the traffic they
    closed in had happened then (tick times keep their order, as a ticker makes them)."""
    conn.execute(
        "UPDATE pgque.tick SET tick_time = tick_time - make_interval(secs => %s)"
        " WHERE tick_queue = (SELECT queue_id FROM pgque.queue WHERE queue_name = %s)",
        (seconds, queue))


def bury(conn: Conn, queue: str, consumer: str, count: int, type_: str, reason: str) -> None:
    """Dead-letter ``count`` new events for ``consumer``, once it has taken what was
    sent before (for the other consumers of the queue)."""
    drain(conn, queue, consumer)
    dead_letter(conn, queue, consumer, count, type_, reason)


def bucket_of(points: list[Any], moment: datetime) -> Any:
    (found,) = [p for p in points
                if p.bucket_start <= moment < p.bucket_start + (points[1].bucket_start
                                                                - points[0].bucket_start)]
    return found


def test_throughput_counts_the_events_sent_in_epoch_aligned_buckets(
    conn: Conn, engine: Engine
) -> None:
    make_ticking_queue(conn, "orders", "c")  # its first event, ticked
    make_ticking_queue(conn, "idle", "c")
    # Five minutes ago: 7 events in one tick; then 5 + 3 now, in two ticks.
    send_many(conn, "orders", 7)
    tick(conn, "orders", force=False)
    move_ticks_back(conn, "orders", 300)
    for count in (5, 3):
        send_many(conn, "orders", count)
        tick(conn, "orders", force=False)
    send_many(conn, "orders", 2)  # not ticked yet: not counted

    history = admin.throughput_history(engine, minutes=10, bucket_seconds=30)
    assert set(history) == {"orders", "idle"}
    orders, idle = history["orders"], history["idle"]
    assert len(orders) == len(idle) == 20
    assert [p.bucket_start for p in orders] == [p.bucket_start for p in idle]
    starts = [p.bucket_start for p in orders]
    assert all(s.timestamp() % 30 == 0 for s in starts)
    assert [b - a for a, b in itertools.pairwise(starts)] == \
        [timedelta(seconds=30)] * 19
    now = datetime.now(timezone.utc)
    assert starts[-1] <= now < starts[-1] + timedelta(seconds=31)

    # A queue's first event counts too (PgQue's sequence distances leave it out).
    assert total(orders) == 1 + 7 + 5 + 3 and total(idle) == 1
    # The two older ticks, milliseconds apart, may straddle a bucket boundary; so may
    # the two recent ones, or the call's clock a boundary after them.
    older = [p for p in orders if p.bucket_start <= now - timedelta(seconds=240)]
    assert sum(p.events for p in older) == 1 + 7
    assert sum(p.events for p in orders[-2:]) == 5 + 3
    assert all(p.events_per_second == pytest.approx(p.events / 30) for p in orders[:-1])
    # The bucket in progress: over the part of it that has passed, at least 1 s.
    last = orders[-1]
    assert last.events / 30 <= last.events_per_second <= last.events

    # One queue, same figures; a shorter window leaves the older bucket out.
    (alone,) = admin.throughput_history(engine, queue="orders", minutes=10,
                                        bucket_seconds=30).items()
    assert alone[0] == "orders"
    assert [(p.bucket_start, p.events) for p in alone[1]] == [
        (p.bucket_start, p.events) for p in orders]
    assert total(admin.throughput_history(engine, queue="orders", minutes=2)["orders"]) == 8
    with pytest.raises(QueueNotFound):
        admin.throughput_history(engine, queue="nosuch")
    with pytest.raises(ValueError, match="bucket_seconds"):
        admin.throughput_history(engine, bucket_seconds=0)


def test_figures_stay_the_same_once_the_statement_is_prepared(
    conn: Conn, engine: Engine
) -> None:
    """psycopg prepares a statement run five times on one connection, and PostgreSQL may
    then plan it without knowing the parameters: with every queue, or with one."""
    make_ticking_queue(conn, "a", "c")
    make_ticking_queue(conn, "b", "c")
    send_many(conn, "a", 3)
    tick(conn, "a", force=False)
    with engine.connect() as connection:
        for _ in range(8):
            every = admin.throughput_history(connection)
            one = admin.throughput_history(connection, queue="b")
            assert {name: total(points) for name, points in every.items()} == {"a": 4, "b": 1}
            assert {name: total(points) for name, points in one.items()} == {"b": 1}
            assert sum(p.dead_letters for p in admin.error_history(connection, "a")) == 0


def test_the_first_bucket_counts_the_events_of_a_tick_whose_predecessor_is_older(
    conn: Conn, engine: Engine
) -> None:
    make_ticking_queue(conn, "q", "c")
    move_ticks_back(conn, "q", 3600)
    send_many(conn, "q", 4)
    tick(conn, "q", force=False)
    assert total(admin.throughput_history(engine, queue="q", minutes=1)["q"]) == 4


def test_forced_ticks_add_no_events(conn: Conn, engine: Engine) -> None:
    """force_next_tick jumps the event sequence by 2 * ticker_max_count + 1001 with no
    event behind it: PgQue's throughput() counts the jumps, throughput_history not."""
    if not is_our_engine(conn):
        pytest.skip("the skipped-values bookkeeping is our engine's")
    make_queue(conn, "q", "c")
    tick(conn, "q")
    for _ in range(4):
        send_many(conn, "q", 3)
        tick(conn, "q")  # force_next_tick, then ticker
    tick(conn, "q")  # forced with nothing sent
    assert total(admin.throughput_history(engine, queue="q")["q"]) == 12
    upstream = scalar(conn, "SELECT sum(events) FROM pgque.throughput("
                            "'q', interval '10 minutes', interval '30 seconds')")
    assert upstream > 5 * 2000


def test_an_install_without_the_skipped_counts_gets_the_sequence_distances(
    conn: Conn, engine: Engine
) -> None:
    """Another PgQue 0.2 install has no tick_seq_skipped column (simulated by dropping
    ours, after the traffic): the same statement runs and counts as PgQue does, the
    queue's first event left out and a forced tick's jump counted."""
    if not is_our_engine(conn):
        pytest.skip("drops a column of our engine")
    make_queue(conn, "q", "c")
    send_many(conn, "q", 3)
    tick(conn, "q")  # force_next_tick, then ticker
    max_count = int(scalar(conn, "SELECT queue_ticker_max_count FROM pgque.queue"))
    ours = total(admin.throughput_history(engine, queue="q")["q"])
    conn.execute("ALTER TABLE pgque.tick DROP COLUMN tick_seq_skipped")
    theirs = total(admin.throughput_history(engine, queue="q")["q"])
    assert ours == 3
    assert theirs == 3 - 1 + 2 * max_count + 1001


@pytest.mark.parametrize("one_call", [True, False], ids=["tick_now", "two_calls"])
def test_commit_woken_ticks_add_no_events(
    conn: Conn, engine: Engine, tickers: Any, one_call: bool
) -> None:
    """The worker's ticker ticks a queue at each commit that sends to it: with
    ``tick_now`` on our engine, or ``force_next_tick`` and ``ticker`` where that is
    missing (simulated by dropping it). Either way the figures are the events sent."""
    if not is_our_engine(conn):
        pytest.skip("the skipped-values bookkeeping is our engine's")
    if not one_call:
        conn.execute("DROP FUNCTION pgque.tick_now(text)")
    make_queue(conn, "q", "c", **QUIET)
    ticks = lambda: int(scalar(conn, "SELECT count(*) FROM pgque.tick"))  # noqa: E731
    ticker = tickers(Ticker(engine, tick_period=0.05))
    assert ticker.leading.wait(10)
    queue = Queue("q", wake=True)
    sent = 0
    for commit in range(6):
        before = ticks()
        with Session(engine) as session, session.begin():
            for n in range(commit + 1):
                queue.send(session, {"n": n})
        sent += commit + 1
        wait_until(lambda before=before: ticks() > before, timeout=5, what="the woken tick")
    received: list[Any] = []
    wait_until(lambda: received.extend(drain(conn, "q", "c")) or len(received) == sent,
               what="every event in a tick")
    assert total(admin.throughput_history(engine, queue="q")["q"]) == sent == 21
    skipped = scalar(conn, "SELECT queue_seq_skipped FROM pgque.queue")
    assert (skipped == 0) is one_call


def retry(conn: Conn, count: int, *, later: int) -> None:
    """``count`` new events of queue ``q`` nacked by ``c`` and brought back by the retry
    mover, ticked and taken again; ``later`` more nacked for a retry in an hour."""
    send_many(conn, "q", count + later)
    tick(conn, "q", force=False)
    with conn.transaction():
        rows = receive(conn, "q", "c")
        assert len(rows) == count + later
        for row in rows[:count]:
            nack(conn, row)
        for row in rows[count:]:
            nack(conn, row, retry_after="1 hour")
        scalar(conn, "SELECT pgque.ack(%s)", rows[0][1])
    assert move_retries(conn) == count
    tick(conn, "q", force=False)  # closes the retries into a batch
    assert len(drain(conn, "q", "c")) == count


def test_error_history_counts_dead_letters_and_retries_where_they_happened(
    conn: Conn, engine: Engine
) -> None:
    make_ticking_queue(conn, "q", "c")
    make_ticking_queue(conn, "other", "c")
    dead_letter(conn, "q", "c", 2, "t")
    dead_letter(conn, "q", "c", 3, "t")
    dead_letter(conn, "other", "c", 4, "t")
    # Two of the five dead letters (one transaction: one dl_time) happened twenty
    # minutes ago.
    earlier = scalar(conn, "UPDATE pgque.dead_letter SET dl_time = dl_time - interval"
                           " '20 minutes' WHERE dl_id IN (SELECT dl_id FROM pgque.dead_letter"
                           " ORDER BY dl_id LIMIT 2) RETURNING dl_time")
    # Two hours ago: two retries (out of the window, with the ticks before it).
    retry(conn, 2, later=0)
    move_ticks_back(conn, "q", 7200)
    # Now: three events nacked for a retry at once, one for a retry in an hour.
    retry(conn, 3, later=1)

    points = admin.error_history(engine, "q", minutes=60, bucket_seconds=60)
    assert len(points) == 60
    assert all(p.bucket_start.timestamp() % 60 == 0 for p in points)
    now = datetime.now(timezone.utc)
    assert points[-1].bucket_start <= now < points[-1].bucket_start + timedelta(seconds=61)
    assert sum(p.dead_letters for p in points) == 5
    assert sum(p.retries for p in points) == 3
    assert bucket_of(points, earlier).dead_letters == 2
    assert points[-1].dead_letters + points[-2].dead_letters == 3
    assert points[-1].retries + points[-2].retries == 3
    assert sum(p.dead_letters for p in admin.error_history(engine, "q", minutes=10)) == 3
    assert sum(p.dead_letters + p.retries
               for p in admin.error_history(engine, "other")) == 4
    with pytest.raises(QueueNotFound):
        admin.error_history(engine, "nosuch")


def test_dlq_growth_counts_recent_dead_letters_per_queue(conn: Conn, engine: Engine) -> None:
    make_ticking_queue(conn, "a", "c")
    make_ticking_queue(conn, "b", "c")
    make_ticking_queue(conn, "calm", "c")
    dead_letter(conn, "a", "c", 3, "t")
    dead_letter(conn, "b", "c", 2, "t")
    conn.execute("UPDATE pgque.dead_letter SET dl_time = dl_time - interval '1 hour'"
                 " WHERE dl_queue_id = (SELECT queue_id FROM pgque.queue WHERE queue_name = 'b')")
    assert admin.dlq_growth(engine, minutes=10) == {"a": 3}
    assert admin.dlq_growth(engine, minutes=120) == {"a": 3, "b": 2}


def test_dlq_filters_by_reason_and_counts_agree_with_the_list(
    conn: Conn, engine: Engine
) -> None:
    make_ticking_queue(conn, "orders", "billing", "mail")
    bury(conn, "orders", "billing", 3, "order.created", reason="Timeout talking to bank")
    bury(conn, "orders", "billing", 2, "order.paid", reason="card declined")
    bury(conn, "orders", "mail", 1, "order.created", reason="SMTP timeout: 100%")

    timeouts = admin.dlq_list(engine, reason="TIMEOUT")
    assert [e.reason for e in timeouts] == ["Timeout talking to bank"] * 3 + [
        "SMTP timeout: 100%"]
    # What an operator types matches itself: no LIKE wildcards.
    assert [e.consumer for e in admin.dlq_list(engine, reason="100%")] == ["mail"]
    assert admin.dlq_list(engine, reason="1_0") == []

    later = datetime.now(timezone.utc) + timedelta(hours=1)
    for filters in ({}, {"queue": "orders"}, {"consumer": "billing"},
                    {"type": "order.created"}, {"reason": "timeout"},
                    {"consumer": "billing", "reason": "timeout"}, {"since": later},
                    {"before": later}, {"queue": "nosuch"}):
        listed = admin.dlq_list(engine, limit=None, **filters)
        assert admin.dlq_count(engine, **filters) == len(listed), filters
    assert admin.dlq_count(engine, consumer="billing", reason="timeout") == 3


def test_dlq_replay_and_purge_by_filters(conn: Conn, engine: Engine) -> None:
    make_ticking_queue(conn, "orders", "billing", "mail")
    bury(conn, "orders", "billing", 2, "order.created", reason="timeout")
    bury(conn, "orders", "billing", 2, "order.paid", reason="card declined")
    bury(conn, "orders", "mail", 1, "order.created", reason="SMTP timeout")
    bury(conn, "orders", "mail", 1, "order.paid", reason="bounced")

    # Replay by reason: each entry comes back once, to the queue.
    drain(conn, "orders", "billing")
    replayed = admin.dlq_replay(engine, consumer="billing", reason="timeout")
    assert len(replayed) == 2 and admin.dlq_count(engine, reason="timeout") == 1
    tick(conn, "orders", force=False)
    billing = drain(conn, "orders", "billing")
    assert sorted(row[0] for row in billing) == sorted(replayed.values())

    # Purge by filters deletes exactly what the same filters list.
    declined = {e.id for e in admin.dlq_list(engine, reason="DECLINED")}
    assert admin.dlq_purge(engine, reason="DECLINED") == len(declined) == 2
    assert admin.dlq_count(engine) == 2
    assert admin.dlq_purge(engine, consumer="mail", type="order.paid") == 1
    assert admin.dlq_purge(engine, older_than="1 hour", consumer="mail") == 0
    assert admin.dlq_purge(engine, older_than=0, consumer="mail") == 1
    assert admin.dlq_count(engine) == 0

    with pytest.raises(ValueError, match="at least one filter"):
        admin.dlq_purge(engine)
    with pytest.raises(ValueError, match="not both"):
        admin.dlq_purge(engine, [1], reason="x")


def test_the_dashboard_reads_need_only_pgque_reader(
    conn: Conn, engine: Engine, db: Any, app_role: str
) -> None:
    make_ticking_queue(conn, "q", "c")
    dead_letter(conn, "q", "c", 2, "t", reason="gave up")
    conn.execute(f'GRANT pgque_reader TO "{app_role}"')
    reader = create_engine(db.url)

    @event.listens_for(reader, "connect")
    def act_as_reader(dbapi_connection: Any, record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f'SET ROLE "{app_role}"')

    try:
        with reader.connect() as connection:
            assert scalar_of(connection, "SELECT current_user") == app_role
            assert total(admin.throughput_history(connection)["q"]) == 1 + 2
            assert sum(p.dead_letters for p in admin.error_history(connection, "q")) == 2
            assert admin.dlq_growth(connection) == {"q": 2}
            assert admin.dlq_count(connection, reason="GAVE") == 2
            assert [q.dlq_events for q in admin.queues(connection)] == [2]
            assert len(admin.consumers(connection, "q")) == 1
    finally:
        reader.dispose()


def scalar_of(connection: Any, query: str) -> Any:
    return connection.exec_driver_sql(query).scalar_one()


@pytest.mark.parametrize("read", [
    lambda bind: admin.queues(bind),
    lambda bind: admin.consumers(bind),
    lambda bind: admin.throughput_history(bind),
    lambda bind: admin.dlq_growth(bind),
    lambda bind: admin.dlq_list(bind, limit=None),
    lambda bind: admin.dlq_count(bind),
    lambda bind: admin.error_history(bind, "q000"),
], ids=["queues", "consumers", "throughput_history", "dlq_growth", "dlq_list", "dlq_count",
        "error_history"])
def test_a_read_is_a_fixed_number_of_statements_whatever_the_number_of_queues(
    conn: Conn, engine: Engine, read: Any
) -> None:
    def statements_with(queues: int) -> int:
        for n in range(queues):
            name = f"q{n:03}"
            if not scalar(conn, "SELECT count(*) FROM pgque.queue WHERE queue_name = %s", name):
                make_ticking_queue(conn, name, "c", "d")
                dead_letter(conn, name, "c", 1, "t")
                send_many(conn, name, 2)
                tick(conn, name, force=False)
        with captured_statements(engine) as seen, engine.connect() as connection:
            result = read(connection)
        assert result or result == 0
        return len(seen)

    assert statements_with(2) == statements_with(12) <= 2
