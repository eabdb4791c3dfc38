"""Ticker in-process: periodic ticks, maintenance, commit wake-ups, the leader lock."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

import pytest
from consumer_support import ticker_sessions
from engine_helpers import (
    Conn,
    drain,
    is_our_engine,
    make_queue,
    payloads,
    send,
    tick,
    wait_until,
)
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session

from sqlalchemy_pgque import Queue
from sqlalchemy_pgque import ticker as ticker_module
from sqlalchemy_pgque.ticker import Ticker

QUIET = {"ticker_max_lag": "1 hour", "ticker_idle_period": "1 hour"}


def tick_ids(conn: Conn, queue: str = "q") -> list[int]:
    return [int(r[0]) for r in conn.execute(
        "SELECT t.tick_id FROM pgque.tick t JOIN pgque.queue q ON q.queue_id = t.tick_queue "
        "WHERE q.queue_name = %s ORDER BY t.tick_id", (queue,))]


def test_periodic_ticks_follow_queue_thresholds(conn: Conn, engine: Engine, tickers: Any) -> None:
    make_queue(conn, "q", "c", ticker_max_lag="20 milliseconds")
    ticker = tickers(Ticker(engine, tick_period=0.01, wake=False))
    assert ticker.leading.wait(10)
    before = tick_ids(conn)[-1]
    send(conn, "q")
    wait_until(lambda: tick_ids(conn)[-1] > before, timeout=5, what="a periodic tick")


@pytest.mark.parametrize("in_steps", [True, False], ids=["ticker_step", "ticker"])
def test_a_periodic_pass_reaches_every_queue(
    conn: Conn, engine: Engine, tickers: Any, monkeypatch: pytest.MonkeyPatch, in_steps: bool
) -> None:
    """On our engine the pass goes in steps of a few queues (here 4, so 11 queues take
    three steps); where ``ticker_step`` is missing (another PgQue install, simulated by
    dropping it) it is one ``ticker()``. Either way every queue with events ticks."""
    if in_steps and not is_our_engine(conn):
        pytest.skip("ticker_step is our engine's")
    if not in_steps and is_our_engine(conn):
        conn.execute("DROP FUNCTION pgque.ticker_step(integer, integer)")
    monkeypatch.setattr(ticker_module, "_QUEUES_PER_STEP", 4)
    names = [f"q{n:02d}" for n in range(11)]
    for name in names:
        make_queue(conn, name, "c", ticker_max_count=1, **QUIET)
        tick(conn, name)
    ticker = tickers(Ticker(engine, tick_period=0.01, wake=False))
    assert ticker.leading.wait(10)
    before = {name: tick_ids(conn, name)[-1] for name in names}
    for name in names:
        send(conn, name)
    wait_until(lambda: all(tick_ids(conn, name)[-1] > before[name] for name in names),
               timeout=5, what="a periodic tick of every queue")


def test_a_starting_ticker_ticks_what_committed_while_none_listened(
    conn: Conn, engine: Engine, tickers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits made before the ticker listens woke nobody: it ticks their queues when it
    starts (read a page of queues at a time, here 4), whatever their thresholds, and
    leaves alone the queues without new events and the paused ones."""
    monkeypatch.setattr(ticker_module, "_QUEUES_PER_STEP", 4)
    names = [f"q{n:02d}" for n in range(10)]
    for name in names:
        make_queue(conn, name, "c", **QUIET)
        tick(conn, name)
    with_events = {"q01", "q04", "q05", "q09", "q07"}
    conn.execute("SELECT pgque.set_queue_config('q07', 'ticker_paused', 'true')")
    for name in sorted(with_events):
        send(conn, name)
    before = {name: tick_ids(conn, name)[-1] for name in names}
    ticker = tickers(Ticker(engine, tick_period=3600))
    assert ticker.leading.wait(10)
    wait_until(lambda: all(tick_ids(conn, name)[-1] > before[name]
                           for name in with_events - {"q07"}),
               timeout=5, what="catch-up ticks")
    # The first periodic pass ran before the catch-up, with these queues' thresholds an
    # hour away; nothing else ticks them.
    assert {name for name in names if tick_ids(conn, name)[-1] > before[name]} == \
        with_events - {"q07"}


