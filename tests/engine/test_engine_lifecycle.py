"""Maintenance, ticker loop, schedulers, status, observability, reinstall and uninstall.

Neither pg_cron nor pg_timetable is installed in the test databases, so the scheduler
functions are checked on their manual-mode paths.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from conftest import Database
from engine_helpers import (
    BATCH_ID,
    MSG_ID,
    Conn,
    ConnectAs,
    is_our_engine,
    make_queue,
    receive,
    scalar,
    send,
    tick,
)
from sqlalchemy import create_engine

from sqlalchemy_pgque import schema

STATUS_COMPONENTS = ["postgresql", "pgque", "scheduler", "ticker", "maintenance", "pg_cron",
                     "pg_timetable", "queues", "consumers"]


def records(conn: Conn, query: str, *params: object) -> list[dict[str, Any]]:
    cur = conn.execute(query, params)
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def last_tick(conn: Conn, queue: str) -> int | None:
    value = scalar(conn, "select max(t.tick_id) from pgque.tick t join pgque.queue q"
                         " on q.queue_id = t.tick_queue where q.queue_name = %s", queue)
    return None if value is None else int(value)


def tick_row(conn: Conn, queue: str, tick_id: int) -> tuple[datetime, int]:
    row = conn.execute("select t.tick_time, t.tick_event_seq from pgque.tick t"
                       " join pgque.queue q on q.queue_id = t.tick_queue"
                       " where q.queue_name = %s and t.tick_id = %s", (queue, tick_id)).fetchone()
    assert row is not None
    return row[0], int(row[1])


def collect_notices(conn: Conn) -> list[str]:
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    return notices


# --- maint() and the ticker loop ------------------------------------------------------


def test_maint_returns_zero_and_runs_rotation_step1(conn: Conn) -> None:
    make_queue(conn, "due")
    make_queue(conn, "later")
    conn.execute("select pgque.set_queue_config('due', 'rotation_period', '1 millisecond')")
    deadline = time.monotonic() + 30
    while scalar(conn, "select queue_cur_table from pgque.queue where queue_name = 'due'") == 0:
        assert time.monotonic() < deadline, "maint() did not rotate the due queue"
        assert scalar(conn, "select pgque.maint()") == 0
    rows = conn.execute("select queue_name, queue_cur_table, queue_switch_step2 is null"
                        " from pgque.queue order by queue_name").fetchall()
    # Step 2 is not maint()'s job: the rotated queue waits for it.
    assert rows == [("due", 1, True), ("later", 0, False)]
    assert scalar(conn, "select pgque.maint()") == 0
    assert scalar(conn, "select queue_cur_table from pgque.queue where queue_name = 'due'") == 1


def test_maint_calls_extra_maintenance_owned_like_maint(conn: Conn) -> None:
    make_queue(conn, "q")
    other_owner = f"e2_owner_{uuid.uuid4().hex[:10]}"
    conn.execute("create table public.e2_maint_log (fn text, queue text)")
    for fn in ("e2_trusted", "e2_foreign"):
        conn.execute(f"create function public.{fn}(q text) returns integer language sql"
                     f" as $$ insert into public.e2_maint_log values ('{fn}', q); select 0 $$")
    maint_owner = scalar(conn, "select proowner::regrole::text from pg_proc"
                               " where oid = 'pgque.maint()'::regprocedure")
    conn.execute(f"alter function public.e2_trusted(text) owner to {maint_owner}")
    conn.execute(f"create role {other_owner} nologin")
    try:
        conn.execute(f"alter function public.e2_foreign(text) owner to {other_owner}")
        conn.execute("update pgque.queue set queue_extra_maint = array["
                     "'public.e2_trusted', 'public.e2_missing', 'public.e2_foreign']")
        notices = collect_notices(conn)

        assert scalar(conn, "select pgque.maint()") == 0

        assert conn.execute("select fn, queue from public.e2_maint_log").fetchall() == [
            ("e2_trusted", "q")]
        assert any("e2_missing" in n for n in notices)
        assert any("e2_foreign" in n for n in notices)
    finally:
        conn.execute("drop function public.e2_foreign(text)")
        conn.execute(f"drop role {other_owner}")


def test_ticker_loop_ticks_and_commits(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    assert scalar(conn, "select pgque.set_tick_period_ms(500)") == 500
    ev_id = send(conn, "q", '"hello"')
    conn.execute("select pgque.force_next_tick('q')")
    before = last_tick(conn, "q")
    conn.execute("call pgque.ticker_loop()")
    after = last_tick(conn, "q")
    assert before is not None
    assert after is not None
    assert after > before
    assert [r[MSG_ID] for r in receive(conn, "q", "c")] == [ev_id]


def test_ticker_loop_needs_a_top_level_call(conn: Conn) -> None:
    make_queue(conn, "q")
    with pytest.raises(psycopg.Error, match="invalid transaction termination"), \
            conn.transaction():
        conn.execute("call pgque.ticker_loop()")


@pytest.mark.parametrize("bad", [0, 3, 7, 300, 1001, -5])
def test_set_tick_period_ms_rejects_non_divisors(conn: Conn, bad: int) -> None:
    expected = ("tick_period_ms must be an exact divisor of 1000 between 1 and 1000"
                f" (got {bad})")
    with pytest.raises(psycopg.Error) as info:
        conn.execute("select pgque.set_tick_period_ms(%s::integer)", (bad,))
    assert expected in str(info.value)
    assert scalar(conn, "select tick_period_ms from pgque.config") == 100


def test_set_tick_period_ms_stores_the_period(conn: Conn) -> None:
    assert scalar(conn, "select pgque.set_tick_period_ms(250)") == 250
    assert scalar(conn, "select tick_period_ms from pgque.config") == 250
    scheduler = records(conn, "select * from pgque.status() where component = 'scheduler'")
    assert "tick_period_ms=250 (4 ticks/sec)" in scheduler[0]["detail"]


# --- schedulers and status ------------------------------------------------------------


def test_start_without_pg_cron_points_to_manual_mode(conn: Conn) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute("select pgque.start()")
    message = str(info.value)
    assert message.startswith("pg_cron extension is not installed.")
    assert "PgQue itself works without pg_cron" in message
    assert "manual" in message
    conn.execute("select pgque.stop()")
    conn.execute("select pgque.stop_timetable()")
    with pytest.raises(psycopg.Error, match="pg_timetable"):
        conn.execute("select pgque.start_timetable()")
    cfg = conn.execute("select ticker_job_id, maint_job_id, scheduler from pgque.config")
    assert cfg.fetchall() == [(None, None, None)]


def test_status_rows_in_order(conn: Conn) -> None:
    make_queue(conn, "a", "c1", "c2")
    make_queue(conn, "b", "c1")
    rows = records(conn, "select * from pgque.status()")
    assert [r["component"] for r in rows] == STATUS_COMPONENTS
    by_name = {r["component"]: r for r in rows}
    assert by_name["postgresql"]["status"] == "info"
    assert by_name["postgresql"]["detail"]
    assert (by_name["pgque"]["status"], by_name["pgque"]["detail"]) == ("info", "0.2.0")
    assert by_name["scheduler"]["status"] == "manual"
    assert "tick_period_ms=100 (10 ticks/sec)" in by_name["scheduler"]["detail"]
    assert by_name["ticker"]["status"] == "stopped"
    assert by_name["maintenance"]["status"] == "stopped"
    assert by_name["pg_cron"]["status"] == "unavailable"
    assert by_name["pg_timetable"]["status"] == "unavailable"
    assert (by_name["queues"]["status"], by_name["queues"]["detail"]) == (
        "info", "2 queues configured")
    assert (by_name["consumers"]["status"], by_name["consumers"]["detail"]) == (
        "info", "3 active subscriptions")


def test_version(conn: Conn) -> None:
    assert scalar(conn, "select pgque.version()") == "0.2.0"


# --- observability --------------------------------------------------------------------


def test_get_consumer_info_follows_cursor_and_batch(conn: Conn) -> None:
    make_queue(conn, "q", "c", "idle")
    make_queue(conn, "other", "c")
    first_tick = last_tick(conn, "q")
    assert first_tick is not None
    for i in range(3):
        send(conn, "q", str(i))
    second_tick = tick(conn, "q")
    seq_first = tick_row(conn, "q", first_tick)[1]
    seq_second = tick_row(conn, "q", second_tick)[1]
    assert seq_second > seq_first

    [info] = records(conn, "select * from pgque.get_consumer_info('q', 'c')")
    assert (info["queue_name"], info["consumer_name"]) == ("q", "c")
    assert (info["last_tick"], info["current_batch"], info["next_tick"]) == (
        first_tick, None, None)
    if is_our_engine(conn):
        # The forced tick's jump is not counted (see tests/engine/test_engine_pending.py).
        assert info["pending_events"] == 3
    else:
        assert info["pending_events"] == seq_second - seq_first
    assert info["lag"] >= timedelta(0)
    assert info["last_seen"] >= timedelta(0)

    rows = receive(conn, "q", "c")
    batch = rows[0][BATCH_ID]
    [info] = records(conn, "select * from pgque.get_consumer_info('q', 'c')")
    assert (info["last_tick"], info["current_batch"], info["next_tick"]) == (
        first_tick, batch, second_tick)

    assert scalar(conn, "select pgque.ack(%s)", batch) == 1
    [info] = records(conn, "select * from pgque.get_consumer_info('q', 'c')")
    assert (info["last_tick"], info["current_batch"], info["next_tick"]) == (
        second_tick, None, None)
    assert info["pending_events"] == 0

    def names(query: str) -> list[tuple[str, str]]:
        return [(r["queue_name"], r["consumer_name"]) for r in records(conn, query)]

    everything = [("other", "c"), ("q", "c"), ("q", "idle")]
    assert names("select * from pgque.get_consumer_info()") == everything
    assert names("select * from pgque.get_consumer_info(NULL, NULL)") == everything
    assert [r["consumer_name"] for r in records(
        conn, "select * from pgque.get_consumer_info('q')")] == ["c", "idle"]
    assert [r["queue_name"] for r in records(
        conn, "select * from pgque.get_consumer_info(NULL, 'c')")] == ["other", "q"]
    assert records(conn, "select * from pgque.get_consumer_info('nope')") == []


def test_get_consumer_info_names_cooperative_members(conn: Conn) -> None:
    make_queue(conn, "q")
    assert scalar(conn, "select pgque.subscribe_subconsumer('q', 'grp', 'w1')") == 1
    names = [r["consumer_name"] for r in records(
        conn, "select * from pgque.get_consumer_info('q')")]
    assert names == ["grp", "grp.w1"]


def test_get_batch_info(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    first_tick = last_tick(conn, "q")
    assert first_tick is not None
    send(conn, "q", "1")
    send(conn, "q", "2")
    second_tick = tick(conn, "q")
    batch = receive(conn, "q", "c")[0][BATCH_ID]

    [info] = records(conn, "select * from pgque.get_batch_info(%s)", batch)
    start_time, start_seq = tick_row(conn, "q", first_tick)
    end_time, end_seq = tick_row(conn, "q", second_tick)
    assert info["queue_name"] == "q"
    assert info["consumer_name"] == "c"
    assert (info["prev_tick_id"], info["tick_id"]) == (first_tick, second_tick)
    assert (info["batch_start"], info["batch_end"]) == (start_time, end_time)
    assert (info["seq_start"], info["seq_end"]) == (start_seq, end_seq)
    assert info["lag"] >= timedelta(0)

    unknown = records(conn, "select * from pgque.get_batch_info(987654321)")
    assert len(unknown) == 1
    assert set(unknown[0].values()) == {None}


def test_get_queue_info(conn: Conn) -> None:
    make_queue(conn, "b")
    make_queue(conn, "a", "c")
    conn.execute("select pgque.set_queue_config('a', 'ticker_max_count', '7')")
    for i in range(3):
        send(conn, "a", str(i))
    latest = tick(conn, "a")
    send(conn, "a", "99")

    [info] = records(conn, "select * from pgque.get_queue_info('a')")
    assert info["queue_name"] == "a"
    assert (info["queue_ntables"], info["queue_cur_table"]) == (3, 0)
    assert info["queue_rotation_period"] == timedelta(hours=2)
    assert (info["queue_external_ticker"], info["queue_ticker_paused"]) == (False, False)
    assert info["queue_ticker_max_count"] == 7
    assert info["queue_ticker_max_lag"] == timedelta(seconds=3)
    assert info["queue_ticker_idle_period"] == timedelta(minutes=1)
    assert info["last_tick_id"] == latest
    assert info["ev_new"] == 1
    assert info["ticker_lag"] >= timedelta(0)
    assert info["ev_per_sec"] is None or info["ev_per_sec"] >= 0

    names = [r["queue_name"] for r in records(conn, "select * from pgque.get_queue_info()")]
    assert names == ["a", "b"]
    assert [r["queue_name"] for r in records(
        conn, "select * from pgque.get_queue_info(NULL)")] == ["a", "b"]
    assert records(conn, "select * from pgque.get_queue_info('nope')") == []


def test_observability_works_for_a_reader_only_role(conn: Conn, role_conn: ConnectAs) -> None:
    make_queue(conn, "q", "c")
    send(conn, "q", "1")
    tick(conn, "q")
    reader = role_conn("pgque_reader")
    batch = receive(reader, "q", "c")[0][BATCH_ID]

    assert [r["queue_name"] for r in records(reader, "select * from pgque.get_queue_info()")] \
        == ["q"]
    assert len(records(reader, "select * from pgque.get_queue_info('q')")) == 1
    [consumer] = records(reader, "select * from pgque.get_consumer_info('q', 'c')")
    assert consumer["current_batch"] == batch
    assert len(records(reader, "select * from pgque.get_consumer_info()")) == 1
    assert len(records(reader, "select * from pgque.get_consumer_info('q')")) == 1
    assert records(reader, "select * from pgque.get_batch_info(%s)", batch)[0]["tick_id"] \
        == consumer["next_tick"]
    assert scalar(reader, "select pgque.version()") == "0.2.0"

    admin_only = ["select * from pgque.status()", "select pgque.maint()",
                  "select pgque.start()", "select pgque.set_tick_period_ms(100)",
                  "call pgque.ticker_loop()"]
    for statement in admin_only:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute(statement)


def test_admin_runs_maintenance_but_not_uninstall(conn: Conn, role_conn: ConnectAs) -> None:
    make_queue(conn, "q", "c")
    admin = role_conn("pgque_admin")
    ev_id = send(conn, "q", "1")
    tick(conn, "q")
    [msg] = receive(conn, "q", "c")
    conn.execute("select pgque.event_retry(%s, %s, now())", (msg[BATCH_ID], ev_id))
    assert scalar(conn, "select pgque.ack(%s)", msg[BATCH_ID]) == 1
    assert scalar(admin, "select pgque.maint_retry_events()") == 1
    conn.execute("select pgque.set_queue_config('q', 'rotation_period', '1 millisecond')")
    deadline = time.monotonic() + 30
    while scalar(conn, "select queue_cur_table from pgque.queue") == 0:
        assert time.monotonic() < deadline, "admin could not rotate"
        tick(conn, "q")
        receive(conn, "q", "c")
        conn.execute("select pgque.ack(sub_batch) from pgque.subscription"
                     " where sub_batch is not null")
        assert scalar(admin, "select pgque.maint_rotate_tables_step1('q')") == 0
    assert scalar(admin, "select pgque.maint_rotate_tables_step2()") == 0
    assert scalar(admin, "select pgque.maint()") == 0
    assert scalar(admin, "select pgque.set_tick_period_ms(1000)") == 1000
    admin.execute("call pgque.ticker_loop()")
    assert len(records(admin, "select * from pgque.status()")) == len(STATUS_COMPONENTS)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        admin.execute("select pgque.uninstall()")
    assert scalar(conn, "select count(*) from pg_namespace where nspname = 'pgque'") == 1


# --- install and uninstall ------------------------------------------------------------


def test_install_again_keeps_events_subscriptions_and_cursors(db: Database, conn: Conn) -> None:
    make_queue(conn, "q", "c", "d")
    first = [send(conn, "q", str(i)) for i in range(3)]
    tick(conn, "q")
    assert [r[MSG_ID] for r in receive(conn, "q", "c")] == first
    conn.execute("select pgque.ack(sub_batch) from pgque.subscription where sub_batch is not null")
    second = [send(conn, "q", str(i)) for i in range(3, 5)]
    tick(conn, "q")
    conn.execute("select pgque.set_tick_period_ms(200)")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    open_batch = receive(conn, "q", "d")
    assert [r[MSG_ID] for r in open_batch] == first
    tables_before = conn.execute(
        "select * from pgque.queue order by queue_id").fetchall()
    cursors_before = conn.execute(
        "select sub_id, sub_last_tick, sub_batch, sub_next_tick from pgque.subscription"
        " order by sub_id").fetchall()

    engine = create_engine(db.url)
    try:
        with engine.begin() as sa_conn:
            schema.install(sa_conn)
    finally:
        engine.dispose()

    assert conn.execute("select * from pgque.queue order by queue_id").fetchall() == tables_before
    assert conn.execute(
        "select sub_id, sub_last_tick, sub_batch, sub_next_tick from pgque.subscription"
        " order by sub_id").fetchall() == cursors_before
    assert scalar(conn, "select tick_period_ms from pgque.config") == 200
    assert [r[MSG_ID] for r in receive(conn, "q", "c")] == second
    again = receive(conn, "q", "d")
    assert [r[MSG_ID] for r in again] == first
    assert again[0][BATCH_ID] == open_batch[0][BATCH_ID]
    assert scalar(conn, "select pgque.ack(%s)", again[0][BATCH_ID]) == 1
    assert [r[MSG_ID] for r in receive(conn, "q", "d")] == second


def test_uninstall_drops_the_schema_and_keeps_the_roles(db: Database, conn: Conn) -> None:
    make_queue(conn, "q", "c")
    notices = collect_notices(conn)
    conn.execute("select pgque.uninstall()")
    assert scalar(conn, "select count(*) from pg_namespace where nspname = 'pgque'") == 0
    roles = {r[0] for r in conn.execute(
        "select rolname from pg_roles where rolname like 'pgque\\_%'")}
    assert {"pgque_reader", "pgque_writer", "pgque_admin"} <= roles
    assert any("pgque_reader" in n for n in notices)

    engine = create_engine(db.url)
    try:
        with engine.begin() as sa_conn:
            schema.install(sa_conn)
    finally:
        engine.dispose()
    assert scalar(conn, "select count(*) from pgque.queue") == 0
    assert scalar(conn, "select pgque.create_queue('q')") == 1
