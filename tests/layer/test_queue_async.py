"""Queue.send in the unit of work of an AsyncSession (emitted inside its greenlet)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
from conftest import Database
from engine_helpers import Conn, make_queue
from queue_helpers import (
    captured_statements,
    pgque_calls,
    wait_wakes,
    wake_listener,
)
from sqlalchemy import Engine, func, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_pgque import PayloadError, Queue
from sqlalchemy_pgque.testing import sent

Scenario = Callable[[async_sessionmaker[AsyncSession]], Awaitable[None]]


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    amount: Mapped[int]


invoices_q = Queue("invoices")
credits_q = Queue("credits")


@pytest.fixture
def run(engine: Engine, db: Database, conn: Conn) -> Iterator[Callable[[Scenario], None]]:
    """Run an async scenario against a fresh async engine on the test database."""
    Base.metadata.create_all(engine)
    make_queue(conn, invoices_q.name)
    make_queue(conn, credits_q.name)
    async_engine: AsyncEngine = create_async_engine(db.url)

    def runner(scenario: Scenario) -> None:
        async def main() -> None:
            try:
                await scenario(async_sessionmaker(async_engine, expire_on_commit=False))
            finally:
                await async_engine.dispose()

        asyncio.run(main())

    yield runner


def invoice_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Invoice)) or 0


def test_commit_delivers_with_the_new_primary_key(
    engine: Engine, run: Callable[[Scenario], None]
) -> None:
    invoice = Invoice(amount=10)

    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session, session.begin():
            session.add(invoice)
            handle = invoices_q.send(session, lambda: {"invoice_id": invoice.id}, type="issued")
            assert handle.event_id is None
        assert handle.event_id is not None

    run(scenario)
    messages = sent(engine, invoices_q)
    assert [(m.type, m.payload) for m in messages] == [("issued", {"invoice_id": invoice.id})]


def test_rollback_discards(engine: Engine, run: Callable[[Scenario], None]) -> None:
    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            session.add(Invoice(amount=1))
            handle = invoices_q.send(session, {"n": 1})
            await session.flush()
            assert handle.event_id is not None
            await session.rollback()
            assert handle.event_id is None
            invoices_q.send(session, {"n": 2})
            await session.commit()

    run(scenario)
    assert [m.payload for m in sent(engine, invoices_q)] == [{"n": 2}]
    assert invoice_count(engine) == 0


def test_exception_inside_begin_discards(engine: Engine, run: Callable[[Scenario], None]) -> None:
    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            async with sessions.begin() as session:
                session.add(Invoice(amount=2))
                invoices_q.send(session, {"n": 1})
                await session.flush()
                raise RuntimeError("boom")

    run(scenario)
    assert sent(engine, invoices_q) == []
    assert invoice_count(engine) == 0


def test_sends_of_one_flush_are_one_statement(
    engine: Engine, run: Callable[[Scenario], None]
) -> None:
    statements: list[str] = []

    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        with captured_statements(sessions.kw["bind"]) as captured:
            async with sessions.begin() as session:
                session.add(Invoice(amount=3))
                for i in range(25):
                    invoices_q.send(session, {"i": i}, type="line")
        statements.extend(captured)

    run(scenario)
    calls = pgque_calls(statements)
    assert len(calls) == 1
    assert "pgque.send_batch" in calls[0]
    assert [m.payload for m in sent(engine, invoices_q)] == [
        {"i": i} for i in range(25)
    ]


def test_send_without_orm_changes_is_emitted_on_commit(
    engine: Engine, run: Callable[[Scenario], None]
) -> None:
    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            handle = invoices_q.send(session, "[1, 2]")
            await session.commit()
            assert handle.event_id is not None

    run(scenario)
    assert [m.payload for m in sent(engine, invoices_q)] == [[1, 2]]


def test_savepoint_rollback(engine: Engine, run: Callable[[Scenario], None]) -> None:
    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions.begin() as session:
            outer = invoices_q.send(session, {"where": "outer"})
            savepoint = await session.begin_nested()
            invoices_q.send(session, {"where": "inner"})
            session.add(Invoice(amount=4))
            await session.flush()
            assert outer.event_id is not None
            await savepoint.rollback()
            assert outer.event_id is None

    run(scenario)
    assert [m.payload for m in sent(engine, invoices_q)] == [{"where": "outer"}]
    assert invoice_count(engine) == 0


def test_payload_error_raises_in_send(engine: Engine, run: Callable[[Scenario], None]) -> None:
    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions.begin() as session:
            session.add(Invoice(amount=5))
            with pytest.raises(PayloadError):
                invoices_q.send(session, {"bad": {1, 2}})
            invoices_q.send(session, {"good": 1})

    run(scenario)
    assert invoice_count(engine) == 1
    assert [m.payload for m in sent(engine, invoices_q)] == [{"good": 1}]


def deep_note() -> str:
    return "[" * 1000 + "]" * 1000


@pytest.mark.parametrize("emit", ["flush", "commit"])
def test_payload_callable_error_reaches_the_caller_and_undoes_the_transaction(
    engine: Engine, run: Callable[[Scenario], None], emit: str
) -> None:
    async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            session.add(Invoice(amount=7))
            invoices_q.send(session, {"good": 1})
            invoices_q.send(session, deep_note, type="noted")
            with pytest.raises(PayloadError) as raised:
                await (session.flush() if emit == "flush" else session.commit())
            assert raised.type is PayloadError
            assert str(raised.value) == (
                "payload callable deep_note for queue 'invoices', type 'noted', returned a "
                "payload that cannot be sent: payload nests arrays and objects 1000 levels "
                "deep; the limit is MAX_PAYLOAD_DEPTH = 512"
            )
            await session.rollback()

    run(scenario)
    assert invoice_count(engine) == 0
    assert sent(engine, invoices_q) == []


def test_wake_notification_on_commit_only(
    db: Database, run: Callable[[Scenario], None]
) -> None:
    with wake_listener(db.dsn) as listener:

        async def scenario(sessions: async_sessionmaker[AsyncSession]) -> None:
            async with sessions() as session:
                session.add(Invoice(amount=6))
                credits_q.send(session, {"rolled": "back"})
                await session.flush()
                await session.rollback()
            async with sessions.begin() as session:
                invoices_q.send(session, {"committed": True})

        run(scenario)
        # Notifications arrive in commit order: the rolled-back one would come first.
        assert wait_wakes(listener, 1) == ["invoices"]
