"""Cooperative consumers as real worker processes: members split a queue's events, a
killed member's batch is taken over, members leave with their batch handled."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from conftest import Database
from consumer_support import HANDLED_TABLE, handled_counts, listening, one_error_line, open_batch
from engine_helpers import Conn, make_queue, move_retries, send_batches, tick, wait_until
from sqlalchemy import create_engine

from sqlalchemy_pgque import BatchInProgress, Queue


@pytest.fixture
def group(conn: Conn) -> None:
    """Queue ``q`` with the cooperative group ``group``, created as a migration would
    (``op.pgque_subscribe_subconsumer``) with its member ``w``; the workers' members
    join on their first receive."""
    conn.execute("SELECT pgque.create_queue('q')")
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'group', 'w')")
    conn.execute(HANDLED_TABLE)


def members(conn: Conn) -> list[str]:
    """The group's members, but for ``w`` which the fixture registered."""
    rows = conn.execute(
        "SELECT consumer_name FROM pgque.get_consumer_info('q') "
        "WHERE consumer_name LIKE 'group.%' AND consumer_name <> 'group.w' ORDER BY 1"
    ).fetchall()
    return [str(row[0]) for row in rows]


def handlers(conn: Conn) -> set[str]:
    """The worker threads (labelled ``q/group.<member>``) that handled messages."""
    return {str(row[0]) for row in conn.execute("SELECT DISTINCT handled_by FROM handled")}


def drain_and_stop(conn: Conn, worker: Any, batches: int, size: int,
                   member_labels: set[str]) -> None:
    """Send ticked batches, wait until each event was handled once and every member
    handled some, then stop ``worker`` with SIGTERM."""
    ids = send_batches(conn, batches=batches, size=size)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=30,
               what="every event handled once")
    assert handlers(conn) == member_labels
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()


