"""Many queues and many consumers: sends reach the right table whatever the number and
ids of the queues, and fan-out and cooperative groups deliver every event as with one.

Queues get ids spread over a wide range (by moving the queue id sequence before each
``create_queue``) rather than thousands of real queues: the engine routes a send by
queue id, so that is what crosses its internal boundaries, at a fraction of the cost.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from engine_helpers import (
    Conn,
    drain,
    ids,
    is_our_engine,
    make_queue,
    payloads,
    scalar,
    send,
    send_many,
    tick,
    wait_until,
)
from sqlalchemy import Engine

from sqlalchemy_pgque import schema

# Ids on both sides of group boundaries (the engine groups queues by id / 64), in more
# groups than a leaf of the dispatcher's binary search holds (8), with gaps between.
SPREAD_IDS = [1, 2, 63, 64, 65, 127, 128, 640, 641, 700, 1000, 5000, 9999, 12_805, 70_000]


def create_queue_with_id(conn: Conn, queue_id: int, name: str) -> None:
    conn.execute("select setval(pg_get_serial_sequence('pgque.queue', 'queue_id'), %s, false)",
                 (queue_id,))
    make_queue(conn, name, "c")
    assert scalar(conn, "select queue_id from pgque.queue where queue_name = %s", name) == queue_id


def spread_queues(conn: Conn, queue_ids: list[int] = SPREAD_IDS) -> dict[int, str]:
    names = {qid: f"q{qid}" for qid in queue_ids}
    for qid, name in names.items():
        create_queue_with_id(conn, qid, name)
    return names


def rotate(conn: Conn, queue: str) -> None:
    """One rotation of ``queue``'s event tables (two steps in their own transactions,
    then a tick past step 2); awaited, as a transaction open elsewhere on a shared
    server can hold it back."""
    before = scalar(conn, "select queue_cur_table from pgque.queue where queue_name = %s", queue)

    def rotated() -> bool:
        conn.execute("select pgque.maint_rotate_tables_step1(%s)", (queue,))
        conn.execute("select pgque.maint_rotate_tables_step2()")
        tick(conn, queue)
        drain(conn, queue, "c")
        return bool(scalar(conn, "select queue_cur_table <> %s from pgque.queue"
                                 " where queue_name = %s", before, queue))

    wait_until(rotated, 30, f"a rotation of {queue}")


def test_every_send_path_reaches_its_own_queue_whatever_the_queue_ids(conn: Conn) -> None:
    names = spread_queues(conn)
    sent: dict[str, list[int]] = {name: [] for name in names.values()}
    for name in names.values():
        sent[name].append(send(conn, name, f'{{"to": "{name}"}}'))
        sent[name].append(int(scalar(conn, "select pgque.insert_event(%s, 't', %s, 'a', 'b',"
                                           " 'c', 'd')", name, name)))
        sent[name] += send_many(conn, name, 2)
    for name in names.values():
        tick(conn, name)
        rows = drain(conn, name, "c")
        assert ids(rows) == sent[name]
        assert payloads(rows)[:2] == [f'{{"to": "{name}"}}', name]
        assert list(rows[1][6:10]) == ["a", "b", "c", "d"]


def test_sends_follow_rotation_on_queues_in_different_groups(conn: Conn) -> None:
    names = spread_queues(conn, [5, 64, 641, 9999])
    for name in names.values():
        conn.execute("select pgque.set_queue_config(%s, 'rotation_period', '1 millisecond')",
                     (name,))
    for _ in range(3):
        for name in names.values():
            rotate(conn, name)
            table = scalar(conn, "select queue_data_pfx || '_' || queue_cur_table"
                                 " from pgque.queue where queue_name = %s", name)
            event_id = send(conn, name)
            assert scalar(conn, f"select count(*) from {table} where ev_id = %s", event_id) == 1
            tick(conn, name)
            assert ids(drain(conn, name, "c")) == [event_id]


@pytest.fixture
def ours(conn: Conn) -> Conn:
    if not is_our_engine(conn):
        pytest.skip("the generated insert functions are our engine's")
    return conn


def statically_inserted(conn: Conn, queue_id: int, table_no: int) -> bool:
    """Whether the generated code inserts into table ``table_no`` of queue ``queue_id``
    (rolled back) rather than leaving the event to the dynamic fallback."""
    with conn.transaction(force_rollback=True):
        return bool(scalar(conn, "select pgque._insert_static(%s, %s, -1, 't', 'd',"
                                 " null, null, null, null)", queue_id, table_no))


def group_functions(conn: Conn) -> int:
    return int(scalar(conn, "select count(*) from pg_proc"
                            " where pronamespace = 'pgque'::regnamespace"
                            " and proname ~ '^_insert_static_g[0-9]+$'"))


def test_the_static_insert_path_knows_every_table_of_every_queue(ours: Conn) -> None:
    conn = ours
    spread_queues(conn)
    for qid in SPREAD_IDS:
        for table_no in range(3):
            assert statically_inserted(conn, qid, table_no), (qid, table_no)
        assert not statically_inserted(conn, qid, 3)
    for unknown in (3, 62, 66, 129, 639, 10_000, 69_999, 70_001, 1_000_000):
        for table_no in range(3):
            assert not statically_inserted(conn, unknown, table_no), unknown
    with conn.transaction(force_rollback=True):
        conn.execute("select pgque._insert_static(641, 2, -7, 't', 'd', null, null, null, null)")
        assert scalar(conn, "select count(*) from pgque.event_641_2 where ev_id = -7") == 1
        assert scalar(conn, "select count(*) from pgque.event_640_2 where ev_id = -7") == 0


def test_the_static_insert_path_has_no_cap_on_the_number_of_queues(ours: Conn) -> None:
    conn = ours
    conn.execute("select pgque.create_queue('n' || i) from generate_series(1, 300) i")
    with conn.transaction(force_rollback=True):
        missed = conn.execute(
            "select queue_id from pgque.queue q where not pgque._insert_static("
            "q.queue_id, q.queue_cur_table, -1, 't', 'd', null, null, null, null)").fetchall()
    assert missed == []


def test_dropping_and_creating_queues_keeps_one_function_per_busy_group(ours: Conn) -> None:
    conn = ours
    spread_queues(conn)
    busy_groups = len({qid // 64 for qid in SPREAD_IDS})
    assert group_functions(conn) == busy_groups
    for name in ("q640", "q641", "q700"):  # every queue of group 10
        assert scalar(conn, "select pgque.unsubscribe(%s, 'c')", name) == 1
        assert scalar(conn, "select pgque.drop_queue(%s)", name) == 1
    assert group_functions(conn) == busy_groups - 1
    assert not statically_inserted(conn, 641, 0)
    assert statically_inserted(conn, 1000, 0) and statically_inserted(conn, 5000, 0)

    create_queue_with_id(conn, 650, "back")
    assert group_functions(conn) == busy_groups
    assert statically_inserted(conn, 650, 0)
    event_id = send(conn, "back")
    tick(conn, "back")
    assert ids(drain(conn, "back", "c")) == [event_id]


def test_reinstall_regenerates_the_insert_functions(ours: Conn, engine: Engine) -> None:
    conn = ours
    spread_queues(conn, [1, 100, 5000])
    conn.execute("drop function pgque._insert_static_g1(integer, integer, bigint, text, text,"
                 " text, text, text, text)")
    conn.execute("create function pgque._insert_static_g999(integer, integer, bigint, text,"
                 " text, text, text, text, text) returns boolean language sql as 'select false'")
    with engine.begin() as sa_conn:
        schema.install(sa_conn)
    assert group_functions(conn) == 3
    for qid in (1, 100, 5000):
        assert statically_inserted(conn, qid, 0)


def queue_relation_locks(sa_conn: Any) -> int:
    """Locks this session holds on the queues' own tables and sequences."""
    return int(sa_conn.exec_driver_sql(
        "select count(*) from pg_locks l join pg_class c on c.oid = l.relation"
        " join pg_namespace n on n.oid = c.relnamespace"
        " where l.pid = pg_backend_pid() and n.nspname = 'pgque'"
        " and c.relname ~ '^(event_[0-9]+|event_[0-9]+_[0-9]+|event_[0-9]+_(id|tick)_seq)$'"
    ).scalar_one())


