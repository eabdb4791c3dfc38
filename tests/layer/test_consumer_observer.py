"""ConsumerObserver: the hooks metrics and tracing build on, on both faces."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from typing import Any

import pytest
from engine_helpers import Conn, make_queue, send, tick
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Message, Queue
from sqlalchemy_pgque.consumer import AsyncConsumer, Consumer, ConsumerObserver, Outcome

current_span: contextvars.ContextVar[str | None] = contextvars.ContextVar("span", default=None)


class Recorder(ConsumerObserver):
    def __init__(self) -> None:
        self.handlers: list[tuple[int, Outcome, str | None]] = []
        self.batches: list[tuple[list[tuple[int, Outcome]], bool]] = []
        self.seen_in_handler: list[str | None] = []

    def handler_started(self, consumer: Any, message: Message) -> Any:
        return current_span.set(f"span-{message.msg_id}")

    def handler_finished(self, consumer: Any, message: Message, state: Any, outcome: Outcome,
                         error: BaseException | None, seconds: float) -> None:
        assert seconds >= 0
        current_span.reset(state)
        self.handlers.append((message.msg_id, outcome, type(error).__name__ if error else None))

    def batch_finished(self, consumer: Any, outcomes: Sequence[tuple[Message, Outcome]],
                       seconds: float, committed: bool) -> None:
        self.batches.append(([(m.msg_id, o) for m, o in outcomes], committed))


class Broken(ConsumerObserver):
    def handler_started(self, consumer: Any, message: Message) -> Any:
        raise RuntimeError("observer bug")

    def batch_finished(self, *args: Any) -> None:
        raise RuntimeError("observer bug")


@pytest.fixture
def traffic(conn: Conn) -> dict[str, int]:
    """One batch: ok, fails (max_retries 0: dead-lettered at once), unknown type."""
    make_queue(conn, "q", "c", max_retries=0)
    ids = {"ok": send(conn, "q", type="ok"), "boom": send(conn, "q", type="boom"),
           "mystery": send(conn, "q", type="mystery")}
    tick(conn, "q")
    return ids


def expected(ids: dict[str, int]) -> list[tuple[int, Outcome]]:
    return [(ids["ok"], "handled"), (ids["boom"], "dead_lettered"),
            (ids["mystery"], "unknown_type")]


def test_sync_consumer_reports_each_outcome_and_the_handler_sees_its_context(
    engine: Engine, traffic: dict[str, int]
) -> None:
    consumer = Consumer(sessionmaker(engine), queue=Queue("q"), name="c")
    recorder = Recorder()
    consumer.observe(Broken())
    consumer.observe(recorder)

    @consumer.on("ok")
    def ok(msg: Message, session: Session) -> None:
        recorder.seen_in_handler.append(current_span.get())

    @consumer.on("boom")
    def boom(msg: Message) -> None:
        raise ValueError("no")

    assert consumer.process_batch() == 3
    assert recorder.seen_in_handler == [f"span-{traffic['ok']}"]
    assert current_span.get() is None
    assert recorder.handlers == [(traffic["ok"], "handled", None),
                                 (traffic["boom"], "dead_lettered", "ValueError")]
    assert recorder.batches == [(expected(traffic), True)]


def test_async_consumer_reports_the_same(conn: Conn, traffic: dict[str, int], db: Any) -> None:
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> Recorder:
        engine = create_async_engine(db.url)
        consumer = AsyncConsumer(engine, queue="q", name="c")
        recorder = Recorder()
        consumer.observe(recorder)

        @consumer.on("ok")
        async def ok(msg: Message) -> None:
            await asyncio.sleep(0)
            recorder.seen_in_handler.append(current_span.get())

        @consumer.on("boom")
        async def boom(msg: Message) -> None:
            raise ValueError("no")

        try:
            assert await consumer.process_batch() == 3
        finally:
            await engine.dispose()
        return recorder

    recorder = asyncio.run(main())
    assert recorder.seen_in_handler == [f"span-{traffic['ok']}"]
    assert recorder.handlers == [(traffic["ok"], "handled", None),
                                 (traffic["boom"], "dead_lettered", "ValueError")]
    assert recorder.batches == [(expected(traffic), True)]


def test_a_retry_is_nacked_and_a_lost_connection_fails_the_whole_batch(
    conn: Conn, engine: Engine
) -> None:
    make_queue(conn, "q", "c")
    first, second = send(conn, "q", type="boom"), send(conn, "q", type="die")
    tick(conn, "q")
    consumer = Consumer(sessionmaker(engine), queue="q", name="c")
    recorder = Recorder()
    consumer.observe(recorder)

    @consumer.on("boom")
    def boom(msg: Message) -> None:
        raise ValueError("try later")

    @consumer.on("die")
    def die(msg: Message, session: Session) -> None:
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    with pytest.raises(Exception):  # noqa: B017 - whichever error the driver raises
        consumer.process_batch()
    assert recorder.handlers[0] == (first, "nacked", "ValueError")
    assert recorder.handlers[1][:2] == (second, "failed")
    assert recorder.batches == [([(first, "failed"), (second, "failed")], False)]
