"""The orders app, tested with sqlalchemy_pgque.testing only: a fresh migrated database
per test (``pgque_engine``), the events read where they were sent (``sent``,
``assert_sent``), and the shipping consumer run in the test (``deliver``)."""

from __future__ import annotations

import pytest
from orders.models import Order, Shipment, orders_q
from orders.producer import place_order
from orders.workers import consumer
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sqlalchemy_pgque.testing import assert_sent, deliver, dlq, sent


def test_the_event_commits_with_the_order(pgque_engine: Engine) -> None:
    with Session(pgque_engine, expire_on_commit=False) as session, session.begin():
        order = place_order(session, "ada", 4200)

    assert_sent(pgque_engine, orders_q, type="order.created", count=1,
                payload={"order_id": order.id, "customer": "ada", "total_cents": 4200})


def test_a_rollback_sends_nothing(pgque_engine: Engine) -> None:
    with Session(pgque_engine) as session:
        session.begin()
        place_order(session, "mallory", 1)
        session.flush()
        assert [event.type for event in sent(session, orders_q)] == ["order.created"]
        session.rollback()

    assert sent(pgque_engine, orders_q) == []
    with Session(pgque_engine) as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 0


def test_the_handler_ships_the_order(pgque_engine: Engine) -> None:
    with Session(pgque_engine, expire_on_commit=False) as session, session.begin():
        order = place_order(session, "grace", 1999)

    # The worker binds the consumer's unbound sessionmaker with --url; here, engine=.
    report = deliver(consumer, engine=pgque_engine)

    assert report.outcomes == ["handled"]
    assert report.handled[0].payload["order_id"] == order.id
    with Session(pgque_engine) as session:
        assert session.scalars(select(Shipment.order_id)).all() == [order.id]


def test_an_order_still_being_placed_is_not_shipped(pgque_engine: Engine) -> None:
    with Session(pgque_engine) as session:
        session.begin()
        place_order(session, "linus", 500)
        session.flush()
        # The event is in the table, but its transaction is open: no tick takes it.
        assert deliver(consumer, engine=pgque_engine).outcomes == []
        session.commit()

    assert deliver(consumer, engine=pgque_engine).outcomes == ["handled"]


def test_a_failing_handler_ends_in_the_dead_letter_queue(pgque_engine: Engine) -> None:
    with Session(pgque_engine) as session, session.begin():
        # No such order: the shipment's foreign key refuses it, every time.
        orders_q.send(session, {"order_id": 404, "customer": "nobody", "total_cents": 0},
                      type="order.created")

    # By default the handler's error fails the test, after the batch was handled the
    # way the worker handles it: the message nacked for a retry, the batch acked.
    with pytest.raises(IntegrityError):
        deliver(consumer, engine=pgque_engine)
    assert dlq(pgque_engine, orders_q) == []

    # Its retries, made due at once, until the queue's max_retries (5) are spent.
    report = deliver(consumer, engine=pgque_engine, include_retries=True, raise_errors=False)

    assert report.outcomes == ["nacked"] * 4 + ["dead_lettered"]
    assert [d.message.retry_count for d in report] == [1, 2, 3, 4, 5]
    [dead] = dlq(pgque_engine, orders_q)
    assert dead.payload["order_id"] == 404
    assert dead.reason is not None and "ForeignKeyViolation" in dead.reason
    with Session(pgque_engine) as session:
        assert session.scalar(select(func.count()).select_from(Shipment)) == 0
