"""Delayed delivery (ENGINE-0.3.md §2.2, §3.2, §4.3, §4.4, §5.1, §6.3): ``send_at``,
``maint_deliver_delayed``, ``maint()`` and the ``delayed_events`` view, plus our
``next_delayed_due``.

Covers upstream's ``test_api_delayed.sql`` and ``us4_delayed_delivery.sql`` and what our
insert-only storage must add: a row committed late, racing movers, partition switches
and truncations, zero updates and deletes on the storage, rows for unknown or
insert-disabled queues, grants and reinstall. Holding rows are inserted through the
view naming only ``de_queue_name, de_deliver_at, de_type, de_data``, as upstream's tests do.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import psycopg
import pytest
from conftest import Database
from engine_helpers import (
    Conn,
    ConnectAs,
    is_our_engine,
    make_queue,
    scalar,
    tick,
    wait_until,
)
from psycopg import errors
from sqlalchemy import create_engine

from sqlalchemy_pgque import schema

MSG_ID, BATCH_ID, TYPE, PAYLOAD, RETRY, CREATED_AT, EXTRA1, EXTRA2, EXTRA3, EXTRA4 = range(10)

# The mover moves inserts on to another partition once the current one holds this many
# rows (by de_id span), and switches its state log after this many runs (84_delayed.sql).
SLOT_ROWS = 1000
LOG_RUNS = 1000

INSERT_HOLDING = ("insert into pgque.delayed_events (de_queue_name, de_deliver_at, de_type,"
                  " de_data) values (%s, %s, %s, %s) returning de_id")
COUNT_HOLDING = "select count(*) from pgque.delayed_events where de_queue_name = %s"
SEND_AT = "select pgque.send_at(%s, %s, %s::jsonb, %s)"
MOVE = "select pgque.maint_deliver_delayed()"


@pytest.fixture(autouse=True)
def _our_engine(conn: Conn) -> None:
    if not is_our_engine(conn):
        pytest.skip("delayed delivery is PgQue 0.3: another 0.2 engine does not have it")


def db_now(conn: Conn) -> datetime:
    value = scalar(conn, "select now()")
    assert isinstance(value, datetime)
    return value


def hold(conn: Conn, queue: str, data: str, deliver_at: datetime | str = "now",
         type_: str = "t") -> int:
    """A holding row inserted through the view; due at once unless ``deliver_at`` says."""
    return int(scalar(conn, INSERT_HOLDING, queue, deliver_at, type_, data))


def holding(conn: Conn, queue: str = "q") -> int:
    return int(scalar(conn, COUNT_HOLDING, queue))


def move(conn: Conn) -> int:
    return int(scalar(conn, MOVE))


def drain(conn: Conn, queue: str = "q", consumer: str = "c") -> list[tuple[Any, ...]]:
    """Tick, then receive and ack every batch ``consumer`` has up to that tick."""
    tick(conn, queue)
    got: list[tuple[Any, ...]] = []
    while True:
        rows = conn.execute("select * from pgque.receive(%s, %s, 100000)",
                            (queue, consumer)).fetchall()
        if rows:
            got += rows
            conn.execute("select pgque.ack(%s)", (rows[0][BATCH_ID],))
        # An empty window is finished by receive; stop once no window is left.
        elif scalar(conn, "select pgque.next_batch(%s, %s)", queue, consumer) is None:
            return got


def collect_warnings(conn: Conn) -> list[str]:
    warnings: list[str] = []
    conn.add_notice_handler(lambda diag: warnings.append(diag.message_primary or "")
                            if diag.severity_nonlocalized == "WARNING" else None)
    return warnings


@pytest.fixture
def connect(db: Database) -> Iterator[Callable[..., Conn]]:
    """Further connections to the test database, closed afterwards."""
    opened: list[Conn] = []

    def open_conn(autocommit: bool = False) -> Conn:
        c = psycopg.connect(db.dsn, autocommit=autocommit)
        opened.append(c)
        return c

    yield open_conn
    for c in opened:
        c.close()


# --- send_at and the holding rows (test_api_delayed.sql, us4) ------------------------


def test_future_send_at_returns_the_holding_rows_id(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    due = db_now(conn) + timedelta(hours=1)
    de_id = scalar(conn, SEND_AT, "q", "order.later", '{"n": 1}', due)
    assert holding(conn) == 1
    assert conn.execute("select de_id, de_deliver_at, de_type, de_data, de_extra1"
                        " from pgque.delayed_events").fetchall() == [
        (de_id, due, "order.later", '{"n": 1}', None)]
    # Not due: the mover leaves it, nothing reaches the queue.
    assert move(conn) == 0
    assert scalar(conn, "select pgque.maint()") == 0
    assert drain(conn) == []
    assert holding(conn) == 1


def test_future_send_at_does_not_check_the_queue(conn: Conn) -> None:
    due = db_now(conn) + timedelta(hours=1)
    assert scalar(conn, SEND_AT, "no_such_queue", "t", "{}", due) is not None
    assert holding(conn, "no_such_queue") == 1


@pytest.mark.parametrize("when", ["past", "now"])
def test_due_send_at_inserts_the_event_at_once(conn: Conn, when: str) -> None:
    make_queue(conn, "q", "c")
    deliver_at = "now() - interval '1 hour'" if when == "past" else "now()"
    ev_id = scalar(conn, f"select pgque.send_at('q', 'order.now', '{{\"n\": 2}}', {deliver_at})")
    assert ev_id is not None
    assert holding(conn) == 0
    [msg] = drain(conn)
    assert (msg[MSG_ID], msg[TYPE], json.loads(msg[PAYLOAD])) == (ev_id, "order.now", {"n": 2})


def test_due_send_at_fails_like_insert_event(conn: Conn) -> None:
    with pytest.raises(psycopg.Error, match="queue not found: nosuch"):
        conn.execute(SEND_AT, ("nosuch", "t", "{}", db_now(conn)))
    make_queue(conn, "q")
    conn.execute("update pgque.queue set queue_disable_insert = true")
    with pytest.raises(psycopg.Error, match="Insert into queue disallowed"):
        conn.execute(SEND_AT, ("q", "t", "{}", db_now(conn)))
    assert holding(conn) == 0


def test_null_due_time_is_not_due_and_violates_not_null(conn: Conn) -> None:
    make_queue(conn, "q")
    with pytest.raises(errors.NotNullViolation):
        conn.execute(SEND_AT, ("q", "t", "{}", None))


def test_directly_inserted_due_row_is_delivered_by_the_mover(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    hold(conn, "q", "direct")
    assert move(conn) == 1
    assert holding(conn) == 0
    assert [(m[TYPE], m[PAYLOAD]) for m in drain(conn)] == [("t", "direct")]
    assert move(conn) == 0
    assert drain(conn) == []


def test_insert_move_and_tick_in_one_transaction(conn: Conn) -> None:
    # test_api_delayed.sql test 3: all in one transaction, the batch cannot hold the
    # transaction's own event; it comes in the next window, once.
    make_queue(conn, "q", "c")
    with conn.transaction():
        hold(conn, "q", "one-tx")
        assert move(conn) == 1
        hold(conn, "q", "after-the-run")
        conn.execute("select pgque.force_next_tick('q')")
        conn.execute("select pgque.ticker('q')")
        batch_id = scalar(conn, "select pgque.next_batch('q', 'c')")
        assert batch_id is not None
        assert conn.execute("select * from pgque.get_batch_events(%s)",
                            (batch_id,)).fetchall() == []
        # The row inserted after the run is still waiting, even within the transaction.
        assert [r[0] for r in conn.execute(
            "select de_data from pgque.delayed_events")] == ["after-the-run"]
    conn.execute("select pgque.finish_batch(%s)", (batch_id,))
    assert [m[PAYLOAD] for m in drain(conn)] == ["one-tx"]
    assert move(conn) == 1
    assert [m[PAYLOAD] for m in drain(conn)] == ["after-the-run"]
    assert move(conn) == 0


def test_rows_a_transaction_adds_after_its_run_wait_for_the_next_run(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    other = connect(autocommit=True)
    with conn.transaction():
        hold(conn, "q", "before")
        # A transaction ending after this one took its xid: pg_current_snapshot() then
        # counts this transaction's xid as visible, so its rows cannot be judged by it.
        other.execute("select pg_current_xact_id()")
        assert move(conn) == 1
        hold(conn, "q", "after")
        assert holding(conn) == 1
    assert holding(conn) == 1
    assert move(conn) == 1
    assert [m[PAYLOAD] for m in drain(conn)] == ["before", "after"]


def test_a_mover_that_began_earlier_does_not_undo_the_previous_run(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    early = connect()
    early_now = db_now(early)
    hold(conn, "q", "due after the early transaction began")
    assert scalar(conn, "select de_deliver_at from pgque.delayed_events") > early_now
    assert move(conn) == 1
    assert move(early) == 0
    early.commit()
    assert move(conn) == 0
    assert [m[PAYLOAD] for m in drain(conn)] == ["due after the early transaction began"]


def test_maint_delivers_due_rows_and_adds_the_count(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    hold(conn, "q", "a")
    hold(conn, "q", "b")
    assert scalar(conn, "select pgque.maint()") == 2
    assert holding(conn) == 0
    assert sorted(m[PAYLOAD] for m in drain(conn)) == ["a", "b"]
    assert scalar(conn, "select pgque.maint()") == 0


def test_future_message_arrives_once_after_its_due_time(conn: Conn) -> None:
    # us4_delayed_delivery.sql, with 1.5 s instead of 5 s; two subscribers.
    make_queue(conn, "q", "c", "d")
    due = db_now(conn) + timedelta(seconds=1.5)
    assert scalar(conn, SEND_AT, "q", "reminder", '{"id": 7}', due) is not None
    assert holding(conn) == 1
    assert scalar(conn, "select pgque.maint()") == 0
    assert drain(conn) == []
    assert drain(conn, consumer="d") == []

    wait_until(lambda: db_now(conn) >= due, what="the due time")
    assert scalar(conn, "select pgque.maint()") == 1
    assert holding(conn) == 0
    for consumer in ("c", "d"):
        [msg] = drain(conn, consumer=consumer)
        assert (msg[TYPE], json.loads(msg[PAYLOAD])) == ("reminder", {"id": 7})
    assert scalar(conn, "select pgque.maint()") == 0
    assert drain(conn) == []


def test_moved_event_copies_the_extras_and_takes_the_movers_time(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("insert into pgque.delayed_events (de_queue_name, de_deliver_at, de_type,"
                 " de_data, de_extra1, de_extra2, de_extra3, de_extra4)"
                 " values ('q', now() - interval '1 hour', 't', 'd', 'e1', 'e2', 'e3', 'e4')")
    with conn.transaction():
        mover_now = db_now(conn)
        assert move(conn) == 1
    [msg] = drain(conn)
    assert msg[EXTRA1:] == ("e1", "e2", "e3", "e4")
    assert msg[CREATED_AT] == mover_now
    assert msg[RETRY] is None


def test_delete_through_the_view_cancels_pending_rows(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    hold(conn, "q", "cancelled", db_now(conn) + timedelta(hours=1))
    hold(conn, "q", "cancelled too")
    hold(conn, "other", "kept")
    assert conn.execute("delete from pgque.delayed_events where de_queue_name = 'q'"
                        ).rowcount == 2
    assert holding(conn) == 0
    assert holding(conn, "other") == 1
    assert move(conn) == 0
    assert drain(conn) == []


# --- the mover's state: late commits, races, same-transaction rows -----------------


def test_row_committed_late_is_delivered_by_the_next_run_once(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    producer = connect()
    hold(producer, "q", "late", "2000-01-01")
    # The producer's transaction stays open across this run, its row due long before.
    assert move(conn) == 0
    producer.commit()
    assert holding(conn) == 1
    assert move(conn) == 1
    assert move(conn) == 0
    assert [m[PAYLOAD] for m in drain(conn)] == ["late"]


def test_rolled_back_rows_never_arrive(conn: Conn, connect: Callable[..., Conn]) -> None:
    make_queue(conn, "q", "c")
    producer = connect()
    hold(producer, "q", "rolled back")
    assert move(conn) == 0
    producer.rollback()
    assert move(conn) == 0
    assert holding(conn) == 0
    assert drain(conn) == []


def test_a_second_mover_waits_for_the_first_and_skips_its_rows(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    hold(conn, "q", "first")
    first = connect()
    assert move(first) == 1
    second = connect(autocommit=True)
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(move(second)))
    waiter.start()
    try:
        wait_until(lambda: scalar(conn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                        " where pid = %s", second.info.backend_pid),
                   what="the second mover to wait for the first")
        # Due before the waiting mover's transaction began, committed after the first's run.
        hold(conn, "q", "second", "2000-01-01")
        first.commit()
    finally:
        waiter.join(timeout=30)
    assert result == [1]
    assert sorted(m[PAYLOAD] for m in drain(conn)) == ["first", "second"]


def test_racing_movers_and_producers_deliver_every_row_once(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    total, per_transaction = 3 * SLOT_ROWS, 50
    producing = threading.Event()
    producing.set()
    failures: list[BaseException] = []
    moved: list[int] = []

    producer_conn = connect()

    def produce() -> None:
        with producer_conn as c:
            for start in range(0, total, per_transaction):
                c.execute("insert into pgque.delayed_events (de_queue_name, de_deliver_at,"
                          " de_type, de_data) select 'q', now(), 't', g::text"
                          " from generate_series(%s::int, %s::int) g",
                          (start, start + per_transaction - 1))
                c.commit()

    def mover(c: Conn) -> None:
        while producing.is_set():
            moved.append(move(c))

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)
                producing.clear()
        return run

    movers = [threading.Thread(target=guarded(partial(mover, connect(autocommit=True))))
              for _ in range(2)]
    for thread in movers:
        thread.start()
    producer = threading.Thread(target=guarded(produce))
    producer.start()
    producer.join(timeout=120)
    producing.clear()
    for thread in movers:
        thread.join(timeout=30)
    assert failures == []
    moved.append(move(conn))
    assert sum(moved) == total
    assert holding(conn) == 0
    # Inserts moved on to other partitions, and drained ones were truncated.
    assert scalar(conn, "select count(*) from pgque.delayed_store") < total
    payloads = Counter(m[PAYLOAD] for m in drain(conn))
    assert payloads == Counter(str(i) for i in range(total))


# --- rows the mover cannot deliver ---------------------------------------------------


def test_rows_of_a_dropped_queue_are_discarded_with_a_warning(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    make_queue(conn, "gone")
    hold(conn, "gone", "lost")
    hold(conn, "gone", "lost too")
    hold(conn, "q", "delivered")
    assert scalar(conn, "select pgque.drop_queue('gone')") == 1
    warnings = collect_warnings(conn)
    assert move(conn) == 1
    assert [w for w in warnings if "gone" in w] == [
        "pgque.maint_deliver_delayed: queue not found: gone; discarded 2 delayed event(s)"]
    assert holding(conn, "gone") == 0
    assert [m[PAYLOAD] for m in drain(conn)] == ["delivered"]
    warnings.clear()
    assert move(conn) == 0
    assert warnings == []


def test_rows_of_an_insert_disabled_queue_wait_for_it(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    make_queue(conn, "off", "c")
    conn.execute("update pgque.queue set queue_disable_insert = true where queue_name = 'off'")
    hold(conn, "off", "waits")
    hold(conn, "q", "goes")
    warnings = collect_warnings(conn)
    for delivered in (1, 0):
        assert scalar(conn, "select pgque.maint()") == delivered
        assert holding(conn, "off") == 1
    assert [w for w in warnings if "off" in w] == [
        "pgque.maint_deliver_delayed: inserts into queue off are disabled;"
        " kept 1 delayed event(s) for a later run"] * 2
    assert [m[PAYLOAD] for m in drain(conn)] == ["goes"]
    assert drain(conn, "off") == []
    # Kept rows are not due for a ticker: it would spin on them.
    assert scalar(conn, "select pgque.next_delayed_due()") is None

    conn.execute("update pgque.queue set queue_disable_insert = false")
    assert move(conn) == 1
    assert holding(conn, "off") == 0
    assert [m[PAYLOAD] for m in drain(conn, "off")] == ["waits"]
    assert move(conn) == 0


# --- zero bloat: partitions, truncation, the state log -------------------------------


def storage_rows_by_slot(conn: Conn) -> dict[int, int]:
    return dict(conn.execute("select slot, count(*) from pgque.delayed_store group by slot"
                             ).fetchall())


def current_slot(conn: Conn) -> int:
    return int(scalar(conn, "select last_value from pgque.delayed_slot_seq"))


def test_partitions_switch_and_drained_ones_are_truncated(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    make_queue(conn, "off", "c")
    later = db_now(conn) + timedelta(hours=1)
    hold(conn, "q", "later", later)
    conn.execute("update pgque.queue set queue_disable_insert = true where queue_name = 'off'")
    hold(conn, "off", "kept")
    rounds, per_round = 5, SLOT_ROWS + 200
    slots_used = set()
    for n in range(rounds):
        slots_used.add(current_slot(conn))
        conn.execute("insert into pgque.delayed_events (de_queue_name, de_deliver_at, de_type,"
                     " de_data) select 'q', now(), 't', %s || '-' || g"
                     " from generate_series(1, %s) g", (str(n), per_round))
        assert move(conn) == per_round
    assert slots_used == {0, 1, 2}
    # The first partition keeps the pending rows; delivered rows elsewhere were truncated.
    stored = storage_rows_by_slot(conn)
    assert sum(stored.values()) < rounds * per_round
    assert stored[0] == per_round + 2
    assert conn.execute("select de_queue_name, de_data from pgque.delayed_events"
                        " order by 1").fetchall() == [("off", "kept"), ("q", "later")]
    payloads = Counter(m[PAYLOAD] for m in drain(conn))
    assert payloads == Counter(f"{n}-{g}" for n in range(rounds) for g in range(1, per_round + 1))

    conn.execute("update pgque.queue set queue_disable_insert = false")
    assert move(conn) == 1
    assert [m[PAYLOAD] for m in drain(conn, "off")] == ["kept"]
    assert conn.execute("select de_data from pgque.delayed_events").fetchall() == [("later",)]


def test_an_insert_still_open_in_a_switched_away_partition_is_not_truncated(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    producer = connect()
    hold(producer, "q", "open", "2000-01-01")
    conn.execute("insert into pgque.delayed_events (de_queue_name, de_deliver_at, de_type,"
                 " de_data) select 'q', now(), 't', g::text from generate_series(1, %s) g",
                 (SLOT_ROWS,))
    assert move(conn) == SLOT_ROWS
    assert current_slot(conn) == 1
    # The open insert holds partition 0: the mover neither truncates nor waits for it.
    conn.execute("set statement_timeout = '10s'")
    hold(conn, "q", "next")
    assert move(conn) == 1
    assert storage_rows_by_slot(conn)[0] == SLOT_ROWS
    producer.commit()
    assert move(conn) == 1
    assert 0 not in storage_rows_by_slot(conn)
    payloads = Counter(m[PAYLOAD] for m in drain(conn))
    assert payloads == Counter(["open", "next", *(str(g) for g in range(1, SLOT_ROWS + 1))])


def test_the_state_log_switches_and_keeps_the_latest_state(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    hold(conn, "q", "later", db_now(conn) + timedelta(hours=1))
    hold(conn, "q", "now")
    runs = 2 * LOG_RUNS + 100
    conn.execute(f"do $$ begin for i in 1..{runs} loop"
                 " perform pgque.maint_deliver_delayed(); commit; end loop; end $$")
    assert scalar(conn, "select max(run) from pgque.delayed_mover_log") == runs
    # At least one partition's worth of superseded states was truncated.
    assert scalar(conn, "select count(*) from pgque.delayed_mover_log") <= runs - LOG_RUNS + 1
    assert [m[PAYLOAD] for m in drain(conn)] == ["now"]
    hold(conn, "q", "after")
    assert move(conn) == 1
    assert [m[PAYLOAD] for m in drain(conn)] == ["after"]
    assert conn.execute("select de_data from pgque.delayed_events").fetchall() == [("later",)]


def storage_stats(conn: Conn) -> tuple[int, int, int, int]:
    """n_tup_ins, n_tup_upd, n_tup_del, n_dead_tup summed over the leaf partitions of the
    holding rows and of the mover's state log."""
    conn.execute("select pg_stat_clear_snapshot()")
    row = conn.execute(
        "select sum(n_tup_ins), sum(n_tup_upd), sum(n_tup_del), sum(n_dead_tup)"
        " from pg_stat_user_tables"
        " where relid in (select relid from pg_partition_tree('pgque.delayed_store')"
        "                  where isleaf)"
        "    or relid in (select relid from pg_partition_tree('pgque.delayed_mover_log')"
        "                  where isleaf)").fetchone()
    assert row is not None
    return tuple(int(v or 0) for v in row)  # type: ignore[return-value]


