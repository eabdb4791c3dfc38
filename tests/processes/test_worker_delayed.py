"""Delayed delivery through a real worker: its ticker moves a delayed event into the
queue at its due time and ticks it, so the handler runs within one tick period (plus
50 ms) of the time asked for, whether the sender notified the ticker or not."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import Database
from consumer_support import HANDLED_TABLE, listening
from engine_helpers import Conn, is_our_engine, make_queue, scalar, wait_until
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from sqlalchemy_pgque import Queue

TICK_PERIOD = 0.1  # pgque.config.tick_period_ms, the worker's ticker default
ALLOWED_LATENESS = TICK_PERIOD + 0.05


@pytest.fixture
def quiet_queue(conn: Conn) -> Conn:
    if not is_our_engine(conn):
        pytest.skip("delayed delivery is a PgQue 0.3 function")
    # No periodic tick would cover the event before an hour: only the ticker's
    # delayed-delivery path can deliver it in time.
    make_queue(conn, "q", "c", ticker_max_lag="1 hour", ticker_idle_period="1 hour")
    conn.execute(HANDLED_TABLE)
    assert scalar(conn, "select tick_period_ms from pgque.config") == TICK_PERIOD * 1000
    return conn


def lateness(conn: Conn, due: datetime) -> float:
    """Seconds from ``due`` to the handler's insert, once it ran."""
    row = wait_until(lambda: conn.execute(
        "select extract(epoch from handled_at - %s) from handled", (due,)).fetchone(),
        timeout=15, what="the delayed event's handler")
    return float(row[0])


def test_a_worker_handles_a_delayed_send_at_its_due_time(
    quiet_queue: Conn, workers: Any, db: Database
) -> None:
    workers("workers_app:consumer", extra_args=("--ticker",))
    wait_until(lambda: listening(quiet_queue), what="the worker's LISTEN")
    engine = create_engine(db.url)
    try:
        due = datetime.now(timezone.utc) + timedelta(seconds=1.5)
        with Session(engine) as session, session.begin():
            pending = Queue("q").send(session, {"n": 1}, type="later", deliver_at=due)
        assert pending.delayed_id is not None
        late = lateness(quiet_queue, due)
    finally:
        engine.dispose()
    assert 0 <= late <= ALLOWED_LATENESS, f"handled {late:.3f} s after its due time"


def test_an_unannounced_send_at_is_found_within_a_tick_period(
    quiet_queue: Conn, workers: Any
) -> None:
    workers("workers_app:consumer", extra_args=("--ticker",))
    wait_until(lambda: listening(quiet_queue), what="the worker's LISTEN")
    # Another client's send_at notifies nobody: the ticker finds it on its next look.
    due = scalar(quiet_queue, "select clock_timestamp() + interval '1.5 seconds'")
    assert scalar(quiet_queue, "select pgque.send_at('q', 'later', '{}', %s)", due)
    late = lateness(quiet_queue, due)
    assert 0 <= late <= ALLOWED_LATENESS, f"handled {late:.3f} s after its due time"
