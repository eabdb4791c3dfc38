"""The ticker pass, ``pgque.ticker()``, against the tick decision of spec §4.2.

A pass decides for many queues at once and must tick exactly the queues that
``ticker(queue)`` would tick: pending events at ``ticker_max_count`` or past
``ticker_max_lag``, idle queues at their backed-off idle ticks, a queue without an
earlier tick at once, never a paused or external queue. The tests reach those states
through the public functions and, where a state needs time to pass, by moving the
spec's observable ``tick.tick_time`` into the past; they hold for any PgQue 0.2 engine
except where marked as ours.

``pgque.tick_now(queue)`` is ours (one call and one transaction for a tick whatever the
thresholds, where PgQue has ``force_next_tick`` then ``ticker``); its tests are skipped
on another install.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from conftest import Database
from engine_helpers import (
    Conn,
    drain,
    ids,
    is_our_engine,
    make_queue,
    receive,
    receive_and_ack,
    scalar,
    send,
    send_many,
    tick,
    wait_until,
)
from psycopg import sql

# Thresholds of the queues below: every time a test moves lies minutes away from them,
# and a queue left alone falls due only after half an hour, so a slow machine cannot
# move a queue across one.
MAX_COUNT = 3
MAX_LAG = timedelta(hours=1)
IDLE_PERIOD = timedelta(hours=10)
CONFIG = {"ticker_max_count": MAX_COUNT, "ticker_max_lag": "1 hour",
          "ticker_idle_period": "10 hours"}
MINUTE = timedelta(minutes=1)


def tick_times(conn: Conn, queue: str) -> list[datetime]:
    return [r[0] for r in conn.execute(
        "select t.tick_time from pgque.tick t join pgque.queue q on q.queue_id = t.tick_queue"
        " where q.queue_name = %s order by t.tick_id", (queue,))]


def ticks_by_queue(conn: Conn) -> dict[str, int]:
    return {str(name): int(n) for name, n in conn.execute(
        "select q.queue_name, count(t.tick_id) from pgque.queue q"
        " left join pgque.tick t on t.tick_queue = q.queue_id group by q.queue_name")}


def age_ticks(conn: Conn, queue: str, *ages: timedelta) -> None:
    """Move the queue's latest tick ``ages[0]`` into the past, the one before it
    ``ages[1]``, and so on (the queue then looks as if that much time had passed)."""
    for offset, age in enumerate(ages):
        conn.execute(
            "update pgque.tick t set tick_time = now() - %s from pgque.queue q"
            " where q.queue_id = t.tick_queue and q.queue_name = %s and t.tick_id = ("
            "   select t2.tick_id from pgque.tick t2 where t2.tick_queue = q.queue_id"
            "    order by t2.tick_id desc offset %s limit 1)",
            (age, queue, offset))


def drop_earlier_ticks(conn: Conn, queue: str) -> None:
    """Leave the queue only its latest tick, as a rotation that deleted the older ones
    does."""
    conn.execute(
        "delete from pgque.tick t using pgque.queue q where q.queue_id = t.tick_queue"
        " and q.queue_name = %s and t.tick_id < (select max(tick_id) from pgque.tick"
        " where tick_queue = q.queue_id)", (queue,))


def settle(conn: Conn) -> None:
    """Run passes until one ticks nothing."""
    for _ in range(10):
        if scalar(conn, "select pgque.ticker()") == 0:
            return
    raise AssertionError("passes kept ticking")


def create_queues(conn: Conn, names: list[str], **config: object) -> None:
    """Queues with ``config``, consumer ``c`` and two events each (a sequence's first
    value does not count as pending), then ticked: each has two ticks and nothing
    pending. A few transactions, each within the default lock table."""
    for start in range(0, len(names), 50):
        chunk = names[start:start + 50]
        with conn.transaction():
            for name in chunk:
                make_queue(conn, name, "c", **config)
                conn.execute("select pgque.send_batch(%s, array['a', 'b'])", (name,))
        for name in chunk:
            tick(conn, name)


# --- one pass, many queues --------------------------------------------------------------


# Each state: how to set a queue up after it settled, and whether one pass must tick it.
STATES: dict[str, bool] = {
    "quiet": False,
    "idle past idle_period": True,
    "idle, backing off": False,
    "idle, spacing doubled": True,
    "idle, below half max_lag": False,
    "idle, no earlier tick": True,
    "pending below max_count": False,
    "pending past max_lag": True,
    "pending at max_count": True,
    "paused, due": False,
    "external, due": False,
}


def arrange(conn: Conn, queue: str, state: str) -> None:
    if state == "idle past idle_period":
        age_ticks(conn, queue, IDLE_PERIOD + MINUTE, IDLE_PERIOD + 2 * MINUTE)
    elif state == "idle, backing off":
        # Past half of max_lag, not yet twice the previous spacing nor the idle period.
        age_ticks(conn, queue, 60 * MINUTE, 600 * MINUTE)
    elif state == "idle, spacing doubled":
        age_ticks(conn, queue, 60 * MINUTE, 70 * MINUTE)
    elif state == "idle, below half max_lag":
        # Twice the previous spacing has passed, half of max_lag not yet.
        age_ticks(conn, queue, 10 * MINUTE, 12 * MINUTE)
    elif state == "idle, no earlier tick":
        drop_earlier_ticks(conn, queue)
    elif state == "pending below max_count":
        send_many(conn, queue, MAX_COUNT - 1)
    elif state == "pending past max_lag":
        send(conn, queue)
        age_ticks(conn, queue, MAX_LAG + 10 * MINUTE)
    elif state == "pending at max_count":
        send_many(conn, queue, MAX_COUNT)
    elif state in ("paused, due", "external, due"):
        send_many(conn, queue, MAX_COUNT)
        age_ticks(conn, queue, IDLE_PERIOD + MINUTE, IDLE_PERIOD + 2 * MINUTE)
        param = "ticker_paused" if state == "paused, due" else "external_ticker"
        conn.execute("select pgque.set_queue_config(%s, %s, 'true')", (queue, param))


def check_a_pass_ticks_exactly_the_due_ones(
        conn: Conn, queues: int, one_pass: Callable[[Conn], int]) -> None:
    names = [f"q{n:04d}" for n in range(queues)]
    create_queues(conn, names, **CONFIG)
    settle(conn)
    # A few queues in each state, spread over the names; the rest stay quiet.
    state_of = {name: "quiet" for name in names}
    spread = queues // 10 - 3
    for n, state in enumerate(STATES):
        for name in names[n::spread][:5]:
            state_of[name] = state
    with conn.transaction():
        for name, state in state_of.items():
            arrange(conn, name, state)
    before = ticks_by_queue(conn)

    ticked = one_pass(conn)

    after = ticks_by_queue(conn)
    got = {name for name in names if after[name] > before[name]}
    expected = {name for name, state in state_of.items() if STATES[state]}
    assert {name: state_of[name] for name in got ^ expected} == {}
    assert all(after[name] == before[name] + 1 for name in got)
    assert ticked == len(expected)
    # What was due is done; the backing-off queues stay within their spacing.
    assert one_pass(conn) == 0


def test_a_pass_over_a_thousand_queues_ticks_exactly_the_due_ones(conn: Conn) -> None:
    check_a_pass_ticks_exactly_the_due_ones(
        conn, 1000, lambda c: int(scalar(c, "select pgque.ticker()")))


def stepped_pass(conn: Conn, queues_per_step: int) -> int:
    """A pass in steps of ``ticker_step``, each its own transaction; how many ticked.
    Checks that each step hands on the last queue id it covered."""
    ticked, after, covered = 0, 0, 0
    ids_in_order = [int(r[0]) for r in conn.execute(
        "select queue_id from pgque.queue order by queue_id")]
    while True:
        row = conn.execute("select ticked, next_queue_id from pgque.ticker_step(%s, %s)",
                           (after, queues_per_step)).fetchone()
        assert row is not None
        ticked += int(row[0])
        if row[1] is None:
            assert len(ids_in_order) - covered <= queues_per_step
            return ticked
        covered += queues_per_step
        assert row[1] == ids_in_order[covered - 1]
        after = row[1]


@pytest.mark.usefixtures("ours")
def test_a_stepped_pass_ticks_exactly_the_due_ones(conn: Conn) -> None:
    check_a_pass_ticks_exactly_the_due_ones(conn, 200, lambda c: stepped_pass(c, 30))


def sequence_locks(conn: Conn) -> int:
    return int(scalar(
        conn, "select count(*) from pg_locks l join pg_class c on c.oid = l.relation"
              " where l.pid = pg_backend_pid() and c.relkind = 'S'"))


@pytest.mark.usefixtures("ours")
def test_a_step_holds_locks_for_its_own_queues_only(conn: Conn) -> None:
    names = [f"q{n:03d}" for n in range(120)]
    create_queues(conn, names, **CONFIG)
    settle(conn)
    with conn.transaction():
        for name in names:
            send_many(conn, name, MAX_COUNT)
    with conn.transaction():
        first = conn.execute("select ticked, next_queue_id from pgque.ticker_step(0, 20)"
                             ).fetchone()
        step_locks = sequence_locks(conn)
    assert first is not None and first[0] == 20
    with conn.transaction():
        rest = scalar(conn, "select pgque.ticker()")
        pass_locks = sequence_locks(conn)
    assert rest == 100
    # Two sequences per queue ticked (its events and its ticks): a step's 20 queues,
    # against the 100 a whole pass ticks in its one transaction.
    assert step_locks <= 2 * 20 + 5 < 2 * 100 <= pass_locks


@pytest.mark.usefixtures("ours")
def test_ticker_step_refuses_a_step_of_no_queues(conn: Conn) -> None:
    for size in (0, -1, None):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="i_queues"):
            conn.execute("select pgque.ticker_step(0, %s)", (size,))


# --- single queues through the pass, in real time ----------------------------------------


def test_a_pass_ticks_pending_events_once_max_count_is_reached(conn: Conn) -> None:
    create_queues(conn, ["q"], **CONFIG)
    settle(conn)
    drain(conn, "q", "c")
    before = len(tick_times(conn, "q"))
    sent = send_many(conn, "q", MAX_COUNT - 1)
    assert scalar(conn, "select pgque.ticker()") == 0
    sent.append(send(conn, "q"))
    assert scalar(conn, "select pgque.ticker()") == 1
    assert len(tick_times(conn, "q")) == before + 1
    assert ids(receive(conn, "q", "c")) == sent


def test_a_pass_ticks_pending_events_once_max_lag_has_passed(conn: Conn) -> None:
    create_queues(conn, ["q"], ticker_max_lag="300 milliseconds")
    settle(conn)
    drain(conn, "q", "c")
    sent = send(conn, "q")
    assert scalar(conn, "select pgque.ticker()") == 0
    wait_until(lambda: scalar(conn, "select pgque.ticker()"), timeout=15, what="a lag tick")
    *_, previous, latest = tick_times(conn, "q")
    assert latest - previous >= timedelta(milliseconds=300)
    assert ids(receive(conn, "q", "c")) == [sent]


def test_a_pass_gives_an_idle_queue_its_backed_off_idle_ticks(conn: Conn) -> None:
    create_queues(conn, ["q"], ticker_max_lag="200 milliseconds",
                  ticker_idle_period="800 milliseconds")
    settle(conn)
    first_idle_tick = len(tick_times(conn, "q"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        conn.execute("select pgque.ticker()")
        time.sleep(0.01)
    times = tick_times(conn, "q")[first_idle_tick:]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # The spacing doubles, from at least half of max_lag up to the idle period, then
    # stays there, and the ticks keep coming.
    assert len(gaps) >= 4, times
    assert gaps[0] >= timedelta(milliseconds=100)
    assert all(b >= min(2 * a, timedelta(milliseconds=800))
               for a, b in itertools.pairwise(gaps))
    assert gaps[3] >= timedelta(milliseconds=800)
    assert max(gaps) <= timedelta(milliseconds=800 + 1000)


def test_a_pass_leaves_paused_and_external_queues_alone(conn: Conn) -> None:
    create_queues(conn, ["due", "paused", "external"], **CONFIG)
    settle(conn)
    for queue in ("due", "paused", "external"):
        send_many(conn, queue, MAX_COUNT)
    conn.execute("select pgque.set_queue_config('paused', 'ticker_paused', 'true')")
    conn.execute("select pgque.set_queue_config('external', 'external_ticker', 'true')")
    before = ticks_by_queue(conn)
    assert scalar(conn, "select pgque.ticker()") == 1
    after = ticks_by_queue(conn)
    assert {q for q in before if after[q] != before[q]} == {"due"}


def test_a_pass_survives_a_due_queue_dropped_while_it_runs(conn: Conn, db: Database) -> None:
    create_queues(conn, ["doomed", "due"], **CONFIG)
    settle(conn)
    drain(conn, "due", "c")
    send_many(conn, "due", MAX_COUNT)
    send_many(conn, "doomed", MAX_COUNT)
    conn.execute("select pgque.unsubscribe('doomed', 'c')")
    result: dict[str, Any] = {}
    with psycopg.connect(db.dsn) as dropping, psycopg.connect(db.dsn, autocommit=True) as ticking:
        assert scalar(dropping, "select pgque.drop_queue('doomed')") == 1
        ticking_pid = ticking.info.backend_pid

        def run_pass() -> None:
            try:
                result["ticked"] = scalar(ticking, "select pgque.ticker()")
            except psycopg.Error as exc:
                result["error"] = exc

        runner = threading.Thread(target=run_pass)
        runner.start()
        wait_until(lambda: scalar(conn, "select wait_event_type = 'Lock' from pg_stat_activity"
                                        " where pid = %s", ticking_pid),
                   timeout=15, what="the pass to wait for the dropping transaction")
        dropping.commit()
        runner.join(timeout=30)
        assert not runner.is_alive()
    assert result == {"ticked": 1}
    assert len(receive(conn, "due", "c")) == MAX_COUNT


# --- ours: a pass does not wait for a queue another transaction holds ----------------------


@pytest.fixture
def ours(conn: Conn) -> Iterator[None]:
    if not is_our_engine(conn):
        pytest.skip("behaviour of our engine beyond PgQue 0.2")
    yield


@pytest.mark.usefixtures("ours")
def test_a_pass_skips_a_queue_another_transaction_holds_and_ticks_it_next(
        conn: Conn, db: Database) -> None:
    create_queues(conn, ["held", "free"], **CONFIG)
    settle(conn)
    drain(conn, "held", "c")
    send_many(conn, "held", MAX_COUNT)
    send_many(conn, "free", MAX_COUNT)
    with psycopg.connect(db.dsn) as holder:
        holder.execute("select pgque.set_queue_config('held', 'ticker_max_lag', '60 seconds')")
        before = ticks_by_queue(conn)
        assert scalar(conn, "select pgque.ticker()") == 1
        after = ticks_by_queue(conn)
        assert {q for q in before if after[q] != before[q]} == {"free"}
    assert scalar(conn, "select pgque.ticker()") == 1
    assert len(receive(conn, "held", "c")) == MAX_COUNT


# --- ours: tick_now ---------------------------------------------------------------------


def tick_now(conn: Conn, queue: str = "q") -> int:
    tick_id = scalar(conn, "select pgque.tick_now(%s)", queue)
    assert tick_id is not None
    return int(tick_id)


@pytest.mark.usefixtures("ours")
def test_tick_now_ticks_whatever_the_thresholds(conn: Conn, db: Database) -> None:
    make_queue(conn, "q", "c", ticker_max_lag="1 hour", ticker_idle_period="1 hour")
    tick(conn)
    latest = int(scalar(conn, "select max(tick_id) from pgque.tick"))
    assert scalar(conn, "select pgque.ticker('q')") is None
    with psycopg.connect(db.dsn, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier("pgque_q")))
        assert tick_now(conn) == latest + 1  # idle
        send(conn, "q")
        assert tick_now(conn) == latest + 2  # one pending event, far below max_count
        got = list(listener.notifies(timeout=10, stop_after=2))
    assert [n.payload for n in got] == [str(latest + 1), str(latest + 2)]


@pytest.mark.usefixtures("ours")
def test_tick_now_delivers_what_committed_before_it_and_nothing_after(
        conn: Conn, db: Database) -> None:
    make_queue(conn, "q", "c")
    before = send(conn, "q", '{"n": 1}')
    with psycopg.connect(db.dsn) as producer:
        in_flight = scalar(producer, "select pgque.send('q', 'in flight'::text)")
        tick_now(conn)
        producer.commit()
    after = send(conn, "q", '{"n": 2}')
    assert ids(receive_and_ack(conn, "q", "c")) == [before]
    assert receive_and_ack(conn, "q", "c") == []
    tick_now(conn)
    assert sorted(ids(receive_and_ack(conn, "q", "c"))) == sorted([in_flight, after])


@pytest.mark.usefixtures("ours")
def test_tick_now_in_the_sending_transaction_leaves_its_events_for_the_next_tick(
        conn: Conn) -> None:
    make_queue(conn, "q", "c")
    with conn.transaction():
        sent = send(conn, "q")
        tick_now(conn)
    assert receive_and_ack(conn, "q", "c") == []
    tick_now(conn)
    assert ids(receive_and_ack(conn, "q", "c")) == [sent]


@pytest.mark.usefixtures("ours")
def test_tick_now_moves_no_sequence(conn: Conn) -> None:
    make_queue(conn, "q", "c")
    send_many(conn, "q", 5)
    seq_query = "select pgque.seq_getval(queue_event_seq) from pgque.queue"
    seq_before = scalar(conn, seq_query)
    tick_now(conn)
    assert scalar(conn, seq_query) == seq_before
    assert scalar(conn, "select tick_event_seq from pgque.tick order by tick_id desc"
                        " limit 1") == seq_before
    assert scalar(conn, "select queue_seq_skipped from pgque.queue") == 0


@pytest.mark.usefixtures("ours")
def test_tick_now_refuses_unknown_paused_and_external_queues(conn: Conn) -> None:
    make_queue(conn, "p")
    make_queue(conn, "x")
    conn.execute("select pgque.set_queue_config('p', 'ticker_paused', 'true')")
    conn.execute("select pgque.set_queue_config('x', 'external_ticker', 'true')")
    with pytest.raises(psycopg.ProgrammingError, match="no such queue: nosuch") as missing:
        conn.execute("select pgque.tick_now('nosuch')")
    with pytest.raises(psycopg.ProgrammingError, match="paused") as paused:
        conn.execute("select pgque.tick_now('p')")
    with pytest.raises(psycopg.ProgrammingError, match="external tick source") as external:
        conn.execute("select pgque.tick_now('x')")
    assert [e.value.sqlstate for e in (missing, paused, external)] == ["PQ001", "PQ105", "PQ106"]


@pytest.mark.usefixtures("ours")
def test_tick_now_is_for_the_admin_role_only(conn: Conn) -> None:
    grants = conn.execute(
        "select r, has_function_privilege(r, 'pgque.tick_now(text)', 'EXECUTE')"
        " from unnest(array['pgque_reader', 'pgque_writer', 'pgque_admin']) r").fetchall()
    assert dict(grants) == {"pgque_reader": False, "pgque_writer": False, "pgque_admin": True}
    row = conn.execute(
        "select prosecdef, proconfig, exists (select from aclexplode(proacl) a"
        "                                      where a.grantee = 0)"
        " from pg_proc where oid = 'pgque.tick_now(text)'::regprocedure").fetchone()
    assert row == (True, ["search_path=pgque, pg_catalog"], False)
