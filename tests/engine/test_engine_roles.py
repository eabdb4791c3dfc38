"""Roles and grants (spec §2.5): who may call what, checked by calling it.

Each test creates its own login roles (unique names, since roles are cluster-wide),
members of only ``pgque_writer``, only ``pgque_reader``, only ``pgque_admin`` or of
nothing, and acts as them with ``SET ROLE`` on a superuser connection. The catalog
checks cover every function of schema ``pgque`` against the grant classes of spec §3.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import Database
from engine_helpers import Conn, make_queue, scalar, tick
from psycopg import errors, sql

QUEUE = "roles_q"

# Functions PgQue 0.3 adds (ENGINE-0.3.md §6.3), absent from another 0.2 install; our
# engine's are required by their own tests in tests/engine/.
PGQUE_03_READER = ["queue_stats", "consumer_stats", "queue_health", "otel_metrics",
                   "stuck_consumers", "in_flight", "throughput", "error_rate"]
PGQUE_03_WRITER = ["send_idem", "send_at"]
# next_delayed_due, tick_now and ticker_step are ours (the worker's ticker calls them),
# not PgQue's.
PGQUE_03_ADMIN = ["pause_queue", "resume_queue", "maint_idem", "maint_deliver_delayed",
                  "next_delayed_due", "tick_now", "ticker_step"]
# Grant class per public function name (spec §3, and ENGINE-0.3 §3 for the 0.3
# additions): R reader, W writer, A admin only, O owner only. Names not listed are
# internal helpers: never reader/writer-callable.
GRANT_CLASS: dict[str, str] = {
    **dict.fromkeys(["send", "send_batch", "insert_event", "dlq_replay", "dlq_replay_all"],
                    "W"),
    **dict.fromkeys([
        "subscribe", "unsubscribe", "receive", "ack", "nack", "register_consumer",
        "register_consumer_at", "unregister_consumer", "next_batch", "next_batch_info",
        "next_batch_custom", "get_batch_events", "finish_batch", "event_retry", "version",
        "get_queue_info", "get_consumer_info", "get_batch_info", "dlq_inspect",
        "register_subconsumer", "subscribe_subconsumer", "unregister_subconsumer",
        "unsubscribe_subconsumer", "touch_subconsumer", "receive_coop",
    ], "R"),
    **dict.fromkeys([
        "get_batch_cursor", "batch_retry", "event_retry_raw", "current_event_table",
        "create_queue", "drop_queue", "set_queue_config", "ticker", "force_next_tick",
        "force_tick", "maint", "maint_retry_events", "maint_rotate_tables_step1",
        "maint_rotate_tables_step2", "maint_operations", "maint_tables_to_vacuum",
        "ticker_loop", "set_tick_period_ms", "start", "stop", "start_timetable",
        "stop_timetable", "status", "event_dead", "dlq_purge",
        "jsontriga", "logutriga", "sqltriga",
    ], "A"),
    **dict.fromkeys(["uninstall", "insert_event_bulk"], "O"),
    **dict.fromkeys(PGQUE_03_READER, "R"),
    **dict.fromkeys(PGQUE_03_WRITER, "W"),
    **dict.fromkeys(PGQUE_03_ADMIN, "A"),
}
# Low priority in the spec (§3.10), or PgQue 0.3 additions a 0.2 install under test
# (PGQUE_SCHEMA_SQL) lacks: checked when present, not required.
OPTIONAL_FUNCTIONS = {"jsontriga", "logutriga", "sqltriga",
                      *PGQUE_03_READER, *PGQUE_03_WRITER, *PGQUE_03_ADMIN}
GROUP_ROLES = ("pgque_reader", "pgque_writer", "pgque_admin")
# pgque-py's nack form; the engine re-reads the event, so only msg_id matters.
NACK = ("select pgque.nack(%s, ROW(%s, %s, null, null, null, now(), null, null, null, null)"
        "::pgque.message, %s::interval, %s)")


@dataclass(frozen=True)
class Roles:
    """Login roles of one test, by what they are members of."""

    writer: str
    reader: str
    admin: str
    nobody: str


@pytest.fixture
def roles(db: Database, conn: Conn) -> Iterator[Roles]:
    tag = f"pgque_t{os.getpid()}_{uuid.uuid4().hex[:8]}"
    made = Roles(f"{tag}_writer", f"{tag}_reader", f"{tag}_admin", f"{tag}_nobody")
    memberships = {made.writer: "pgque_writer", made.reader: "pgque_reader",
                   made.admin: "pgque_admin", made.nobody: None}
    created: list[str] = []
    try:
        for role, group in memberships.items():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            created.append(role)
            if group is not None:
                conn.execute(sql.SQL("GRANT {} TO {}").format(
                    sql.Identifier(group), sql.Identifier(role)))
        yield made
    finally:
        conn.execute("RESET ROLE")
        for role in created:
            ident = sql.Identifier(role)
            # Objects or grants a role picked up live only in this test database.
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(ident))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


@contextmanager
def acting_as(conn: Conn, role: str) -> Iterator[Conn]:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    try:
        yield conn
    finally:
        conn.execute("RESET ROLE")


def denied(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
        conn.execute(query, params)


def test_writer_can_send_but_not_consume(conn: Conn, roles: Roles) -> None:
    make_queue(conn, QUEUE)
    conn.execute("select pgque.subscribe(%s, 'c')", (QUEUE,))
    with acting_as(conn, roles.writer):
        ids = [
            scalar(conn, "select pgque.send(%s, %s::jsonb)", QUEUE, '{"a": 1}'),
            scalar(conn, "select pgque.send(%s, %s::text)", QUEUE, '{"a": 2}'),
            scalar(conn, "select pgque.send(%s, 'typed', %s::jsonb)", QUEUE, '{"a": 3}'),
            *scalar(conn, "select pgque.send_batch(%s, 'bulk', %s::jsonb[])",
                    QUEUE, ['{"a": 4}', '{"a": 5}']),
            scalar(conn, "select pgque.insert_event(%s, 'raw', '{}')", QUEUE),
        ]
        assert all(isinstance(i, int) for i in ids)
        denied(conn, "select * from pgque.receive(%s, 'c', 10)", (QUEUE,))
        denied(conn, "select pgque.ack(1)")
        denied(conn, "select pgque.subscribe(%s, 'w')", (QUEUE,))
        denied(conn, "select pgque.unsubscribe(%s, 'c')", (QUEUE,))
        denied(conn, NACK, (1, 1, 1, "1 second", None))
        denied(conn, "select pgque.ticker()")
        denied(conn, "select pgque.create_queue('writer_q')")
        denied(conn, "select * from pgque.get_consumer_info()")
        denied(conn, "select pgque.insert_event_bulk(%s, 't', array['{}'])", (QUEUE,))
    tick(conn, QUEUE)
    received = [r[0] for r in conn.execute("select * from pgque.receive(%s, 'c', 100)",
                                           (QUEUE,))]
    assert received == ids, "what the writer sent is there for the consumer"


def test_reader_can_consume_and_observe_but_not_send(conn: Conn, roles: Roles) -> None:
    make_queue(conn, QUEUE)
    with acting_as(conn, roles.reader):
        assert scalar(conn, "select pgque.subscribe(%s, 'r')", QUEUE) == 1
        assert scalar(conn, "select pgque.subscribe(%s, 'gone')", QUEUE) == 1
        assert scalar(conn, "select pgque.unsubscribe(%s, 'gone')", QUEUE) == 1
        denied(conn, "select pgque.send(%s, %s::jsonb)", (QUEUE, '{}'))
        denied(conn, "select pgque.send(%s, 't', %s::jsonb)", (QUEUE, '{}'))
        denied(conn, "select pgque.send_batch(%s, 't', %s::jsonb[])", (QUEUE, ['{}']))
        denied(conn, "select pgque.insert_event(%s, 't', '{}')", (QUEUE,))
        denied(conn, "select pgque.ticker()")
        denied(conn, "select pgque.force_next_tick(%s)", (QUEUE,))
        denied(conn, "select pgque.create_queue('reader_q')")
    ids = [scalar(conn, "select pgque.send(%s, %s::jsonb)", QUEUE, json.dumps({"n": n}))
           for n in range(3)]
    tick(conn, QUEUE)

    with acting_as(conn, roles.reader):
        rows = conn.execute("select * from pgque.receive(%s, 'r', 100)", (QUEUE,)).fetchall()
        assert [r[0] for r in rows] == ids
        batch_id = rows[0][1]
        events = conn.execute("select ev_id, ev_type from pgque.get_batch_events(%s)",
                              (batch_id,)).fetchall()
        assert events == [(i, "default") for i in ids]
        info = conn.execute("select queue_name, consumer_name, tick_id "
                            "from pgque.get_batch_info(%s)", (batch_id,)).fetchall()
        assert [(q, c) for q, c, _ in info] == [(QUEUE, "r")]
        consumers = conn.execute("select queue_name, consumer_name, current_batch "
                                 "from pgque.get_consumer_info()").fetchall()
        assert consumers == [(QUEUE, "r", batch_id)]
        assert conn.execute("select queue_name from pgque.get_consumer_info(%s, 'r')",
                            (QUEUE,)).fetchall() == [(QUEUE,)]
        queues = conn.execute("select queue_name, last_tick_id "
                              "from pgque.get_queue_info()").fetchall()
        assert [q for q, _ in queues] == [QUEUE]
        assert conn.execute("select queue_name from pgque.get_queue_info(%s)",
                            (QUEUE,)).fetchall() == [(QUEUE,)]
        assert str(scalar(conn, "select pgque.version()")).startswith("0.2")

        assert scalar(conn, NACK, batch_id, ids[0], batch_id, "0 seconds", "r") == 1
        assert scalar(conn, "select pgque.ack(%s)", batch_id) == 1
        assert scalar(conn, "select pgque.ack(%s)", batch_id) == 0
        # The invoker-rights R functions and the cooperative entry points work too.
        assert scalar(conn, "select pgque.next_batch(%s, 'r')", QUEUE) is None
        assert conn.execute("select batch_id from pgque.next_batch_info(%s, 'r')",
                            (QUEUE,)).fetchall() == [(None,)]
        assert conn.execute("select * from pgque.receive_coop(%s, 'grp', 'w1', 10, null)",
                            (QUEUE,)).fetchall() == []
        assert scalar(conn, "select pgque.touch_subconsumer(%s, 'grp', 'w1')", QUEUE) == 1
        assert conn.execute("select * from pgque.dlq_inspect(%s)", (QUEUE,)).fetchall() == []
        assert scalar(conn, "select count(*) from pgque.dead_letter") == 0
        assert scalar(conn, "select count(*) from pgque.config") == 1
        assert scalar(conn, "select count(*) from pgque.retry_queue") == 1


def test_reader_sees_dead_letters_through_dlq_inspect(conn: Conn, roles: Roles) -> None:
    make_queue(conn, QUEUE)
    conn.execute("update pgque.queue set queue_max_retries = 0 where queue_name = %s", (QUEUE,))
    conn.execute("select pgque.subscribe(%s, 'r')", (QUEUE,))
    event_id = scalar(conn, "select pgque.send(%s, %s::jsonb)", QUEUE, '{"bad": true}')
    tick(conn, QUEUE)
    with acting_as(conn, roles.reader):
        (row,) = conn.execute("select * from pgque.receive(%s, 'r', 10)", (QUEUE,)).fetchall()
        assert scalar(conn, NACK, row[1], row[0], row[1], "1 second", "boom") == 1
        assert scalar(conn, "select pgque.ack(%s)", row[1]) == 1
        dead = conn.execute("select ev_id, dl_reason from pgque.dlq_inspect(%s, 10)",
                            (QUEUE,)).fetchall()
        assert dead == [(event_id, "boom")]
        denied(conn, "select pgque.dlq_replay(%s)",
               (scalar(conn, "select dl_id from pgque.dead_letter"),))
        denied(conn, "select pgque.dlq_purge(%s, '0 seconds')", (QUEUE,))


def test_role_without_pgque_membership_can_execute_nothing(conn: Conn, roles: Roles) -> None:
    make_queue(conn, QUEUE)
    callable_by_nobody = conn.execute(
        "select p.oid::regprocedure::text from pg_proc p "
        "where p.pronamespace = 'pgque'::regnamespace "
        "and has_function_privilege(%s, p.oid, 'EXECUTE') order by 1",
        (roles.nobody,)).fetchall()
    assert callable_by_nobody == [], "PUBLIC must have EXECUTE on no pgque function"
    assert scalar(conn, "select count(*) from pg_proc "
                        "where pronamespace = 'pgque'::regnamespace") > 50
    with acting_as(conn, roles.nobody):
        denied(conn, "select pgque.version()")
        denied(conn, "select pgque.send(%s, %s::jsonb)", (QUEUE, '{}'))
        denied(conn, "select * from pgque.receive(%s, 'c', 1)", (QUEUE,))
        denied(conn, "select pgque.ticker()")
        # PUBLIC keeps read access to the monitoring tables (spec §2.5), not to the rest.
        assert scalar(conn, "select count(*) from pgque.queue") == 1
        assert scalar(conn, "select count(*) from pgque.subscription") == 0
        assert scalar(conn, "select count(*) from pgque.tick") >= 1
        event_table = scalar(conn, "select queue_data_pfx from pgque.queue")
        assert scalar(conn, f"select count(*) from {event_table}") == 0
        denied(conn, "select count(*) from pgque.config")
        denied(conn, "select count(*) from pgque.dead_letter")
        denied(conn, "insert into pgque.consumer (co_name) values ('x')")


def test_admin_manages_queues_but_cannot_uninstall_or_bulk_insert(
    conn: Conn, roles: Roles
) -> None:
    with acting_as(conn, roles.admin):
        assert scalar(conn, "select pgque.create_queue(%s)", QUEUE) == 1
        assert scalar(conn, "select pgque.set_queue_config(%s, 'ticker_max_lag', '1 hour')",
                      QUEUE) == 1
        assert scalar(conn, "select pgque.force_next_tick(%s)", QUEUE) == 1
        assert scalar(conn, "select pgque.ticker(%s)", QUEUE) == 2
        assert scalar(conn, "select pgque.ticker()") == 0
        assert scalar(conn, "select pgque.force_tick(%s)", QUEUE) == 2
        # Through membership of pgque_writer and pgque_reader.
        assert scalar(conn, "select pgque.subscribe(%s, 'adm')", QUEUE) == 1
        event_id = scalar(conn, "select pgque.send(%s, %s::jsonb)", QUEUE, '{}')
        conn.execute("select pgque.force_next_tick(%s)", (QUEUE,))
        conn.execute("select pgque.ticker(%s)", (QUEUE,))
        assert [r[0] for r in conn.execute("select * from pgque.receive(%s, 'adm', 10)",
                                           (QUEUE,))] == [event_id]
        denied(conn, "select pgque.uninstall()")
        denied(conn, "select pgque.insert_event_bulk(%s, 't', array['{}'])", (QUEUE,))
    assert scalar(conn, "select count(*) from pg_namespace where nspname = 'pgque'") == 1


def test_grants_follow_the_spec_for_every_function(conn: Conn, roles: Roles) -> None:
    rows = conn.execute(
        "select p.proname, p.oid::regprocedure::text, "
        "       has_function_privilege(%s, p.oid, 'EXECUTE'), "
        "       has_function_privilege(%s, p.oid, 'EXECUTE'), "
        "       has_function_privilege(%s, p.oid, 'EXECUTE') "
        "from pg_proc p where p.pronamespace = 'pgque'::regnamespace order by 2",
        (roles.reader, roles.writer, roles.admin)).fetchall()
    present = {name for name, *_ in rows}
    missing = sorted(set(GRANT_CLASS) - OPTIONAL_FUNCTIONS - present)
    assert missing == [], f"spec §3 functions missing from schema pgque: {missing}"

    expected_access = {"R": (True, False, True), "W": (False, True, True),
                       "A": (False, False, True), "O": (False, False, False)}
    wrong: list[str] = []
    for name, signature, reader, writer, admin in rows:
        grant_class = GRANT_CLASS.get(name)
        if grant_class is None:
            if reader or writer:
                wrong.append(f"{signature}: internal, yet reader={reader} writer={writer}")
            continue
        if (reader, writer, admin) != expected_access[grant_class]:
            wrong.append(f"{signature}: class {grant_class}, got reader={reader} "
                         f"writer={writer} admin={admin}")
    assert wrong == [], "\n".join(wrong)


def test_group_roles_are_nologin_and_reader_writer_are_siblings(conn: Conn) -> None:
    rows = dict(conn.execute(
        "select rolname, rolcanlogin from pg_roles where rolname = any(%s)",
        (list(GROUP_ROLES),)).fetchall())
    assert rows == dict.fromkeys(GROUP_ROLES, False)
    def member(role: str, group: str) -> bool:
        return bool(scalar(conn, "select pg_has_role(%s, %s, 'MEMBER')", role, group))

    assert member("pgque_admin", "pgque_reader") and member("pgque_admin", "pgque_writer")
    assert not member("pgque_writer", "pgque_reader")
    assert not member("pgque_reader", "pgque_writer")


def test_security_definer_functions_pin_search_path(conn: Conn) -> None:
    rows = conn.execute(
        "select p.oid::regprocedure::text, p.proconfig from pg_proc p "
        "where p.pronamespace = 'pgque'::regnamespace and p.prosecdef order by 1").fetchall()
    assert len(rows) > 20, "spec §3 marks most entry points SECURITY DEFINER"
    unpinned = [
        f"{signature}: {config}" for signature, config in rows
        if not any(setting.replace(" ", "").replace('"', "") == "search_path=pgque,pg_catalog"
                   for setting in (config or []))
    ]
    assert unpinned == [], "\n".join(unpinned)


def test_ticker_loop_is_an_invoker_rights_procedure(conn: Conn) -> None:
    # It COMMITs, so it can carry neither SECURITY DEFINER nor a SET clause (spec §2.5).
    assert conn.execute(
        "select prokind, prosecdef, proconfig from pg_proc "
        "where pronamespace = 'pgque'::regnamespace and proname = 'ticker_loop'"
    ).fetchall() == [("p", False, None)]
