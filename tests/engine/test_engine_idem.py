"""Producer idempotency (PgQue 0.3: ``send_idem``, ``maint_idem``, ``pgque.idem``).

Covers what upstream's ``test_send_idem.sql`` and ``us13_producer_idempotency.sql``
check (ENGINE-0.3 §8), with two psycopg connections where they use dblink, plus our
storage: claims are only ever inserted and space comes back by TRUNCATE of expired
partitions (sql/82_idem.sql), so the claim tables see no UPDATE or DELETE at all.
These are 0.3 functions, so the module is skipped when another (0.2) PgQue install is
under test (``PGQUE_SCHEMA_SQL``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import Database
from engine_helpers import Conn, ConnectAs, is_our_engine, make_queue, scalar, tick, wait_until
from psycopg import errors
from sqlalchemy import Engine

from sqlalchemy_pgque import schema

SEND_IDEM_TEXT = "pgque.send_idem(text, text, text, text, interval, text)"
SEND_IDEM_JSONB = "pgque.send_idem(text, text, jsonb, text, interval, text)"
PARTITIONS = ("pgque.idem_claim_0", "pgque.idem_claim_1", "pgque.idem_claim_2")
CLAIM_RELATIONS = ("pgque.idem", "pgque.idem_claim", *PARTITIONS, "pgque.idem_switch")
SEQUENCES = ("pgque.idem_slot", "pgque.idem_gc_watermark")
SHORT_TTL = "100 milliseconds"


@pytest.fixture(autouse=True)
def _our_engine_only(conn: Conn) -> Iterator[None]:
    if not is_our_engine(conn):
        pytest.skip("send_idem is a PgQue 0.3 function; the engine under test is 0.2")
    yield


def send_idem(conn: Conn, queue: str, key: str | None, ttl: str | None = "1 hour",
              payload: str = '{"n": 1}', partition_key: str | None = None) -> tuple[int, bool]:
    """The one row of the text overload: (event_id, deduped)."""
    rows = conn.execute("select * from pgque.send_idem(%s, 't', %s, %s, %s::interval, %s)",
                        (queue, payload, key, ttl, partition_key)).fetchall()
    assert len(rows) == 1, rows
    event_id, deduped = rows[0]
    return int(event_id), bool(deduped)


def events(conn: Conn, queue: str = "q") -> list[tuple[Any, ...]]:
    """(ev_id, ev_type, ev_data, ev_extra1, ev_extra2) of every event in the queue's
    current child table, which is where PgQue's tests look."""
    table = scalar(conn, "select pgque.quote_fqname(queue_data_pfx || '_' || queue_cur_table)"
                         " from pgque.queue where queue_name = %s", queue)
    return conn.execute(f"select ev_id, ev_type, ev_data, ev_extra1, ev_extra2 from {table}"
                        " order by ev_id").fetchall()


def claims(conn: Conn, queue: str = "q") -> dict[str, int]:
    """What pgque.idem shows for ``queue``: idem_key -> event_id."""
    return dict(conn.execute("select i.idem_key, i.event_id from pgque.idem i"
                             " join pgque.queue using (queue_id) where queue_name = %s",
                             (queue,)).fetchall())


def stored_claims(conn: Conn) -> int:
    return int(scalar(conn, "select count(*) from pgque.idem_claim"))


def current_slot(conn: Conn) -> int:
    return int(scalar(conn, "select last_value from pgque.idem_slot"))


def rows_in(conn: Conn, relation: str) -> int:
    return int(scalar(conn, f"select count(*) from {relation}"))


def failure(conn: Conn, query: str, *params: object) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params or None)
    return info.value


def receive_all(conn: Conn, consumer: str = "c", queue: str = "q") -> list[tuple[Any, ...]]:
    rows = conn.execute("select * from pgque.receive(%s, %s, 1000)", (queue, consumer)).fetchall()
    if rows:
        assert scalar(conn, "select pgque.ack(%s)", rows[0][1]) == 1
    return rows


def pending(conn: Conn, consumer: str = "c", queue: str = "q") -> int:
    return int(scalar(conn, "select pending_events from pgque.get_consumer_info(%s, %s)",
                      queue, consumer))


