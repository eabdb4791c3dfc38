"""The immediate Queue calls (receive, ack, nack, subscriptions, ticks) and error mapping."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import pickle
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from functools import partial

import pytest
from conftest import Database, Server
from engine_helpers import Conn, make_queue, tick
from sqlalchemy import Connection, Engine, create_engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from sqlalchemy_pgque import (
    BatchInProgress,
    BatchNotFound,
    ConsumerModeConflict,
    ConsumerNotSubscribed,
    EngineNotInstalled,
    InvalidName,
    Message,
    MessageNotInBatch,
    PermissionDenied,
    Queue,
    QueueNotFound,
)
from sqlalchemy_pgque._duration import as_seconds
from sqlalchemy_pgque.errors import _translate
from sqlalchemy_pgque.testing import sent

jobs_q = Queue("jobs")


@pytest.fixture
def jobs(engine: Engine, conn: Conn) -> Engine:
    make_queue(conn, jobs_q.name, "worker")
    return engine


Tick = Callable[[], int]


@pytest.fixture
def tick_jobs(conn: Conn) -> Tick:
    """A forced tick of ``jobs`` on the psycopg ``conn`` fixture, which these tests cannot
    name: ``conn`` is their SQLAlchemy connection."""
    return partial(tick, conn, "jobs")


def test_subscribe_and_unsubscribe_report_changes(jobs: Engine) -> None:
    with jobs.begin() as conn:
        assert jobs_q.subscribe(conn, "reporting") is True
        assert jobs_q.subscribe(conn, "reporting") is False
        assert jobs_q.unsubscribe(conn, "reporting") is True
        assert jobs_q.unsubscribe(conn, "reporting") is False


def test_receive_returns_typed_messages_and_ack_finishes_the_batch(
    jobs: Engine, tick_jobs: Tick
) -> None:
    with jobs.begin() as conn:
        first = jobs_q.send_now(conn, {"job": 1}, type="build", extra1="a", extra3="c")
        second = jobs_q.send_now(conn, [2])
    tick_jobs()
    with Session(jobs) as session, session.begin():
        messages = jobs_q.receive(session, "worker")
        assert [m.msg_id for m in messages] == [first, second]
        msg = messages[0]
        assert isinstance(msg, Message)
        assert (msg.type, msg.payload, msg.raw_payload) == ("build", {"job": 1}, '{"job": 1}')
        assert (msg.extra1, msg.extra2, msg.extra3, msg.extra4) == ("a", None, "c", None)
        assert msg.retry_count == 0
        assert isinstance(msg.created_at, datetime) and msg.created_at.tzinfo is not None
        assert messages[1].type == "default"
        assert messages[0].batch_id == messages[1].batch_id
        with pytest.raises(dataclasses.FrozenInstanceError):
            msg.payload = None  # type: ignore[misc]
        assert jobs_q.ack(session, msg.batch_id) == 1
        assert jobs_q.ack(session, msg.batch_id) == 0
    with jobs.begin() as conn:
        assert jobs_q.receive(conn, "worker") == []


def test_receive_limits_the_messages_returned(jobs: Engine, tick_jobs: Tick) -> None:
    with jobs.begin() as conn:
        ids = [jobs_q.send_now(conn, i) for i in range(5)]
    tick_jobs()
    with jobs.begin() as conn:
        assert [m.msg_id for m in jobs_q.receive(conn, "worker", 2)] == ids[:2]


def test_payload_that_is_not_json_is_kept_as_text(jobs: Engine) -> None:
    with jobs.begin() as conn:
        conn.execute(text("SELECT pgque.send('jobs', 'raw', CAST('not json' AS text))"))
    messages = sent(jobs, jobs_q)
    assert [(m.payload, m.raw_payload) for m in messages] == [("not json", "not json")]


def test_received_message_behaves_like_a_constructed_one(jobs: Engine, tick_jobs: Tick) -> None:
    # Received payloads are decoded on first access: each operation below gets a message
    # fresh from receive (the open batch is re-read) and must see the decoded value.
    with jobs.begin() as conn:
        event_id = jobs_q.send_now(conn, {"order": [1, 2]}, type="t", extra2="x")
        conn.execute(text("SELECT pgque.send('jobs', 'raw', CAST('not json' AS text))"))
    tick_jobs()
    with jobs.begin() as conn:
        def fresh() -> list[Message]:
            return jobs_q.receive(conn, "worker")

        received = fresh()[0]
        built = Message(msg_id=event_id, batch_id=received.batch_id, type="t",
                        payload={"order": [1, 2]}, retry_count=0,
                        created_at=received.created_at, extra2="x",
                        raw_payload='{"order": [1, 2]}')
        assert received == built
        assert repr(fresh()[0]) == repr(built)
        assert dataclasses.asdict(fresh()[0])["payload"] == {"order": [1, 2]}
        assert pickle.loads(pickle.dumps(fresh()[0])) == built
        assert copy.copy(fresh()[0]) == built
        assert dataclasses.replace(fresh()[0], msg_id=0).payload == {"order": [1, 2]}
        assert received.payload is received.payload
        assert [(m.payload, m.raw_payload) for m in fresh()][1] == ("not json", "not json")
        assert dataclasses.replace(fresh()[1]).payload == "not json"
        with pytest.raises(dataclasses.FrozenInstanceError):
            fresh()[0].payload = None  # type: ignore[misc]
        assert jobs_q.ack(conn, received.batch_id) == 1


def test_nack_redelivers_then_dead_letters(jobs: Engine, tick_jobs: Tick) -> None:
    with jobs.begin() as conn:
        conn.execute(text("SELECT pgque.set_queue_config('jobs', 'max_retries', '1')"))
        event_id = jobs_q.send_now(conn, {"flaky": True})
    tick_jobs()
    for attempt in range(2):
        with jobs.begin() as conn:
            [msg] = jobs_q.receive(conn, "worker")
            assert (msg.msg_id, msg.retry_count) == (event_id, attempt)
            assert jobs_q.nack(conn, msg, retry_after=timedelta(0), reason="it broke") == 1
            assert jobs_q.ack(conn, msg.batch_id) == 1
        with jobs.begin() as conn:
            moved = conn.execute(text("SELECT pgque.maint_retry_events()")).scalar_one()
            assert moved == (1 if attempt == 0 else 0)
        tick_jobs()
    with jobs.begin() as conn:
        assert jobs_q.receive(conn, "worker") == []
        dead = conn.execute(text("SELECT ev_id, dl_reason FROM pgque.dlq_inspect('jobs')")).all()
    assert [tuple(row) for row in dead] == [(event_id, "it broke")]


DURATION_TEXTS = ["5 minutes", "1 hour 30 minutes", "500 ms", "00:05:00", "1:30", "30",
                  "1.5 hours", "2 days", "10 secs", " 3 Min ", "1 week", "250 milliseconds",
                  "90 s", "1h 2m 3s", "0.25 seconds", "1 day 02:00:00", "10 days 10:00:00",
                  "-5 minutes", "1.5"]


@pytest.mark.parametrize("text_value", DURATION_TEXTS)
def test_duration_text_reads_as_postgresql_reads_it(engine: Engine, text_value: str) -> None:
    with engine.connect() as conn:
        expected = conn.execute(
            text("SELECT extract(epoch FROM CAST(:value AS interval))"), {"value": text_value}
        ).scalar_one()
    assert as_seconds(text_value) == pytest.approx(float(expected))


def test_durations_as_text(jobs: Engine, tick_jobs: Tick) -> None:
    for bad in ["", " ", "soon", "5 months", "5 minutes ago", "nan", "inf", "infinity",
                "1e3", "\u0663 s", "PT5M"]:
        with pytest.raises(ValueError, match="not a duration"):
            as_seconds(bad)
    for not_finite in [float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="not finite"):
            as_seconds(not_finite)
    with jobs.begin() as conn:
        jobs_q.send_now(conn, {"later": True})
    tick_jobs()
    with jobs.begin() as conn:
        [msg] = jobs_q.receive(conn, "worker")
        jobs_q.nack(conn, msg, retry_after="2 minutes")
        delay = conn.execute(text(
            "SELECT extract(epoch FROM ev_retry_after - now()) FROM pgque.retry_queue"
        )).scalar_one()
    assert float(delay) == pytest.approx(120, abs=1)


def test_nack_errors(jobs: Engine, tick_jobs: Tick) -> None:
    with jobs.begin() as conn:
        jobs_q.send_now(conn, {"x": 1})
    tick_jobs()
    with jobs.begin() as conn:
        [msg] = jobs_q.receive(conn, "worker")
        with pytest.raises(MessageNotInBatch, match="not found in batch"), conn.begin_nested():
            jobs_q.nack(conn, dataclasses.replace(msg, msg_id=msg.msg_id + 1000))
        jobs_q.ack(conn, msg.batch_id)
        with pytest.raises(BatchNotFound, match=str(msg.batch_id)), conn.begin_nested():
            jobs_q.nack(conn, msg, retry_after=5)


def test_cooperative_consumer_calls(jobs: Engine, tick_jobs: Tick) -> None:
    with jobs.begin() as conn:
        assert jobs_q.subscribe_subconsumer(conn, "pool", "w1") is True
        assert jobs_q.subscribe_subconsumer(conn, "pool", "w1") is False
    with jobs.begin() as conn:
        event_id = jobs_q.send_now(conn, {"coop": 1})
    tick_jobs()
    with jobs.begin() as conn:
        [msg] = jobs_q.receive_coop(conn, "pool", "w1", dead_interval=30.0)
        assert msg.msg_id == event_id
        assert jobs_q.touch_subconsumer(conn, "pool", "w1") == 1
        assert jobs_q.touch_subconsumer(conn, "pool", "nobody") == 0
        assert jobs_q.ack(conn, msg.batch_id) == 1
        assert jobs_q.receive_coop(conn, "pool", "w1") == []
        assert jobs_q.unsubscribe_subconsumer(conn, "pool", "w1") is True
        assert jobs_q.unsubscribe_subconsumer(conn, "pool", "w1") is False


def test_cooperative_misuse_gets_named_errors(jobs: Engine, tick_jobs: Tick) -> None:
    with jobs.begin() as conn:
        jobs_q.subscribe_subconsumer(conn, "pool", "w1")
        msg_id = jobs_q.send_now(conn, {"coop": 1})
    tick_jobs()
    with jobs.connect() as conn, pytest.raises(ConsumerModeConflict, match="with a subconsumer"):
        jobs_q.receive(conn, "pool")
    with jobs.connect() as conn, pytest.raises(ConsumerModeConflict, match="conversion"):
        jobs_q.subscribe_subconsumer(conn, "worker", "w1")  # worker is a normal consumer
    with jobs.begin() as conn:
        assert jobs_q.subscribe_subconsumer(conn, "worker", "w1", convert_normal=True)
        assert [m.msg_id for m in jobs_q.receive_coop(conn, "worker", "w1")] == [msg_id]
    with jobs.connect() as conn, pytest.raises(ConsumerModeConflict, match="subconsumers"):
        jobs_q.unsubscribe(conn, "pool")
    with jobs.begin() as conn:
        [msg] = jobs_q.receive_coop(conn, "pool", "w1")
    with jobs.connect() as conn, pytest.raises(BatchInProgress, match="batch_handling = 1"):
        jobs_q.unsubscribe_subconsumer(conn, "pool", "w1")
    with jobs.connect() as conn, pytest.raises(ValueError, match="0 or 1"):
        jobs_q.unsubscribe_subconsumer(conn, "pool", "w1", batch_handling=2)
    with jobs.begin() as conn:
        assert jobs_q.ack(conn, msg.batch_id) == 1


def test_ticks(jobs: Engine) -> None:
    with jobs.begin() as conn:
        latest = jobs_q.force_next_tick(conn)
        assert isinstance(latest, int)
        new_tick = jobs_q.ticker(conn)
        assert new_tick is not None and new_tick > latest


def test_queue_not_found(jobs: Engine) -> None:
    missing = Queue("missing")
    calls: list[Callable[[Connection], object]] = [
        lambda conn: missing.send_now(conn, {"x": 1}),
        lambda conn: missing.send_now(conn, {"x": 1}, extra1="e"),
        lambda conn: missing.subscribe(conn, "worker"),
        lambda conn: missing.ticker(conn),
        lambda conn: missing.force_next_tick(conn),
    ]
    for call in calls:
        with jobs.connect() as conn, pytest.raises(QueueNotFound, match="missing") as caught:
            call(conn)
        assert isinstance(caught.value.__cause__, DBAPIError)


def test_consumer_not_subscribed(jobs: Engine) -> None:
    with jobs.connect() as conn, pytest.raises(ConsumerNotSubscribed, match="stranger"):
        jobs_q.receive(conn, "stranger")


def test_batch_not_found(jobs: Engine) -> None:
    ghost = Message(msg_id=1, batch_id=987654, type="t", payload=None, retry_count=0,
                    created_at=datetime.now().astimezone())
    with jobs.connect() as conn, pytest.raises(BatchNotFound, match="987654"):
        jobs_q.nack(conn, ghost)


def test_engine_not_installed(empty_db: Database) -> None:
    engine = create_engine(empty_db.url)
    try:
        for call in (
            lambda conn: jobs_q.send_now(conn, {"x": 1}),
            lambda conn: jobs_q.receive(conn, "worker"),
            lambda conn: jobs_q.ack(conn, 1),
            lambda conn: jobs_q.ticker(conn),
        ):
            with engine.connect() as conn, pytest.raises(EngineNotInstalled) as caught:
                call(conn)
            assert "python -m sqlalchemy_pgque install" in str(caught.value)
            assert isinstance(caught.value.__cause__, DBAPIError)
    finally:
        engine.dispose()


_role_counter = itertools.count()


@pytest.fixture
def bare_role(pg_server: Server, jobs: Engine) -> Iterator[str]:
    """A role without any pgque grant; tests SET ROLE to it inside a transaction."""
    role = f"p1_bare_{os.getpid()}_{next(_role_counter)}"
    with pg_server.admin() as admin:
        admin.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        yield role
    finally:
        with pg_server.admin() as admin:
            admin.execute(f"DROP ROLE {role}")


def as_role(conn: Connection, role: str) -> None:
    conn.execute(text(f"SET LOCAL ROLE {role}"))


def test_permission_denied_names_the_role_to_grant(
    jobs: Engine, bare_role: str, pg_server: Server
) -> None:
    cases: list[tuple[Callable[[Connection], object], str]] = [
        (lambda conn: jobs_q.send_now(conn, {"x": 1}), "pgque_writer"),
        (lambda conn: jobs_q.receive(conn, "worker"), "pgque_reader"),
        (lambda conn: jobs_q.ticker(conn), "pgque_admin"),
    ]
    for call, role in cases:
        with jobs.connect() as conn, conn.begin():
            as_role(conn, bare_role)
            with pytest.raises(PermissionDenied, match=f"GRANT {role} TO") as caught:
                call(conn)
            assert caught.value.required_role == role
    with pg_server.admin() as admin:
        admin.execute(f"GRANT pgque_writer TO {bare_role}")
    with jobs.connect() as conn, conn.begin():
        as_role(conn, bare_role)
        assert isinstance(jobs_q.send_now(conn, {"granted": True}), int)


def test_invalid_names_from_the_engine(jobs: Engine) -> None:
    with jobs.connect() as conn, pytest.raises(InvalidName, match="dot"):
        jobs_q.subscribe_subconsumer(conn, "pool.main", "w1")
    with jobs.connect() as conn, pytest.raises(InvalidName):
        jobs_q.subscribe(conn, "")


def test_unrelated_database_errors_are_not_translated(jobs: Engine) -> None:
    with jobs.connect() as conn, pytest.raises(DBAPIError) as caught:
        conn.execute(text("SELECT 1 / 0"))
    assert _translate(caught.value) is None
    with jobs.connect() as conn, pytest.raises(DBAPIError) as caught:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert _translate(caught.value) is None


def test_async_session_is_refused_with_advice(db: Database) -> None:
    session = AsyncSession(create_async_engine(db.url))
    with pytest.raises(TypeError, match="run_sync"):
        jobs_q.receive(session, "worker")  # type: ignore[arg-type]


def test_func_pgque_functions_run_typed(jobs: Engine) -> None:
    with jobs.begin() as conn:
        event_id = conn.scalar(select(func.pgque.send("jobs", "typed", {"a": [1, 2]})))
        batch_ids = conn.scalar(select(func.pgque.send_batch("jobs", "typed", [{"b": 1}, None])))
        assert conn.scalar(select(func.pgque.version())).startswith("0.2")
    assert isinstance(event_id, int)
    assert isinstance(batch_ids, list) and len(batch_ids) == 2
    messages = sent(jobs, jobs_q)
    assert [(m.msg_id, m.payload) for m in messages] == [
        (event_id, {"a": [1, 2]}), (batch_ids[0], {"b": 1}), (batch_ids[1], None)
    ]
