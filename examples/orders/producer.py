"""Place orders: each order and its ``order.created`` event commit together."""

from __future__ import annotations

from sqlalchemy.orm import Session

from .models import Order, orders_q


def place_order(session: Session, customer: str, total_cents: int) -> Order:
    order = Order(customer=customer, total_cents=total_cents)
    session.add(order)
    # The payload is a callable: it runs after the flush that assigns order.id.
    orders_q.send(
        session,
        lambda: {"order_id": order.id, "customer": customer, "total_cents": total_cents},
        type="order.created",
    )
    return order