def test_sends_deliveries_and_truncations_update_and_delete_nothing(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    baseline_ins = storage_stats(conn)[0]
    first_run = scalar(conn, "select max(run) from pgque.delayed_mover_log")
    sent = 0
    for n in range(3):
        conn.execute("select pgque.send_at('q', 't', to_jsonb(g), now() + interval '300 ms')"
                     " from generate_series(1, %s) g", (SLOT_ROWS,))
        hold(conn, "q", f"direct-{n}")
        sent += SLOT_ROWS + 1
        due = scalar(conn, "select max(de_deliver_at) from pgque.delayed_events")
        wait_until(lambda due=due: db_now(conn) >= due, what="the due time")
        assert move(conn) == SLOT_ROWS + 1
    assert len(drain(conn)) == sent
    # Partitions were truncated on the way: fewer rows stored than sent.
    assert scalar(conn, "select count(*) from pgque.delayed_store") < sent
    inserted = sent + scalar(conn, "select max(run) from pgque.delayed_mover_log") - first_run

    # Statistics reach the server asynchronously: wait until every insert is counted,
    # so that zero updates and deletes means something.
    def counted() -> tuple[int, int, int, int] | None:
        stats = storage_stats(conn)
        return stats if stats[0] - baseline_ins >= inserted else None

    stats = wait_until(counted, timeout=30, what="the inserts in pg_stat_user_tables")
    assert stats[0] - baseline_ins == inserted
    assert stats[1:] == (0, 0, 0)


# --- next_delayed_due -------------------------------------------------------------------


def test_next_delayed_due_is_the_earliest_undelivered_due_time(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    next_due = "select pgque.next_delayed_due()"
    assert scalar(conn, next_due) is None
    now = db_now(conn)
    in_an_hour, in_two = now + timedelta(hours=1), now + timedelta(hours=2)
    conn.execute(SEND_AT, ("q", "t", "{}", in_two))
    conn.execute(SEND_AT, ("q", "t", "{}", in_an_hour))
    assert scalar(conn, next_due) == in_an_hour
    past = now - timedelta(minutes=5)
    hold(conn, "q", "due", past)
    assert scalar(conn, next_due) == past
    assert move(conn) == 1
    assert scalar(conn, next_due) == in_an_hour
    # Committed after the last run with an earlier due time: due now, for the next run.
    producer = connect()
    hold(producer, "q", "late", past)
    assert move(conn) == 0
    assert scalar(conn, next_due) == in_an_hour
    producer.commit()
    assert scalar(conn, next_due) == past
    assert move(conn) == 1
    assert scalar(conn, next_due) == in_an_hour
    conn.execute("delete from pgque.delayed_events")
    assert scalar(conn, next_due) is None


# --- grants, isolation, reinstall ------------------------------------------------------


def test_writer_sends_at_and_admin_runs_the_mover(conn: Conn, role_conn: ConnectAs) -> None:
    make_queue(conn, "q", "c")
    writer = role_conn("pgque_writer")
    later = db_now(conn) + timedelta(hours=1)
    assert scalar(writer, SEND_AT, "q", "t", '"held"', later) is not None
    assert scalar(writer, SEND_AT, "q", "t", '"now"', db_now(conn)) is not None
    for statement in (MOVE, "select pgque.next_delayed_due()",
                      "select count(*) from pgque.delayed_events",
                      "select count(*) from pgque.delayed_store"):
        with pytest.raises(errors.InsufficientPrivilege):
            writer.execute(statement)

    reader = role_conn("pgque_reader")
    assert scalar(reader, COUNT_HOLDING, "q") == 1
    with pytest.raises(errors.InsufficientPrivilege):
        reader.execute(SEND_AT, ("q", "t", "{}", later))

    admin = role_conn("pgque_admin")
    hold(admin, "q", "by admin")
    assert scalar(admin, "select pgque.next_delayed_due()") < later
    assert move(admin) == 1
    assert scalar(admin, "select pgque.maint()") == 0
    assert admin.execute("delete from pgque.delayed_events").rowcount == 1
    assert sorted(m[PAYLOAD] for m in drain(conn)) == ['"now"', "by admin"]


def test_public_can_neither_call_nor_read(conn: Conn) -> None:
    nobody = "e2_nobody_delayed"
    conn.execute(f"create role {nobody} nologin")
    try:
        for function in ("pgque.send_at(text, text, jsonb, timestamptz)",
                         "pgque.maint_deliver_delayed()", "pgque.next_delayed_due()"):
            assert scalar(conn, "select has_function_privilege(%s, %s, 'execute')",
                          nobody, function) is False
            secdef, config = conn.execute("select prosecdef, proconfig from pg_proc"
                                          " where oid = %s::regprocedure", (function,)).fetchone()
            assert secdef is True
            assert [c.replace(" ", "") for c in config] == ["search_path=pgque,pg_catalog"]
        for relation in ("pgque.delayed_events", "pgque.delayed_store",
                         "pgque.delayed_mover_log"):
            assert scalar(conn, "select has_table_privilege(%s, %s, 'select')",
                          nobody, relation) is False
    finally:
        conn.execute(f"drop role {nobody}")


def test_mover_refuses_repeatable_read_and_maint_skips_it(
    conn: Conn, connect: Callable[..., Conn]
) -> None:
    make_queue(conn, "q", "c")
    hold(conn, "q", "waits")
    strict = connect()
    strict.execute("set transaction isolation level repeatable read")
    with pytest.raises(errors.InvalidTransactionState, match="needs READ COMMITTED"):
        strict.execute(MOVE)
    strict.rollback()
    warnings = collect_warnings(strict)
    strict.execute("set transaction isolation level repeatable read")
    assert scalar(strict, "select pgque.maint()") == 0
    strict.commit()
    assert any("maint_deliver_delayed" in w for w in warnings)
    assert holding(conn) == 1
    assert move(conn) == 1


def test_reinstall_keeps_pending_rows_and_what_was_delivered(db: Database, conn: Conn) -> None:
    make_queue(conn, "q", "c")
    later = db_now(conn) + timedelta(hours=1)
    conn.execute(SEND_AT, ("q", "t", '"later"', later))
    hold(conn, "q", "delivered")
    assert move(conn) == 1
    hold(conn, "q", "pending")

    engine = create_engine(db.url)
    try:
        with engine.begin() as sa_conn:
            schema.install(sa_conn)
    finally:
        engine.dispose()

    assert conn.execute("select de_data from pgque.delayed_events order by de_id").fetchall(
        ) == [('"later"',), ("pending",)]
    assert move(conn) == 1
    assert [m[PAYLOAD] for m in drain(conn)] == ["delivered", "pending"]
    assert conn.execute(SEND_AT, ("q", "t", '"again"', later)).fetchone() is not None
    assert holding(conn) == 2


def test_taking_over_upstream_delayed_events_keeps_its_rows(empty_db: Database) -> None:
    with psycopg.connect(empty_db.dsn, autocommit=True) as c:
        c.execute("create schema pgque")
        # Upstream's experimental holding table (spec §2.2), with one due and one later row.
        c.execute("create table pgque.delayed_events (de_id bigserial primary key,"
                  " de_queue_name text not null, de_deliver_at timestamptz not null,"
                  " de_type text, de_data text, de_extra1 text, de_extra2 text,"
                  " de_extra3 text, de_extra4 text)")
        c.execute("insert into pgque.delayed_events (de_queue_name, de_deliver_at, de_type,"
                  " de_data, de_extra1) values ('q', now() - interval '1 minute', 't', 'due', 'x'),"
                  " ('q', now() + interval '1 hour', 't', 'later', null)")
    engine = create_engine(empty_db.url)
    try:
        with engine.begin() as sa_conn:
            schema.install(sa_conn, take_over=True)
    finally:
        engine.dispose()
    with psycopg.connect(empty_db.dsn, autocommit=True) as c:
        assert c.execute("select de_id, de_data from pgque.delayed_events order by de_id"
                         ).fetchall() == [(1, "due"), (2, "later")]
        make_queue(c, "q", "c")
        assert move(c) == 1
        [msg] = drain(c)
        assert (msg[PAYLOAD], msg[EXTRA1]) == ("due", "x")
        assert scalar(c, SEND_AT, "q", "t", "{}", db_now(c) + timedelta(hours=1)) == 3
        assert holding(c) == 2
