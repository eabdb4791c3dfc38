"""The sqlalchemy-pgque demo, end to end: migrations, producer, worker.

    python3 dev.py demo                  # on a throwaway embedded PostgreSQL
    DATABASE_URL=postgresql+psycopg://... python3 dev.py demo   # on your server

1. ``alembic upgrade head`` installs the PgQue engine, creates the ``orders`` queue,
   subscribes the ``shipping`` consumer and creates the app's tables (one migration,
   written by ``alembic revision --autogenerate`` from the models and the queue
   declaration in ``orders/models.py``).
2. The worker starts as a subprocess: ``python -m sqlalchemy_pgque.worker
   orders.workers:consumer --ticker``.
3. The producer places orders; each order and its event commit together. One
   transaction is rolled back: its order and its event vanish together.
4. The demo waits for the shipments, shows the delivery latency, stops the worker with
   SIGTERM (exit code 0) and downgrades the database back to empty.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, create_engine, func, make_url, select, text
from sqlalchemy.orm import Session

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from orders.models import Order, Shipment  # noqa: E402
from orders.producer import place_order  # noqa: E402


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def alembic_config(url: URL) -> Config:
    cfg = Config(str(HERE / "orders" / "alembic.ini"))
    # ConfigParser interpolates %, and the embedded server's socket path is %-escaped.
    cfg.set_main_option("sqlalchemy.url", url.render_as_string(False).replace("%", "%%"))
    return cfg


def start_worker(url: URL) -> subprocess.Popen[bytes]:
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env["DATABASE_URL"] = url.render_as_string(False)
    return subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_pgque.worker", "orders.workers:consumer", "--ticker"],
        env=env,
    )


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"[demo] timed out waiting for {what}")
        time.sleep(0.01)


def run(url: URL) -> None:
    cfg = alembic_config(url)
    say("alembic upgrade head: install PgQue, create queue 'orders', subscribe 'shipping', tables")
    command.upgrade(cfg, "head")
    engine = create_engine(url)

    worker = start_worker(url)
    try:
        def worker_listening() -> bool:
            # A new transaction each time: pg_stat_activity is a per-transaction snapshot.
            with engine.connect() as conn:
                return bool(conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
                )).scalar_one())

        wait_for(worker_listening, 30, "the worker to listen")
        say("worker is up (consumer 'shipping' + ticker)")

        placed: list[int] = []
        for customer, cents in [("ada", 4200), ("grace", 1999), ("linus", 500)]:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                order = place_order(session, customer, cents)
            placed.append(order.id)
            say(f"placed order {order.id} for {customer}: committed with its event")

        with Session(engine) as session:
            session.begin()
            doomed = place_order(session, "mallory", 1)
            session.flush()
            say(f"placed order {doomed.id} for mallory ... and rolled back: no order, no event")
            session.rollback()

        def all_shipped() -> bool:
            with Session(engine) as session:
                return set(placed) <= set(session.scalars(select(Shipment.order_id)))

        wait_for(all_shipped, 30, "the shipments")
        with Session(engine) as session:
            # Both timestamps are now() of their transactions: the producer's, and the
            # worker's batch that created the shipment.
            delays = session.execute(
                select(Order.id, Shipment.shipped_at - Order.created_at)
                .join(Shipment, Shipment.order_id == Order.id)
                .order_by(Order.id)
            ).all()
        for order_id, delay in delays:
            ms = delay.total_seconds() * 1000
            say(f"order {order_id} shipped by the worker, {ms:.1f} ms after it was placed")
        with Session(engine) as session:
            orders = session.scalar(select(func.count()).select_from(Order))
            shipments = session.scalar(select(func.count()).select_from(Shipment))
        say(f"database: {orders} orders, {shipments} shipments "
            "(the rolled-back order left nothing)")
        with engine.connect() as conn:
            info = conn.execute(text(
                "SELECT consumer_name, pending_events, current_batch "
                "FROM pgque.get_consumer_info('orders')"
            )).one()
        say(f"consumer {info.consumer_name}: pending_events={info.pending_events}, "
            f"open batch={info.current_batch}")
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        say(f"worker stopped by SIGTERM, exit code {code}")
        engine.dispose()

    say("alembic downgrade base: drop tables, unsubscribe, drop queue, uninstall PgQue")
    command.downgrade(cfg, "base")
    if code != 0:
        raise SystemExit(code)
    say("done")


def main() -> None:
    configured = os.environ.get("DATABASE_URL")
    if configured:
        say("using DATABASE_URL")
        run(make_url(configured))
        return
    from sqlalchemy_pgque.embedded import EmbeddedPostgres

    say("starting an embedded PostgreSQL (no server needed)")
    with EmbeddedPostgres() as pg:
        run(pg.url)


if __name__ == "__main__":
    main()
