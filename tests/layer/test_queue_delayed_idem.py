"""Queue.send with deliver_at / delay (delayed delivery) and idempotency_key
(idempotent send): the unit of work's guarantees on Session and AsyncSession."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from conftest import Database
from engine_helpers import (
    MSG_ID,
    PAYLOAD,
    TYPE,
    Conn,
    is_our_engine,
    receive_and_ack,
    scalar,
    tick,
    wait_until,
)
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_pgque import Consumer, EngineFeatureMissing, Queue
from sqlalchemy_pgque.errors import PgqueError
from sqlalchemy_pgque.testing import deliver

orders_q = Queue("orders")


class Base(DeclarativeBase):
    pass


class Note(Base):
    """An ORM row to flush: a Session with no ORM changes does not flush at all, so
    these tests add one where they look at an event between flush and commit."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def orders(conn: Conn) -> Conn:
    if not is_our_engine(conn):
        pytest.skip("delayed delivery and idempotent send are PgQue 0.3 functions")
    conn.execute("create table notes (id serial primary key)")
    conn.execute("select pgque.create_queue('orders')")
    conn.execute("select pgque.subscribe('orders', 'c')")
    return conn


def held(conn: Conn, queue: str = "orders") -> int:
    return int(scalar(conn, "select count(*) from pgque.delayed_events"
                            " where de_queue_name = %s", queue))


def received(conn: Conn) -> list[tuple[object, ...]]:
    """Tick, then the consumer's next window, acked: (id, type, payload, extra1..4)."""
    tick(conn, "orders")
    return [(r[MSG_ID], r[TYPE], r[PAYLOAD], *r[6:10])
            for r in receive_and_ack(conn, "orders", "c")]


def move_due(conn: Conn) -> int:
    return int(scalar(conn, "select pgque.maint_deliver_delayed()"))


def test_a_delayed_event_commits_with_the_session_and_arrives_when_due(
    orders: Conn, engine: Engine
) -> None:
    due = datetime.now(timezone.utc) + timedelta(milliseconds=300)
    with Session(engine) as session, session.begin():
        pending = orders_q.send(session, {"remind": 1}, type="reminder", deliver_at=due)
        session.add(Note())
        session.flush()
        assert pending.event_id is None
        assert pending.delayed_id is not None
        assert pending.deduplicated is None
    assert held(orders) == 1
    assert received(orders) == []
    wait_until(lambda: move_due(orders), what="the event's due time")
    assert held(orders) == 0
    rows = received(orders)
    assert [(r[1], r[2]) for r in rows] == [("reminder", '{"remind": 1}')]
    assert scalar(orders, "select clock_timestamp() >= %s", due)