def in_background(call: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``call`` in a thread; its result or exception lands in the returned dict."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_lock(conn: Conn, waiter: Conn, what: str) -> None:
    pid = waiter.info.backend_pid
    wait_until(lambda: scalar(conn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                    " where pid = %s", pid), what=what)


# --- sending and deduplicating ----------------------------------------------------------


def test_first_send_inserts_one_event_with_the_key_in_extra2(conn: Conn) -> None:
    make_queue(conn)
    event_id, deduped = send_idem(conn, "q", "order-42:created")
    assert deduped is False
    assert events(conn) == [(event_id, "t", '{"n": 1}', None, "order-42:created")]
    assert claims(conn) == {"order-42:created": event_id}


def test_repeat_in_the_window_returns_the_original_id_and_adds_no_event(conn: Conn) -> None:
    make_queue(conn)
    first = send_idem(conn, "q", "k", payload='{"n": 1}')
    again = send_idem(conn, "q", "k", payload='{"n": 2}')
    assert again == (first[0], True)
    assert [e[0] for e in events(conn)] == [first[0]]


def test_other_keys_insert_and_keys_match_exactly(conn: Conn) -> None:
    make_queue(conn)
    make_queue(conn, "other")
    v1, _ = send_idem(conn, "q", "order-1:v1")
    v2, deduped = send_idem(conn, "q", "order-1:v2")
    empty, empty_deduped = send_idem(conn, "q", "")
    elsewhere, elsewhere_deduped = send_idem(conn, "other", "order-1:v1")
    assert not deduped and not empty_deduped and not elsewhere_deduped
    assert len({v1, v2, empty}) == 3
    assert [e[4] for e in events(conn)] == ["order-1:v1", "order-1:v2", ""]
    assert [e[0] for e in events(conn, "other")] == [elsewhere]
    assert send_idem(conn, "q", "") == (empty, True)


def test_partition_key_lands_in_extra1(conn: Conn) -> None:
    make_queue(conn)
    event_id, _ = send_idem(conn, "q", "k", partition_key="customer-7")
    assert events(conn) == [(event_id, "t", '{"n": 1}', "customer-7", "k")]


def test_jsonb_overload_stores_canonical_json_and_dedups_alike(conn: Conn) -> None:
    make_queue(conn)
    row = conn.execute("select * from pgque.send_idem('q', 't', %s::jsonb, 'j')",
                       ('{"b": 1,   "a": [1, 2]}',)).fetchone()
    assert row is not None and row[1] is False
    assert conn.execute("select * from pgque.send_idem('q', 't', %s::jsonb, 'j', '1 hour', 'p')",
                        ('{"other": true}',)).fetchall() == [(row[0], True)]
    # The text overload shares the claim: a key is a key whatever the payload type.
    assert send_idem(conn, "q", "j") == (row[0], True)
    assert events(conn) == [(row[0], "t", '{"a": [1, 2], "b": 1}', None, "j")]


def test_consumer_receives_one_event_for_a_deduplicated_pair(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    payload = '{"order_id": 42, "total": 99}'
    first = conn.execute("select * from pgque.send_idem('q', 'order.paid', %s::jsonb,"
                         " 'order-42:paid')", (payload,)).fetchall()
    retry = conn.execute("select * from pgque.send_idem('q', 'order.paid', %s::jsonb,"
                         " 'order-42:paid')", (payload,)).fetchall()
    assert retry == [(first[0][0], True)]
    tick(conn)
    received = receive_all(conn)
    assert [(r[0], r[2], r[3], r[7]) for r in received] == [
        (first[0][0], "order.paid", '{"total": 99, "order_id": 42}', "order-42:paid")]
    assert receive_all(conn) == []


# --- errors ----------------------------------------------------------------------------


def test_null_key_fails_with_the_exact_text(conn: Conn) -> None:
    make_queue(conn)
    for query in ("select * from pgque.send_idem('q', 't', 'x'::text, null)",
                  "select * from pgque.send_idem('q', 't', '{}'::jsonb, null)"):
        error = failure(conn, query)
        assert error.diag.message_primary == "idem_key must not be null"
        assert error.sqlstate == "22004"
    assert events(conn) == []


@pytest.mark.parametrize(("ttl", "sqlstate"), [
    ("0 seconds", "22023"), ("-1 second", "22023"), ("1 month -30 days", "22023"),
    (None, "22004"),
])
def test_ttl_must_be_positive(conn: Conn, ttl: str | None, sqlstate: str) -> None:
    make_queue(conn)
    error = failure(conn, "select * from pgque.send_idem('q', 't', 'x', 'k', %s::interval)", ttl)
    assert error.diag.message_primary == "ttl must be a positive interval"
    assert error.sqlstate == sqlstate
    assert stored_claims(conn) == 0


def test_unknown_queue_fails_with_the_exact_text(conn: Conn) -> None:
    error = failure(conn, "select * from pgque.send_idem('nosuch', 't', 'x', 'k')")
    assert error.diag.message_primary == "queue not found: nosuch"
    assert error.sqlstate == "PQ001"
    # Checked in the spec's order: the key first.
    error = failure(conn, "select * from pgque.send_idem('nosuch', 't', 'x', null)")
    assert error.diag.message_primary == "idem_key must not be null"


def test_insert_disabled_queue_fails_leaves_no_claim_and_the_key_works_later(conn: Conn) -> None:
    make_queue(conn)
    conn.execute("update pgque.queue set queue_disable_insert = true")
    error = failure(conn, "select * from pgque.send_idem('q', 't', 'x', 'k')")
    assert error.diag.message_primary == "Insert into queue disallowed"
    assert error.sqlstate == "PQ104"
    assert stored_claims(conn) == 0 and claims(conn) == {}
    conn.execute("update pgque.queue set queue_disable_insert = false")
    event_id, deduped = send_idem(conn, "q", "k")
    assert not deduped and [e[0] for e in events(conn)] == [event_id]
    # A live claim answers before any insert is tried, as in PgQue.
    conn.execute("update pgque.queue set queue_disable_insert = true")
    assert send_idem(conn, "q", "k") == (event_id, True)


def test_a_failed_send_rolls_its_claim_back(conn: Conn, db: Database) -> None:
    make_queue(conn)
    with psycopg.connect(db.dsn) as producer:
        send_idem(producer, "q", "k")
        producer.rollback()
    assert claims(conn) == {} and events(conn) == []
    event_id, deduped = send_idem(conn, "q", "k")
    assert not deduped and [e[0] for e in events(conn)] == [event_id]


# --- expiry and GC -----------------------------------------------------------------------


def test_short_ttl_key_is_reusable_after_it_expired(conn: Conn) -> None:
    make_queue(conn)
    first, _ = send_idem(conn, "q", "k", SHORT_TTL)
    assert send_idem(conn, "q", "k", SHORT_TTL) == (first, True)
    time.sleep(0.25)  # the window itself is the behaviour under test
    second, deduped = send_idem(conn, "q", "k")
    assert not deduped and second != first
    assert [e[0] for e in events(conn)] == [first, second]
    assert send_idem(conn, "q", "k") == (second, True)
    assert claims(conn) == {"k": second}


def test_maint_idem_purges_expired_claims_and_keeps_live_ones(conn: Conn) -> None:
    make_queue(conn)
    make_queue(conn, "other")
    send_idem(conn, "q", "short", SHORT_TTL)
    live, _ = send_idem(conn, "q", "long")
    send_idem(conn, "other", "short", SHORT_TTL)
    time.sleep(0.25)
    assert set(claims(conn)) == {"short", "long"}

    assert scalar(conn, "select pgque.maint_idem()") == 0
    assert claims(conn) == {"long": live}
    assert claims(conn, "other") == {}
    assert scalar(conn, "select count(*) from pgque.idem where expires_at < now()") == 0
    assert send_idem(conn, "q", "long") == (live, True)
    assert scalar(conn, "select pgque.maint_idem('nosuch')") == 0


def test_send_registers_the_maint_hook_once_and_maint_reaps(conn: Conn) -> None:
    make_queue(conn)
    make_queue(conn, "plain")
    send_idem(conn, "q", "expiring", SHORT_TTL)
    send_idem(conn, "q", "other")
    hooks = dict(conn.execute("select queue_name, queue_extra_maint from pgque.queue").fetchall())
    assert hooks == {"q": ["pgque.maint_idem"], "plain": None}
    assert ("pgque.maint_idem", "q") in conn.execute(
        "select func_name, func_arg from pgque.maint_operations()").fetchall()
    time.sleep(0.25)
    # maint() runs the hook only because maint_idem has maint()'s owner.
    assert scalar(conn, "select pgque.maint()") == 0
    assert set(claims(conn)) == {"other"}


def test_concurrent_first_sends_register_the_hook_once(conn: Conn, db: Database) -> None:
    make_queue(conn)
    with psycopg.connect(db.dsn) as first, psycopg.connect(db.dsn, autocommit=True) as second:
        send_idem(first, "q", "a")
        thread, outcome = in_background(lambda: send_idem(second, "q", "b"))
        try:
            wait_for_lock(conn, second, "the second first-send to wait for the queue row")
            first.commit()
        finally:
            first.rollback()
            thread.join(timeout=30)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert scalar(conn, "select queue_extra_maint from pgque.queue") == ["pgque.maint_idem"]


def test_maint_idem_truncates_expired_partitions_and_moves_the_slot_on(conn: Conn) -> None:
    make_queue(conn)
    start = current_slot(conn)
    slot = [(start + i) % 3 for i in range(3)]
    long_lived, _ = send_idem(conn, "q", "long")
    assert scalar(conn, "select pgque.maint_idem()") == 0
    assert current_slot(conn) == slot[1]
    # Nothing claimed since the switch: no reason to move on.
    assert scalar(conn, "select pgque.maint_idem()") == 0
    assert current_slot(conn) == slot[1]
    send_idem(conn, "q", "short-1", SHORT_TTL)
    assert scalar(conn, "select pgque.maint_idem()") == 0
    assert current_slot(conn) == slot[2]
    send_idem(conn, "q", "short-2", SHORT_TTL)
    time.sleep(0.25)

    assert scalar(conn, "select pgque.maint_idem()") == 0
    # slot[1] held only expired claims: truncated, and next in line although slot[0],
    # the next partition after the current one, still holds a live claim.
    assert rows_in(conn, PARTITIONS[slot[1]]) == 0
    assert rows_in(conn, PARTITIONS[slot[0]]) == 1
    assert current_slot(conn) == slot[1]
    # The current partition keeps its expired claim, hidden from pgque.idem.
    assert rows_in(conn, PARTITIONS[slot[2]]) == 1
    assert claims(conn) == {"long": long_lived}

    assert send_idem(conn, "q", "long") == (long_lived, True)
    reused, deduped = send_idem(conn, "q", "short-1")
    assert not deduped and rows_in(conn, PARTITIONS[slot[1]]) == 1
    assert claims(conn) == {"long": long_lived, "short-1": reused}


def test_maint_idem_does_not_keep_producers_waiting_behind_an_open_send(
        conn: Conn, db: Database) -> None:
    """The partition work waits for send_idem transactions in flight only briefly
    (lock_timeout) and is left for a later run, so an open producer transaction never
    holds up the other producers behind maint_idem."""
    make_queue(conn)
    send_idem(conn, "q", "a")
    start = current_slot(conn)
    with psycopg.connect(db.dsn) as producer:
        send_idem(producer, "q", "b")
        assert scalar(conn, "select pgque.maint_idem()") == 0
        assert current_slot(conn) == start
        assert send_idem(conn, "q", "c")[1] is False
        producer.commit()
    assert scalar(conn, "select pgque.maint_idem()") == 0
    assert current_slot(conn) == (start + 1) % 3


@pytest.mark.parametrize("mode", ["ACCESS SHARE", "ACCESS EXCLUSIVE"])
def test_maint_idem_leaves_partitions_it_cannot_lock_to_a_later_run(
        conn: Conn, db: Database, mode: str) -> None:
    make_queue(conn)
    start = current_slot(conn)
    send_idem(conn, "q", "short", SHORT_TTL)
    assert scalar(conn, "select pgque.maint_idem()") == 0
    time.sleep(0.25)
    watermark = scalar(conn, "select last_value from pgque.idem_gc_watermark")
    with psycopg.connect(db.dsn) as reader:
        reader.execute(f"lock table {PARTITIONS[start]} in {mode} mode")
        assert scalar(conn, "select pgque.maint_idem()") == 0
        reader.commit()
    assert rows_in(conn, PARTITIONS[start]) == 1
    # The expired claim is hidden all the same.
    assert scalar(conn, "select last_value from pgque.idem_gc_watermark") > watermark
    assert claims(conn) == {}
    assert scalar(conn, "select pgque.maint_idem()") == 0
    assert rows_in(conn, PARTITIONS[start]) == 0


# --- concurrency ---------------------------------------------------------------------------


def test_two_racing_producers_get_one_event_and_equal_ids(conn: Conn, db: Database) -> None:
    make_queue(conn)
    # The queue's maint hook is in place, so the race below is on the claim itself.
    send_idem(conn, "q", "warm-up")
    tick(conn)
    assert scalar(conn, "select pgque.subscribe('q', 'c')") == 1
    with psycopg.connect(db.dsn) as first, psycopg.connect(db.dsn, autocommit=True) as second:
        won = send_idem(first, "q", "order-1")
        thread, outcome = in_background(lambda: send_idem(second, "q", "order-1"))
        try:
            wait_for_lock(conn, second, "the second producer to wait for the first")
            assert outcome == {}
            first.commit()
        finally:
            first.rollback()
            thread.join(timeout=30)
    assert not thread.is_alive()
    assert won[1] is False
    assert outcome == {"result": (won[0], True)}
    assert [e[0] for e in events(conn) if e[4] == "order-1"] == [won[0]]
    # The loser drew an event id that no event carries; pending counts events only.
    tick(conn)
    assert pending(conn) == 1
    assert [r[0] for r in receive_all(conn)] == [won[0]]


def test_a_race_under_repeatable_read_is_a_serialization_failure(
        conn: Conn, db: Database) -> None:
    make_queue(conn)
    send_idem(conn, "q", "warm-up")
    with psycopg.connect(db.dsn) as first, psycopg.connect(db.dsn) as second:
        second.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        won, _ = send_idem(first, "q", "k")
        thread, outcome = in_background(lambda: send_idem(second, "q", "k"))
        try:
            wait_for_lock(conn, second, "the repeatable-read producer to wait")
            first.commit()
        finally:
            first.rollback()
            thread.join(timeout=30)
        second.rollback()
    assert isinstance(outcome.get("error"), errors.SerializationFailure), outcome
    assert [e[0] for e in events(conn) if e[4] == "k"] == [won]


# --- zero bloat ---------------------------------------------------------------------------


def test_claim_storage_sees_no_update_and_no_delete(conn: Conn, db: Database) -> None:
    """Sends, dedups, takeovers of expired keys and GC truncations only insert and
    truncate: no claim partition counts an updated, deleted or dead tuple."""
    make_queue(conn)
    with psycopg.connect(db.dsn, autocommit=True) as work:
        send_idem(work, "q", "a", SHORT_TTL)
        send_idem(work, "q", "b", SHORT_TTL)
        send_idem(work, "q", "a", SHORT_TTL)
        assert scalar(work, "select pgque.maint_idem()") == 0
        time.sleep(0.25)
        send_idem(work, "q", "a")
        send_idem(work, "q", "b")
        send_idem(work, "q", "a")
        assert scalar(work, "select pgque.maint_idem()") == 0
        send_idem(work, "q", "c")
        assert scalar(work, "select pgque.maint()") == 0
        # a, b, their takeovers and c; the first partition was truncated.
        assert stored_claims(work) == 3
        assert sum(rows_in(work, p) == 0 for p in PARTITIONS) == 1
    # The work session's statistics reach the cumulative views once it has ended.

    def partition_stats() -> list[tuple[Any, ...]] | None:
        conn.execute("select pg_stat_clear_snapshot()")
        rows = conn.execute(
            "select relname, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd, n_dead_tup"
            " from pg_stat_user_tables where schemaname = 'pgque'"
            " and relname like 'idem\\_claim\\__' order by relname").fetchall()
        return rows if sum(r[1] for r in rows) == 5 else None

    stats = wait_until(partition_stats, what="the claim partitions' statistics")
    assert [r[2:] for r in stats] == [(0, 0, 0, 0)] * 3, stats


# --- privileges and install ------------------------------------------------------------------


def test_privileges(conn: Conn, role_conn: ConnectAs) -> None:
    make_queue(conn)
    for function in (SEND_IDEM_TEXT, SEND_IDEM_JSONB):
        assert scalar(conn, "select has_function_privilege('pgque_writer', %s, 'execute')",
                      function)
        assert not scalar(conn, "select has_function_privilege('pgque_reader', %s, 'execute')",
                          function)
    for function in ("pgque.maint_idem()", "pgque.maint_idem(text)"):
        assert scalar(conn, "select has_function_privilege('pgque_admin', %s, 'execute')",
                      function)
        assert not scalar(conn, "select has_function_privilege('pgque_writer', %s, 'execute')",
                          function)
    assert_no_access_to_claims(conn)

    writer = role_conn("pgque_writer")
    event_id, deduped = send_idem(writer, "q", "k")
    assert not deduped
    row = writer.execute("select * from pgque.send_idem('q', 't', '{}'::jsonb, 'k')").fetchone()
    assert row == (event_id, True)
    for relation in ("pgque.idem", "pgque.idem_claim"):
        with pytest.raises(errors.InsufficientPrivilege):
            writer.execute(f"select count(*) from {relation}")
    with pytest.raises(errors.InsufficientPrivilege):
        writer.execute("select pgque.maint_idem()")
    admin = role_conn("pgque_admin")
    assert scalar(admin, "select pgque.maint_idem()") == 0
    with pytest.raises(errors.InsufficientPrivilege):
        admin.execute("select count(*) from pgque.idem")


def assert_no_access_to_claims(conn: Conn) -> None:
    granted = conn.execute(
        "select r.name, rel, p from unnest(%s::text[]) rel,"
        " unnest(array['public', 'pgque_reader', 'pgque_writer', 'pgque_admin']) r(name),"
        " unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p"
        " where has_table_privilege(r.name, rel, p)"
        " union all "
        "select r.name, seq, p from unnest(%s::text[]) seq,"
        " unnest(array['public', 'pgque_reader', 'pgque_writer', 'pgque_admin']) r(name),"
        " unnest(array['SELECT', 'USAGE', 'UPDATE']) p"
        " where has_sequence_privilege(r.name, seq, p)",
        (list(CLAIM_RELATIONS), list(SEQUENCES))).fetchall()
    assert granted == []


def test_drop_queue_removes_its_claims(conn: Conn) -> None:
    make_queue(conn)
    make_queue(conn, "other")
    send_idem(conn, "q", "a")
    send_idem(conn, "q", "b", SHORT_TTL)
    kept, _ = send_idem(conn, "other", "a")
    assert scalar(conn, "select pgque.drop_queue('q')") == 1
    assert scalar(conn, "select count(*) from pgque.idem_claim c where not exists"
                        " (select 1 from pgque.queue q where q.queue_id = c.queue_id)") == 0
    assert claims(conn, "other") == {"a": kept}
    make_queue(conn)
    assert send_idem(conn, "q", "a")[1] is False


def install(engine: Engine) -> None:
    with engine.begin() as sa_conn:
        schema.install(sa_conn, os.environ.get("PGQUE_SCHEMA_SQL") or None)


def test_reinstall_keeps_claims_slot_and_privileges(conn: Conn, engine: Engine) -> None:
    make_queue(conn)
    event_id, _ = send_idem(conn, "q", "k")
    send_idem(conn, "q", "gone", SHORT_TTL)
    assert scalar(conn, "select pgque.maint_idem()") == 0
    time.sleep(0.25)
    assert scalar(conn, "select pgque.maint_idem()") == 0
    slot = current_slot(conn)
    watermark = scalar(conn, "select last_value from pgque.idem_gc_watermark")
    stored = conn.execute("select * from pgque.idem_claim order by queue_id, idem_key, gen"
                          ).fetchall()

    install(engine)

    assert conn.execute("select * from pgque.idem_claim order by queue_id, idem_key, gen"
                        ).fetchall() == stored
    assert current_slot(conn) == slot
    assert scalar(conn, "select last_value from pgque.idem_gc_watermark") == watermark
    assert claims(conn) == {"k": event_id}
    assert send_idem(conn, "q", "k") == (event_id, True)
    assert scalar(conn, "select has_function_privilege('pgque_writer', %s, 'execute')",
                  SEND_IDEM_TEXT)
    assert_no_access_to_claims(conn)


def test_install_adds_idempotency_to_an_older_install(conn: Conn, engine: Engine) -> None:
    """An install from before send_idem (simulated by dropping its objects) is upgraded
    in place: queued events stay and send_idem works."""
    make_queue(conn, "q", "c")
    sent = int(scalar(conn, "select pgque.send('q', 'x'::text)"))
    conn.execute("drop view pgque.idem")
    conn.execute("drop table pgque.idem_claim, pgque.idem_switch")
    conn.execute("drop sequence pgque.idem_slot, pgque.idem_gc_watermark")
    conn.execute(f"drop function {SEND_IDEM_TEXT}, {SEND_IDEM_JSONB}, pgque.maint_idem(),"
                 " pgque.maint_idem(text),"
                 " pgque._send_idem(text, text, text, text, interval, text)")

    install(engine)

    event_id, deduped = send_idem(conn, "q", "k")
    assert not deduped
    tick(conn)
    assert [r[0] for r in receive_all(conn)] == [sent, event_id]
    assert_no_access_to_claims(conn)
