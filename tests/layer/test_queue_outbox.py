"""Queue.send in the unit of work, on a sync Session (the transactional outbox)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pydantic
import pytest
from conftest import Database
from engine_helpers import Conn, make_queue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from queue_helpers import (
    captured_statements,
    pgque_calls,
    wait_wakes,
    wake_listener,
)
from sqlalchemy import Engine, String, func, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from sqlalchemy_pgque import PayloadError, PendingEvent, Queue, QueueNotFound
from sqlalchemy_pgque.testing import sent


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[int]
    note: Mapped[str | None] = mapped_column(String(50))


@dataclasses.dataclass
class Shipped:
    order_id: int
    carrier: str
    tags: list[str]


class Refund(pydantic.BaseModel):
    order_id: int
    amount: float
    reason: str | None = None


orders_q = Queue("orders")
audit_q = Queue("audit")
quiet_q = Queue("quiet", wake=False)


@pytest.fixture
def sessions(engine: Engine, conn: Conn) -> Iterator[sessionmaker[Session]]:
    Base.metadata.create_all(engine)
    for queue in (orders_q, audit_q, quiet_q):
        make_queue(conn, queue.name)
    yield sessionmaker(engine, expire_on_commit=False)


def order_count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Order)) or 0


def test_commit_delivers_with_the_new_primary_key(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        order = Order(total=99)
        session.add(order)
        handle = orders_q.send(session, lambda: {"order_id": order.id}, type="order.created")
        assert not session.new or handle.event_id is None
    assert order.id is not None
    messages = sent(engine, orders_q)
    assert [(m.type, m.payload, m.msg_id) for m in messages] == [
        ("order.created", {"order_id": order.id}, handle.event_id)
    ]
    assert messages[0].raw_payload == json.dumps({"order_id": order.id})


def test_rollback_discards(engine: Engine, sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        session.add(Order(total=1))
        handle = orders_q.send(session, {"n": 1})
        session.flush()
        assert handle.event_id is not None
        session.rollback()
        assert handle.event_id is None
        # The same session's next transaction must not carry the discarded event.
        orders_q.send(session, {"n": 2})
        session.commit()
    assert [m.payload for m in sent(engine, orders_q)] == [{"n": 2}]
    assert order_count(engine) == 0


def test_exception_inside_begin_discards(engine: Engine, sessions: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError, match="boom"), sessions.begin() as session:
        session.add(Order(total=5))
        orders_q.send(session, {"n": 1})
        session.flush()
        orders_q.send(session, {"n": 2})
        raise RuntimeError("boom")
    assert sent(engine, orders_q) == []
    assert order_count(engine) == 0


def test_sends_of_one_flush_are_one_statement_after_the_orm_inserts(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with captured_statements(engine) as statements, sessions.begin() as session:
        orders = [Order(total=i) for i in range(3)]
        session.add_all(orders)
        handles = [
            orders_q.send(session, (lambda o=o: {"order_id": o.id}), type="order.created")
            for o in orders
        ] + [orders_q.send(session, {"i": i}, type="order.created") for i in range(47)]
    calls = pgque_calls(statements)
    assert len(calls) == 1
    assert "pgque.send_batch" in calls[0]
    assert statements.index(calls[0]) > max(
        i for i, s in enumerate(statements) if s.startswith("INSERT INTO orders")
    )
    messages = sent(engine, orders_q)
    assert [m.msg_id for m in messages] == [h.event_id for h in handles]
    assert [m.payload for m in messages[:3]] == [{"order_id": o.id} for o in orders]
    assert [m.payload for m in messages[3:]] == [{"i": i} for i in range(47)]


def test_mixed_queues_types_and_extras_are_one_statement_in_order(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with captured_statements(engine) as statements, sessions.begin() as session:
        first = orders_q.send(session, {"step": 1}, type="order.created")
        orders_q.send(session, {"step": 2}, type="order.paid", extra1="eur", extra4="x")
        audit_q.send(session, {"step": 3})
        orders_q.send(session, {"step": 4}, type="order.created")
    assert len(pgque_calls(statements)) == 1
    messages = sent(engine, orders_q)
    assert [(m.type, m.payload, m.extra1, m.extra2, m.extra4) for m in messages] == [
        ("order.created", {"step": 1}, None, None, None),
        ("order.paid", {"step": 2}, "eur", None, "x"),
        ("order.created", {"step": 4}, None, None, None),
    ]
    assert messages[0].msg_id == first.event_id
    assert [m.payload for m in sent(engine, audit_q)] == [{"step": 3}]


def test_send_without_orm_changes_is_emitted_on_commit(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with captured_statements(engine) as statements:
        with sessions() as session:
            handle = orders_q.send(session, [1, "two", None])
            assert pgque_calls(statements) == []
            session.commit()
            assert handle.event_id is not None
    assert len(pgque_calls(statements)) == 1
    assert [m.payload for m in sent(engine, orders_q)] == [[1, "two", None]]


def test_event_id_is_set_by_flush(engine: Engine, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.add(Order(total=3))
        handle = orders_q.send(session, {"a": 1})
        assert handle.event_id is None
        session.flush()
        event_id = handle.event_id
        assert isinstance(event_id, int)
    assert handle.event_id == event_id
    assert [m.msg_id for m in sent(engine, orders_q)] == [event_id]


def test_send_batch_records_each_payload(engine: Engine, sessions: sessionmaker[Session]) -> None:
    with captured_statements(engine) as statements, sessions.begin() as session:
        handles = orders_q.send_batch(session, [{"i": 1}, 2, "\"three\""], type="bulk")
    assert len(pgque_calls(statements)) == 1
    assert all(isinstance(h, PendingEvent) and h.type == "bulk" for h in handles)
    messages = sent(engine, orders_q)
    assert [m.payload for m in messages] == [{"i": 1}, 2, "three"]
    assert [m.msg_id for m in messages] == [h.event_id for h in handles]


def test_savepoint_rollback_drops_events_recorded_inside_it(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        orders_q.send(session, {"where": "outer"})
        savepoint = session.begin_nested()
        inner = orders_q.send(session, {"where": "inner"})
        session.add(Order(total=7))
        session.flush()
        assert inner.event_id is not None
        savepoint.rollback()
        assert inner.event_id is None
        with session.begin_nested():
            orders_q.send(session, {"where": "released"})
    assert [m.payload for m in sent(engine, orders_q)] == [
        {"where": "outer"},
        {"where": "released"},
    ]
    assert order_count(engine) == 0


def test_savepoint_rollback_reemits_events_recorded_outside_it(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        outer = orders_q.send(session, {"where": "outer"})
        with pytest.raises(RuntimeError), session.begin_nested():
            session.add(Order(total=8))
            session.flush()  # emits the outer event inside the savepoint
            assert outer.event_id is not None
            raise RuntimeError("undo the savepoint")
        assert outer.event_id is None
    assert outer.event_id is not None
    messages = sent(engine, orders_q)
    assert [(m.payload, m.msg_id) for m in messages] == [({"where": "outer"}, outer.event_id)]


@pytest.mark.parametrize(
    "payload",
    [{1, 2}, object(), "not json", "{'single': 'quotes'}", float("nan"), float("inf"),
     {"x": float("-inf")}, "NaN", {"nul": "a\x00b"}, "\"\\u0000\"", {"bad": "\ud800"},
     "[" * 1000 + "]" * 1000, "\"\\ud800\""],
    ids=["set", "object", "plain-text", "python-repr", "nan", "inf", "nested-inf",
         "nan-text", "nul", "nul-escape", "lone-surrogate", "1000-deep-text",
         "lone-surrogate-escape"],
)
def test_unencodable_payload_raises_in_send_and_records_nothing(
    engine: Engine, sessions: sessionmaker[Session], payload: object
) -> None:
    with sessions.begin() as session:
        session.add(Order(total=11))
        with pytest.raises(PayloadError):
            orders_q.send(session, payload)
        with pytest.raises(PayloadError):
            orders_q.send_batch(session, [{"fine": True}, payload])
        orders_q.send(session, {"fine": True})
    assert order_count(engine) == 1
    assert [m.payload for m in sent(engine, orders_q)] == [{"fine": True}]


def test_payload_callable_that_fails_to_encode_fails_the_commit(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with pytest.raises(PayloadError, match="payload callable"), sessions.begin() as session:
        session.add(Order(total=12))
        orders_q.send(session, {"fine": True})
        orders_q.send(session, lambda: {1, 2})
    assert order_count(engine) == 0
    assert sent(engine, orders_q) == []


def lone_surrogate_note() -> str:
    return '{"note": "\\ud800"}'


@pytest.mark.parametrize("emit", ["flush", "commit"])
def test_payload_callable_error_names_the_event_and_undoes_the_transaction(
    engine: Engine, sessions: sessionmaker[Session], emit: str
) -> None:
    with sessions() as session:
        session.add(Order(total=14))
        orders_q.send(session, {"fine": True})
        orders_q.send(session, lone_surrogate_note, type="order.noted")
        with pytest.raises(PayloadError) as raised:
            if emit == "flush":
                session.flush()
            else:
                session.commit()
        assert raised.type is PayloadError
        assert str(raised.value) == (
            "payload callable lone_surrogate_note for queue 'orders', type 'order.noted', "
            "returned a payload that cannot be sent: payload JSON text has the escape "
            "\\ud800 at character 10: a high surrogate not directly followed by a low "
            "surrogate escape"
        )
        session.rollback()
    assert order_count(engine) == 0
    assert sent(engine, orders_q) == []


def test_payloads_nested_to_the_limit_round_trip(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """512 levels survive each statement shape, some of which wrap payloads deeper."""
    nested: list[object] = []
    for _ in range(511):
        nested = [nested]
    with sessions.begin() as session:
        orders_q.send(session, nested)
    with sessions.begin() as session:
        orders_q.send_batch(session, [json.dumps(nested), lambda: nested])
    with sessions.begin() as session:
        orders_q.send(session, nested, extra1="mixed")
        audit_q.send(session, nested)
    assert [m.payload for m in sent(engine, orders_q)] == [nested] * 4
    assert [m.payload for m in sent(engine, audit_q)] == [nested]


def test_unknown_queue_fails_the_commit(engine: Engine, sessions: sessionmaker[Session]) -> None:
    with pytest.raises(QueueNotFound, match="missing"), sessions.begin() as session:
        session.add(Order(total=13))
        Queue("missing").send(session, {"x": 1})
    assert order_count(engine) == 0


def test_scalar_payloads_round_trip(engine: Engine, sessions: sessionmaker[Session]) -> None:
    payloads: list[object] = [0, -7, 2.5, True, False, None, "\"text\"", "{\"k\": [1, 2]}",
                              {"unicode": "żółw 🐢"}, [], {}]
    with sessions.begin() as session:
        for payload in payloads:
            orders_q.send(session, payload)
    decoded = [m.payload for m in sent(engine, orders_q)]
    assert decoded == [0, -7, 2.5, True, False, None, "text", {"k": [1, 2]},
                       {"unicode": "żółw 🐢"}, [], {}]


def test_dataclass_and_pydantic_payloads_round_trip(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        orders_q.send(session, Shipped(order_id=1, carrier="dhl", tags=["a", "b"]))
        orders_q.send(session, Refund(order_id=2, amount=9.5))
        orders_q.send(session, {"nested": [Shipped(3, "ups", []), Refund(order_id=4, amount=1)]})
        orders_q.send(session, lambda: Refund(order_id=5, amount=0.25, reason="late"))
    payloads = [m.payload for m in sent(engine, orders_q)]
    assert Shipped(**payloads[0]) == Shipped(order_id=1, carrier="dhl", tags=["a", "b"])
    assert Refund.model_validate(payloads[1]) == Refund(order_id=2, amount=9.5)
    assert payloads[2] == {
        "nested": [
            {"order_id": 3, "carrier": "ups", "tags": []},
            {"order_id": 4, "amount": 1.0, "reason": None},
        ]
    }
    assert Refund.model_validate(payloads[3]) == Refund(order_id=5, amount=0.25, reason="late")


def test_wake_notification_is_delivered_on_commit_only(
    engine: Engine, sessions: sessionmaker[Session], db: Database
) -> None:
    with wake_listener(db.dsn) as listener:
        with sessions() as session:
            session.add(Order(total=1))
            orders_q.send(session, {"rolled": "back"})
            session.flush()
            session.rollback()
        with sessions.begin() as session:
            quiet_q.send(session, {"wake": False})
        with sessions.begin() as session:
            for i in range(3):
                audit_q.send(session, {"i": i})
        # Notifications arrive in commit order: had the rolled-back or the wake=False
        # transaction notified, its payload would come first.
        assert wait_wakes(listener, 1) == ["audit"]
        with sessions.begin() as session:
            orders_q.send(session, {"committed": True})
            audit_q.send(session, {"committed": True})
        assert sorted(wait_wakes(listener, 2)) == ["audit", "orders"]


def test_send_now_executes_at_once(engine: Engine, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.add(Order(total=20))
        event_id = orders_q.send_now(session, {"now": True}, type="instant", extra2="e2")
        assert isinstance(event_id, int)
        assert session.new  # the ORM was not flushed
    messages = sent(engine, orders_q)
    assert [(m.msg_id, m.type, m.payload, m.extra2) for m in messages] == [
        (event_id, "instant", {"now": True}, "e2")
    ]
    with engine.begin() as conn:
        plain_id = orders_q.send_now(conn, lambda: [1])
    assert [m.msg_id for m in sent(engine, orders_q)] == [plain_id]


def test_close_without_commit_discards(engine: Engine, sessions: sessionmaker[Session]) -> None:
    session = sessions()
    session.connection()
    orders_q.send(session, {"closed": True})
    session.close()
    with session.begin():
        orders_q.send(session, {"next": True})
    assert [m.payload for m in sent(engine, orders_q)] == [{"next": True}]


def test_scoped_session_and_wrong_targets(engine: Engine, sessions: sessionmaker[Session]) -> None:
    scoped = scoped_session(sessions)
    try:
        orders_q.send(scoped, {"scoped": True})
        scoped.commit()
    finally:
        scoped.remove()
    assert [m.payload for m in sent(engine, orders_q)] == [{"scoped": True}]
    with engine.connect() as conn, pytest.raises(TypeError, match="send_now"):
        orders_q.send(conn, {"x": 1})  # type: ignore[arg-type]


def test_sessions_created_before_the_first_send_emit(db: Database, engine: Engine,
                                                      conn: Conn) -> None:
    """The listeners are installed lazily; a session that already exists must see them."""
    make_queue(conn, orders_q.name)
    script = textwrap.dedent(
        """
        import sys
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session
        from sqlalchemy_pgque import Queue

        engine = create_engine(sys.argv[1])
        with Session(engine) as session:
            handle = Queue("orders").send(session, {"early": True})
            session.commit()
        assert handle.event_id is not None, handle
        """
    )
    url = db.url.render_as_string(hide_password=False)
    subprocess.run([sys.executable, "-c", script, url], check=True, timeout=60)
    assert [m.payload for m in sent(engine, orders_q)] == [{"early": True}]


savepoint_steps = st.lists(
    st.sampled_from(["send", "send", "flush", "begin", "rollback", "release", "fail"]),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=savepoint_steps)
def test_savepoints_keep_exactly_the_events_of_committed_scopes(
    engine: Engine, sessions: sessionmaker[Session], steps: list[str]
) -> None:
    """Random nesting of SAVEPOINTs, some ending in a failed flush: an event survives iff
    the scope it was recorded in and every enclosing one committed; each survivor is
    delivered exactly once."""
    scopes: list[list[tuple[int, PendingEvent]]] = [[]]
    savepoints = []
    discarded: list[PendingEvent] = []
    with sessions.begin() as session:
        for n, step in enumerate(steps):
            if step == "send":
                scopes[-1].append((n, orders_q.send(session, {"n": n})))
            elif step == "flush":
                session.add(Order(total=n))
                session.flush()
            elif step == "begin":
                savepoints.append(session.begin_nested())
                scopes.append([])
            elif savepoints and step == "rollback":
                savepoints.pop().rollback()
                discarded.extend(handle for _, handle in scopes.pop())
            elif savepoints and step == "release":
                savepoints.pop().commit()
                released = scopes.pop()
                scopes[-1].extend(released)
            elif savepoints and step == "fail":
                scopes[-1].append((n, orders_q.send(session, {"n": n})))
                Queue("missing").send(session, {"n": n})
                session.add(Order(total=n))
                with pytest.raises(QueueNotFound):
                    session.flush()
                # As a `with session.begin_nested()` block does after a failed flush.
                savepoints.pop().close()
                discarded.extend(handle for _, handle in scopes.pop())
        while savepoints:
            savepoints.pop().commit()
            released = scopes.pop()
            scopes[-1].extend(released)
    survivors = scopes[0]
    messages = sent(engine, orders_q)
    assert sorted(m.payload["n"] for m in messages) == sorted(n for n, _ in survivors)
    by_n = {m.payload["n"]: m.msg_id for m in messages}
    assert all(handle.event_id == by_n[n] for n, handle in survivors)
    assert all(handle.event_id is None for handle in discarded)


def test_failed_emission_inside_a_savepoint_keeps_the_outer_events(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        outer = orders_q.send(session, {"where": "outer"})
        with pytest.raises(QueueNotFound), session.begin_nested():
            Queue("missing").send(session, {"where": "inner"})
            session.add(Order(total=1))
            session.flush()
        assert outer.event_id is None
    assert [(m.payload, m.msg_id) for m in sent(engine, orders_q)] == [
        ({"where": "outer"}, outer.event_id)
    ]
    assert order_count(engine) == 0