def handling_backend(conn: Conn) -> int | None:
    """The backend of a member whose handler is sleeping inside its batch transaction."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'idle in transaction' AND query LIKE 'INSERT INTO handled%'"
    ).fetchone()
    return None if row is None else int(row[0])


def backend_gone(conn: Conn, pid: int) -> bool:
    return conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() \
        is None


def kill_while_handling(conn: Conn, worker: Any, member: str) -> int:
    """SIGKILL ``worker`` once member ``member`` is inside a handler; its batch id."""
    pid = wait_until(lambda: handling_backend(conn), what="the member to be handling a batch")
    batch = open_batch(conn, "q", f"group.{member}")
    assert batch is not None
    worker.process.kill()
    worker.wait()
    wait_until(lambda: backend_gone(conn, pid), what="the killed member's backend to end")
    assert handled_counts(conn) == {}  # its writes died with its transaction
    return batch


@pytest.mark.usefixtures("group")
def test_four_member_processes_handle_every_event_exactly_once(
    conn: Conn, workers: Any
) -> None:
    started = [
        workers("workers_app:cooperative", APP_MEMBER=f"w{n}", APP_HANDLER_DELAY="0.02")
        for n in range(1, 5)
    ]
    wait_until(lambda: listening(conn) == 4, what="four members listening")
    ids = send_batches(conn, batches=40, size=5)

    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=30,
               what="every event handled once")
    assert handlers(conn) == {f"q/group.w{n}" for n in range(1, 5)}
    assert members(conn) == [f"group.w{n}" for n in range(1, 5)]
    for worker in started:
        worker.signal(signal.SIGTERM)
    for worker in started:
        assert worker.wait() == 0, worker.output()
    assert all(open_batch(conn, "q", name) is None for name in members(conn))


@pytest.mark.usefixtures("group")
def test_concurrency_runs_that_many_members_in_one_process(conn: Conn, workers: Any) -> None:
    worker = workers("workers_app:cooperative", extra_args=("--concurrency", "4"),
                     APP_MEMBER="pod", APP_HANDLER_DELAY="0.02")
    wait_until(lambda: listening(conn) == 4, what="four members listening")
    drain_and_stop(conn, worker, 40, 5, {f"q/group.pod-{n}" for n in range(1, 5)})
    assert members(conn) == [f"group.pod-{n}" for n in range(1, 5)]


@pytest.mark.usefixtures("group")
def test_more_members_than_a_default_pool_holds_all_work_at_once(
    conn: Conn, workers: Any
) -> None:
    # A default pool gives 15 connections: without the worker sizing it, a 16th member
    # holding work at the same time as the others would wait for a connection.
    worker = workers("workers_app:cooperative", extra_args=("--concurrency", "16"),
                     APP_HANDLER_DELAY="1")
    wait_until(lambda: listening(conn) == 16, timeout=20, what="sixteen members listening")
    drain_and_stop(conn, worker, 32, 1, {f"q/group.w-{n}" for n in range(1, 17)})


@pytest.mark.usefixtures("group")
def test_subconsumer_flag_names_the_members(conn: Conn, workers: Any) -> None:
    worker = workers("workers_app:cooperative",
                     extra_args=("--concurrency", "2", "--subconsumer", "host7"),
                     APP_HANDLER_DELAY="0.05")
    wait_until(lambda: listening(conn) == 2, what="two members listening")
    drain_and_stop(conn, worker, 4, 3, {"q/group.host7-1", "q/group.host7-2"})
    assert members(conn) == ["group.host7-1", "group.host7-2"]


@pytest.mark.usefixtures("group")
def test_async_members_share_one_event_loop(conn: Conn, workers: Any) -> None:
    worker = workers("workers_app:async_cooperative", extra_args=("--concurrency", "3"))
    wait_until(lambda: listening(conn) == 3, what="three members listening")
    ids = send_batches(conn, batches=9, size=4)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="every event once")
    assert members(conn) == ["group.aw-1", "group.aw-2", "group.aw-3"]
    # Batches handled at once prove the members ran side by side in the loop.
    overlapping = conn.execute(
        "SELECT count(*) FROM handled a JOIN handled b ON a.handled_by <> b.handled_by "
        "AND abs(extract(epoch FROM a.handled_at - b.handled_at)) < 0.02"
    ).fetchone()
    assert overlapping is not None and overlapping[0] > 0
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()


@pytest.mark.usefixtures("group")
def test_killed_members_batch_is_taken_over_after_dead_interval(
    conn: Conn, workers: Any
) -> None:
    victim = workers("workers_app:cooperative", APP_MEMBER="a", APP_HANDLER_DELAY="60",
                     APP_DEAD_INTERVAL="1")
    wait_until(lambda: listening(conn) == 1, what="member a listening")
    ids = send_batches(conn, batches=1, size=3)
    stale = kill_while_handling(conn, victim, "a")

    workers("workers_app:cooperative", APP_MEMBER="b", APP_DEAD_INTERVAL="1",
            APP_POLL_INTERVAL="0.1")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=15,
               what="member b to take the batch over and handle it")
    assert handlers(conn) == {"q/group.b"}
    assert open_batch(conn, "q", "group.a") is None
    assert open_batch(conn, "q", "group.b") is None

    row = conn.execute("SELECT pgque.ack(%s)", (stale,)).fetchone()
    assert row is not None and row[0] == 0  # the killed member's batch id stopped working
    more = send_batches(conn, batches=2, size=2)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids + more, 1),
               what="the group to go on after the takeover")


@pytest.mark.parametrize("max_retries", [5, 0])
def test_unsubscribing_a_member_that_holds_a_batch(
    conn: Conn, db: Database, workers: Any, max_retries: int
) -> None:
    make_queue(conn, "q", "plain", max_retries=max_retries)
    # b stays: removing a group's last member would turn it back into a normal consumer.
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'group', 'a')")
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'group', 'b')")
    conn.execute(HANDLED_TABLE)
    holder = workers("workers_app:cooperative", APP_MEMBER="a", APP_HANDLER_DELAY="60")
    wait_until(lambda: listening(conn) == 1, what="member a listening")
    ids = send_batches(conn, batches=1, size=3)
    kill_while_handling(conn, holder, "a")

    q = Queue("q")
    engine = create_engine(db.url)
    try:
        with engine.begin() as connection, pytest.raises(BatchInProgress, match="batch_handling"):
            q.unsubscribe_subconsumer(connection, "group", "a")
        assert members(conn) == ["group.a", "group.b"]
        with engine.begin() as connection:
            assert q.unsubscribe_subconsumer(connection, "group", "a", batch_handling=1)
    finally:
        engine.dispose()
    assert members(conn) == ["group.b"]

    if max_retries == 0:
        dead = conn.execute("SELECT ev_id, dl_reason FROM pgque.dlq_inspect('q')").fetchall()
        assert sorted(dead) == [(i, "subconsumer unregistered") for i in sorted(ids)]
        return
    conn.execute("UPDATE pgque.retry_queue SET ev_retry_after = now()")
    assert move_retries(conn) == len(ids)
    tick(conn, "q")
    workers("workers_app:cooperative", APP_MEMBER="b")
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1),
               what="the retried events to reach the remaining member")
    rows = conn.execute("SELECT DISTINCT retry_count FROM handled").fetchall()
    assert rows == [(1,)]


@pytest.mark.usefixtures("group")
def test_cooperative_configuration_errors_are_one_line(conn: Conn, workers: Any) -> None:
    assert "apply to cooperative consumers" in one_error_line(
        workers("workers_app:consumer", extra_args=("--concurrency", "2")))
    assert "must not contain a dot" in one_error_line(
        workers("workers_app:cooperative", extra_args=("--subconsumer", "web.example.com")))
    # An empty name (an unset $HOSTNAME) must not fall back to the name set in code.
    assert "non-empty" in one_error_line(
        workers("workers_app:cooperative", extra_args=("--subconsumer", "")))
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'c', 'm')")
    assert "is a cooperative main consumer" in one_error_line(workers("workers_app:consumer"))
    zero = workers("workers_app:cooperative", extra_args=("--concurrency", "0"))
    assert zero.wait() == 2
    assert "must be at least 1" in zero.output()
    conn.execute("SELECT pgque.subscribe('q', 'normal')")
    assert "explicit conversion is required" in one_error_line(
        workers("workers_app:cooperative", APP_GROUP="normal"))
    assert "explicit conversion is required" in one_error_line(
        workers("workers_app:async_cooperative", APP_GROUP="normal"))
