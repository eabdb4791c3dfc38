"""Workers behind PgBouncer in transaction mode: the batches go through the pool, the
connections that need a server session of their own (LISTEN, the ticker's lock)
straight to PostgreSQL with ``--direct-url``, and every event is handled once.

The pooler is the system's ``pgbouncer`` (Debian's package), started by the test in
front of the suite's server; without it the module is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Database, Server
from consumer_support import HANDLED_TABLE, handled_counts, listening, one_error_line
from engine_helpers import Conn, wait_until
from pgbouncer import PgBouncer, find_pgbouncer
from sqlalchemy import URL, Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from sqlalchemy_pgque import AsyncConsumer, Consumer, Message, Queue
from sqlalchemy_pgque.ticker import TICKER_LOCK_KEY, Ticker

PGBOUNCER = find_pgbouncer()
pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (Debian: apt-get install pgbouncer); these tests "
           "run workers behind it",
)


@pytest.fixture(scope="module")
def bouncer(pg_server: Server) -> Iterator[PgBouncer]:
    assert PGBOUNCER is not None
    with PgBouncer(PGBOUNCER, pg_server.base_dsn) as pool:
        yield pool


@pytest.fixture
def group(conn: Conn) -> None:
    """Queue ``q`` with the cooperative consumer ``group`` (its members join at run time)."""
    conn.execute("SELECT pgque.create_queue('q')")
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'group', 'w')")
    conn.execute(HANDLED_TABLE)


def url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def pooled_engine(url: URL) -> Engine:
    # What every application engine behind PgBouncer before 1.21 needs (see README).
    return create_engine(url, connect_args={"prepare_threshold": None})


def produce(url: URL, count: int, threads: int = 2) -> list[int]:
    """``count`` events sent with ``Queue.send`` through ``url``, one per transaction,
    from ``threads`` threads; their ids."""
    engine = pooled_engine(url)
    queue = Queue("q")
    ids: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            for k in range(n):
                with Session(engine) as session, session.begin():
                    event = queue.send(session, {"k": k})
                assert event.event_id is not None
                with lock:
                    ids.append(event.event_id)
        except BaseException as exc:
            errors.append(exc)

    started = [threading.Thread(target=send, args=(count // threads,)) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    engine.dispose()
    assert not errors, errors
    return ids


def ticker_lock_holders(conn: Conn) -> list[tuple[int, str]]:
    """(backend pid, application_name) of the sessions holding the ticker lock here."""
    rows = conn.execute(
        "SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s "
        "AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())",
        (TICKER_LOCK_KEY[0] & 0xFFFFFFFF, TICKER_LOCK_KEY[1] & 0xFFFFFFFF),
    ).fetchall()
    return [(int(pid), str(name)) for pid, name in rows]


def listening_backends(conn: Conn) -> set[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'LISTEN %'").fetchall()
    return {int(row[0]) for row in rows}


def pooled_backends(bouncer: PgBouncer, db: Database) -> set[int]:
    """The server processes behind the pool's connections to ``db``."""
    return {int(s["remote_pid"]) for s in bouncer.show("SERVERS") if s["database"] == db.name}


def worker_clients(bouncer: PgBouncer, db: Database) -> set[str]:
    """application_name of the pool's clients for ``db`` (a worker's: its pid in it)."""
    return {str(c["application_name"]) for c in bouncer.show("CLIENTS")
            if c["database"] == db.name}


