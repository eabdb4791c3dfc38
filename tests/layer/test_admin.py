"""The admin API against a real database with real traffic: lag, DLQ, rotation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from engine_helpers import BATCH_ID, Conn, drain, receive, send_many, tick
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from traffic_helpers import (
    dead_letter,
    keep_up_past_rotation,
    make_ticking_queue,
    rotation_blocked_by_a_stopped_consumer,
)

from sqlalchemy_pgque import DeadLetterNotFound, QueueNotFound, admin


def test_queue_and_consumer_figures_are_those_of_the_traffic(conn: Conn, engine: Engine) -> None:
    make_ticking_queue(conn, "orders", "fast", "slow")
    make_ticking_queue(conn, "idle")
    send_many(conn, "orders", 30)
    tick(conn, "orders", force=False)
    assert len(drain(conn, "orders", "fast")) == 30
    send_many(conn, "orders", 4)  # not ticked yet

    idle, orders = admin.queues(engine)
    assert (idle.queue, orders.queue) == ("idle", "orders")
    assert orders.events_not_ticked == 4
    assert orders.pending_events == 30 + 4  # slow has all 30 ticked ones to do
    assert orders.dlq_events == 0 and orders.rotation_blocked_by == ()
    assert orders.ticker_lag_seconds is not None and orders.ticker_lag_seconds >= 0
    assert idle.pending_events == 0 and idle.events_not_ticked == 0

    consumers = {c.consumer: c for c in admin.consumers(engine, "orders")}
    assert set(consumers) == {"fast", "slow"}
    assert consumers["fast"].pending_events == 0
    assert consumers["slow"].pending_events == 30
    assert consumers["slow"].batch_id is None and consumers["slow"].batch_age_seconds is None
    assert consumers["slow"].label == "orders/slow"

    # slow takes a batch and keeps it open: it shows, with its age.
    with conn.transaction():
        rows = receive(conn, "orders", "slow")
    batch = admin.consumers(engine, "orders")[1]
    assert batch.consumer == "slow" and batch.batch_id == rows[0][BATCH_ID]
    assert batch.batch_age_seconds is not None and batch.batch_age_seconds >= 0

    with pytest.raises(QueueNotFound):
        admin.queues(engine, "nosuch")


def test_stuck_consumers_are_those_behind_or_holding_a_batch_too_long(
    conn: Conn, engine: Engine
) -> None:
    make_ticking_queue(conn, "q", "alive", "stopped", "holding")
    send_many(conn, "q", 3)
    tick(conn, "q", force=False)
    for consumer in ("alive", "stopped"):
        drain(conn, "q", consumer)
    conn.execute("select pgque.receive('q', 'holding', 10)")
    send_many(conn, "q", 1)
    tick(conn, "q", force=False)
    drain(conn, "q", "alive")
    # An hour passes for the two others: every tick but the newest (alive's cursor) and
    # the activity of the one holding a batch move an hour back.
    conn.execute("update pgque.tick set tick_time = tick_time - interval '1 hour'"
                 " where tick_id < (select max(tick_id) from pgque.tick)")
    conn.execute("update pgque.subscription set sub_active = now() - interval '1 hour'"
                 " where sub_consumer = (select co_id from pgque.consumer"
                 " where co_name = 'holding')")
    stuck = admin.stuck_consumers(engine, older_than="10 minutes")
    assert [c.consumer for c in stuck] == ["holding", "stopped"]
    assert admin.stuck_consumers(engine, older_than=timedelta(hours=2)) == []


def test_a_consumer_that_stops_blocks_rotation_and_is_named(conn: Conn, engine: Engine) -> None:
    rotation_blocked_by_a_stopped_consumer(conn)
    (status,) = admin.queues(engine, "r")
    assert status.rotation_blocked_by == ("forgotten",)
    drain(conn, "r", "forgotten")
    keep_up_past_rotation(conn, "r", "forgotten", "worker")
    assert admin.queues(engine, "r")[0].rotation_blocked_by == ()


def test_dead_letters_are_listed_filtered_paged_shown_replayed_and_purged(
    conn: Conn, engine: Engine
) -> None:
    make_ticking_queue(conn, "orders", "billing")
    make_ticking_queue(conn, "mail", "sender")
    dead_letter(conn, "orders", "billing", 3, "order.created")
    dead_letter(conn, "orders", "billing", 2, "order.paid")
    dead_letter(conn, "mail", "sender", 1, "mail.send")

    everything = admin.dlq_list(engine)
    assert [e.queue for e in everything] == ["orders"] * 5 + ["mail"]
    assert everything == sorted(everything, key=lambda e: e.id)
    created = admin.dlq_list(engine, "orders", type="order.created")
    assert [e.payload for e in created] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert {(e.consumer, e.reason, e.retry_count) for e in created} == {
        ("billing", "handler gave up", 5)}
    first_page = admin.dlq_list(engine, limit=4)
    second_page = admin.dlq_list(engine, limit=4, after_id=first_page[-1].id)
    assert first_page + second_page == everything
    assert admin.dlq_list(engine, since=datetime.now(timezone.utc) + timedelta(hours=1)) == []
    assert admin.queues(engine, "orders")[0].dlq_events == 5

    assert admin.dlq_show(engine, created[0].id) == created[0]
    with pytest.raises(DeadLetterNotFound):
        admin.dlq_show(engine, 10**9)

    # Replay brings each event back once to its consumer, and only once.
    replayed = admin.dlq_replay(engine, queue="orders", type="order.created")
    assert sorted(replayed) == [e.id for e in created]
    with pytest.raises(DeadLetterNotFound):
        admin.dlq_replay(engine, [created[0].id])
    tick(conn, "orders", force=False)
    with conn.transaction():
        rows = conn.execute("select msg_id, type, payload::text"
                            " from pgque.receive('orders', 'billing', 100)").fetchall()
    assert sorted(r[0] for r in rows) == sorted(replayed.values())
    assert sorted(r[2] for r in rows) == ['{"n": 0}', '{"n": 1}', '{"n": 2}']
    with pytest.raises(ValueError, match="at least one filter"):
        admin.dlq_replay(engine)

    # Purge by id, then by age.
    paid = admin.dlq_list(engine, type="order.paid")
    assert admin.dlq_purge(engine, [paid[0].id]) == 1
    assert admin.dlq_purge(engine, older_than="1 hour") == 0
    assert admin.dlq_purge(engine, older_than=0) == 2
    assert admin.dlq_list(engine) == []


def test_a_session_call_runs_in_the_callers_transaction(conn: Conn, engine: Engine) -> None:
    make_ticking_queue(conn, "q", "c")
    dead_letter(conn, "q", "c", 1, "t")
    entry_id = admin.dlq_list(engine)[0].id
    with Session(engine) as session:
        assert list(admin.dlq_replay(session, [entry_id])) == [entry_id]
        session.rollback()
    assert [e.id for e in admin.dlq_list(engine)] == [entry_id]
