"""The shipping worker: ``python -m sqlalchemy_pgque.worker orders.workers:consumer``.

The session factory is unbound; the worker's ``--url`` (or ``DATABASE_URL``) binds it.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Consumer, Message

from .models import Shipment, orders_q

log = logging.getLogger("orders.shipping")

consumer = Consumer(sessionmaker(), queue=orders_q, name="shipping", poll_interval=5.0)


@consumer.on("order.created")
def ship(msg: Message, session: Session) -> None:
    # This write and the batch ack commit in one transaction: a crash before the
    # commit redelivers the batch and leaves no shipment behind.
    session.add(Shipment(order_id=msg.payload["order_id"]))
    log.info("shipping order %s for %s", msg.payload["order_id"], msg.payload["customer"])