def test_a_rolled_back_delayed_send_leaves_nothing(orders: Conn, engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        pending = orders_q.send(session, {"n": 1}, delay=60)
        session.add(Note())
        session.flush()
        assert pending.delayed_id is not None
        session.rollback()
    assert pending.delayed_id is None and pending.event_id is None
    assert held(orders) == 0


def test_a_due_time_already_past_sends_at_once(orders: Conn, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        past = orders_q.send(session, {"n": 1}, deliver_at=datetime.now(timezone.utc)
                             - timedelta(seconds=5))
        zero = orders_q.send(session, {"n": 2}, delay=0)
    assert past.event_id is not None and past.delayed_id is None
    assert zero.event_id is not None and zero.delayed_id is None
    assert held(orders) == 0
    assert [r[0] for r in received(orders)] == [past.event_id, zero.event_id]


def test_delayed_events_keep_their_extras_and_the_order_of_the_flush(
    orders: Conn, engine: Engine
) -> None:
    with Session(engine) as session, session.begin():
        first = orders_q.send(session, {"n": 1}, type="a")
        later = orders_q.send(session, {"n": 2}, type="b", delay="200 ms",
                              extra1="k1", extra3="x3")
        batch = orders_q.send_batch(session, [{"n": 3}, {"n": 4}], type="c", delay=0.2)
        last = orders_q.send(session, {"n": 5}, type="d")
    assert first.event_id is not None and last.event_id is not None
    assert first.event_id < last.event_id
    assert later.delayed_id is not None and all(p.delayed_id for p in batch)
    assert [r[1] for r in received(orders)] == ["a", "d"]
    wait_until(lambda: move_due(orders) >= 0 and held(orders) == 0,
               what="the delayed events' due time")
    rows = received(orders)
    assert sorted(r[1] for r in rows) == ["b", "c", "c"]
    b = next(r for r in rows if r[1] == "b")
    assert b[3:] == ("k1", None, "x3", None)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"deliver_at": datetime(2030, 1, 1)}, ValueError, "timezone-aware"),
        ({"deliver_at": "2030-01-01"}, TypeError, "must be a datetime"),
        ({"deliver_at": datetime.now(timezone.utc), "delay": 5}, ValueError, "not both"),
        ({"delay": "soon"}, ValueError, "not a duration"),
        ({"idempotency_key": "k", "delay": 5}, ValueError, "cannot be combined"),
        ({"key_ttl": 5}, ValueError, "without an idempotency_key"),
        ({"idempotency_key": "k", "key_ttl": 0}, ValueError, "positive"),
        ({"idempotency_key": "k", "extra2": "x"}, ValueError, "extra2"),
        ({"idempotency_key": 7}, TypeError, "must be a str"),
    ],
)
def test_bad_options_raise_before_anything_is_recorded(
    orders: Conn, engine: Engine, options: dict[str, object], error: type[Exception],
    words: str,
) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(error, match=words):
            orders_q.send(session, {"n": 1}, **options)
        session.add(Note())
        session.flush()
    assert held(orders) == 0 and received(orders) == []


def send_idem(engine: Engine, key: str, payload: object, **options: object) -> tuple[
        int | None, bool | None]:
    with Session(engine) as session, session.begin():
        pending = orders_q.send(session, payload, idempotency_key=key, **options)
    return pending.event_id, pending.deduplicated


def test_an_idempotency_key_sends_once_and_tells_the_first_id(
    orders: Conn, engine: Engine
) -> None:
    first_id, first_dedup = send_idem(engine, "charge:1", {"n": 1}, extra1="order-1")
    again_id, again_dedup = send_idem(engine, "charge:1", {"n": 2})
    other_id, other_dedup = send_idem(engine, "receipt:1", {"n": 3})
    assert first_dedup is False and again_dedup is True and other_dedup is False
    assert again_id == first_id and other_id != first_id
    rows = received(orders)
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        (first_id, '{"n": 1}', "order-1", "charge:1"),
        (other_id, '{"n": 3}', None, "receipt:1"),
    ]


def test_an_expired_key_sends_again(orders: Conn, engine: Engine) -> None:
    first_id, _ = send_idem(engine, "k", {"n": 1}, key_ttl=timedelta(milliseconds=100))
    again = wait_until(lambda: (lambda r: r if r[1] is False else None)(
        send_idem(engine, "k", {"n": 2}, key_ttl="1 hour")), what="the key to expire")
    assert again[0] != first_id
    assert len(received(orders)) == 2


