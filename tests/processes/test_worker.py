"""The worker command as a real subprocess: atomic batches, signals, reconnects, errors."""

from __future__ import annotations

import signal
from typing import Any

import psycopg
import pytest
from conftest import Database
from consumer_support import (
    HANDLED_TABLE,
    handled_counts,
    listening,
    one_error_line,
    open_batch,
    ticker_sessions,
)
from engine_helpers import Conn, make_queue, send, send_batches, send_many, tick, wait_until
from workers_app import BLOCK_KEY


@pytest.fixture
def queue_q(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute(HANDLED_TABLE)


@pytest.mark.usefixtures("queue_q")
def test_sigkill_before_commit_redelivers_the_batch_without_its_writes(
    conn: Conn, workers: Any
) -> None:
    ids = [send(conn, "q", '{"block": false}') for _ in range(2)]
    ids.append(send(conn, "q", '{"block": true}'))
    ids += [send(conn, "q", '{"block": false}') for _ in range(2)]
    tick(conn, "q")
    conn.execute("SELECT pg_advisory_lock(%s)", (BLOCK_KEY,))

    first = workers("workers_app:consumer", APP_BLOCK="1")
    wait_until(lambda: _waiting_on_block(conn), what="the handler to block mid-batch")
    assert handled_counts(conn) == {}  # written, not committed
    first.process.kill()
    first.wait()
    conn.execute("SELECT pg_advisory_unlock(%s)", (BLOCK_KEY,))

    workers("workers_app:consumer")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="the redelivery")
    wait_until(lambda: open_batch(conn, "q", "c") is None, what="the ack")
    assert handled_counts(conn) == dict.fromkeys(ids, 1)


def _waiting_on_block(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND objid = %s AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())",
        (BLOCK_KEY,),
    ).fetchone()
    return bool(row and row[0])


@pytest.mark.usefixtures("queue_q")
def test_sigterm_mid_stream_exits_zero_and_loses_nothing(conn: Conn, workers: Any) -> None:
    ids = send_batches(conn, batches=30, size=20)
    worker = workers("workers_app:consumer", APP_HANDLER_DELAY="0.002")
    wait_until(lambda: len(handled_counts(conn)) >= 40, what="some progress")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()
    done = handled_counts(conn)
    assert set(done.values()) == {1}
    assert len(done) < len(ids), "the worker finished before SIGTERM: nothing was tested"
    assert open_batch(conn, "q", "c") is None  # the batch in progress was acked

    workers("workers_app:consumer")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="the rest")
    assert "Traceback" not in worker.output()


@pytest.mark.usefixtures("queue_q")
def test_listen_wakes_worker_well_inside_its_poll_interval(conn: Conn, workers: Any) -> None:
    workers("workers_app:consumer", APP_POLL_INTERVAL="30")
    wait_until(lambda: listening(conn), what="the worker's LISTEN")
    event_id = send(conn, "q")
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == {event_id: 1}, timeout=5, what="the handler")


@pytest.mark.usefixtures("queue_q")
def test_worker_reconnects_after_pg_terminate_backend(conn: Conn, workers: Any) -> None:
    worker = workers("workers_app:consumer")
    wait_until(lambda: listening(conn), what="the worker's LISTEN")
    ids = send_many(conn, "q", 5)
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="the first events")

    terminated = conn.execute(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()) t"
    ).fetchone()
    assert terminated is not None and terminated[0] >= 1
    more = send_many(conn, "q", 5)
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids + more, 1), timeout=15,
               what="events sent while reconnecting")
    wait_until(lambda: listening(conn), what="the LISTEN to come back")
    last = send_many(conn, "q", 5)
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids + more + last, 1),
               what="events after the reconnect")
    assert worker.process.poll() is None


@pytest.mark.usefixtures("queue_q")
def test_several_consumers_run_in_one_process(conn: Conn, workers: Any) -> None:
    make_queue(conn, "q2", "c")
    worker = workers("workers_app:both")
    wait_until(lambda: listening(conn, "pgque_q") and listening(conn, "pgque_q2"),
               what="both LISTENs")
    a = send(conn, "q", "{}", type="from_q")
    b = send(conn, "q2", "{}", type="from_q2")
    tick(conn, "q")
    tick(conn, "q2")
    wait_until(lambda: sorted(conn.execute("SELECT type, msg_id FROM handled").fetchall())
               == [("from_q", a), ("from_q2", b)], what="both consumers")
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0, worker.output()


@pytest.mark.usefixtures("queue_q")
def test_async_consumer_in_the_worker(conn: Conn, workers: Any) -> None:
    worker = workers("workers_app:async_consumer")
    wait_until(lambda: listening(conn), what="the worker's LISTEN")
    ids = send_many(conn, "q", 3)
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="the async handler")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()


