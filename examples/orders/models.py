"""ORM models and the queue declaration of the orders example."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_pgque import Queue, QueueRegistry


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]
    total_cents: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Shipment(Base):
    __tablename__ = "shipments"

    id: Mapped[int] = mapped_column(primary_key=True)
    # unique: a redelivered event must not ship twice (the handler's write and the ack
    # commit together, so this only guards against bugs, never fires in normal runs)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), unique=True)
    shipped_at: Mapped[datetime] = mapped_column(server_default=func.now())


# Queues the app declares; alembic_ops compares them with the database on autogenerate.
registry = QueueRegistry()
orders_q = Queue(
    "orders",
    consumers=["shipping"],
    config={"ticker_max_lag": "100 milliseconds"},
    registry=registry,
)
