"""Consumers for the fault-injection runs (``python -m sqlalchemy_pgque.worker
fault_app:single --url ...``): each handler writes one row per message in the batch
Session, so the rows that commit are exactly the messages whose batch committed.

``FAULT_HANDLER_DELAY`` (seconds) stands in for each handler's own work.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Consumer, Message

SessionLocal = sessionmaker()

_INSERT = text(
    "INSERT INTO handled (msg_id, consumer, k, member) VALUES (:msg_id, :consumer, :k, :member)"
)
_DELAY = float(os.environ.get("FAULT_HANDLER_DELAY", "0"))


def _recorder(consumer: str) -> Callable[[Message, Session], None]:
    def record(msg: Message, session: Session) -> None:
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        session.execute(_INSERT, {
            "msg_id": msg.msg_id, "consumer": consumer, "k": payload.get("k"),
            # The worker names each consumer's thread after its label.
            "member": threading.current_thread().name,
        })
        if _DELAY:
            time.sleep(_DELAY)

    return record


def _consumer(name: str, subconsumer: str | None = None) -> Consumer:
    consumer = Consumer(SessionLocal, queue="q", name=name, subconsumer=subconsumer,
                        poll_interval=5)
    consumer.on("*")(_recorder(name))
    return consumer


single = _consumer("c")
coop = _consumer("group", subconsumer="w")
fanout = [_consumer("c1"), _consumer("c2")]
