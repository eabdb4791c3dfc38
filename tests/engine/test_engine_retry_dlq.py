"""Retries, nack and the dead-letter queue, through the public PgQue 0.2 SQL API.

Producing, ticking, consuming and moving retries each run in their own transaction (the
``conn`` fixture is autocommit). Retry delays are made due by nacking with a zero delay
or by moving ``retry_queue.ev_retry_after`` into the past, never by sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from conftest import Database
from engine_helpers import (
    BATCH_ID,
    CREATED_AT,
    MSG_ID,
    PAYLOAD,
    RETRY_COUNT,
    TYPE,
    Conn,
    ConnectAs,
    Row,
    ack,
    make_queue,
    move_retries,
    nack,
    receive,
    receive_and_ack,
    scalar,
    send,
    tick,
)


def count(conn: Conn, table: str) -> int:
    return int(scalar(conn, f"select count(*) from pgque.{table}"))


def dlq(conn: Conn, queue: str, limit: int = 100) -> list[dict[str, Any]]:
    cur = conn.execute("select * from pgque.dlq_inspect(%s, %s)", (queue, limit))
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def sub_id(conn: Conn, queue: str, consumer: str) -> int:
    return int(scalar(
        conn,
        "select s.sub_id from pgque.subscription s join pgque.queue q on q.queue_id = s.sub_queue"
        " join pgque.consumer c on c.co_id = s.sub_consumer"
        " where q.queue_name = %s and c.co_name = %s", queue, consumer))


def co_id(conn: Conn, consumer: str) -> int:
    return int(scalar(conn, "select co_id from pgque.consumer where co_name = %s", consumer))


def dead_letter_one(conn: Conn, queue: str, consumer: str, payload: str) -> int:
    """Send one event and nack it straight into the DLQ (max_retries 0); its ev_id."""
    ev_id = send(conn, queue, payload)
    tick(conn, queue)
    rows = receive(conn, queue, consumer)
    assert [r[MSG_ID] for r in rows] == [ev_id]
    assert nack(conn, rows[0], reason="bad") == 1
    assert ack(conn, rows[0][BATCH_ID]) == 1
    return ev_id


# --- nack and the retry mover ----------------------------------------------------------


def test_nack_redelivers_only_to_owner_with_incremented_retry_count(conn: Conn) -> None:
    make_queue(conn, "q", "a", "b")
    ev_id = send(conn, "q", '{"n": 1}', type="order.created")
    tick(conn, "q")

    first = receive(conn, "q", "a")
    assert [(m[MSG_ID], m[RETRY_COUNT]) for m in first] == [(ev_id, None)]
    assert nack(conn, first[0], retry_after="0 seconds", reason="boom") == 1
    assert ack(conn, first[0][BATCH_ID]) == 1
    assert [m[MSG_ID] for m in receive_and_ack(conn, "q", "b")] == [ev_id]

    parked = conn.execute(
        "select ev_id, ev_owner, ev_retry, ev_type, ev_data from pgque.retry_queue").fetchall()
    assert parked == [(ev_id, sub_id(conn, "q", "a"), 1, "order.created", '{"n": 1}')]

    ev_new_sql = "select ev_new from pgque.get_queue_info('q')"
    pending_before = scalar(conn, ev_new_sql)
    assert scalar(conn, "select pgque.maint_retry_events()") == 1
    assert count(conn, "retry_queue") == 0
    # The re-injected copy keeps its id but still draws from the event sequence, which
    # is what makes the ticker notice it.
    assert scalar(conn, ev_new_sql) == pending_before + 1
    tick(conn, "q")

    again = receive_and_ack(conn, "q", "a")
    assert len(again) == 1
    msg = again[0]
    assert (msg[MSG_ID], msg[TYPE], msg[PAYLOAD], msg[RETRY_COUNT]) == (
        ev_id, "order.created", '{"n": 1}', 1)
    assert msg[CREATED_AT] == first[0][CREATED_AT]
    assert receive_and_ack(conn, "q", "b") == []


def test_retry_waits_for_its_due_time(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    send(conn, "q", "1")
    tick(conn, "q")
    rows = receive(conn, "q", "a")
    with conn.transaction():
        # Delays are rounded to whole seconds from the nacking transaction's start.
        assert nack(conn, rows[0], retry_after="2.6 seconds") == 1
        assert scalar(conn, "select ev_retry_after - now() from pgque.retry_queue") \
            == scalar(conn, "select interval '3 seconds'")
    assert ack(conn, rows[0][BATCH_ID]) == 1

    conn.execute("update pgque.retry_queue set ev_retry_after = now() + interval '1 hour'")
    assert scalar(conn, "select pgque.maint_retry_events()") == 0
    tick(conn, "q")
    assert receive(conn, "q", "a") == []

    conn.execute("update pgque.retry_queue set ev_retry_after = now() - interval '1 second'")
    assert scalar(conn, "select pgque.maint_retry_events()") == 1
    tick(conn, "q")
    assert [m[RETRY_COUNT] for m in receive(conn, "q", "a")] == [1]


@pytest.mark.parametrize(("max_retries", "deliveries"), [(None, 6), (2, 3), (0, 1)])
def test_dead_letter_after_max_retries(conn: Conn, max_retries: int | None,
                                       deliveries: int) -> None:
    make_queue(conn, "q", "a")
    if max_retries is not None:
        assert scalar(conn, "select pgque.set_queue_config('q', 'max_retries', %s)",
                      str(max_retries)) == 1
    ev_id = send(conn, "q", '{"k": "v"}', type="job")
    tick(conn, "q")

    seen: list[int | None] = []
    for _ in range(deliveries + 3):
        rows = consume_and_ack_with_nack(conn, "q", "a", reason="handler failed")
        if not rows:
            break
        seen.extend(m[RETRY_COUNT] for m in rows)
        move_retries(conn)
        tick(conn, "q")

    assert seen == [None, *range(1, deliveries)]
    assert count(conn, "retry_queue") == 0
    [entry] = dlq(conn, "q")
    assert entry["ev_id"] == ev_id
    assert entry["dl_reason"] == "handler failed"
    assert entry["ev_retry"] == (deliveries - 1 or None)
    assert (entry["ev_type"], entry["ev_data"]) == ("job", '{"k": "v"}')
    assert entry["dl_consumer_id"] == co_id(conn, "a")


def consume_and_ack_with_nack(conn: Conn, queue: str, consumer: str,
                              reason: str | None) -> list[Row]:
    rows = receive(conn, queue, consumer)
    for msg in rows:
        assert nack(conn, msg, reason=reason) == 1
    if rows:
        assert ack(conn, rows[0][BATCH_ID]) == 1
    return rows


def test_dead_letter_default_reason(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    send(conn, "q", "1")
    tick(conn, "q")
    rows = receive(conn, "q", "a")
    assert nack(conn, rows[0]) == 1
    assert count(conn, "retry_queue") == 0
    assert [e["dl_reason"] for e in dlq(conn, "q")] == ["max retries exceeded"]


def test_nack_uses_the_stored_event_not_the_callers_copy(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    ev_id = send(conn, "q", '{"real": true}', type="real")
    tick(conn, "q")
    [msg] = receive(conn, "q", "a")
    forged = (msg[MSG_ID], 424242, "forged", '{"forged": true}', 99, msg[CREATED_AT],
              "x1", "x2", "x3", "x4")
    assert nack(conn, forged, batch_id=msg[BATCH_ID]) == 1
    parked = conn.execute(
        "select ev_id, ev_retry, ev_type, ev_data, ev_extra1 from pgque.retry_queue").fetchall()
    assert parked == [(ev_id, 1, "real", '{"real": true}', None)]
    assert count(conn, "dead_letter") == 0


def test_nack_of_message_not_in_batch_raises_and_writes_nothing(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    send(conn, "q", "1")
    tick(conn, "q")
    [msg] = receive(conn, "q", "a")
    batch = msg[BATCH_ID]
    stranger = (987654321, *msg[1:])
    with pytest.raises(psycopg.Error, match=f"msg_id 987654321 not found in batch {batch}"):
        nack(conn, stranger)
    nameless = (None, *msg[1:])
    with pytest.raises(psycopg.Error, match=f"msg_id .* not found in batch {batch}"):
        nack(conn, nameless)
    assert count(conn, "retry_queue") == 0
    assert count(conn, "dead_letter") == 0


def test_nack_of_unknown_batch_raises(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    send(conn, "q", "1")
    tick(conn, "q")
    [msg] = receive(conn, "q", "a")
    assert ack(conn, msg[BATCH_ID]) == 1
    with pytest.raises(psycopg.Error, match=f"batch not found: {msg[BATCH_ID]}"):
        nack(conn, msg)
    with pytest.raises(psycopg.Error, match="batch not found: 99999999"):
        nack(conn, msg, batch_id=99999999)
    assert count(conn, "retry_queue") == 0


def test_nack_leaves_the_batch_open(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    ids = [send(conn, "q", str(i)) for i in range(3)]
    tick(conn, "q")
    rows = receive(conn, "q", "a")
    assert nack(conn, rows[1]) == 1
    again = receive(conn, "q", "a")
    assert [m[MSG_ID] for m in again] == ids
    assert {m[BATCH_ID] for m in again} == {rows[0][BATCH_ID]}
    # A second nack of the same event in the same batch parks nothing new.
    assert nack(conn, again[1]) == 1
    assert count(conn, "retry_queue") == 1


def test_maint_retry_events_moves_at_most_ten_due_rows_per_call(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    ids = [send(conn, "q", str(i)) for i in range(25)]
    tick(conn, "q")
    rows = receive(conn, "q", "a")
    assert [m[MSG_ID] for m in rows] == ids
    for msg in rows:
        nack(conn, msg)
    assert ack(conn, rows[0][BATCH_ID]) == 1
    # Due times in reverse id order, and one row not due at all.
    conn.execute("update pgque.retry_queue"
                 " set ev_retry_after = now() - ev_id * interval '1 minute'")
    conn.execute("update pgque.retry_queue set ev_retry_after = now() + interval '1 hour'"
                 " where ev_id = %s", (ids[-1],))

    assert scalar(conn, "select pgque.maint_retry_events()") == 10
    left = [r[0] for r in conn.execute("select ev_id from pgque.retry_queue order by ev_id")]
    assert left == [*ids[:14], ids[-1]]
    assert scalar(conn, "select pgque.maint_retry_events()") == 10
    assert scalar(conn, "select pgque.maint_retry_events()") == 4
    assert scalar(conn, "select pgque.maint_retry_events()") == 0
    assert [r[0] for r in conn.execute("select ev_id from pgque.retry_queue")] == [ids[-1]]

    tick(conn, "q")
    redelivered = receive(conn, "q", "a")
    assert sorted(m[MSG_ID] for m in redelivered) == ids[:-1]
    assert {m[RETRY_COUNT] for m in redelivered} == {1}


def test_event_retry_forms_and_batch_retry(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    ids = [send(conn, "q", str(i)) for i in range(3)]
    tick(conn, "q")
    rows = receive(conn, "q", "a")
    batch = rows[0][BATCH_ID]
    assert scalar(conn, "select pgque.event_retry(%s, %s, %s::integer)", batch, ids[0], 30) == 1
    assert scalar(conn, "select pgque.event_retry(%s, %s, %s::integer)", batch, ids[0], 30) == 0
    assert scalar(conn, "select pgque.event_retry(%s, %s, now() + interval '1 minute')",
                  batch, ids[1]) == 1
    with pytest.raises(psycopg.Error, match="event not found"):
        conn.execute("select pgque.event_retry(%s, %s, %s::integer)", (batch, 123456789, 30))
    assert scalar(conn, "select pgque.batch_retry(%s, %s)", batch, 30) == 1
    assert sorted(r[0] for r in conn.execute("select ev_id from pgque.retry_queue")) == ids
    with pytest.raises(psycopg.Error, match="batch_retry: batch 99999999 not found"):
        conn.execute("select pgque.batch_retry(99999999, 30)")
    assert ack(conn, batch) == 1


def test_event_retry_raw(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    new_id = scalar(conn, "select pgque.event_retry_raw('q', 'a', now(), NULL, now(), 3,"
                          " 'raw', 'payload', 'e1', NULL, NULL, NULL)")
    assert isinstance(new_id, int)
    with pytest.raises(psycopg.Error, match="consumer not registered"):
        conn.execute("select pgque.event_retry_raw('q', 'nobody', now(), 5, now(), 0,"
                     " 't', 'd', NULL, NULL, NULL, NULL)")
    assert scalar(conn, "select pgque.maint_retry_events()") == 1
    tick(conn, "q")
    [msg] = receive(conn, "q", "a")
    assert (msg[MSG_ID], msg[TYPE], msg[PAYLOAD], msg[RETRY_COUNT], msg[6]) == (
        new_id, "raw", "payload", 3, "e1")


# --- dead-letter queue -----------------------------------------------------------------


def test_dlq_inspect_newest_first_with_limit(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    make_queue(conn, "other", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    conn.execute("select pgque.set_queue_config('other', 'max_retries', '0')")
    dead = [dead_letter_one(conn, "q", "a", str(i)) for i in range(3)]
    dead_letter_one(conn, "other", "a", '"x"')
    assert [e["ev_id"] for e in dlq(conn, "q")] == dead[::-1]
    assert [e["ev_id"] for e in dlq(conn, "q", 2)] == dead[:0:-1]
    assert dlq(conn, "no_such_queue") == []
    times = [e["dl_time"] for e in dlq(conn, "q")]
    assert times == sorted(times, reverse=True)


def test_dlq_replay_sends_to_every_subscriber_and_removes_entry(conn: Conn) -> None:
    make_queue(conn, "q", "a", "b")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    ev_id = send(conn, "q", '{"p": 1}', type="kind")
    tick(conn, "q")
    [msg] = receive(conn, "q", "a")
    nack(conn, msg, reason="nope")
    assert ack(conn, msg[BATCH_ID]) == 1
    receive_and_ack(conn, "q", "b")
    [entry] = dlq(conn, "q")

    new_id = scalar(conn, "select pgque.dlq_replay(%s)", entry["dl_id"])
    assert new_id != ev_id
    assert dlq(conn, "q") == []
    with pytest.raises(psycopg.Error, match=f"dead letter entry not found: {entry['dl_id']}"):
        conn.execute("select pgque.dlq_replay(%s)", (entry["dl_id"],))

    tick(conn, "q")
    for consumer in ("a", "b"):
        rows = receive_and_ack(conn, "q", consumer)
        assert [(m[MSG_ID], m[TYPE], m[PAYLOAD], m[RETRY_COUNT]) for m in rows] == [
            (new_id, "kind", '{"p": 1}', None)]


def test_dlq_replay_all_counts(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    dead = [dead_letter_one(conn, "q", "a", str(i)) for i in range(3)]

    assert conn.execute("select * from pgque.dlq_replay_all('q')").fetchone() == (3, 0, None)
    assert dlq(conn, "q") == []
    assert conn.execute("select * from pgque.dlq_replay_all('q')").fetchone() == (0, 0, None)
    assert conn.execute("select * from pgque.dlq_replay_all('nope')").fetchone() == (0, 0, None)
    tick(conn, "q")
    replayed = receive_and_ack(conn, "q", "a")
    assert [m[PAYLOAD] for m in replayed] == ["0", "1", "2"]
    assert not {m[MSG_ID] for m in replayed} & set(dead)


def test_dlq_replay_all_counts_failures_and_keeps_failed_entries(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    for i in range(2):
        dead_letter_one(conn, "q", "a", str(i))
    dl_ids = {e["dl_id"] for e in dlq(conn, "q")}
    conn.execute("update pgque.queue set queue_disable_insert = true where queue_name = 'q'")
    warnings: list[str] = []
    conn.add_notice_handler(lambda diag: warnings.append(diag.message_primary or ""))

    replayed, failed, first_error = conn.execute(
        "select * from pgque.dlq_replay_all('q')").fetchone() or (None, None, None)
    assert (replayed, failed) == (0, 2)
    assert first_error is not None
    assert first_error.startswith("dl_id=")
    assert int(first_error.split(":")[0].removeprefix("dl_id=")) in dl_ids
    assert "Insert into queue disallowed" in first_error
    assert len(warnings) == 2
    assert {e["dl_id"] for e in dlq(conn, "q")} == dl_ids


def test_dlq_replay_all_skips_rows_locked_by_others(db: Database, conn: Conn) -> None:
    make_queue(conn, "q", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    for i in range(3):
        dead_letter_one(conn, "q", "a", str(i))
    locked_id = dlq(conn, "q")[1]["dl_id"]
    # Waiting for the lock would hang this test; fail fast instead.
    conn.execute("set lock_timeout = '5s'")
    with psycopg.connect(db.dsn) as other:
        other.execute("select 1 from pgque.dead_letter where dl_id = %s for update", (locked_id,))
        assert conn.execute("select * from pgque.dlq_replay_all('q')").fetchone() == (2, 0, None)
        other.rollback()
    assert [e["dl_id"] for e in dlq(conn, "q")] == [locked_id]


def test_dlq_purge_by_age(conn: Conn) -> None:
    make_queue(conn, "q", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    for i in range(3):
        dead_letter_one(conn, "q", "a", str(i))
    old, *recent = dlq(conn, "q")
    conn.execute("update pgque.dead_letter set dl_time = now() - interval '40 days'"
                 " where dl_id = %s", (old["dl_id"],))
    assert scalar(conn, "select pgque.dlq_purge('q')") == 1
    assert {e["dl_id"] for e in dlq(conn, "q")} == {e["dl_id"] for e in recent}
    assert scalar(conn, "select pgque.dlq_purge('q', interval '1 hour')") == 0
    assert scalar(conn, "select pgque.dlq_purge('nope', interval '0 seconds')") == 0
    assert scalar(conn, "select pgque.dlq_purge('q', interval '0 seconds')") == 2
    assert dlq(conn, "q") == []


# --- cooperative groups and roles -----------------------------------------------------


def test_cooperative_member_retries_and_dies_under_its_group(conn: Conn) -> None:
    make_queue(conn, "q", "plain")
    assert scalar(conn, "select pgque.subscribe_subconsumer('q', 'grp', 'w1')") == 1
    assert scalar(conn, "select pgque.subscribe_subconsumer('q', 'grp', 'w2')") == 1
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '1')")
    ev_id = send(conn, "q", '"job"')
    tick(conn, "q")
    coop_sql = "select * from pgque.receive_coop('q', 'grp', %s, 100, NULL)"

    [msg] = conn.execute(coop_sql, ("w1",)).fetchall()
    assert nack(conn, msg) == 1
    assert ack(conn, msg[BATCH_ID]) == 1
    assert receive_and_ack(conn, "q", "plain") != []
    assert scalar(conn, "select pgque.maint_retry_events()") == 1
    tick(conn, "q")
    assert receive_and_ack(conn, "q", "plain") == []

    [again] = conn.execute(coop_sql, ("w2",)).fetchall()
    assert (again[MSG_ID], again[RETRY_COUNT]) == (ev_id, 1)
    assert nack(conn, again, reason="still failing") == 1
    assert ack(conn, again[BATCH_ID]) == 1
    [entry] = dlq(conn, "q")
    assert entry["dl_consumer_id"] == co_id(conn, "grp")
    assert entry["dl_reason"] == "still failing"


def test_reader_nacks_and_inspects_writer_replays(conn: Conn, role_conn: ConnectAs) -> None:
    make_queue(conn, "q", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    send(conn, "q", "1")
    tick(conn, "q")
    reader = role_conn("pgque_reader")
    writer = role_conn("pgque_writer")

    [msg] = receive(reader, "q", "a")
    assert nack(reader, msg, reason="r") == 1
    assert ack(reader, msg[BATCH_ID]) == 1
    [entry] = dlq(reader, "q")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        reader.execute("select pgque.dlq_replay(%s)", (entry["dl_id"],))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        writer.execute("select * from pgque.dlq_inspect('q')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        writer.execute("select pgque.dlq_purge('q')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        reader.execute("select pgque.maint_retry_events()")
    assert isinstance(scalar(writer, "select pgque.dlq_replay(%s)", entry["dl_id"]), int)
    assert writer.execute("select * from pgque.dlq_replay_all('q')").fetchone() == (0, 0, None)


# --- concurrency ----------------------------------------------------------------------


def run_in_threads(db: Database, workers: int,
                   work: Callable[[Conn], list[Any]]) -> list[list[Any]]:
    """Run ``work`` on ``workers`` autocommit connections at once; each one's results."""
    barrier = threading.Barrier(workers)
    results: list[list[Any]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as own:
                barrier.wait(timeout=30)
                results[index] = work(own)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_concurrent_retry_movers_reinject_each_event_once(db: Database, conn: Conn) -> None:
    make_queue(conn, "q", "a")
    ids = [send(conn, "q", str(i)) for i in range(60)]
    tick(conn, "q")
    rows = receive(conn, "q", "a")
    for msg in rows:
        nack(conn, msg)
    assert ack(conn, rows[0][BATCH_ID]) == 1

    def mover(own: Conn) -> list[Any]:
        moved = []
        while (step := scalar(own, "select pgque.maint_retry_events()")) > 0:
            moved.append(step)
        return moved

    moved = run_in_threads(db, 4, mover)
    assert sum(sum(steps) for steps in moved) == len(ids)
    assert all(step <= 10 for steps in moved for step in steps)
    tick(conn, "q")
    redelivered = [m[MSG_ID] for m in receive(conn, "q", "a")]
    assert sorted(redelivered) == ids


def test_concurrent_dlq_replays_replay_each_entry_once(db: Database, conn: Conn) -> None:
    make_queue(conn, "q", "a")
    conn.execute("select pgque.set_queue_config('q', 'max_retries', '0')")
    ids = [send(conn, "q", str(i)) for i in range(40)]
    tick(conn, "q")
    rows = receive(conn, "q", "a")
    for msg in rows:
        nack(conn, msg)
    assert ack(conn, rows[0][BATCH_ID]) == 1
    dl_ids = sorted(e["dl_id"] for e in dlq(conn, "q"))
    assert len(dl_ids) == len(ids)

    def replay_one_by_one(own: Conn) -> list[Any]:
        new_ids = []
        for dl_id in dl_ids:
            try:
                new_ids.append(scalar(own, "select pgque.dlq_replay(%s)", dl_id))
            except psycopg.Error as exc:
                assert f"dead letter entry not found: {dl_id}" in str(exc)
        return new_ids

    def replay_all(own: Conn) -> list[Any]:
        row = own.execute("select * from pgque.dlq_replay_all('q')").fetchone()
        assert row is not None
        replayed, failed, first_error = row
        assert (failed, first_error) == (0, None)
        return [replayed]

    one_by_one = run_in_threads(db, 2, replay_one_by_one)
    assert dlq(conn, "q") == []
    tick(conn, "q")
    replayed = receive(conn, "q", "a")
    assert sorted(m[MSG_ID] for m in replayed) == sorted(one_by_one[0] + one_by_one[1])
    assert sorted(m[PAYLOAD] for m in replayed) == sorted(str(i) for i in range(40))

    # Dead-letter the copies again, then race two dlq_replay_all calls.
    for msg in replayed:
        nack(conn, msg)
    assert ack(conn, replayed[0][BATCH_ID]) == 1
    assert len(dlq(conn, "q")) == len(ids)
    counts = run_in_threads(db, 2, replay_all)
    assert counts[0][0] + counts[1][0] == len(ids)
    assert dlq(conn, "q") == []
    tick(conn, "q")
    again = receive(conn, "q", "a")
    assert sorted(m[PAYLOAD] for m in again) == sorted(str(i) for i in range(40))
