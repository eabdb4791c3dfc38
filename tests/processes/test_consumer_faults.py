"""Consumers under database faults, in-process: a lost connection is never a handler
failure, a handler's own error always is, and a batch abandoned on shutdown comes back
whole. Faults are real: backends terminated with ``pg_terminate_backend``, statements
cancelled by the server."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from conftest import Database
from consumer_support import HANDLED_TABLE, Running, handled_counts, open_batch, start
from engine_helpers import Conn, make_queue, send_batches, send_many, tick, wait_until
from psycopg import sql
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from sqlalchemy_pgque import Message, PermissionDenied, Queue
from sqlalchemy_pgque.consumer import AsyncConsumer, Consumer
from sqlalchemy_pgque.ticker import Ticker

_INSERT = text("INSERT INTO handled (msg_id, type, retry_count) VALUES (:id, :type, :retry)")
_KILL_MYSELF = text("SELECT pg_terminate_backend(pg_backend_pid())")
_LOCK_KEY = 77001


@pytest.fixture
def queue(conn: Conn) -> Queue:
    make_queue(conn, "q", "c")
    conn.execute(HANDLED_TABLE)
    return Queue("q")


def _row(msg: Message) -> dict[str, object]:
    return {"id": msg.msg_id, "type": msg.type, "retry": msg.retry_count}


def retry_rows(conn: Conn) -> list[int]:
    return [int(r[0]) for r in conn.execute("SELECT ev_id FROM pgque.retry_queue ORDER BY ev_id")]


class FaultAt:
    """A handler recording each message, which runs ``fault`` when handling the n-th
    message it is given, for each n in ``nths`` (redeliveries count)."""

    def __init__(self, fault: Callable[[Session], None], *nths: int) -> None:
        self.fault = fault
        self.nths = set(nths)
        self.seen = 0
        self.lock = threading.Lock()

    def __call__(self, msg: Message, session: Session) -> None:
        session.execute(_INSERT, _row(msg))
        with self.lock:
            self.seen += 1
            strike = self.seen in self.nths
        if strike:
            self.fault(session)


def kill_own_backend(session: Session) -> None:
    session.execute(_KILL_MYSELF)


def swallow_the_loss_and_raise_own_error(session: Session) -> None:
    try:
        session.execute(_KILL_MYSELF)
    except OperationalError:
        pass
    raise ValueError("the handler's own error, raised after the connection died")


@pytest.mark.parametrize("fault", [kill_own_backend, swallow_the_loss_and_raise_own_error],
                         ids=["raised", "swallowed"])
def test_connection_lost_in_a_handler_rolls_back_the_batch_and_nacks_nothing(
    conn: Conn, engine: Engine, queue: Queue, fault: Callable[[Session], None]
) -> None:
    ids = send_batches(conn, batches=1, size=3)
    consumer = Consumer(engine, queue=queue, name="c")
    consumer.on("*")(FaultAt(fault, 2))

    # process_batch() raises what the handler raised; run() would back off and go on.
    with pytest.raises(OperationalError if fault is kill_own_backend else ValueError):
        consumer.process_batch()
    assert handled_counts(conn) == {}
    assert retry_rows(conn) == []
    # Everything of the batch transaction rolled back, the receive included: the same
    # batch comes back whole, and every message is handled once.
    assert consumer.process_batch() == 3
    assert handled_counts(conn) == dict.fromkeys(ids, 1)
    assert open_batch(conn, "q", "c") is None


def test_errors_on_a_healthy_connection_stay_handler_failures(
    conn: Conn, engine: Engine, queue: Queue
) -> None:
    conn.execute("CREATE TABLE once (k int PRIMARY KEY)")
    conn.execute("INSERT INTO once VALUES (1)")
    ids = send_batches(conn, batches=1, size=3)
    consumer = Consumer(engine, queue=queue, name="c")

    @consumer.on("*")
    def handle(msg: Message, session: Session) -> None:
        session.execute(_INSERT, _row(msg))
        if msg.msg_id == ids[0]:
            session.execute(text("INSERT INTO once VALUES (1)"))  # IntegrityError
        elif msg.msg_id == ids[1]:
            session.execute(text("SET LOCAL statement_timeout = '20ms'"))
            session.execute(text("SELECT pg_sleep(1)"))  # QueryCanceled: a timeout

    assert consumer.process_batch() == 3
    assert handled_counts(conn) == {ids[2]: 1}
    assert retry_rows(conn) == ids[:2]


@pytest.fixture
def running() -> Iterator[Running]:
    started: Running = []
    yield started
    for consumer, thread in started:
        consumer.stop(abandon=True)
        thread.join(10)
        assert not thread.is_alive()


def test_run_survives_connections_dying_in_handlers_and_delivers_each_event_once(
    conn: Conn, engine: Engine, queue: Queue, running: Running,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pgque")
    consumer = Consumer(engine, queue=queue, name="c", poll_interval=30)
    consumer.on("*")(FaultAt(kill_own_backend, 2, 9, 17))
    thread = start(running, consumer)
    ids = send_batches(conn, batches=6, size=5)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=20,
               what="every event handled once despite three dead connections")
    assert thread.is_alive()
    assert retry_rows(conn) == []
    lost = [r.getMessage() for r in caplog.records if "connection lost in the handler" in
            r.getMessage()]
    assert len(lost) >= 1, caplog.text
    assert "will be redelivered" in lost[0]
    assert not [r for r in caplog.records if "failed on message" in r.getMessage()]


def test_cooperative_member_survives_its_connection_dying_mid_batch(
    conn: Conn, engine: Engine, running: Running
) -> None:
    make_queue(conn, "q", "seed")
    conn.execute(HANDLED_TABLE)
    group = Queue("q")
    with Session(engine) as session, session.begin():
        group.unsubscribe(session, "seed")
        group.subscribe_subconsumer(session, "group", "m")
    consumer = Consumer(engine, queue=group, name="group", subconsumer="m", poll_interval=30)
    consumer.on("*")(FaultAt(kill_own_backend, 4))
    thread = start(running, consumer)
    ids = send_batches(conn, batches=4, size=3)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=20,
               what="every event once")
    assert thread.is_alive()
    assert retry_rows(conn) == []


def waiting_on_lock(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND objid = %s", (_LOCK_KEY,),
    ).fetchone()
    return bool(row and row[0])


def test_stop_abandon_cancels_a_waiting_handler_and_rolls_the_batch_back(
    conn: Conn, engine: Engine, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pgque")
    ids = send_batches(conn, batches=1, size=4)
    consumer = Consumer(engine, queue=queue, name="c", poll_interval=30)

    @consumer.on("*")
    def handle(msg: Message, session: Session) -> None:
        session.execute(_INSERT, _row(msg))
        if msg.msg_id == ids[1]:
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})

    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        wait_until(lambda: waiting_on_lock(conn), what="the handler to wait on the lock")
        consumer.stop(abandon=True)
        thread.join(10)
        assert not thread.is_alive()
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    assert handled_counts(conn) == {}
    assert retry_rows(conn) == []
    assert "its 4 messages will be redelivered" in caplog.text
    assert "failed on message" not in caplog.text

    again = Consumer(engine, queue=queue, name="c")
    again.on("*")(lambda msg, session: session.execute(_INSERT, _row(msg)))
    assert again.process_batch() == 4
    assert handled_counts(conn) == dict.fromkeys(ids, 1)


def test_shutdown_timeout_abandons_a_long_batch_between_messages(
    conn: Conn, engine: Engine, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pgque")
    ids = send_batches(conn, batches=1, size=40)
    consumer = Consumer(engine, queue=queue, name="c", poll_interval=30,
                        shutdown_timeout="300 ms")
    started = threading.Event()

    @consumer.on("*")
    def handle(msg: Message, session: Session) -> None:
        session.execute(_INSERT, _row(msg))
        started.set()
        time.sleep(0.05)  # the handler's own work: 40 messages take 2 s

    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    assert started.wait(10)
    stop_at = time.monotonic()
    consumer.stop()
    thread.join(10)
    took = time.monotonic() - stop_at
    assert not thread.is_alive()
    assert took < 1.5, took  # the whole batch would have taken about 2 s
    assert handled_counts(conn) == {}
    assert "shutdown timeout of 0.3 s reached" in caplog.text
    assert "its 40 messages will be redelivered" in caplog.text

    again = Consumer(engine, queue=queue, name="c")
    again.on("*")(lambda msg, session: session.execute(_INSERT, _row(msg)))
    assert again.process_batch() == 40
    assert handled_counts(conn) == dict.fromkeys(ids, 1)


def test_stop_without_timeout_still_finishes_the_batch(
    conn: Conn, engine: Engine, queue: Queue
) -> None:
    ids = send_batches(conn, batches=1, size=5)
    consumer = Consumer(engine, queue=queue, name="c", poll_interval=30)
    started = threading.Event()

    @consumer.on("*")
    def handle(msg: Message, session: Session) -> None:
        session.execute(_INSERT, _row(msg))
        started.set()
        time.sleep(0.05)

    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    assert started.wait(10)
    consumer.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert handled_counts(conn) == dict.fromkeys(ids, 1)


# -- AsyncConsumer -----------------------------------------------------------------


async def _record_async(msg: Message, session: AsyncSession) -> None:
    await session.execute(_INSERT, _row(msg))


def test_async_connection_lost_in_a_handler_is_a_database_failure(
    conn: Conn, db: Database, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pgque")
    ids = send_batches(conn, batches=1, size=3)
    strikes = iter([True])

    async def scenario() -> None:
        engine = create_async_engine(db.url)
        try:
            consumer = AsyncConsumer(engine, queue=queue, name="c", poll_interval=30)

            @consumer.on("*")
            async def handle(msg: Message, session: AsyncSession) -> None:
                await session.execute(_INSERT, _row(msg))
                if msg.msg_id == ids[1] and next(strikes, False):
                    await session.execute(_KILL_MYSELF)

            run = asyncio.ensure_future(consumer.run(install_signal_handlers=False))
            deadline = time.monotonic() + 20
            while handled_counts(conn) != dict.fromkeys(ids, 1):
                assert not run.done(), run
                assert time.monotonic() < deadline, "every event once"
                await asyncio.sleep(0.02)
            consumer.stop()
            await asyncio.wait_for(run, 10)
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    assert retry_rows(conn) == []
    assert "connection lost in the handler" in caplog.text
    assert "failed on message" not in caplog.text


def test_async_stop_abandon_cancels_a_waiting_handler(
    conn: Conn, db: Database, queue: Queue
) -> None:
    ids = send_batches(conn, batches=1, size=3)

    async def scenario() -> None:
        engine = create_async_engine(db.url)
        try:
            consumer = AsyncConsumer(engine, queue=queue, name="c", poll_interval=30)

            @consumer.on("*")
            async def handle(msg: Message, session: AsyncSession) -> None:
                await session.execute(_INSERT, _row(msg))
                await session.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                      {"k": _LOCK_KEY})

            run = asyncio.ensure_future(consumer.run(install_signal_handlers=False))
            deadline = time.monotonic() + 10
            while not waiting_on_lock(conn):
                assert time.monotonic() < deadline, "the handler to wait on the lock"
                await asyncio.sleep(0.02)
            # From another thread, as the worker's signal handling does.
            threading.Thread(target=consumer.stop, kwargs={"abandon": True}).start()
            await asyncio.wait_for(run, 10)
        finally:
            await engine.dispose()

    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        asyncio.run(scenario())
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    assert handled_counts(conn) == {}
    assert retry_rows(conn) == []
    engine = create_engine(db.url)
    try:
        again = Consumer(engine, queue=queue, name="c")
        again.on("*")(lambda msg, session: session.execute(_INSERT, _row(msg)))
        assert again.process_batch() == 3
    finally:
        engine.dispose()
    assert handled_counts(conn) == dict.fromkeys(ids, 1)


# -- permissions ---------------------------------------------------------------------


@pytest.fixture
def login_role(conn: Conn, db: Database) -> Iterator[Callable[..., Engine]]:
    """Engines on ``db`` for a fresh LOGIN role that is a member of the given roles."""
    created: list[str] = []
    engines: list[Engine] = []

    def engine_as(*member_of: str) -> Engine:
        role = f"faults_{len(created)}_{db.name}"[:63]
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        created.append(role)
        for parent in member_of:
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(parent),
                                                          sql.Identifier(role)))
        engine = create_engine(db.url.set(username=role))
        engines.append(engine)
        return engine

    yield engine_as
    for engine in engines:
        engine.dispose()
    for role in created:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_missing_roles_are_permission_denied_naming_the_role(
    queue: Queue, login_role: Callable[..., Engine]
) -> None:
    nobody = login_role()
    with pytest.raises(PermissionDenied, match="needs the pgque_reader role"):
        Consumer(nobody, queue=queue, name="c").check()
    reader = login_role("pgque_reader")
    Consumer(reader, queue=queue, name="c").check()
    with pytest.raises(PermissionDenied, match="needs the pgque_admin role"):
        Ticker(reader).check()
    Ticker(login_role("pgque_admin")).check()


def test_receive_and_ack_without_the_role_are_permission_denied(
    conn: Conn, queue: Queue, login_role: Callable[..., Engine]
) -> None:
    send_many(conn, "q", 1)
    tick(conn, "q")
    writer = login_role("pgque_writer")
    consumer = Consumer(writer, queue=queue, name="c")
    consumer.on("*")(lambda msg: None)
    with pytest.raises(PermissionDenied, match="pgque_reader"):
        consumer.process_batch()


def test_handler_error_from_another_database_is_a_handler_failure(
    conn: Conn, engine: Engine, queue: Queue
) -> None:
    """Only the batch's own connection tells a database failure: a handler whose call
    to some other database fails has failed itself, and its message is nacked."""
    ids = send_batches(conn, batches=1, size=3)
    consumer = Consumer(engine, queue=queue, name="c")

    @consumer.on("*")
    def handle(msg: Message) -> None:
        if msg.msg_id == ids[1]:
            psycopg.connect("host=/nonexistent-socket-dir dbname=other", connect_timeout=1)

    assert consumer.process_batch() == 3
    assert retry_rows(conn) == [ids[1]]


def test_deferred_constraint_broken_by_one_handler_nacks_that_message(
    conn: Conn, engine: Engine, queue: Queue, running: Running,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler's writes that break a DEFERRED constraint fail the batch's COMMIT, not
    the handler's SAVEPOINT. Redelivered as it is, the batch would fail forever; handled
    again with constraints checked per handler, only the message at fault is nacked."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pgque")
    conn.execute("CREATE TABLE once (k int, CONSTRAINT once_k UNIQUE (k) "
                 "DEFERRABLE INITIALLY DEFERRED)")
    conn.execute("INSERT INTO once VALUES (1)")
    ids = send_batches(conn, batches=1, size=3)
    later = send_batches(conn, batches=1, size=2)
    consumer = Consumer(engine, queue=queue, name="c", poll_interval=30)

    @consumer.on("*")
    def handle(msg: Message, session: Session) -> None:
        session.execute(_INSERT, _row(msg))
        if msg.msg_id == ids[1]:
            session.execute(text("INSERT INTO once VALUES (1)"))

    start(running, consumer)
    wait_until(lambda: retry_rows(conn) == [ids[1]], what="the message at fault nacked")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys([ids[0], ids[2], *later], 1),
               what="the rest of the batch, and the next batch")
    assert "failed at commit" in caplog.text
    assert "reconnecting" not in caplog.text


def test_shutdown_timeout_during_commit_lets_the_commit_finish(
    conn: Conn, engine: Engine, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_pgque")
    # A deferred constraint trigger runs inside COMMIT, which it makes slow (as
    # synchronous replication waiting for a standby would).
    conn.execute("""
        CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(0.8); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON handled
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
    """)
    ids = send_batches(conn, batches=1, size=1)
    consumer = Consumer(engine, queue=queue, name="c", poll_interval=30,
                        shutdown_timeout=0.2)
    consumer.on("*")(lambda msg, session: session.execute(_INSERT, _row(msg)))
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    wait_until(lambda: _commit_in_progress(conn), what="the batch's COMMIT")
    consumer.stop()  # the 0.2 s run out while the COMMIT (0.8 s) is on its way
    thread.join(10)
    assert not thread.is_alive()
    assert handled_counts(conn) == dict.fromkeys(ids, 1)
    assert "while batch" in caplog.text and "commits; the commit goes on" in caplog.text
    assert "abandon" not in caplog.text


def _commit_in_progress(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND query = 'COMMIT'"
    ).fetchone()
    return bool(row and row[0])


def test_stop_outside_run_changes_nothing(conn: Conn, engine: Engine, queue: Queue) -> None:
    ids = send_batches(conn, batches=1, size=2)
    consumer = Consumer(engine, queue=queue, name="c", shutdown_timeout=30)
    consumer.on("*")(lambda msg, session: session.execute(_INSERT, _row(msg)))
    threads = threading.active_count()
    consumer.stop()
    consumer.stop(abandon=True)
    assert threading.active_count() == threads  # no shutdown timer left running
    assert consumer.process_batch() == 2
    assert handled_counts(conn) == dict.fromkeys(ids, 1)


# The signal lands right after the main thread took the shutdown lock, which stop()
# also takes: handling it in the signal handler itself would deadlock.
_SIGNAL_UNDER_LOCK = textwrap.dedent("""
    import os, signal, sys, threading
    from sqlalchemy import create_engine
    from sqlalchemy_pgque.consumer import Consumer

    consumer = Consumer(create_engine(sys.argv[1]), queue="q", name="c",
                        poll_interval=0.1, shutdown_timeout=0)
    consumer.on("*")(lambda msg: None)

    class SignalLandsHere:
        def __init__(self):
            self.lock = threading.Lock()
            self.fired = False
        def __enter__(self):
            self.lock.acquire()
            if not self.fired and threading.current_thread() is threading.main_thread():
                self.fired = True
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # bytecodes: the handler runs here
                    pass
            return self
        def __exit__(self, *exc):
            self.lock.release()

    consumer._shutdown._lock = SignalLandsHere()
    consumer.run()
    print("returned", flush=True)
""")


def test_signal_while_the_main_thread_holds_the_shutdown_lock(
    conn: Conn, db: Database, queue: Queue
) -> None:
    send_batches(conn, batches=1, size=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_UNDER_LOCK, db.url.render_as_string(hide_password=False)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"run() deadlocked in its signal handler:\n{out}") from None
    assert "returned" in out, out
