"""Bad input to the core engine API: the spec's error texts, and nothing written.

Like test_engine_core, only the public PgQue 0.2 API and the tables the spec names as
observable are used, so the suite also checks another install (``PGQUE_SCHEMA_SQL``).
The SQLSTATE tests at the end are about our engine's own codes and skip another one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import psycopg
import pytest
from conftest import Database
from engine_helpers import (
    Conn,
    documented_error_codes,
    drain,
    make_queue,
    payloads,
    scalar,
    tick,
)
from psycopg import errors, sql
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError

from sqlalchemy_pgque import (
    BatchInProgress,
    BatchNotFound,
    ConsumerModeConflict,
    ConsumerNotSubscribed,
    DeadLetterNotFound,
    ForeignSchemaError,
    InvalidName,
    MessageNotInBatch,
    PgqueError,
    QueueHasConsumers,
    QueueNotFound,
    schema,
)
from sqlalchemy_pgque.errors import _sqlstate, _translate


def fails(conn: Conn, query: str, message: str, *params: object) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params or None)
    assert message in str(info.value), str(info.value)


def queue_count(conn: Conn) -> object:
    return scalar(conn, "select count(*) from pgque.queue")


def pgque_relations(conn: Conn) -> object:
    return scalar(conn, "select count(*) from pg_class c join pg_namespace n"
                        " on n.oid = c.relnamespace where n.nspname = 'pgque'")


# --- unknown names -------------------------------------------------------------------


@pytest.mark.parametrize(("query", "message"), [
    ("select pgque.send('nosuch', '{}'::jsonb)", "queue not found: nosuch"),
    ("select pgque.send('nosuch', 'x'::text)", "queue not found: nosuch"),
    ("select pgque.send('nosuch', 't', '{}'::jsonb)", "queue not found: nosuch"),
    ("select pgque.send('nosuch', 't', 'x'::text)", "queue not found: nosuch"),
    ("select pgque.send_batch('nosuch', array['{}']::jsonb[])", "queue not found: nosuch"),
    ("select pgque.send_batch('nosuch', 't', array['x'])", "queue not found: nosuch"),
    ("select pgque.insert_event('nosuch', 't', 'x')", "queue not found: nosuch"),
    ("select pgque.insert_event('nosuch', 't', 'x', '1', '2', '3', '4')",
     "queue not found: nosuch"),
    ("select * from pgque.receive('nosuch', 'c')", "Not subscriber to queue: nosuch/c"),
    ("select pgque.next_batch('nosuch', 'c')", "Not subscriber to queue: nosuch/c"),
    ("select pgque.subscribe('nosuch', 'c')", "Event queue not created yet"),
    ("select pgque.register_consumer('nosuch', 'c')", "Event queue not created yet"),
    ("select pgque.ticker('nosuch')", "no such queue"),
    ("select pgque.force_next_tick('nosuch')", "queue not found: nosuch"),
    ("select pgque.set_queue_config('nosuch', 'ticker_max_count', '1')",
     "No such event queue"),
    ("select pgque.drop_queue('nosuch')", "No such event queue"),
    ("select pgque.drop_queue('nosuch', true)", "No such event queue"),
])
def test_unknown_queue(conn: Conn, query: str, message: str) -> None:
    fails(conn, query, message)
    assert queue_count(conn) == 0
    assert scalar(conn, "select count(*) from pgque.consumer") == 0


def test_unknown_queue_writes_nothing(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    fails(conn, "select pgque.send('other', 'x'::text)", "queue not found: other")
    conn.execute("select pgque.send('q', 'only'::text)")
    tick(conn)
    assert payloads(drain(conn, "q", "c")) == ["only"]


def test_unknown_consumer(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    fails(conn, "select * from pgque.receive('q', 'stranger')",
          "Not subscriber to queue: q/stranger")
    fails(conn, "select * from pgque.next_batch_info('q', 'stranger')",
          "Not subscriber to queue: q/stranger")
    fails(conn, "select * from pgque.receive('q', null)", "Not subscriber to queue: q/NULL")
    assert scalar(conn, "select pgque.unsubscribe('q', 'stranger')") == 0
    assert scalar(conn, "select pgque.unregister_consumer('nosuch', 'c')") == 0
    assert scalar(conn, "select count(*) from pgque.consumer where co_name = 'stranger'") == 0


def test_unknown_batch(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    warnings: list[str] = []
    conn.add_notice_handler(lambda diag: warnings.append(str(diag.message_primary)))
    assert scalar(conn, "select pgque.ack(424242)") == 0
    assert scalar(conn, "select pgque.finish_batch(424242)") == 0
    assert scalar(conn, "select pgque.ack(null)") == 0
    assert sum("424242" in w and "not found" in w for w in warnings) == 2
    fails(conn, "select * from pgque.get_batch_events(424242)", "batch not found")


def test_finished_batch_is_unknown(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.send('q', 'x'::text)")
    tick(conn)
    batch_id = scalar(conn, "select batch_id from pgque.receive('q', 'c')")
    assert scalar(conn, "select count(*) from pgque.get_batch_events(%s)", batch_id) == 1
    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 1
    fails(conn, "select * from pgque.get_batch_events(%s)", "batch not found", batch_id)


# --- queue names ---------------------------------------------------------------------


def test_create_queue_null_name(conn: Conn) -> None:
    before = pgque_relations(conn)
    fails(conn, "select pgque.create_queue(null)", "Invalid NULL value")
    assert queue_count(conn) == 0
    assert pgque_relations(conn) == before


def test_create_queue_name_too_long(conn: Conn) -> None:
    before = pgque_relations(conn)
    fails(conn, "select pgque.create_queue(%s)", "queue name too long: 58 bytes (max 57)",
          "x" * 58)
    # Bytes, not characters: 29 two-byte letters are 58 bytes.
    fails(conn, "select pgque.create_queue(%s)", "queue name too long: 58 bytes (max 57)",
          "ä" * 29)
    assert queue_count(conn) == 0
    assert pgque_relations(conn) == before
    assert scalar(conn, "select count(*) from pgque.tick") == 0


def test_create_queue_name_at_limit_works(conn: Conn) -> None:
    name = "ä" * 28 + "x"  # 57 bytes
    make_queue(conn, name, "c")
    conn.execute("select pgque.send(%s, 'edge'::text)", (name,))
    tick(conn, name)
    assert payloads(drain(conn, name, "c")) == ["edge"]


def test_create_queue_empty_name_is_rejected_or_usable(conn: Conn) -> None:
    # The spec leaves the empty name open; whatever an engine does, it must not leave
    # a half-made queue behind.
    try:
        created = scalar(conn, "select pgque.create_queue('')")
    except psycopg.Error:
        assert queue_count(conn) == 0
        return
    assert created == 1
    conn.execute("select pgque.subscribe('', 'c')")
    conn.execute("select pgque.send('', 'empty'::text)")
    tick(conn, "")
    assert payloads(drain(conn, "", "c")) == ["empty"]


# --- arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("max_return", [0, -5])
def test_receive_max_return_below_one(conn: Conn, max_return: int) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.send('q', 'x'::text)")
    tick(conn)
    fails(conn, "select * from pgque.receive('q', 'c', %s)",
          f"pgque.receive: max_return must be >= 1, got {max_return}", max_return)
    open_batch = scalar(conn, "select s.sub_batch from pgque.subscription s"
                              " join pgque.consumer c on c.co_id = s.sub_consumer"
                              " where c.co_name = 'c'")
    assert open_batch is None
    assert payloads(drain(conn, "q", "c")) == ["x"]


def test_invalid_json_through_jsonb_overload(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    with pytest.raises(errors.InvalidTextRepresentation):
        conn.execute("select pgque.send('q', 'not json'::text::jsonb)")
    with pytest.raises(errors.InvalidTextRepresentation):
        conn.execute("select pgque.send('q', 't', %s::jsonb)", ("{broken",))
    with pytest.raises(errors.InvalidTextRepresentation):
        conn.execute("select pgque.send_batch('q', 't', %s::jsonb[])", (['{"ok": 1}', "nope"],))
    # The text overload stores the bytes as given.
    conn.execute("select pgque.send('q', 'not json'::text)")
    tick(conn)
    assert payloads(drain(conn, "q", "c")) == ["not json"]


@pytest.mark.parametrize("query", [
    "select pgque.send_batch('q', null::jsonb[])",
    "select pgque.send_batch('q', null::text[])",
    "select pgque.send_batch('q', 't', null::jsonb[])",
    "select pgque.send_batch('q', 't', null::text[])",
])
def test_send_batch_null_payloads(conn: Conn, query: str) -> None:
    make_queue(conn, "q", "c")
    fails(conn, query, "payloads must not be null")
    conn.execute("select pgque.send('q', 'after'::text)")
    tick(conn)
    assert payloads(drain(conn, "q", "c")) == ["after"]


def test_failed_send_inside_a_transaction_rolls_back_earlier_sends(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    with pytest.raises(psycopg.Error), conn.transaction():
        conn.execute("select pgque.send('q', %s::jsonb)", (json.dumps({"n": 1}),))
        conn.execute("select pgque.send('nosuch', 'x'::text)")
    tick(conn)
    assert payloads(drain(conn, "q", "c")) == []


@pytest.mark.parametrize(("param", "value", "message"), [
    ("ticker_max_count", "0", "set_queue_config: ticker_max_count must be"),
    ("max_retries", "-1", "set_queue_config: max_retries must be"),
    ("ticker_max_lag", "0", "set_queue_config: ticker_max_lag must be"),
    ("ticker_idle_period", "-1 second", "set_queue_config: ticker_idle_period must be"),
    ("rotation_period", "0", "set_queue_config: rotation_period must be"),
    ("disable_insert", "true", "cannot change parameter"),
    ("queue_name", "other", "cannot change parameter"),
    ("bogus", "1", "cannot change parameter"),
])
def test_set_queue_config_rejects(conn: Conn, param: str, value: str, message: str) -> None:
    make_queue(conn, "q")
    before = conn.execute("select * from pgque.queue").fetchall()
    fails(conn, "select pgque.set_queue_config('q', %s, %s)", message, param, value)
    assert conn.execute("select * from pgque.queue").fetchall() == before


def test_set_queue_config_null_arguments(conn: Conn) -> None:
    make_queue(conn, "q")
    fails(conn, "select pgque.set_queue_config(null, 'ticker_max_count', '1')",
          "Invalid NULL value")
    fails(conn, "select pgque.set_queue_config('q', null, '1')", "Invalid NULL value")
    with pytest.raises(psycopg.Error):
        conn.execute("select pgque.set_queue_config('q', 'ticker_max_count', 'many')")


def test_register_at_unknown_tick(conn: Conn) -> None:
    make_queue(conn, "q")
    fails(conn, "select pgque.register_consumer_at('q', 'c', 999999)",
          "cannot reposition, tick not found: 999999")
    assert scalar(conn, "select count(*) from pgque.subscription") == 0


def test_insert_disabled_queue(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    # Not settable through set_queue_config; tests and operators flip the column.
    conn.execute("update pgque.queue set queue_disable_insert = true where queue_name = 'q'")
    fails(conn, "select pgque.send('q', 'x'::text)", "Insert into queue disallowed")
    fails(conn, "select pgque.send_batch('q', array['x'])", "Insert into queue disallowed")
    with conn.transaction():
        conn.execute("set local session_replication_role = 'replica'")
        conn.execute("select pgque.send('q', 'replica'::text)")
    tick(conn)
    assert payloads(drain(conn, "q", "c")) == ["replica"]


# --- privileges ----------------------------------------------------------------------


def test_roles_reach_only_their_functions(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    calls = {
        "send": "select pgque.send('q', 'x'::text)",
        "subscribe": "select pgque.subscribe('q', 'r')",
        "receive": "select * from pgque.receive('q', 'c')",
        "ticker": "select pgque.ticker()",
        "create_queue": "select pgque.create_queue('q2')",
    }
    allowed = {
        "pgque_writer": {"send"},
        "pgque_reader": {"subscribe", "receive"},
        "pgque_admin": set(calls),
    }
    for role, ok in allowed.items():
        for name, query in calls.items():
            conn.execute(f"set role {role}")
            try:
                if name in ok:
                    conn.execute(query)
                else:
                    with pytest.raises(errors.InsufficientPrivilege):
                        conn.execute(query)
            finally:
                conn.execute("reset role")


def test_reader_can_list_batch_events(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("select pgque.send('q', 'x'::text)")
    tick(conn)
    conn.execute("set role pgque_reader")
    try:
        batch_id = scalar(conn, "select pgque.next_batch('q', 'c')")
        rows = conn.execute("select ev_data from pgque.get_batch_events(%s)",
                            (batch_id,)).fetchall()
        assert rows == [("x",)]
        assert scalar(conn, "select pgque.finish_batch(%s)", batch_id) == 1
    finally:
        conn.execute("reset role")


# --- cooperative groups seen through the plain consumer API --------------------------


def make_group(conn: Conn, *members: str) -> None:
    make_queue(conn, "q")
    for member in members:
        assert scalar(conn, "select pgque.subscribe_subconsumer('q', 'g', %s)", member) == 1


def test_legacy_calls_refuse_cooperative_rows(conn: Conn) -> None:
    make_group(conn, "s1")
    conn.execute("select pgque.send('q', 'x'::text)")
    tick(conn)
    for query in ("select pgque.next_batch('q', 'g')",
                  "select * from pgque.receive('q', 'g')",
                  "select * from pgque.next_batch_info('q', 'g')"):
        fails(conn, query, "is a cooperative main consumer")
    fails(conn, "select pgque.next_batch('q', 'g.s1')", "is a cooperative subconsumer")
    fails(conn, "select * from pgque.receive('q', 'g.s1')", "is a cooperative subconsumer")
    rows = conn.execute("select * from pgque.receive_coop('q', 'g', 's1')").fetchall()
    assert [r[3] for r in rows] == ["x"]


def test_cooperative_batch_finish_and_unregister_rules(conn: Conn) -> None:
    make_group(conn, "s1", "s2")
    conn.execute("select pgque.send('q', 'x'::text)")
    tick(conn)
    batch_id = scalar(conn, "select batch_id from pgque.receive_coop('q', 'g', 's1')")
    fails(conn, "select pgque.unregister_consumer('q', 'g.s1')",
          "cannot unregister active cooperative subconsumer without forced batch handling")
    fails(conn, "select pgque.unregister_consumer('q', 'g')",
          "cannot unregister cooperative")
    fails(conn, "select pgque.drop_queue('q', true)", "cannot unregister cooperative")
    assert scalar(conn, "select count(*) from pgque.queue") == 1

    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 1
    assert scalar(conn, "select pgque.ack(%s)", batch_id) == 0
    fails(conn, "select pgque.unregister_consumer('q', 'g')",
          "cannot unregister cooperative main consumer with registered subconsumers")
    assert scalar(conn, "select pgque.unregister_consumer('q', 'g.s1')") == 1
    assert scalar(conn, "select count(*) from pgque.consumer where co_name = 'g.s1'") == 0
    # Removing the last member turns the main back into a plain consumer.
    assert scalar(conn, "select pgque.unsubscribe('q', 'g.s2')") == 1
    conn.execute("select pgque.send('q', 'y'::text)")
    tick(conn)
    assert payloads(drain(conn, "q", "g")) == ["y"]
    assert scalar(conn, "select pgque.unsubscribe('q', 'g')") == 1
    assert scalar(conn, "select pgque.drop_queue('q')") == 1


def test_drop_queue_force_after_members_leave(conn: Conn) -> None:
    make_group(conn, "s1")
    conn.execute("select pgque.subscribe('q', 'plain')")
    fails(conn, "select pgque.drop_queue('q', true)", "cannot unregister cooperative")
    assert scalar(conn, "select pgque.unsubscribe_subconsumer('q', 'g', 's1', 1)") == 1
    assert scalar(conn, "select pgque.drop_queue('q', true)") == 1
    assert scalar(conn, "select count(*) from pgque.subscription") == 0
    assert scalar(conn, "select count(*) from pgque.consumer") == 0


# --- SQLSTATEs -----------------------------------------------------------------------
#
# Our engine gives every kind of error its own SQLSTATE (the table at the top of
# sql/00_objects.sql) and _translate() maps it by that code; another PgQue 0.2 install
# raises the same texts as P0001, which _translate() maps by their wording.


@dataclass(frozen=True)
class Failure:
    code: str
    query: str
    error: type[PgqueError] | None
    setup: tuple[str, ...] = ()
    # Whether the text alone, raised by another install, maps to ``error`` too.
    by_text: bool = True

    def __str__(self) -> str:
        called = re.search(r"pgque\.(\w+)", self.query)
        return f"{self.code}-{called.group(1) if called else self.query}"


QUEUE = ("select pgque.create_queue('q')",)
SUBSCRIBED = (*QUEUE, "select pgque.subscribe('q', 'c')")
TICKED = (*SUBSCRIBED, "select pgque.send('q', 'x'::text)",
          "select pgque.force_next_tick('q')", "select pgque.ticker('q')")
GROUP = (*QUEUE, "select pgque.subscribe_subconsumer('q', 'g', 's1')")
GROUP_BATCH = (*GROUP, "select pgque.send('q', 'x'::text)", "select pgque.force_next_tick('q')",
               "select pgque.ticker('q')",
               "select count(*) from pgque.receive_coop('q', 'g', 's1')")
EXTERNAL = (*QUEUE, "select pgque.set_queue_config('q', 'external_ticker', 'true')")

FAILURES = [
    Failure("PQ001", "select pgque.send('nosuch', 'x'::text)", QueueNotFound),
    Failure("PQ001", "select pgque.ticker('nosuch')", QueueNotFound),
    Failure("PQ001", "select pgque.subscribe('nosuch', 'c')", QueueNotFound),
    Failure("PQ001", "select pgque.drop_queue('nosuch')", QueueNotFound),
    Failure("PQ001", "select * from pgque.throughput('nosuch', '1 hour', '1 minute')",
            QueueNotFound),
    Failure("PQ002", "select * from pgque.receive('q', 'stranger')", ConsumerNotSubscribed,
            QUEUE),
    Failure("PQ002", "select pgque.event_retry_raw('q', 'stranger', now(), 1, now(), 0, 't',"
                     " 'x', null, null, null, null)", ConsumerNotSubscribed, QUEUE),
    Failure("PQ003", "select * from pgque.get_batch_events(424242)", BatchNotFound),
    Failure("PQ003", "select pgque.nack(424242, null::pgque.message)", BatchNotFound),
    Failure("PQ003", "select pgque.batch_retry(424242, 1)", BatchNotFound, by_text=False),
    Failure("PQ004", "select pgque.nack(r.batch_id, row(999999, r.batch_id, 't', 'x', 0, now(),"
                     " null, null, null, null)::pgque.message) from pgque.receive('q', 'c') r",
            MessageNotInBatch, TICKED),
    Failure("PQ004", "select pgque.event_retry(r.batch_id, 999999::bigint, 1)"
                     " from pgque.receive('q', 'c') r", MessageNotInBatch, TICKED, by_text=False),
    Failure("PQ005", "select pgque.register_consumer_at('q', 'c', 999999)", None, QUEUE),
    Failure("PQ006", "select pgque.dlq_replay(424242)", DeadLetterNotFound),
    Failure("PQ101", "select pgque.next_batch('q', 'g')", ConsumerModeConflict, GROUP),
    Failure("PQ101", "select pgque.register_subconsumer('q', 'c', 's1')", ConsumerModeConflict,
            SUBSCRIBED),
    Failure("PQ102", "select pgque.unregister_consumer('q', 'g.s1')", BatchInProgress,
            GROUP_BATCH),
    Failure("PQ102", "select pgque.unsubscribe_subconsumer('q', 'g', 's1', 0)", BatchInProgress,
            GROUP_BATCH),
    Failure("PQ103", "select pgque.drop_queue('q')", QueueHasConsumers, SUBSCRIBED),
    Failure("PQ104", "select pgque.send('q', 'x'::text)", None,
            (*QUEUE, "update pgque.queue set queue_disable_insert = true")),
    Failure("PQ105", "select pgque.ticker('q')", None,
            (*QUEUE, "select pgque.set_queue_config('q', 'ticker_paused', 'true')")),
    Failure("PQ106", "select pgque.ticker('q')", None, EXTERNAL),
    Failure("PQ107", "select pgque.subscribe('q', 'c')", None,
            (*QUEUE, "delete from pgque.tick")),
    Failure("PQ108", "select pgque.ticker('q', 1, now(), 1)", None, EXTERNAL),
    Failure("PQ201", f"select pgque.create_queue('{'x' * 58}')", InvalidName),
    Failure("PQ201", "select pgque.subscribe_subconsumer('q', 'a.b', 's')", InvalidName, QUEUE),
    Failure("PQ901", "select pgque.next_batch('q', 'c')", None,
            (*SUBSCRIBED, "update pgque.subscription set sub_last_tick = 999999")),
    Failure("22004", "select pgque.create_queue(null)", None),
    Failure("22004", "select pgque.send_batch('q', null::text[])", None, QUEUE),
    Failure("22023", "select * from pgque.receive('q', 'c', 0)", None, SUBSCRIBED),
    Failure("22023", "select pgque.set_queue_config('q', 'bogus', '1')", None, QUEUE),
    Failure("22023", "select * from pgque.throughput('q', '1 hour', '0 seconds')", None, QUEUE),
    Failure("PQ001", "select * from pgque.send_idem('nosuch', 't', 'x', 'k')", QueueNotFound),
    Failure("PQ104", "select * from pgque.send_idem('q', 't', 'x', 'k')", None,
            (*QUEUE, "update pgque.queue set queue_disable_insert = true")),
    Failure("22004", "select * from pgque.send_idem('q', 't', 'x', null)", None, QUEUE),
    Failure("22023", "select * from pgque.send_idem('q', 't', 'x', 'k', '0 seconds')", None,
            QUEUE),
    Failure("0A000", "select pgque.start()", None),
    Failure("0A000", "select pgque.start_timetable()", None),
]
# Raised by the install script and by start_timetable, with tests of their own below, and
# by the delayed mover under REPEATABLE READ (tests/engine/test_engine_delayed.py).
SEPARATELY_TESTED = {"PQ301", "PQ302", "25000"}


@pytest.fixture
def ours(engine: Engine) -> bool:
    """Whether the installed engine is this project's, whose errors carry our codes."""
    with engine.connect() as c:
        return schema.engine_build(c) is not None