@pytest.mark.usefixtures("group")
def test_two_workers_behind_pgbouncer_handle_every_event_once_under_one_ticker(
    conn: Conn, db: Database, bouncer: PgBouncer, workers: Any
) -> None:
    pooled = bouncer.url(db.name)

    def start(target: str) -> Any:
        # A poll interval of 30 s: only a LISTEN woken by the ticker delivers in time.
        return workers(
            target, with_url=False, APP_MEMBER="h", APP_POLL_INTERVAL="30",
            extra_args=("--ticker", "--concurrency", "2", "--url", url_text(pooled),
                        "--direct-url", url_text(db.url)))

    # Members of one cooperative consumer: h-1 and h-2 in threads, aw-1 and aw-2 on the
    # other process's event loop.
    first, second = start("workers_app:cooperative"), start("workers_app:async_cooperative")
    wait_until(lambda: listening(conn) == 4, timeout=20, what="four members listening")
    holders = wait_until(lambda: ticker_lock_holders(conn), what="a ticker to lead")
    ids = produce(pooled, 160)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=20,
               what="every event handled once")

    # One leader, and the session state on direct connections only: neither the lock
    # nor a LISTEN sits on a server connection of the pool, which other clients share.
    assert len(ticker_lock_holders(conn)) == 1
    (lock_pid, lock_owner), = holders
    leader, follower = (first, second) if lock_owner.endswith(f" {first.pid}") \
        else (second, first)
    assert lock_owner == f"sqlalchemy_pgque ticker {leader.pid}"
    pooled_pids = pooled_backends(bouncer, db)
    assert pooled_pids, "the batches went through the pool"
    assert lock_pid not in pooled_pids
    assert not listening_backends(conn) & pooled_pids
    assert {f"sqlalchemy_pgque worker {w.pid}" for w in (first, second)} <= \
        worker_clients(bouncer, db)
    assert handled_by(conn) >= {"q/group.h-1", "q/group.h-2", "aw:"}

    # The leader stops: the follower takes the lock over on its direct connection.
    leader.signal(signal.SIGTERM)
    assert leader.wait() == 0, leader.output()
    wait_until(lambda: [name for _, name in ticker_lock_holders(conn)]
               == [f"sqlalchemy_pgque ticker {follower.pid}"], timeout=15,
               what="the follower to take the ticker lock")
    ids += produce(pooled, 40)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=20,
               what="every event handled once after the takeover")
    follower.signal(signal.SIGTERM)
    assert follower.wait() == 0, follower.output()

    for worker in (leader, follower):
        output = worker.output()
        assert "Traceback" not in output, output
        assert "prepared statement" not in output, output
        assert "WARNING" not in output, output
    assert leader.output().count("holding the ticker lock") == 1
    assert follower.output().count("holding the ticker lock") == 1


HANDLED_INSERT = text("INSERT INTO handled (msg_id, retry_count) VALUES (:id, 0)")


def handled_by(conn: Conn) -> set[str]:
    """Who handled events: a sync member's thread, or ``aw:`` for the async members."""
    return {str(row[0]) for row in conn.execute(
        "SELECT DISTINCT regexp_replace(handled_by, '^aw:.*', 'aw:') FROM handled")}


@pytest.mark.usefixtures("group")
def test_ticker_on_a_pooled_url_alone_is_refused(
    db: Database, bouncer: PgBouncer, workers: Any
) -> None:
    worker = workers("workers_app:cooperative", with_url=False,
                     extra_args=("--ticker", "--url", url_text(bouncer.url(db.name))))
    line = one_error_line(worker)
    assert "--ticker: --url goes through a connection pooler" in line
    assert "--direct-url" in line


@pytest.mark.usefixtures("group")
def test_consumers_on_a_pooled_url_alone_poll(
    conn: Conn, db: Database, engine: Engine, bouncer: PgBouncer, workers: Any
) -> None:
    worker = workers("workers_app:cooperative", with_url=False, APP_POLL_INTERVAL="0.2",
                     extra_args=("--concurrency", "2", "--url",
                                 url_text(bouncer.url(db.name))))
    ticker = Ticker(engine)  # straight to PostgreSQL
    thread = threading.Thread(target=ticker.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        ids = produce(bouncer.url(db.name), 40)
        wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=20,
                   what="every event handled once")
    finally:
        ticker.stop()
        thread.join(10)
    assert listening(conn) == 0
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()
    output = worker.output()
    assert "--url goes through a connection pooler" in output
    assert "poll every poll_interval" in output
    assert "Traceback" not in output and "prepared statement" not in output, output


async def _run_then_dispose(consumer: AsyncConsumer, engine: AsyncEngine) -> None:
    try:
        await consumer.run()
    finally:
        await engine.dispose()