@pytest.mark.usefixtures("queue_q")
def test_configuration_errors_are_one_line(workers: Any, empty_db: Database) -> None:
    assert "no_such_module" in one_error_line(workers("no_such_module:consumer"))
    assert "nope" in one_error_line(workers("workers_app:nope"))
    assert "not a Consumer" in one_error_line(workers("workers_app:not_a_consumer"))
    assert "module:attribute" in one_error_line(workers("workers_app"))
    assert "not subscribed" in one_error_line(workers("workers_app:stranger"))
    assert "bad database URL" in one_error_line(
        workers("workers_app:consumer", extra_args=("--url", "not a url"), with_url=False))
    assert "is not PostgreSQL" in one_error_line(
        workers("workers_app:consumer", extra_args=("--url", "mysql://x@y/z"), with_url=False))
    assert "not installed" in one_error_line(workers(
        "workers_app:consumer", with_url=False,
        extra_args=("--url", empty_db.url.render_as_string(hide_password=False))))
    assert "has no database" in one_error_line(workers("workers_app:consumer", with_url=False))
    missing_db = empty_db.url.set(database="no_such_database").render_as_string(
        hide_password=False)
    assert 'database "no_such_database" does not exist' in one_error_line(
        workers("workers_app:consumer", extra_args=("--url", missing_db), with_url=False))


def test_unreachable_database_is_waited_for_then_reported(workers: Any) -> None:
    unreachable = "postgresql+psycopg://nobody@127.0.0.1:1/nowhere?connect_timeout=2"
    worker = workers("workers_app:consumer", with_url=False,
                     extra_args=("--url", unreachable, "--startup-timeout", "1"))
    assert worker.wait() == 1, worker.output()
    output = worker.output()
    assert "Traceback" not in output
    assert "waiting for the database" in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("sqlalchemy_pgque.worker: error: q/c: the database did not answer "
                           "within the startup timeout of 1 s"), output


def _ticker_holder(conn: Conn) -> str | None:
    from sqlalchemy_pgque.ticker import TICKER_LOCK_KEY

    row = conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s "
        "AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())",
        (TICKER_LOCK_KEY[0] & 0xFFFFFFFF, TICKER_LOCK_KEY[1] & 0xFFFFFFFF),
    ).fetchone()
    return None if row is None else str(row[0])


def _holder_other_than(conn: Conn, old: str) -> str | None:
    holder = _ticker_holder(conn)
    return None if holder == old else holder


def _tick_ids(conn: Conn, queue: str) -> list[int]:
    return [int(r[0]) for r in conn.execute(
        "SELECT t.tick_id FROM pgque.tick t JOIN pgque.queue q ON q.queue_id = t.tick_queue "
        "WHERE q.queue_name = %s ORDER BY t.tick_id", (queue,))]


def test_one_ticker_among_workers_and_takeover_when_it_dies(conn: Conn, workers: Any) -> None:
    make_queue(conn, "q", "c", ticker_max_lag="50 milliseconds")
    conn.execute(HANDLED_TABLE)
    first = workers("workers_app:consumer", extra_args=("--ticker",))
    holder = wait_until(lambda: _ticker_holder(conn), what="a ticker to take the lock")
    second = workers("workers_app:consumer", extra_args=("--ticker",))
    wait_until(lambda: ticker_sessions(conn) == 2, what="both tickers to connect")
    assert _ticker_holder(conn) == holder
    leader, follower = (first, second) if holder.endswith(f" {first.pid}") else (second, first)
    assert holder.endswith(f" {leader.pid}")

    ids = [send(conn, "q")]  # no commit wake-up: the periodic tick delivers it
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="a periodic tick")
    assert "holding the ticker lock" in leader.output()
    assert "holding the ticker lock" not in follower.output()

    leader.process.kill()
    leader.wait()
    # The killed leader's backend may still hold the lock for a moment: wait for a change.
    new_holder = wait_until(lambda: _holder_other_than(conn, holder), timeout=15,
                            what="the takeover")
    assert new_holder.endswith(f" {follower.pid}")
    before = _tick_ids(conn, "q")[-1]
    ids.append(send(conn, "q"))
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="ticks after takeover")
    assert _tick_ids(conn, "q")[-1] > before
    assert "holding the ticker lock" in follower.output()