def failure_of(engine: Engine, statement: str) -> DBAPIError:
    with engine.connect() as c, pytest.raises(DBAPIError) as info:
        c.exec_driver_sql(statement)
    return info.value


def raised_by_another_install(engine: Engine, conn: Conn, message: str) -> DBAPIError:
    """``message`` raised the way PgQue 0.2 raises its errors: without an ERRCODE."""
    do = sql.SQL("DO $do$ BEGIN RAISE EXCEPTION USING MESSAGE = {}; END $do$").format(
        sql.Literal(message))
    error = failure_of(engine, do.as_string(conn))
    assert _sqlstate(error.orig) == "P0001"
    return error


def test_every_documented_code_is_triggered() -> None:
    assert {f.code for f in FAILURES} | SEPARATELY_TESTED == set(documented_error_codes())


@pytest.mark.parametrize("failure", FAILURES, ids=str)
def test_error_code_and_class(conn: Conn, engine: Engine, ours: bool, failure: Failure) -> None:
    if not ours:
        pytest.skip("another engine: its errors carry no codes of ours")
    for statement in failure.setup:
        conn.execute(statement)
    error = failure_of(engine, failure.query)
    assert _sqlstate(error.orig) == failure.code, str(error.orig)
    translated = _translate(error)
    assert type(translated) is (failure.error or type(None)), repr(translated)


