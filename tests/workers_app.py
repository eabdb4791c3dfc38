"""Consumers for the worker subprocess tests (``python -m sqlalchemy_pgque.worker``).

The session factory is unbound: the tests give the database with ``--url``. Behaviour
switches come from environment variables, read when the worker imports this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import AsyncConsumer, Consumer, Message

#: Advisory lock key a handler waits on for a message whose payload has "block": true,
#: when APP_BLOCK=1: the test holds it to freeze the worker mid-batch.
BLOCK_KEY = 4242

SessionLocal = sessionmaker()

_INSERT = text(
    "INSERT INTO handled (msg_id, type, retry_count, handled_by) "
    "VALUES (:id, :type, :retry, :by)"
)


def _row(msg: Message) -> dict[str, object]:
    # The worker names each consumer's thread after its label (queue/consumer.member).
    return {"id": msg.msg_id, "type": msg.type, "retry": msg.retry_count,
            "by": threading.current_thread().name}


def record(msg: Message, session: Session) -> None:
    session.execute(_INSERT, _row(msg))
    if os.environ.get("APP_BLOCK") == "1" and isinstance(msg.payload, dict) \
            and msg.payload.get("block"):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": BLOCK_KEY})
    delay = float(os.environ.get("APP_HANDLER_DELAY", "0"))
    if delay:
        time.sleep(delay)  # stands in for a handler's own work


consumer = Consumer(
    SessionLocal,
    queue=os.environ.get("APP_QUEUE", "q"),
    name="c",
    poll_interval=float(os.environ.get("APP_POLL_INTERVAL", "30")),
)
consumer.on("*")(record)

other_queue = Consumer(SessionLocal, queue="q2", name="c",
                       poll_interval=float(os.environ.get("APP_POLL_INTERVAL", "30")))
other_queue.on("*")(record)

both = [consumer, other_queue]


def _dead_interval() -> float | None:
    raw = os.environ.get("APP_DEAD_INTERVAL")
    return float(raw) if raw else None


cooperative = Consumer(
    SessionLocal,
    queue=os.environ.get("APP_QUEUE", "q"),
    name=os.environ.get("APP_GROUP", "group"),
    subconsumer=os.environ.get("APP_MEMBER", "w"),
    dead_interval=_dead_interval(),
    poll_interval=float(os.environ.get("APP_POLL_INTERVAL", "30")),
)
cooperative.on("*")(record)

stranger = Consumer(SessionLocal, queue="q", name="stranger")

not_a_consumer = 42


async def record_async(msg: Message, session: AsyncSession) -> None:
    await session.execute(_INSERT, _row(msg))


async_consumer = AsyncConsumer(
    async_sessionmaker(), queue="q", name="c",
    poll_interval=float(os.environ.get("APP_POLL_INTERVAL", "30")),
)
async_consumer.on("*")(record_async)

async_cooperative = AsyncConsumer(
    async_sessionmaker(), queue="q", name=os.environ.get("APP_GROUP", "group"),
    subconsumer="aw",
    poll_interval=float(os.environ.get("APP_POLL_INTERVAL", "30")),
)


@async_cooperative.on("*")
async def record_async_slowly(msg: Message, session: AsyncSession) -> None:
    await session.execute(_INSERT, {**_row(msg), "by": f"aw:{msg.batch_id}"})
    await asyncio.sleep(0.05)  # members overlap only if the loop runs them side by side

chatty = Consumer(SessionLocal, queue="q", name="c",
                  poll_interval=float(os.environ.get("APP_POLL_INTERVAL", "30")))


@chatty.on("ok", "boom")
def log_then_maybe_fail(msg: Message) -> None:
    """Logs from inside the handler; a message of type "boom" fails."""
    logging.getLogger("workers_app").info("handling %s", msg.type)
    if msg.type == "boom":
        raise ValueError("boom")