def test_a_rolled_back_idempotent_send_frees_its_key(orders: Conn, engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        pending = orders_q.send(session, {"n": 1}, idempotency_key="k")
        session.add(Note())
        session.flush()
        assert pending.deduplicated is False
        session.rollback()
    assert pending.deduplicated is None and pending.event_id is None
    event_id, deduplicated = send_idem(engine, "k", {"n": 2})
    assert deduplicated is False
    assert [r[0] for r in received(orders)] == [event_id]


def test_racing_sessions_send_one_event_per_key(orders: Conn, db: Database) -> None:
    """Each round, two threads race one key through their own Session; the engine
    makes one wait for the other, so exactly one event per key is sent and both
    threads learn its id."""
    engine = create_engine(db.url, pool_size=4)
    rounds = 20
    results: list[tuple[str, int | None, bool | None]] = []
    lock = threading.Lock()

    def producer(barrier: threading.Barrier, key: str) -> None:
        with Session(engine) as session, session.begin():
            barrier.wait()
            pending = orders_q.send(session, {"key": key}, idempotency_key=key)
        with lock:
            results.append((key, pending.event_id, pending.deduplicated))

    try:
        for n in range(rounds):
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=producer, args=(barrier, f"k{n}"))
                       for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
                assert not thread.is_alive()
    finally:
        engine.dispose()
    by_key: dict[str, list[tuple[int | None, bool | None]]] = {}
    for key, event_id, deduplicated in results:
        by_key.setdefault(key, []).append((event_id, deduplicated))
    assert len(by_key) == rounds
    for key, outcomes in by_key.items():
        assert sorted(d for _, d in outcomes) == [False, True], key
        assert outcomes[0][0] == outcomes[1][0] is not None, key
    rows = received(orders)
    assert sorted(r[4] for r in rows) == sorted(by_key)


@pytest.fixture
def async_engine(db: Database) -> Iterator[object]:
    engine = create_async_engine(db.url)
    yield engine
    asyncio.run(engine.dispose())


def test_the_same_on_an_async_session(orders: Conn, async_engine: object) -> None:
    async def scenario() -> tuple[object, ...]:
        async with AsyncSession(async_engine) as session, session.begin():
            delayed = orders_q.send(session, {"n": 1}, delay=60)
            first = orders_q.send(session, {"n": 2}, idempotency_key="k")
        async with AsyncSession(async_engine) as session:
            await session.begin()
            again = orders_q.send(session, {"n": 3}, idempotency_key="k")
            session.add(Note())
            await session.flush()
            dedup_inside = again.deduplicated
            await session.rollback()
        return delayed.delayed_id, first.deduplicated, first.event_id, dedup_inside, again

    delayed_id, first_dedup, first_id, dedup_inside, again = asyncio.run(scenario())
    assert delayed_id is not None and held(orders) == 1
    assert first_dedup is False and dedup_inside is True
    assert again.deduplicated is None
    assert [r[0] for r in received(orders)] == [first_id]


@pytest.mark.parametrize(
    ("function", "options"),
    [
        ("send_idem(text,text,jsonb,text,interval,text)", {"idempotency_key": "k"}),
        ("send_at(text,text,jsonb,timestamptz)", {"delay": 60}),
    ],
)
def test_an_engine_without_the_function_raises_a_clear_error(
    orders: Conn, engine: Engine, function: str, options: dict[str, object]
) -> None:
    # What a PgQue 0.2 install looks like to these calls.
    orders.execute(f"drop function pgque.{function}")
    with Session(engine) as session:
        session.begin()
        orders_q.send(session, {"n": 1}, **options)
        session.add(Note())
        with pytest.raises(EngineFeatureMissing, match=r"PgQue 0\.3 function") as raised:
            session.flush()
        session.rollback()
    assert isinstance(raised.value, PgqueError)
    assert raised.value.function == function.split("(")[0]
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from pgque.delayed_events")).scalar() == 0


def test_the_toolkit_delivers_held_events_when_asked(orders: Conn, engine: Engine) -> None:
    consumer = Consumer(sessionmaker(engine), queue=orders_q, name="c")
    seen: list[str] = []
    consumer.on("*")(lambda msg: seen.append(msg.type))
    with Session(engine) as session, session.begin():
        orders_q.send(session, {}, type="now")
        orders_q.send(session, {}, type="tomorrow", delay=timedelta(days=1))
    deliver(consumer)
    assert seen == ["now"] and held(orders) == 1
    report = deliver(consumer, include_delayed=True)
    assert seen == ["now", "tomorrow"] and held(orders) == 0
    assert [d.type for d in report.handled] == ["tomorrow"]