@pytest.mark.parametrize("failure", FAILURES, ids=str)
def test_same_text_from_another_install_maps_by_wording(
    conn: Conn, engine: Engine, ours: bool, failure: Failure
) -> None:
    if not ours:
        pytest.skip("the texts to replay are our engine's")
    for statement in failure.setup:
        conn.execute(statement)
    original = failure_of(engine, failure.query).orig
    assert isinstance(original, psycopg.Error)
    message = original.diag.message_primary
    assert message is not None
    expected = failure.error if failure.by_text else None
    translated = _translate(raised_by_another_install(engine, conn, message))
    assert type(translated) is (expected or type(None)), (message, repr(translated))


def test_foreign_schema_guard(empty_db: Database) -> None:
    with psycopg.connect(empty_db.dsn, autocommit=True) as c:
        c.execute("create schema pgque")
    engine = create_engine(empty_db.url)
    try:
        with engine.begin() as c, pytest.raises(ForeignSchemaError) as info:
            schema.install(c)
    finally:
        engine.dispose()
    error = info.value.__cause__
    assert isinstance(error, DBAPIError)
    assert _sqlstate(error.orig) == "PQ301"
    assert isinstance(_translate(error), ForeignSchemaError)


def test_start_timetable_refuses_an_untrusted_owner(
    app_role: str, conn: Conn, engine: Engine, ours: bool
) -> None:
    owner = sql.Identifier(app_role)
    conn.execute(sql.SQL("create schema timetable authorization {}").format(owner))
    try:
        conn.execute("create function timetable.add_job(text, text, text, text, text, text,"
                     " text, text, text, text, text) returns bigint language sql as 'select 1'")
        conn.execute("create function timetable.delete_job(text) returns boolean"
                     " language sql as 'select true'")
        for function in ("add_job(text, text, text, text, text, text, text, text, text,"
                         " text, text)", "delete_job(text)"):
            conn.execute(sql.SQL("alter function timetable.{} owner to {}").format(
                sql.SQL(function), owner))
        error = failure_of(engine, "select pgque.start_timetable()")
        assert "untrusted pg_timetable schema owner" in str(error.orig)
        if ours:
            assert _sqlstate(error.orig) == "PQ302"
        assert _translate(error) is None
        cfg = conn.execute("select ticker_job_id, maint_job_id, scheduler from pgque.config")
        assert cfg.fetchall() == [(None, None, None)]
    finally:
        conn.execute("drop schema timetable cascade")
