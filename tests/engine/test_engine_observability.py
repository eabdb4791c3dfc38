"""The PgQue 0.3 observability functions and configuration sugar (ENGINE-0.3.md §3.3,
§3.4, §4.5, §4.6, §6.3), with the behaviour of upstream's test_observability,
us9_observability, test_experimental_config_api, us3_retry_dlq and us6_rotation_lag.

They are additions to the PgQue 0.2 API, so the module is skipped when another 0.2
install is under test (``PGQUE_SCHEMA_SQL``). Figures are checked against the tick
table in the same statement (one ``now()``), and ages are made by moving tick, switch
or dead-letter times into the past, never by sleeping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from engine_helpers import Conn, ConnectAs, is_our_engine, make_queue, scalar, tick
from psycopg import errors

Row = tuple[Any, ...]

OBSERVABILITY = {
    "queue_stats": ("", "TABLE(queue_name text, queue_id integer, depth bigint,"
                        " oldest_msg_age interval, consumers integer, events_per_sec numeric,"
                        " cur_table integer, rotation_age interval, rotation_period interval,"
                        " ticker_paused boolean, last_tick_time timestamp with time zone,"
                        " last_tick_id bigint, dlq_count bigint)"),
    "consumer_stats": ("", "TABLE(queue_name text, consumer_name text, lag interval,"
                           " pending_events bigint, last_batch_start timestamp with time zone,"
                           " batch_active boolean, batch_id bigint)"),
    "queue_health": ("", "TABLE(queue_name text, check_name text, status text, detail text)"),
    "otel_metrics": ("", "TABLE(metric_name text, metric_type text, value numeric,"
                         " labels jsonb)"),
    "stuck_consumers": ("i_threshold interval DEFAULT '01:00:00'::interval",
                        "TABLE(queue_name text, consumer_name text, lag interval,"
                        " last_active timestamp with time zone)"),
    "in_flight": ("i_queue_name text", "TABLE(consumer_name text, batch_id bigint,"
                                       " batch_age interval, estimated_events bigint)"),
    "throughput": ("i_queue_name text, i_period interval, i_bucket_size interval",
                   "TABLE(bucket_start timestamp with time zone, events bigint,"
                   " events_per_sec numeric)"),
    "error_rate": ("i_queue_name text, i_period interval, i_bucket_size interval",
                   "TABLE(bucket_start timestamp with time zone, retries bigint,"
                   " dead_letters bigint)"),
}
OBSERVABILITY_CALLS = [
    "select * from pgque.queue_stats()",
    "select * from pgque.consumer_stats()",
    "select * from pgque.queue_health()",
    "select * from pgque.otel_metrics()",
    "select * from pgque.stuck_consumers()",
    "select * from pgque.stuck_consumers('0 seconds')",
    "select * from pgque.in_flight('q')",
    "select * from pgque.throughput('q', '1 hour', '30 seconds')",
    "select * from pgque.error_rate('q', '1 hour', '1 minute')",
]
CONFIG = {
    "create_queue": ("i_queue text, i_options jsonb", "integer"),
    "pause_queue": ("i_queue text", "void"),
    "resume_queue": ("i_queue text", "void"),
}
STATUSES = {"ok", "warning", "critical"}
QUEUE_GAUGES = ["pgque.queue.depth", "pgque.queue.oldest_message_age_seconds"]
CONSUMER_GAUGES = ["pgque.consumer.lag_seconds", "pgque.consumer.pending_events"]
GAUGES = [*QUEUE_GAUGES, *CONSUMER_GAUGES, "pgque.message.dead_lettered",
          "pgque.queue.throughput"]


@pytest.fixture(autouse=True)
def _our_engine_only(conn: Conn) -> Iterator[None]:
    if not is_our_engine(conn):
        pytest.skip("the PgQue 0.3 observability and config functions are ours only")
    yield


def rows(conn: Conn, query: str, *params: object) -> list[Row]:
    return conn.execute(query, params or None).fetchall()


def dicts(conn: Conn, query: str, *params: object) -> list[dict[str, Any]]:
    cur = conn.execute(query, params or None)
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def fails(conn: Conn, query: str, message: str, *params: object) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params or None)
    assert message in str(info.value), str(info.value)
    return info.value


def send(conn: Conn, queue: str, count: int = 1) -> None:
    conn.execute("select pgque.send_batch(%s, 't', %s::text[])",
                 (queue, [json.dumps({"n": n}) for n in range(count)]))


def receive(conn: Conn, queue: str, consumer: str) -> list[Row]:
    return rows(conn, "select * from pgque.receive(%s, %s, 1000)", queue, consumer)


def consume(conn: Conn, queue: str, consumer: str) -> list[Row]:
    """One batch received and acked."""
    got = receive(conn, queue, consumer)
    if got:
        assert scalar(conn, "select pgque.ack(%s)", got[0][1]) == 1
    return got


def stats(conn: Conn, queue: str) -> dict[str, Any]:
    (row,) = [r for r in dicts(conn, "select * from pgque.queue_stats()")
              if r["queue_name"] == queue]
    return row


def consumer_stat(conn: Conn, queue: str, consumer: str) -> dict[str, Any]:
    (row,) = [r for r in dicts(conn, "select * from pgque.consumer_stats()")
              if (r["queue_name"], r["consumer_name"]) == (queue, consumer)]
    return row


def health(conn: Conn) -> list[Row]:
    return rows(conn, "select * from pgque.queue_health()")


def health_of(conn: Conn, queue: str, check: str) -> tuple[str, str]:
    (found,) = [(status, detail) for q, name, status, detail in health(conn)
                if (q, name) == (queue, check)]
    return found


def set_config(conn: Conn, queue: str, param: str, value: str | None) -> None:
    conn.execute("select pgque.set_queue_config(%s, %s, %s)", (queue, param, value))


def queue_row(conn: Conn, queue: str, column: str) -> Any:
    return scalar(conn, f"select {column} from pgque.queue where queue_name = %s", queue)


def cursor_tick(conn: Conn, queue: str, consumer: str) -> Any:
    return scalar(conn, "select s.sub_last_tick from pgque.subscription s"
                        " join pgque.queue q on q.queue_id = s.sub_queue"
                        " join pgque.consumer c on c.co_id = s.sub_consumer"
                        " where q.queue_name = %s and c.co_name = %s", queue, consumer)


def tick_seq(conn: Conn, queue: str, tick_id: int) -> int:
    return int(scalar(conn, "select t.tick_event_seq from pgque.tick t"
                            " join pgque.queue q on q.queue_id = t.tick_queue"
                            " where q.queue_name = %s and t.tick_id = %s", queue, tick_id))


def age_ticks(conn: Conn, queue: str, by: str) -> None:
    """Move every tick of ``queue`` ``by`` into the past."""
    conn.execute("update pgque.tick t set tick_time = tick_time - %s::interval"
                 " from pgque.queue q where q.queue_id = t.tick_queue and q.queue_name = %s",
                 (by, queue))


def dead_letter(conn: Conn, queue: str, consumer: str, reason: str = "bad") -> None:
    """Dead-letter the first event of the consumer's next batch through event_dead (as
    us9 does; the batch's ev_txid comes back as bigint and is cast to event_dead's xid8)."""
    (batch_id,) = rows(conn, "select batch_id from pgque.receive(%s, %s, 1000) limit 1",
                       queue, consumer)[0]
    assert scalar(
        conn,
        "select pgque.event_dead(%s, e.ev_id, %s, e.ev_time, e.ev_txid::text::xid8,"
        " e.ev_retry, e.ev_type, e.ev_data) from pgque.get_batch_events(%s) e"
        " order by e.ev_id limit 1", batch_id, reason, batch_id) == 1
    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 1


# --- signatures and grants -----------------------------------------------------------


def signature(conn: Conn, name: str) -> list[Row]:
    return rows(conn, "select pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),"
                      " p.prosecdef, p.proconfig from pg_proc p"
                      " where p.pronamespace = 'pgque'::regnamespace and p.proname = %s"
                      " order by p.pronargs", name)


@pytest.mark.parametrize("name", [*OBSERVABILITY, *CONFIG])
def test_signature_is_the_specs_and_security_definer(conn: Conn, name: str) -> None:
    found = signature(conn, name)
    if name == "create_queue":
        assert [r[0] for r in found] == ["i_queue_name text", CONFIG[name][0]]
        found = found[1:]
    (args, result, definer, config), = found
    assert (args, result) == {**OBSERVABILITY, **CONFIG}[name]
    assert definer
    assert config == ["search_path=pgque, pg_catalog"]


def test_one_argument_create_queue_stays_unambiguous(conn: Conn) -> None:
    assert scalar(conn, "select pgque.create_queue('q')") == 1
    assert scalar(conn, "select pgque.create_queue('q', null)") == 0


def test_reader_runs_the_observability_functions_public_runs_nothing(
    conn: Conn, role_conn: ConnectAs
) -> None:
    make_queue(conn, "q", "c")
    send(conn, "q")
    tick(conn)
    reader = role_conn("pgque_reader")
    writer = role_conn("pgque_writer")
    for call in OBSERVABILITY_CALLS:
        reader.execute(call).fetchall()
        with pytest.raises(errors.InsufficientPrivilege):
            writer.execute(call)
    assert [r[0] for r in rows(reader, "select consumer_name from pgque.consumer_stats()")] == ["c"]
    names = [*OBSERVABILITY, *CONFIG]
    executable_by_public = rows(
        conn, "select p.oid::regprocedure::text from pg_proc p"
              " where p.pronamespace = 'pgque'::regnamespace and p.proname = any(%s)"
              " and has_function_privilege('public', p.oid, 'EXECUTE')", names)
    assert executable_by_public == []
    # Eight observability functions plus the three config ones.
    assert scalar(conn, "select count(*) from pg_proc where pronamespace = 'pgque'::regnamespace"
                        " and proname = any(%s)", names) == 12


def test_config_functions_are_admin_only(conn: Conn, role_conn: ConnectAs) -> None:
    for member_of in ("pgque_reader", "pgque_writer"):
        other = role_conn(member_of)
        for call in ("select pgque.create_queue('x', '{}'::jsonb)",
                     "select pgque.pause_queue('x')", "select pgque.resume_queue('x')"):
            with pytest.raises(errors.InsufficientPrivilege):
                other.execute(call)
    admin = role_conn("pgque_admin")
    assert scalar(admin, "select pgque.create_queue('x', '{\"max_retries\": 1}'::jsonb)") == 1
    admin.execute("select pgque.pause_queue('x')")
    assert queue_row(conn, "x", "queue_ticker_paused") is True
    admin.execute("select pgque.resume_queue('x')")
    assert queue_row(conn, "x", "queue_ticker_paused") is False
    assert queue_row(conn, "x", "queue_max_retries") == 1


# --- test_observability.sql ----------------------------------------------------------


def test_observability_smoke(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    send(conn, "q", 3)
    tick(conn)
    queue = stats(conn, "q")
    assert queue["consumers"] == 1 and queue["depth"] >= 0
    assert consumer_stat(conn, "q", "c")["pending_events"] >= 0
    assert health_of(conn, "q", "ticker_running")[0] in STATUSES
    depth_gauges = [r for r in dicts(conn, "select * from pgque.otel_metrics()")
                    if r["metric_name"] == "pgque.queue.depth"]
    assert [(g["metric_type"], g["labels"]) for g in depth_gauges] == [("gauge", {"queue": "q"})]
    assert len(rows(conn, "select * from pgque.stuck_consumers('0 seconds')")) >= 1
    assert rows(conn, "select * from pgque.in_flight('q')") == []
    rows(conn, "select * from pgque.throughput('q', '1 hour', '1 minute')")
    rows(conn, "select * from pgque.error_rate('q', '1 hour', '1 minute')")


# --- queue_stats, consumer_stats, in_flight: sequence distances ------------------------


def test_figures_are_sequence_distances_as_specified(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    start = cursor_tick(conn, "q", "c")
    send(conn, "q", 3)
    newest = tick(conn)  # forced: the sequence jumps 2 * 500 + 1000 past the events

    distance = tick_seq(conn, "q", newest) - tick_seq(conn, "q", start)
    assert distance > 2000
    true_pending = scalar(conn, "select pending_events from pgque.get_consumer_info('q', 'c')")
    assert true_pending < distance, "get_consumer_info stays net of forced ticks"
    assert consumer_stat(conn, "q", "c")["pending_events"] == distance
    queue = stats(conn, "q")
    assert queue["depth"] == distance
    assert queue["last_tick_id"] == newest
    assert (queue["consumers"], queue["dlq_count"], queue["cur_table"]) == (1, 0, 0)
    assert (queue["rotation_period"], queue["ticker_paused"]) == (timedelta(hours=2), False)

    # Ages and rates computed from the tables in the same statement (one now()).
    assert rows(conn, """
        select s.oldest_msg_age = now() - c.tick_time,
               s.last_tick_time = n.tick_time,
               s.rotation_age = now() - q.queue_switch_time,
               s.events_per_sec = (n.tick_event_seq - p.tick_event_seq)
                                  / extract(epoch from n.tick_time - p.tick_time),
               cs.lag = now() - c.tick_time,
               cs.last_batch_start = sub.sub_active
          from pgque.queue_stats() s, pgque.consumer_stats() cs, pgque.queue q,
               pgque.subscription sub,
               pgque.tick c, pgque.tick n, pgque.tick p
         where q.queue_id = s.queue_id and sub.sub_queue = q.queue_id
           and c.tick_queue = q.queue_id and c.tick_id = %s
           and n.tick_queue = q.queue_id and n.tick_id = %s
           and p.tick_queue = q.queue_id and p.tick_id = %s - 1
    """, start, newest, newest) == [(True,) * 6]

    got = receive(conn, "q", "c")
    assert len(got) == 3
    batch_id = got[0][1]
    mine = consumer_stat(conn, "q", "c")
    assert (mine["batch_active"], mine["batch_id"]) == (True, batch_id)
    assert rows(conn, "select consumer_name, batch_id, estimated_events,"
                      " batch_age = now() - s.sub_active"
                      " from pgque.in_flight('q'), pgque.subscription s") == [
        ("c", batch_id, distance, True)]

    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 1
    mine = consumer_stat(conn, "q", "c")
    assert (mine["pending_events"], mine["batch_active"], mine["batch_id"]) == (0, False, None)
    assert stats(conn, "q")["depth"] == 0
    assert rows(conn, "select * from pgque.in_flight('q')") == []


def test_queue_stats_without_consumers_or_previous_tick(conn: Conn) -> None:
    make_queue(conn, "lonely")
    queue = stats(conn, "lonely")
    assert (queue["depth"], queue["oldest_msg_age"], queue["consumers"]) == (0, None, 0)
    assert queue["events_per_sec"] is None, "tick newest - 1 does not exist"
    assert queue["last_tick_id"] == 1

    # Two ticks with the same time (an external source may send them): rate 0.
    set_config(conn, "lonely", "external_ticker", "true")
    conn.execute("select pgque.ticker('lonely', 2, t.tick_time, t.tick_event_seq + 5)"
                 " from pgque.tick t join pgque.queue q on q.queue_id = t.tick_queue"
                 " where q.queue_name = 'lonely'")
    assert stats(conn, "lonely")["events_per_sec"] == 0

    assert rows(conn, "select queue_name from pgque.queue_stats()") == [("lonely",)]
    conn.execute("select pgque.create_queue('a_first')")
    assert [r[0] for r in rows(conn, "select queue_name from pgque.queue_stats()")] == [
        "a_first", "lonely"]


def test_in_flight_of_an_unknown_queue_is_empty(conn: Conn) -> None:
    assert rows(conn, "select * from pgque.in_flight('nosuch')") == []
    assert rows(conn, "select * from pgque.in_flight(null)") == []


# --- us9_observability.sql -----------------------------------------------------------


def test_three_queues(conn: Conn) -> None:
    for queue in ("us9_ok", "us9_dlq", "us9_lag"):
        make_queue(conn, queue, "worker")
        send(conn, queue, 2)
        tick(conn, queue)
    assert len(consume(conn, "us9_ok", "worker")) == 2
    dead_letter(conn, "us9_dlq", "worker")

    assert (stats(conn, "us9_ok")["depth"], stats(conn, "us9_ok")["dlq_count"]) == (0, 0)
    assert stats(conn, "us9_dlq")["dlq_count"] == 1
    assert stats(conn, "us9_lag")["dlq_count"] == 0
    caught_up = consumer_stat(conn, "us9_ok", "worker")
    lagging = consumer_stat(conn, "us9_lag", "worker")
    assert caught_up["pending_events"] == 0 and caught_up["lag"] is not None
    assert lagging["pending_events"] > 0 and lagging["lag"] is not None

    checks = health(conn)
    assert {status for _, _, status, _ in checks} <= STATUSES
    for check in ("ticker_running", "rotation_health", "dlq_health"):
        assert sum(name == check for _, name, _, _ in checks) >= 3
    assert sum(name.startswith("consumer_lag:") for _, name, _, _ in checks) >= 3

    metrics = dicts(conn, "select * from pgque.otel_metrics()")

    def gauges(name: str) -> list[dict[str, Any]]:
        return [m for m in metrics if m["metric_name"] == name]
    assert len(gauges("pgque.queue.depth")) >= 3
    assert len(gauges("pgque.message.dead_lettered")) >= 3
    assert {m["labels"]["queue"]: m["value"] for m in gauges("pgque.message.dead_lettered")} == {
        "us9_ok": 0, "us9_dlq": 1, "us9_lag": 0}
    lag_gauges = gauges("pgque.consumer.lag_seconds")
    assert len(lag_gauges) >= 3 and all("consumer" in m["labels"] for m in lag_gauges)

    stuck = rows(conn, "select queue_name, consumer_name from pgque.stuck_consumers('0 seconds')")
    assert ("us9_lag", "worker") in stuck

    assert scalar(conn, "select pgque.dlq_purge('us9_dlq', '0 seconds')") == 1
    assert stats(conn, "us9_dlq")["dlq_count"] == 0


# --- queue_health --------------------------------------------------------------------

GROUPS = ["ticker_running", "consumer_lag:", "rotation_health", "dlq_health", "pg_cron_"]


def group_of(check_name: str) -> int:
    return next(i for i, prefix in enumerate(GROUPS) if check_name.startswith(prefix))


def test_queue_health_groups_come_in_order(conn: Conn) -> None:
    make_queue(conn, "b", "c2", "c1")
    make_queue(conn, "a", "c3")
    checks = health(conn)
    order = [group_of(name) for _, name, _, _ in checks]
    assert order == sorted(order)
    assert [(q, name) for q, name, _, _ in checks] == [
        ("a", "ticker_running"), ("b", "ticker_running"),
        ("a", "consumer_lag:c3"), ("b", "consumer_lag:c1"), ("b", "consumer_lag:c2"),
        ("a", "rotation_health"), ("b", "rotation_health"),
        ("a", "dlq_health"), ("b", "dlq_health"),
        ("system", "pg_cron_ticker"), ("system", "pg_cron_maint"),
    ]
    assert {status for _, _, status, _ in checks} <= STATUSES


def test_ticker_running(conn: Conn) -> None:
    make_queue(conn, "q")
    status, detail = health_of(conn, "q", "ticker_running")
    last = scalar(conn, "select max(tick_time)::text from pgque.tick")
    assert (status, detail) == ("ok", f"Last tick: {last}")

    age_ticks(conn, "q", "9 seconds")
    assert health_of(conn, "q", "ticker_running")[0] == "ok"
    age_ticks(conn, "q", "2 seconds")
    assert health_of(conn, "q", "ticker_running")[0] == "critical", "over 10 s old"
    tick(conn)
    assert health_of(conn, "q", "ticker_running")[0] == "ok"

    conn.execute("delete from pgque.tick")
    assert health_of(conn, "q", "ticker_running") == ("critical", "Last tick: never")

    conn.execute("select pgque.pause_queue('q')")
    assert [name for q, name, _, _ in health(conn) if q == "q"] == [
        "rotation_health", "dlq_health"], "a paused queue's ticker is not expected to run"


def test_consumer_lag(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    set_config(conn, "q", "rotation_period", "100 seconds")
    status, detail = health_of(conn, "q", "consumer_lag:c")
    assert status == "ok" and detail.startswith("c lag: ")
    assert rows(conn, """
        select h.detail = 'c lag: ' || (now() - t.tick_time)::text
          from pgque.queue_health() h, pgque.tick t
         where h.check_name = 'consumer_lag:c'""") == [(True,)]

    age_ticks(conn, "q", "49 seconds")
    assert health_of(conn, "q", "consumer_lag:c")[0] == "ok"
    age_ticks(conn, "q", "2 seconds")
    assert health_of(conn, "q", "consumer_lag:c")[0] == "warning", "over half the period"
    age_ticks(conn, "q", "50 seconds")
    assert health_of(conn, "q", "consumer_lag:c")[0] == "critical", "over the period"

    conn.execute("update pgque.subscription set sub_last_tick = 999")
    assert health_of(conn, "q", "consumer_lag:c") == ("warning", "c lag: never consumed")


def test_rotation_health(conn: Conn) -> None:
    make_queue(conn, "q")
    switched = queue_row(conn, "q", "queue_switch_time::text")
    assert health_of(conn, "q", "rotation_health") == ("ok", f"last rotation: {switched}")

    conn.execute("update pgque.queue set queue_switch_step2 = null")
    assert health_of(conn, "q", "rotation_health") == ("warning", "mid-rotation (step2 pending)")
    conn.execute("select pgque.maint_rotate_tables_step2()")

    set_config(conn, "q", "rotation_period", "10 seconds")
    conn.execute("update pgque.queue set queue_switch_time = now() - interval '19 seconds'")
    assert health_of(conn, "q", "rotation_health")[0] == "ok"
    conn.execute("update pgque.queue set queue_switch_time = now() - interval '21 seconds'")
    switched = queue_row(conn, "q", "queue_switch_time::text")
    assert health_of(conn, "q", "rotation_health") == ("warning", f"last rotation: {switched}")


def test_dlq_health(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    assert health_of(conn, "q", "dlq_health") == ("ok", "0 dead letter events")

    def add_dead_letters(first: int, count: int) -> None:
        conn.execute(
            "insert into pgque.dead_letter (dl_queue_id, dl_consumer_id, ev_id, ev_time)"
            " select q.queue_id, c.co_id, n, now() from pgque.queue q, pgque.consumer c,"
            " generate_series(%s::bigint, %s::bigint) n", (first, first + count - 1))

    add_dead_letters(1, 1000)
    assert health_of(conn, "q", "dlq_health") == ("ok", "1000 dead letter events")
    add_dead_letters(1001, 1)
    assert health_of(conn, "q", "dlq_health") == ("warning", "1001 dead letter events")


def test_scheduler_job_checks_read_pgque_config(conn: Conn) -> None:
    def system() -> list[Row]:
        return [r[1:] for r in health(conn) if r[0] == "system"]

    assert system() == [("pg_cron_ticker", "critical", "ticker job not scheduled"),
                        ("pg_cron_maint", "critical", "maint job not scheduled")]
    conn.execute("update pgque.config set ticker_job_id = 7")
    assert system() == [("pg_cron_ticker", "ok", "job_id=7"),
                        ("pg_cron_maint", "critical", "maint job not scheduled")]
    conn.execute("update pgque.config set ticker_job_id = null, maint_job_id = 8")
    assert system() == [("pg_cron_ticker", "critical", "ticker job not scheduled"),
                        ("pg_cron_maint", "ok", "job_id=8")]


# --- otel_metrics --------------------------------------------------------------------


def test_otel_metrics_mirror_the_stats(conn: Conn) -> None:
    make_queue(conn, "q", "c1", "c2")
    make_queue(conn, "idle")
    send(conn, "q", 2)
    tick(conn)
    metrics = dicts(conn, "select * from pgque.otel_metrics()")
    assert {m["metric_type"] for m in metrics} == {"gauge"}
    assert [m["metric_name"] for m in metrics] == [
        name for name in GAUGES for _ in range(2)], "six groups, each in fixed order"
    for m in metrics:
        if m["metric_name"] in CONSUMER_GAUGES:
            assert set(m["labels"]) == {"queue", "consumer"}
        else:
            assert set(m["labels"]) == {"queue"}

    def values(name: str) -> dict[str, Any]:
        return {m["labels"]["queue"] + "/" * ("consumer" in m["labels"])
                + m["labels"].get("consumer", ""): m["value"]
                for m in metrics if m["metric_name"] == name}

    q, idle = stats(conn, "q"), stats(conn, "idle")
    assert values("pgque.queue.depth") == {"q": q["depth"], "idle": 0}
    assert values("pgque.queue.oldest_message_age_seconds")["idle"] == 0, "NULL age -> 0"
    assert values("pgque.queue.oldest_message_age_seconds")["q"] > 0
    assert values("pgque.queue.throughput") == {"q": q["events_per_sec"], "idle": 0}
    assert idle["events_per_sec"] is None
    assert values("pgque.message.dead_lettered") == {"q": 0, "idle": 0}
    pending = {f"q/{c}": consumer_stat(conn, "q", c)["pending_events"] for c in ("c1", "c2")}
    assert values("pgque.consumer.pending_events") == pending
    lag = values("pgque.consumer.lag_seconds")
    assert set(lag) == {"q/c1", "q/c2"} and all(v > 0 for v in lag.values())


# --- stuck_consumers -----------------------------------------------------------------


def test_stuck_consumers(conn: Conn) -> None:
    make_queue(conn, "q", "old")
    tick(conn)
    assert scalar(conn, "select pgque.subscribe('q', 'newer')") == 1
    assert rows(conn, "select * from pgque.stuck_consumers()") == [], "default: 1 hour"
    assert rows(conn, "select * from pgque.stuck_consumers(null)") == []

    stuck = dicts(conn, "select * from pgque.stuck_consumers('0 seconds')")
    assert [r["consumer_name"] for r in stuck] == ["old", "newer"], "by lag, longest first"
    assert rows(conn, """
        select bool_and(s.lag = c.lag and s.last_active = c.last_batch_start)
          from pgque.stuck_consumers('0 seconds') s
          join pgque.consumer_stats() c using (queue_name, consumer_name)""") == [(True,)]

    # A cursor tick taken in the calling transaction is not in the past yet.
    with conn.transaction():
        conn.execute("select pgque.force_next_tick('q')")
        assert scalar(conn, "select pgque.ticker('q')") is not None
        assert scalar(conn, "select pgque.subscribe('q', 'fresh')") == 1
        names = [r[1] for r in rows(conn, "select * from pgque.stuck_consumers('0 seconds')")]
        assert names == ["old", "newer"]

    age_ticks(conn, "q", "2 hours")
    assert [r[1] for r in rows(conn, "select * from pgque.stuck_consumers()")] == [
        "old", "newer", "fresh"]


# --- throughput ----------------------------------------------------------------------


def inject_ticks(conn: Conn, queue: str) -> datetime:
    """Ticks 1001-1003 at anchor +10/+40/+100 s with seq +0/+100/+250 over the queue's
    first tick, anchor a multiple of 90 s about 15 minutes ago (test_observability)."""
    anchor: datetime = scalar(conn, "select to_timestamp(floor((extract(epoch from now())"
                                    " - 900) / 90) * 90)")
    conn.execute("""
        insert into pgque.tick (tick_queue, tick_id, tick_time, tick_event_seq)
        select q.queue_id, 1000 + n, %s + make_interval(secs => secs), first.tick_event_seq + seq
          from pgque.queue q
          join pgque.tick first on first.tick_queue = q.queue_id and first.tick_id = 1,
               (values (1, 10, 0), (2, 40, 100), (3, 100, 250)) v (n, secs, seq)
         where q.queue_name = %s""", (anchor, queue))
    return anchor


def test_throughput_of_injected_ticks(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    anchor = inject_ticks(conn, "q")
    step = timedelta(seconds=90)
    assert rows(conn, "select bucket_start, events from pgque.throughput('q', '1 hour',"
                      " '90 seconds')") == [(anchor, 100), (anchor + step, 150)]
    rates = [r[0] for r in rows(conn, "select events_per_sec from pgque.throughput('q',"
                                      " '1 hour', '90 seconds')")]
    assert [round(r, 9) for r in rates] == [round(Decimal(n) / 90, 9) for n in (100, 150)]
    assert rows(conn, "select * from pgque.throughput('q', '1 minute', '90 seconds')") == [], (
        "only the queue's first tick is that recent")

    # Every function still reads the queue, and it can still be dropped.
    for call in OBSERVABILITY_CALLS:
        conn.execute(call).fetchall()
    assert scalar(conn, "select pgque.drop_queue('q', true)") == 1
    assert scalar(conn, "select count(*) from pgque.tick") == 0


def test_throughput_buckets_align_to_the_epoch(conn: Conn) -> None:
    make_queue(conn, "q")
    first = tick_seq(conn, "q", 1)
    for _ in range(3):
        send(conn, "q", 2)
        tick(conn)
    # Ticks 1-4 spread 31 s apart, the newest now: 30 s buckets of their own.
    conn.execute("update pgque.tick set tick_time = tick_time - (4 - tick_id) * interval '31 s'")
    buckets = rows(conn, "select bucket_start, events, events_per_sec"
                         " from pgque.throughput('q', '1 hour', '30 seconds')")
    assert len(buckets) >= 3
    for start, events, per_sec in buckets:
        assert start.timestamp() % 30 == 0
        assert round(per_sec, 9) == round(Decimal(events) / 30, 9)
    assert [b[0] for b in buckets] == sorted(b[0] for b in buckets)
    assert sum(b[1] for b in buckets) == tick_seq(conn, "q", 4) - first, (
        "the deltas chain through every tick in id order")


@pytest.mark.parametrize("size", ["0 seconds", "-1 seconds", None])
def test_throughput_rejects_a_bucket_size_not_above_zero(conn: Conn, size: str | None) -> None:
    make_queue(conn, "q")
    shown = "NULL" if size is None else scalar(conn, "select %s::interval::text", size)
    for queue in ("q", "nosuch"):
        error = fails(conn, "select * from pgque.throughput(%s, '1 hour', %s)",
                      f"throughput: bucket size must be > 0, got {shown}", queue, size)
        assert error.sqlstate == "22023"


@pytest.mark.parametrize("function", ["throughput", "error_rate"])
def test_unknown_queue(conn: Conn, function: str) -> None:
    error = fails(conn, f"select * from pgque.{function}('nosuch', '1 hour', '1 minute')",
                  "queue not found: nosuch")
    assert error.sqlstate == "PQ001"


# --- error_rate ----------------------------------------------------------------------


def test_error_rate_buckets_are_minute_aligned_and_include_empty_ones(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    make_queue(conn, "other", "c")
    send(conn, "q", 3)
    send(conn, "other", 1)
    tick(conn)
    tick(conn, "other")
    batch = receive(conn, "q", "c")
    other_batch = receive(conn, "other", "c")
    # Retries parked with due times 3 and 5 minutes ago, one due in an hour; a retry of
    # another queue that must not count.
    # Times within minutes that stay inside the 10-minute window below even if the
    # clock passes a minute boundary meanwhile.
    base: datetime = scalar(conn, "select date_trunc('minute', now())")
    minute = timedelta(minutes=1)
    half = timedelta(seconds=30)
    dues = (base - 3 * minute + half, base - 5 * minute + half, base + 60 * minute)
    for msg, due in zip(batch, dues, strict=True):
        conn.execute("select pgque.event_retry(%s, %s::bigint, %s::timestamptz)",
                     (msg[1], msg[0], due))
    conn.execute("select pgque.event_retry(%s, %s::bigint, %s::timestamptz)",
                 (other_batch[0][1], other_batch[0][0], dues[0]))
    for b in (batch, other_batch):
        assert scalar(conn, "select pgque.ack(%s)", b[0][1]) == 1
    conn.execute("insert into pgque.dead_letter (dl_queue_id, dl_consumer_id, dl_time, ev_id,"
                 " ev_time) select q.queue_id, c.co_id, %s, n, now()"
                 " from pgque.queue q, pgque.consumer c, generate_series(1, 2) n"
                 " where q.queue_name = 'q'", (base - 5 * minute,))

    with conn.transaction():
        now: datetime = scalar(conn, "select now()")
        got = rows(conn, "select * from pgque.error_rate('q', '10 minutes', '1 minute')")
        first = (now - 10 * minute).replace(second=0, microsecond=0)
        assert [r[0] for r in got] == [first + i * minute for i in range(11)]
        assert {r[0]: r[1:] for r in got if r[1:] != (0, 0)} == {
            base - 3 * minute: (1, 0), base - 5 * minute: (1, 2)}

    two_minutes = rows(conn, "select bucket_start from pgque.error_rate('q', '10 minutes',"
                             " '2 minutes')")
    assert len(two_minutes) == 6
    assert rows(conn, "select * from pgque.error_rate('q', '-10 minutes', '1 minute')") == []
    assert rows(conn, "select * from pgque.error_rate('q', '10 minutes', '-1 minute')") == []
    fails(conn, "select * from pgque.error_rate('q', '10 minutes', '0 minutes')",
          "step size cannot equal zero")


# --- cooperative members -------------------------------------------------------------


def test_cooperative_members_do_not_break_any_function(conn: Conn) -> None:
    make_queue(conn, "q")
    for sub in ("idle", "busy"):
        assert scalar(conn, "select pgque.subscribe_subconsumer('q', 'g', %s)", sub) == 1
    send(conn, "q", 2)
    tick(conn)
    batch = rows(conn, "select * from pgque.receive_coop('q', 'g', 'busy')")
    assert len(batch) == 2

    for call in OBSERVABILITY_CALLS:
        conn.execute(call).fetchall()
    assert stats(conn, "q")["consumers"] == 3
    idle = consumer_stat(conn, "q", "g.idle")
    assert (idle["lag"], idle["pending_events"], idle["batch_active"]) == (None, 0, False)
    assert consumer_stat(conn, "q", "g.busy")["batch_id"] == batch[0][1]
    assert health_of(conn, "q", "consumer_lag:g.idle") == ("warning",
                                                           "g.idle lag: never consumed")
    in_flight = rows(conn, "select consumer_name, batch_id, estimated_events"
                           " from pgque.in_flight('q')")
    assert [r[:2] for r in in_flight] == [("g.busy", batch[0][1])] and in_flight[0][2] > 0
    lag = [m for m in dicts(conn, "select * from pgque.otel_metrics()")
           if m["labels"].get("consumer") == "g.idle"]
    assert [(m["metric_name"], m["value"]) for m in lag] == [
        ("pgque.consumer.lag_seconds", None), ("pgque.consumer.pending_events", 0)]

    # An idle member is judged by its last activity.
    assert "g.idle" not in [r[1] for r in rows(conn, "select * from pgque.stuck_consumers()")]
    conn.execute("update pgque.subscription s set sub_active = now() - interval '2 hours'"
                 " from pgque.consumer c where c.co_id = s.sub_consumer and c.co_name = 'g.idle'")
    stuck = rows(conn, "select consumer_name, lag from pgque.stuck_consumers()")
    assert stuck == [("g.idle", None)]


# --- test_experimental_config_api.sql --------------------------------------------------


def test_create_queue_with_options(conn: Conn) -> None:
    assert scalar(conn, "select pgque.create_queue('cq', '{\"max_retries\": 10}')") == 1
    assert queue_row(conn, "cq", "queue_max_retries") == 10

    conn.execute("select pgque.pause_queue('cq')")
    assert queue_row(conn, "cq", "queue_ticker_paused") is True
    fails(conn, "select pgque.ticker('cq')", "paused")
    conn.execute("select pgque.resume_queue('cq')")
    assert queue_row(conn, "cq", "queue_ticker_paused") is False
    assert scalar(conn, "select pgque.ticker('cq')") is not None


def test_rejected_option_leaves_no_queue(conn: Conn) -> None:
    fails(conn, "select pgque.create_queue('bad', '{\"max_retries\": -1}')",
          "max_retries must be >= 0")
    assert scalar(conn, "select count(*) from pgque.queue") == 0
    with pytest.raises(psycopg.Error, match="max_retries must be >= 0"), conn.transaction():
        conn.execute("select pgque.create_queue('first')")
        conn.execute("select pgque.create_queue('bad', '{\"max_retries\": -1}')")
    assert scalar(conn, "select count(*) from pgque.queue") == 0
    assert rows(conn, "select relname from pg_class"
                      " where relname ~ '^event_[0-9]'") == [], "no event tables either"
    assert scalar(conn, "select pgque.create_queue('bad')") == 1, "the name is free"


def test_option_values(conn: Conn) -> None:
    options = {"max_retries": 3, "ticker_max_count": 7, "ticker_paused": True,
               "external_ticker": False, "rotation_period": "30 seconds",
               "queue_ticker_max_lag": "250 milliseconds", "ticker_idle_period": "5 minutes"}
    assert scalar(conn, "select pgque.create_queue('cq', %s::jsonb)", json.dumps(options)) == 1
    assert rows(conn, "select queue_max_retries, queue_ticker_max_count, queue_ticker_paused,"
                      " queue_external_ticker, queue_rotation_period, queue_ticker_max_lag,"
                      " queue_ticker_idle_period from pgque.queue") == [
        (3, 7, True, False, timedelta(seconds=30), timedelta(milliseconds=250),
         timedelta(minutes=5))]

    # Applied to an existing queue too; JSON null resets a parameter to its default.
    assert scalar(conn, "select pgque.create_queue('cq', %s::jsonb)", json.dumps(
        {"max_retries": None, "ticker_max_count": None, "ticker_paused": None,
         "rotation_period": "1 hour"})) == 0
    assert rows(conn, "select queue_max_retries, queue_ticker_max_count, queue_ticker_paused,"
                      " queue_rotation_period from pgque.queue") == [
        (None, 500, False, timedelta(hours=1))]

    # Nested values reach set_queue_config as JSON text, and fail its cast.
    fails(conn, "select pgque.create_queue('cq', '{\"max_retries\": {\"n\": 1}}')",
          'invalid input syntax for type integer: "{"n": 1}"')
    fails(conn, "select pgque.create_queue('cq', '{\"ticker_paused\": [true]}')",
          'invalid input syntax for type boolean: "[true]"')
    fails(conn, "select pgque.create_queue('cq', '{\"bogus\": 1}')",
          'cannot change parameter "bogus"')
    fails(conn, "select pgque.create_queue('cq', '[1]')", "cannot call jsonb_each on a non-object")
    assert queue_row(conn, "cq", "queue_rotation_period") == timedelta(hours=1)


def test_null_options_just_create(conn: Conn) -> None:
    assert scalar(conn, "select pgque.create_queue('cq', null)") == 1
    assert scalar(conn, "select pgque.create_queue('cq', '{}')") == 0
    assert rows(conn, "select queue_max_retries, queue_rotation_period from pgque.queue") == [
        (None, timedelta(hours=2))]
    fails(conn, "select pgque.create_queue(null, '{}')", "Invalid NULL value")
    fails(conn, "select pgque.pause_queue('nosuch')", "No such event queue")
    fails(conn, "select pgque.resume_queue(null)", "Invalid NULL value")


# --- us3_retry_dlq.sql and us6_rotation_lag.sql ----------------------------------------


def test_retries_then_dead_letter_with_max_retries_from_options(conn: Conn) -> None:
    assert scalar(conn, "select pgque.create_queue('us3', '{\"max_retries\": 2}')") == 1
    conn.execute("select pgque.subscribe('us3', 'c')")
    conn.execute("select pgque.send('us3', 'order.created', '{\"id\": 42}'::jsonb)")
    tick(conn, "us3")

    for expected_retry in (None, 1, 2):
        (msg,) = receive(conn, "us3", "c")
        assert msg[4] == expected_retry
        assert scalar(conn, "select pgque.nack(%s, r, '0 seconds', 'payment failed')"
                            " from pgque.receive('us3', 'c', 1000) r", msg[1]) == 1
        assert scalar(conn, "select pgque.ack(%s)", msg[1]) == 1
        moved = scalar(conn, "select pgque.maint_retry_events()")
        if expected_retry == 2:
            assert moved == 0, "the third nack dead-letters"
        else:
            assert moved == 1
            tick(conn, "us3")

    (dead,) = dicts(conn, "select * from pgque.dlq_inspect('us3')")
    assert (dead["dl_reason"], dead["ev_type"], json.loads(dead["ev_data"])) == (
        "payment failed", "order.created", {"id": 42})
    assert stats(conn, "us3")["dlq_count"] == 1
    conn.execute("select pgque.dlq_replay(%s)", (dead["dl_id"],))
    assert rows(conn, "select * from pgque.dlq_inspect('us3')") == []
    tick(conn, "us3")
    (again,) = consume(conn, "us3", "c")
    assert (again[2], json.loads(again[3]), again[4]) == ("order.created", {"id": 42}, None)


def test_slow_consumer_with_rotation_period_from_options(conn: Conn) -> None:
    assert scalar(conn, "select pgque.create_queue('us6', '{\"rotation_period\":"
                        " \"30 seconds\"}')") == 1
    assert queue_row(conn, "us6", "queue_rotation_period") == timedelta(seconds=30)
    for consumer in ("fast", "slow"):
        conn.execute("select pgque.subscribe('us6', %s)", (consumer,))
    for count in (3, 2):
        send(conn, "us6", count)
        tick(conn, "us6")
        assert len(consume(conn, "us6", "fast")) == count

    stuck = rows(conn, "select consumer_name from pgque.stuck_consumers('0 seconds')")
    assert ("slow",) in stuck
    assert health_of(conn, "us6", "consumer_lag:slow")[0] in STATUSES
    assert consumer_stat(conn, "us6", "slow")["pending_events"] > 0

    assert [len(consume(conn, "us6", "slow")) for _ in range(2)] == [3, 2]
    for consumer in ("fast", "slow"):
        assert consumer_stat(conn, "us6", consumer)["pending_events"] == 0
        assert receive(conn, "us6", consumer) == []