def test_commit_wakes_the_ticker_and_a_rollback_does_not(
    conn: Conn, workers: Any, db: Database
) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from sqlalchemy_pgque import Queue

    quiet = {"ticker_max_lag": "1 hour", "ticker_idle_period": "1 hour"}
    make_queue(conn, "q", "c", **quiet)
    make_queue(conn, "q2", "c", **quiet)
    conn.execute(HANDLED_TABLE)
    workers("workers_app:both", extra_args=("--ticker",))
    wait_until(lambda: listening(conn, "pgque_q") and listening(conn, "pgque_q2")
               and _ticker_holder(conn), what="the worker to listen and tick")
    # A new queue ticks once more on the ticker's first round, then stays quiet.
    wait_until(lambda: len(_tick_ids(conn, "q")) >= 2 and len(_tick_ids(conn, "q2")) >= 2,
               what="the first periodic round")
    ticks_before = _tick_ids(conn, "q")

    engine = create_engine(db.url)
    try:
        with Session(engine) as session:
            session.begin()
            Queue("q").send(session, {"n": 1}, type="rolled_back")
            session.flush()
            session.rollback()
        with Session(engine) as session, session.begin():
            Queue("q2").send(session, {"n": 2}, type="barrier")
        # Notifications arrive in commit order: once the later commit is handled, a
        # wake-up from the rolled-back transaction would already have ticked q.
        wait_until(lambda: [r[0] for r in conn.execute("SELECT type FROM handled")]
                   == ["barrier"], timeout=5, what="the committed event on q2")
        assert _tick_ids(conn, "q") == ticks_before

        with Session(engine) as session, session.begin():
            pending = Queue("q").send(session, {"n": 3}, type="committed")
        wait_until(lambda: conn.execute("SELECT msg_id FROM handled WHERE type = 'committed'")
                   .fetchall() == [(pending.event_id,)], timeout=5, what="the woken tick")
        assert len(_tick_ids(conn, "q")) == len(ticks_before) + 1
    finally:
        engine.dispose()


def test_worker_exits_one_when_a_consumer_fails_at_run_time(
    conn: Conn, workers: Any
) -> None:
    make_queue(conn, "q", "c")
    conn.execute(HANDLED_TABLE)
    worker = workers("workers_app:consumer")
    wait_until(lambda: listening(conn), what="the worker's LISTEN")
    conn.execute("SELECT pgque.unsubscribe('q', 'c')")
    send(conn, "q")
    tick(conn, "q")
    assert worker.wait() == 1, worker.output()
    assert "Not subscriber to queue: q/c" in worker.output()


def test_missing_role_is_a_one_line_permission_error(
    conn: Conn, workers: Any, db: Database
) -> None:
    make_queue(conn, "q", "c")
    role = f"nobody_{db.name}"[:63]
    conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        url = db.url.set(username=role).render_as_string(hide_password=False)
        line = one_error_line(workers("workers_app:consumer", with_url=False,
                                      extra_args=("--url", url)))
        assert "permission denied: the database user needs the pgque_reader role" in line
        conn.execute(f'GRANT pgque_reader TO "{role}"')
        line = one_error_line(workers("workers_app:consumer", with_url=False,
                                      extra_args=("--url", url, "--ticker")))
        assert line.startswith("sqlalchemy_pgque.worker: error: ticker: permission denied")
        assert "pgque_admin" in line
    finally:
        conn.execute(f'DROP ROLE "{role}"')


def test_sigterm_during_a_start_up_check_stops_the_worker(
    conn: Conn, db: Database, workers: Any
) -> None:
    make_queue(conn, "q", "c")
    conn.execute(HANDLED_TABLE)
    # Holds up the start-up check: its read of pgque.queue waits for this lock.
    with psycopg.connect(db.dsn) as locker:
        locker.execute("LOCK TABLE pgque.queue IN ACCESS EXCLUSIVE MODE")
        worker = workers("workers_app:consumer")
        wait_until(lambda: _waiting_for(conn, "pgque.queue"), what="the check to wait")
        worker.signal(signal.SIGTERM)
        wait_until(lambda: "during start-up" in worker.output(), what="the signal")
        locker.rollback()  # the check completes now
    assert worker.wait() == 0, worker.output()
    assert "worker started" not in worker.output()


def _waiting_for(conn: Conn, table: str) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
        (table,),
    ).fetchone()
    return bool(row and row[0])


def test_a_server_refusing_the_login_is_a_configuration_error(
    conn: Conn, workers: Any, db: Database
) -> None:
    make_queue(conn, "q", "c")
    role = f"nologin_{db.name}"[:63]
    conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
    try:
        url = db.url.set(username=role).render_as_string(hide_password=False)
        line = one_error_line(workers("workers_app:consumer", with_url=False,
                                      extra_args=("--url", url)))
        assert "is not permitted to log in" in line
    finally:
        conn.execute(f'DROP ROLE "{role}"')


def test_a_batch_committing_at_exit_is_reported_as_such(
    conn: Conn, workers: Any
) -> None:
    make_queue(conn, "q", "c")
    conn.execute(HANDLED_TABLE)
    # A deferred constraint trigger makes the batch's COMMIT itself slow, longer than
    # the shutdown timeout and the grace after it.
    conn.execute("""
        CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(6); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON handled
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
    """)
    ids = send_batches(conn, batches=1, size=1)
    worker = workers("workers_app:consumer", extra_args=("--shutdown-timeout", "0.5"))
    wait_until(lambda: conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND query = 'COMMIT'").fetchone() == (1,),
        what="the batch's COMMIT")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()
    output = worker.output()
    assert "was committing when the process exited: it committed whole, or its 1 " \
           "messages will be redelivered" in output, output
    assert "abandon" not in output, output
    # The server finishes the COMMIT it was given.
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=15,
               what="the commit")
    assert open_batch(conn, "q", "c") is None
