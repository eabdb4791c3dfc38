"""Structured logs: every line a consumer logs, the library's and the handler's, says
which queue, consumer, batch and message it is about."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Database
from engine_helpers import Conn, make_queue, send, tick, wait_until
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from sqlalchemy_pgque import Message
from sqlalchemy_pgque.consumer import AsyncConsumer, Consumer
from sqlalchemy_pgque.logs import JsonFormatter, _CaptureFields, log_fields

Lines = list[dict[str, Any]]


@pytest.fixture
def logged() -> Iterator[Callable[[], Lines]]:
    """The records logged under ``sqlalchemy_pgque`` and ``app`` so far, formatted by
    JsonFormatter and parsed back."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_CaptureFields())
    loggers = [logging.getLogger("sqlalchemy_pgque"), logging.getLogger("app")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def traffic(conn: Conn) -> tuple[int, int, int]:
    make_queue(conn, "q", "c")
    ids = send(conn, "q", type="ok"), send(conn, "q", type="boom"), send(conn, "q", type="odd")
    tick(conn, "q")
    return ids


def check(lines: Lines, ids: tuple[int, int, int]) -> None:
    ok, boom, odd = ids
    said = [line for line in lines if line["logger"] == "app"]
    assert [(line["message"], line["msg_id"]) for line in said] == [
        ("handling ok", ok), ("handling boom", boom)]
    batch_id = said[0]["batch_id"]
    for line in said:
        assert (line["queue"], line["consumer"], line["batch_id"]) == ("q", "c", batch_id)
    failure = next(line for line in lines if "failed on message" in line["message"])
    assert failure["msg_id"] == boom and failure["batch_id"] == batch_id
    assert failure["level"] == "ERROR" and "ValueError: boom" in failure["exception"]
    unknown = next(line for line in lines if "no handler for type" in line["message"])
    assert (unknown["msg_id"], unknown["batch_id"], unknown["queue"]) == (odd, batch_id, "q")


def test_a_sync_consumer_logs_carry_its_fields(
    engine: Engine, traffic: tuple[int, int, int], logged: Callable[[], Lines]
) -> None:
    consumer = Consumer(sessionmaker(engine), queue="q", name="c")

    @consumer.on("ok", "boom")
    def handle(msg: Message) -> None:
        logging.getLogger("app").info("handling %s", msg.type)
        if msg.type == "boom":
            raise ValueError("boom")

    assert consumer.process_batch() == 3
    assert log_fields() == {}
    check(logged(), traffic)


def test_an_async_consumer_logs_carry_its_fields(
    db: Database, traffic: tuple[int, int, int], logged: Callable[[], Lines]
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> None:
        engine = create_async_engine(db.url)
        consumer = AsyncConsumer(engine, queue="q", name="c")

        @consumer.on("ok", "boom")
        async def handle(msg: Message) -> None:
            await asyncio.sleep(0)
            logging.getLogger("app").info("handling %s", msg.type)
            if msg.type == "boom":
                raise ValueError("boom")

        try:
            assert await consumer.process_batch() == 3
        finally:
            await engine.dispose()

    asyncio.run(main())
    check(logged(), traffic)


def test_the_worker_writes_one_json_object_per_line(
    conn: Conn, workers: Any, traffic: tuple[int, int, int]
) -> None:
    worker = workers("workers_app:chatty", extra_args=("--log-format", "json"))
    wait_until(lambda: "failed on message" in worker.output(), what="the handler failure")
    worker.signal(15)
    assert worker.wait() == 0
    lines = [json.loads(line) for line in worker.output().splitlines() if line.strip()]
    check([{**line, "logger": "app" if line["logger"] == "workers_app" else line["logger"]}
           for line in lines], traffic)
    assert any(line["message"].endswith("stopped") and line["consumer"] == "c"
               for line in lines)
