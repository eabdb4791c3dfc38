"""A consumer for the metrics tests: one type handled, one that always fails, and
unknown types acked (so each event ends handled, dead-lettered or unknown, once).

The session factory is unbound: the tests give the database with ``--url``.
"""

from __future__ import annotations

import os

from sqlalchemy.orm import sessionmaker

from sqlalchemy_pgque import Consumer, Message

consumer = Consumer(
    sessionmaker(), queue="q", name="c", retry_after=0, unknown_handler_policy="ack",
    poll_interval=float(os.environ.get("APP_POLL_INTERVAL", "1")),
)


@consumer.on("ok")
def ok(msg: Message) -> None:
    pass


@consumer.on("boom")
def boom(msg: Message) -> None:
    raise RuntimeError("always fails")