def test_reinstall_grants_only_what_is_missing(ours: Conn, engine: Engine) -> None:
    """A reinstall re-grants nothing already granted, so it locks none of the queues'
    tables (on PostgreSQL 18 a GRANT locks its relation until commit: thousands of queues
    exhausted the lock table), and gives back what was taken away."""
    conn = ours
    for n in range(20):
        make_queue(conn, f"g{n:02d}", "c")
    table = scalar(conn, "select pgque.current_event_table('g07')")
    conn.execute(f"revoke select on {table} from pgque_reader")
    conn.execute(f"revoke all on {table} from pgque_admin")
    with engine.connect() as sa_conn, sa_conn.begin():
        schema.install(sa_conn)
        # The revoked table is granted again (one lock where GRANT locks); nothing else
        # of the queues is.
        assert queue_relation_locks(sa_conn) <= 1
    assert scalar(conn, "select has_table_privilege('pgque_reader', %s, 'SELECT')", table)
    assert scalar(conn, "select has_table_privilege('pgque_admin', %s, 'TRUNCATE')", table)
    with engine.connect() as sa_conn, sa_conn.begin():
        schema.install(sa_conn)
        assert queue_relation_locks(sa_conn) == 0


def test_fan_out_to_a_hundred_consumers_delivers_every_event_to_each(conn: Conn) -> None:
    consumers = [f"c{i:03d}" for i in range(100)]
    make_queue(conn, "q", *consumers)
    sent = send_many(conn, "q", 5)
    tick(conn, "q")
    sent += send_many(conn, "q", 3)
    tick(conn, "q")
    for consumer in consumers:
        assert ids(drain(conn, "q", consumer)) == sent


def test_fifty_cooperative_members_share_the_batches_once(conn: Conn) -> None:
    make_queue(conn, "q")
    members = [f"m{i:02d}" for i in range(50)]
    for member in members:
        assert scalar(conn, "select pgque.subscribe_subconsumer('q', 'g', %s)", member) == 1
    sent: list[int] = []
    for _ in range(120):
        sent += send_many(conn, "q", 2)
        tick(conn, "q")
    got: Counter[int] = Counter()
    batches_by_member: Counter[str] = Counter()
    while True:
        progressed = False
        for member in members:
            rows = conn.execute("select * from pgque.receive_coop('q', 'g', %s, 1000)",
                                (member,)).fetchall()
            if rows:
                progressed = True
                got.update(ids(rows))
                batches_by_member[member] += 1
                assert scalar(conn, "select pgque.ack(%s)", rows[0][1]) == 1
        if not progressed:
            break
    assert sorted(got) == sorted(sent)
    assert set(got.values()) == {1}
    assert set(batches_by_member) == set(members)