@pytest.mark.usefixtures("group")
def test_async_consumer_given_a_pooled_engine_polls(
    conn: Conn, db: Database, engine: Engine, bouncer: PgBouncer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pooled: AsyncEngine = create_async_engine(bouncer.url(db.name),
                                              connect_args={"prepare_threshold": None})
    consumer = AsyncConsumer(pooled, queue="q", name="group", subconsumer="w",
                             poll_interval=0.05)

    @consumer.on("*")
    async def record(msg: Message, session: AsyncSession) -> None:
        await session.execute(HANDLED_INSERT, {"id": msg.msg_id})

    caplog.set_level(logging.INFO, logger="sqlalchemy_pgque")
    ticker = Ticker(engine)  # straight to PostgreSQL
    threads = [threading.Thread(target=ticker.run, kwargs={"install_signal_handlers": False}),
               threading.Thread(target=asyncio.run, args=(_run_then_dispose(consumer, pooled),))]
    for thread in threads:
        thread.start()
    try:
        assert consumer.listening.wait(10)
        ids = produce(bouncer.url(db.name), 20, threads=1)
        wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=20,
                   what="every event handled once")
    finally:
        consumer.stop()
        ticker.stop()
        for thread in threads:
            thread.join(10)
    assert listening(conn) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("q/group.w: its connection goes through a connection pooler" in m
               for m in messages), messages
    assert not any("prepared statement" in m for m in messages), messages


@pytest.fixture
def one_server_connection(pg_server: Server) -> Iterator[PgBouncer]:
    """A pool of one server connection: every client's statements share one session,
    so whatever session state one of them leaves, the next one meets."""
    assert PGBOUNCER is not None
    with PgBouncer(PGBOUNCER, pg_server.base_dsn, pool_size=1) as pool:
        yield pool


def test_ticker_and_consumer_given_a_pooled_engine_leak_nothing_and_poll(
    conn: Conn, db: Database, one_server_connection: PgBouncer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn.execute("SELECT pgque.create_queue('q')")
    conn.execute("SELECT pgque.set_queue_config('q', 'ticker_max_lag', '50 milliseconds')")
    conn.execute("SELECT pgque.subscribe('q', 'c')")
    conn.execute(HANDLED_TABLE)
    url = one_server_connection.url(db.name)
    engine = pooled_engine(url)
    # The ticker's own connection from a plain engine, as an application would have it.
    plain = create_engine(url)
    ticker = Ticker(plain, tick_period=0.05)
    consumer = Consumer(engine, queue="q", name="c", poll_interval=0.05)
    handled: list[int] = []
    consumer.on("*")(lambda msg: handled.append(msg.msg_id))
    caplog.set_level(logging.INFO, logger="sqlalchemy_pgque")
    threads = [threading.Thread(target=ticker.run, kwargs={"install_signal_handlers": False}),
               threading.Thread(target=consumer.run, kwargs={"install_signal_handlers": False})]
    for thread in threads:
        thread.start()
    try:
        wait_until(ticker.leading.is_set, what="the ticker to lead")
        ids = produce(url, 20, threads=1)
        wait_until(lambda: sorted(handled) == sorted(ids), timeout=20,
                   what="every event handled once")
        # The ticker's settings stayed with its session: the one server connection
        # serves this client as it serves the ticker.
        with engine.connect() as other:
            for _ in range(20):
                setting = other.exec_driver_sql("SHOW synchronous_commit").scalar()
                assert setting == "on"
    finally:
        consumer.stop()
        ticker.stop()
        for thread in threads:
            thread.join(10)
        engine.dispose()
        plain.dispose()
    messages = [r.getMessage() for r in caplog.records]
    assert any("ticker: its connection goes through a connection pooler" in m
               for m in messages), messages
    assert any("q/c: its connection goes through a connection pooler" in m
               for m in messages), messages
    assert not any("prepared statement" in m for m in messages), messages
    assert not any("listening on" in m for m in messages), messages