def test_maintenance_moves_due_retries_back(conn: Conn, engine: Engine, tickers: Any) -> None:
    make_queue(conn, "q", "c")
    event_ids = [send(conn, "q") for _ in range(25)]
    tick(conn, "q")
    q = Queue("q")
    with Session(engine) as session, session.begin():
        messages = q.receive(session, "c")
        for message in messages:
            q.nack(session, message, retry_after=0)
        q.ack(session, messages[0].batch_id)
    assert _count(conn, "pgque.retry_queue") == 25

    ticker = tickers(Ticker(engine, tick_period=0.05, maint_interval=3600, wake=False))
    assert ticker.leading.wait(10)
    # More than one call of the mover (it moves at most 10 rows per call).
    wait_until(lambda: _count(conn, "pgque.retry_queue") == 0, timeout=5, what="the mover")
    tick(conn, "q")
    with Session(engine) as session, session.begin():
        again = q.receive(session, "c")
        q.ack(session, again[0].batch_id)
    assert sorted(m.msg_id for m in again) == event_ids
    assert {m.retry_count for m in again} == {1}


def _count(conn: Conn, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def latest_tick_time(conn: Conn, queue: str) -> Any:
    row = conn.execute(
        "SELECT max(t.tick_time) FROM pgque.tick t JOIN pgque.queue q "
        "ON q.queue_id = t.tick_queue WHERE q.queue_name = %s", (queue,)).fetchone()
    assert row is not None
    return row[0]


def test_wake_ups_are_served_between_the_steps_of_a_pass(
    conn: Conn, engine: Engine, tickers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass over thousands of queues takes tens of milliseconds; a commit's wake-up
    that arrives meanwhile is ticked after the step in progress, not after the pass.
    Here every pass ticks q00..q03 (idle thresholds of a millisecond), one queue a
    step, and one is held at q01 (a pending rename holds its event sequence, which the
    step reads) while a commit to w wakes the ticker: w ticks before that pass's q03."""
    if not is_our_engine(conn):
        pytest.skip("ticker_step is our engine's")
    monkeypatch.setattr(ticker_module, "_QUEUES_PER_STEP", 1)
    names = ["q00", "q01", "q02", "q03"]
    for name in names:
        make_queue(conn, name, "c", ticker_max_lag="1 millisecond",
                   ticker_idle_period="1 millisecond")
    make_queue(conn, "w", "c", **QUIET)
    for name in [*names, "w"]:
        tick(conn, name)
        tick(conn, name)
    row = conn.execute("SELECT queue_event_seq FROM pgque.queue WHERE queue_name = 'q01'"
                       ).fetchone()
    assert row is not None
    ticker = tickers(Ticker(engine, tick_period=0.05))
    assert ticker.leading.wait(10)

    def pass_held_at_q01() -> bool:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%ticker_step%'").fetchone()
        return row is not None and row[0] > 0

    with engine.connect() as blocker:
        # Rolled back below: it only holds the sequence's lock meanwhile.
        blocker.execute(text(f"ALTER SEQUENCE {row[0]} RENAME TO held_by_the_test"))
        wait_until(pass_held_at_q01, timeout=10, what="a pass held at q01")
        held_since = latest_tick_time(conn, "q01")
        w_before = latest_tick_time(conn, "w")
        with Session(engine) as session, session.begin():
            Queue("w").send(session, {"n": 1})
        blocker.rollback()
    wait_until(lambda: latest_tick_time(conn, "w") > w_before, timeout=10,
               what="the woken tick of w")
    w_ticked = latest_tick_time(conn, "w")

    def first_tick_after(queue: str, moment: Any) -> Any:
        found = conn.execute(
            "SELECT min(t.tick_time) FROM pgque.tick t JOIN pgque.queue q "
            "ON q.queue_id = t.tick_queue WHERE q.queue_name = %s AND t.tick_time > %s",
            (queue, moment)).fetchone()
        assert found is not None
        return found[0]

    wait_until(lambda: first_tick_after("q03", held_since) is not None, timeout=10,
               what="the held pass to reach q03")
    held_pass_q01 = first_tick_after("q01", held_since)
    held_pass_q03 = first_tick_after("q03", held_pass_q01)
    assert held_pass_q01 < w_ticked < held_pass_q03, (held_pass_q01, w_ticked, held_pass_q03)


def test_commit_wakes_an_immediate_tick_of_that_queue(
    conn: Conn, engine: Engine, tickers: Any
) -> None:
    make_queue(conn, "q", "c", **QUIET)
    make_queue(conn, "other", "c", **QUIET)
    ticker = tickers(Ticker(engine, tick_period=0.05))
    assert ticker.leading.wait(10)
    wait_until(lambda: len(tick_ids(conn)) >= 2 and len(tick_ids(conn, "other")) >= 2,
               what="the first periodic round")
    before, other_before = tick_ids(conn), tick_ids(conn, "other")

    with Session(engine) as session, session.begin():
        Queue("q").send(session, {"n": 1})
    wait_until(lambda: len(tick_ids(conn)) == len(before) + 1, timeout=5, what="the woken tick")
    assert [json.loads(p) for p in payloads(drain(conn, "q", "c"))] == [{"n": 1}]
    assert tick_ids(conn, "other") == other_before


@pytest.mark.parametrize("one_call", [True, False], ids=["tick_now", "two_calls"])
def test_a_woken_tick_is_one_call_where_the_engine_has_tick_now(
    conn: Conn, engine: Engine, tickers: Any, one_call: bool
) -> None:
    """On our engine the woken tick is ``tick_now``, which moves no sequence; where it
    is missing (another PgQue install, simulated by dropping it) the ticker falls back
    to ``force_next_tick`` and ``ticker``, whose forced jump queue_seq_skipped counts."""
    if not is_our_engine(conn):
        pytest.skip("tick_now is our engine's")
    if not one_call:
        conn.execute("DROP FUNCTION pgque.tick_now(text)")
    make_queue(conn, "q", "c", **QUIET)
    ticker = tickers(Ticker(engine, tick_period=0.05))
    assert ticker.leading.wait(10)
    wait_until(lambda: len(tick_ids(conn)) >= 2, what="the first periodic round")
    before = len(tick_ids(conn))
    for n in range(3):
        with Session(engine) as session, session.begin():
            Queue("q").send(session, {"n": n})
        wait_until(lambda n=n: len(tick_ids(conn)) == before + n + 1, timeout=5,
                   what="the woken tick")
    assert [json.loads(p)["n"] for p in payloads(drain(conn, "q", "c"))] == [0, 1, 2]
    skipped = conn.execute("SELECT queue_seq_skipped FROM pgque.queue").fetchone()
    assert skipped is not None
    assert (skipped[0] == 0) is one_call


def test_wake_ups_close_together_share_ticks(conn: Conn, engine: Engine, tickers: Any) -> None:
    make_queue(conn, "q", "c", **QUIET)
    window = 0.5
    ticker = tickers(Ticker(engine, tick_period=0.05, coalesce_window=window))
    assert ticker.leading.wait(10)
    wait_until(lambda: len(tick_ids(conn)) >= 2, what="the first periodic round")
    before = len(tick_ids(conn))

    commits = 60
    started = time.monotonic()
    with Session(engine) as session:
        for n in range(commits):
            with session.begin():
                Queue("q").send(session, {"n": n})
    elapsed = time.monotonic() - started
    received: list[int] = []

    def all_received() -> bool:
        received.extend(json.loads(p)["n"] for p in payloads(drain(conn, "q", "c")))
        return len(received) >= commits

    # The last commit is covered by a tick at most one window later.
    wait_until(all_received, timeout=10, what="every commit to be ticked")
    assert sorted(received) == list(range(commits))
    wake_ticks = len(tick_ids(conn)) - before
    assert 1 <= wake_ticks <= elapsed / window + 2 < commits


def test_one_ticker_leads_and_another_takes_over(conn: Conn, engine: Engine,
                                                 tickers: Any) -> None:
    make_queue(conn, "q", "c")
    first = tickers(Ticker(engine, tick_period=0.05, lock_retry_interval=0.05))
    assert first.leading.wait(10)
    second = tickers(Ticker(engine, tick_period=0.05, lock_retry_interval=0.05))
    wait_until(lambda: ticker_sessions(conn) == 2, what="the second ticker to connect")
    assert not second.leading.is_set()

    first.stop()
    assert second.leading.wait(10)
    assert not first.leading.is_set()


def test_ticker_reconnects_after_its_backend_is_terminated(
    conn: Conn, engine: Engine, tickers: Any
) -> None:
    make_queue(conn, "q", "c", ticker_max_lag="20 milliseconds")
    ticker = tickers(Ticker(engine, tick_period=0.02))
    assert ticker.leading.wait(10)
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE 'sqlalchemy_pgque ticker %' "
        "AND datname = current_database()"
    )
    wait_until(lambda: ticker_sessions(conn) == 1 and ticker.leading.is_set(), timeout=10,
               what="the ticker to come back")
    before = tick_ids(conn)[-1]
    send(conn, "q")
    wait_until(lambda: tick_ids(conn)[-1] > before, timeout=5, what="ticks after reconnecting")


def test_stop_returns_promptly(engine: Engine, tickers: Any) -> None:
    ticker = Ticker(engine, tick_period=1.0)
    thread = threading.Thread(target=ticker.run, daemon=True)
    thread.start()
    assert ticker.leading.wait(10)
    ticker.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert not ticker.leading.is_set()


def test_maintenance_rotates_tables_with_step_two_in_between(
    conn: Conn, engine: Engine, tickers: Any
) -> None:
    conn.execute("SELECT pgque.create_queue('rot')")
    conn.execute("SELECT pgque.set_queue_config('rot', 'rotation_period', '1 millisecond')")
    ticker = tickers(Ticker(engine, tick_period=0.05, maint_interval=0.05,
                            rotate_step2_interval=3600))
    assert ticker.leading.wait(10)
    tables_seen: set[int] = set()

    def rotated_twice() -> bool:
        row = conn.execute(
            "SELECT queue_cur_table FROM pgque.queue WHERE queue_name = 'rot'").fetchone()
        assert row is not None
        tables_seen.add(int(row[0]))
        return len(tables_seen) >= 3

    # A second rotation needs maint_rotate_tables_step2() to have run after the first.
    wait_until(rotated_twice, timeout=10, what="two rotations")


def test_ticker_backs_off_while_ticking_fails_after_it_connects(
    conn: Conn, db: Any, tickers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Connecting works but every tick fails (a server that takes no writes, as a
    standby reached before a failover completes): the delays must grow to the cap,
    not start over at each reconnection, and the outage is never declared over."""
    make_queue(conn, "q", "c")
    engine = create_engine(db.url)

    @event.listens_for(engine, "connect")
    def read_only(dbapi_connection: Any, record: object) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET default_transaction_read_only = on")
        dbapi_connection.commit()

    caplog.set_level(logging.DEBUG, logger="sqlalchemy_pgque")
    try:
        tickers(Ticker(engine, wake=False))
        wait_until(lambda: max(_retry_delays(caplog), default=0) >= 1.0, timeout=20,
                   what="the backoff to reach a second")
    finally:
        engine.dispose()
    assert "database back" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    found = (re.search(r"(?:reconnecting|retrying) in ([0-9.]+) s", r.getMessage())
             for r in caplog.records)
    return [float(match.group(1)) for match in found if match]
