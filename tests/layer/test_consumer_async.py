"""AsyncConsumer: async def handlers over an AsyncSession, with Consumer's semantics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Database
from consumer_support import HANDLED_TABLE, handled_counts, open_batch
from engine_helpers import Conn, make_queue, send, tick, wait_until
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from sqlalchemy_pgque import Message
from sqlalchemy_pgque.consumer import AsyncConsumer, Consumer


@pytest.fixture
def async_url(db: Database, conn: Conn) -> Iterator[Any]:
    make_queue(conn, "q", "c")
    conn.execute(HANDLED_TABLE)
    yield db.url


async def record(msg: Message, session: AsyncSession) -> None:
    await session.execute(
        text("INSERT INTO handled (msg_id, type, retry_count) VALUES (:id, :type, :retry)"),
        {"id": msg.msg_id, "type": msg.type, "retry": msg.retry_count},
    )


def test_async_handlers_with_and_without_session(conn: Conn, async_url: Any) -> None:
    seen: list[int] = []

    async def scenario() -> int:
        engine = create_async_engine(async_url)
        try:
            consumer = AsyncConsumer(async_sessionmaker(engine), queue="q", name="c",
                                     retry_after=0)

            @consumer.on("note")
            async def note(msg: Message) -> None:
                await asyncio.sleep(0)
                seen.append(msg.msg_id)

            @consumer.on("write")
            async def write(msg: Message, session: AsyncSession) -> None:
                await record(msg, session)
                if msg.payload.get("fail"):
                    raise RuntimeError("refused")

            return await consumer.process_batch()
        finally:
            await engine.dispose()

    noted = send(conn, "q", "{}", type="note")
    written = send(conn, "q", "{}", type="write")
    failed = send(conn, "q", '{"fail": true}', type="write")
    tick(conn, "q")

    assert asyncio.run(scenario()) == 3
    assert seen == [noted]
    assert handled_counts(conn) == {written: 1}
    assert open_batch(conn, "q", "c") is None
    retried = [r[0] for r in conn.execute("SELECT ev_id FROM pgque.retry_queue")]
    assert retried == [failed]


def test_async_consumer_wakes_on_tick_and_stops_from_another_thread(
    conn: Conn, async_url: Any
) -> None:
    engine: AsyncEngine = create_async_engine(async_url)
    consumer = AsyncConsumer(engine, queue="q", name="c", poll_interval=30)
    consumer.on("*")(record)
    thread = threading.Thread(target=asyncio.run, args=(_run_then_dispose(consumer, engine),),
                              daemon=True)
    thread.start()
    try:
        assert consumer.listening.wait(10)
        ids = [send(conn, "q"), send(conn, "q")]
        tick(conn, "q")
        wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=5,
                   what="the async handler")
    finally:
        consumer.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert not consumer.listening.is_set()


async def _run_then_dispose(consumer: AsyncConsumer, engine: AsyncEngine) -> None:
    try:
        await consumer.run()
    finally:
        await engine.dispose()


def test_sync_and_async_factories_are_not_mixed(async_url: Any) -> None:
    engine = create_async_engine(async_url)
    with pytest.raises(TypeError, match="AsyncConsumer"):
        Consumer(engine, queue="q", name="c")  # type: ignore[arg-type]
    consumer = AsyncConsumer(engine, queue="q", name="c")
    with pytest.raises(TypeError, match="async def"):
        consumer.on("x")(lambda msg: None)  # type: ignore[arg-type, return-value]
    asyncio.run(engine.dispose())
