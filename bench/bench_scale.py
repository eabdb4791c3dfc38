"""How send, the ticker, receive + ack and latency scale with queues, consumers, members.

    .venv/bin/python bench/bench_scale.py                  # embedded PostgreSQL 18
    .venv/bin/python bench/bench_scale.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/scale-pg15.json              # a running server
    .venv/bin/python bench/bench_scale.py --quick           # 1-1,000 queues, fewer rounds

Three axes, each in a scratch database of its own (dropped afterwards):

* queues: one database grown to 1, 100, 1,000 and 10,000 queues (``--sizes``) as
  ``bench_ticker.py`` grows it (one consumer each, ``ticker_max_count`` 1, but one day
  of ``ticker_max_lag`` / ``ticker_idle_period``), with one plain table of the event
  row shape per queue beside them. At each size:

  - send rate: ``pgque.send`` one event per autocommit transaction, prepared,
    round-robin over every queue, against a prepared plain ``INSERT`` round-robin over
    the plain tables; and both again on a single queue / table of the same database.
    The four loops alternate in short rounds and ratios are medians of per-round
    ratios. Also the server time per send (a loop of sends inside one function call,
    timed by ``clock_timestamp()``, no round trips or commits);
  - ticker pass: ``select pgque.ticker()`` idle and after one event to each of 100
    queues; with every queue given an event, one ``pgque.ticker()`` (its error, if it
    fails; skipped on a ``--dsn`` server where it would take most of the lock table,
    which other sessions share) and, where the engine has ``pgque.ticker_step``, a
    full stepped pass of 500 queues per transaction, idle and with every queue busy;
  - send -> handler latency: ``bench_latency.py``'s commit-woken case (worker
    subprocess with ``--ticker``, one queue sent to at 50 events/s) in that database.

* consumers: one queue with 1, 10 and 100 subscribed consumers: the time of a tick
  (``pgque.ticker(queue)``) after 50 events, and of ``receive`` + ``ack`` (one
  transaction) per consumer;
* members: one queue with one cooperative group of 1, 10 and 50 members, a batch of 50
  events ticked for each: ``receive_coop`` + ``ack`` per member.

Results go to ``bench/results/scale.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from _common import SHARED_MACHINE_NOTE, payload, run_facts, scratch_database
from bench_engine import PLAIN_TABLE, alternate, checkpoint
from bench_latency import QUEUE as LATENCY_QUEUE
from bench_latency import run_case, summary
from bench_ticker import CREATE_CHUNK, measure_busy, measure_idle, queue_name
from bench_ticker import settle as settle_passes
from psycopg import sql

Conn = psycopg.Connection[tuple[Any, ...]]

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
SIZES = (1, 100, 1_000, 10_000)
CONSUMERS = (1, 10, 100)
MEMBERS = (1, 10, 50)
EVENT_TYPE = "order.created"
BATCH = 50
STEP_QUEUES = 500
STEPPED_PASSES = 5
# Sends per call of the server-side loop: enough to dwarf the call itself, and few
# enough queues per transaction that their locks stay far inside the lock table.
SERVER_LOOP_SENDS = 100
SERVER_LOOP_CALLS = 10

SEND = "select pgque.send(%s, %s, %s::jsonb)"
SEND_BATCH = "select pgque.send_batch(%s, %s, %b::jsonb[])"
RECEIVE = "select * from pgque.receive(%s, %s, %s)"
RECEIVE_COOP = "select * from pgque.receive_coop(%s, %s, %s, %s)"
ACK = "select pgque.ack(%s)"
BATCH_ID_COLUMN = 1
# As bench_ticker.py's, so that a pass ticks exactly the queues given new events, but with
# a day where it has an hour: growing to 10,000 queues took over half an hour on a busy
# machine, after which every early queue fell due for an idle tick in the same pass, and
# that pass ran out of shared memory.
CONFIG = (("ticker_max_count", "1"), ("ticker_max_lag", "1 day"),
          ("ticker_idle_period", "1 day"))

SETUP = """
create table latency (msg_id bigint, sent_at float8, handled_at float8);
create function bench_send_loop(names text[], body text) returns float8
language plpgsql as $$
declare
    started timestamptz := clock_timestamp();
    name text;
begin
    foreach name in array names loop
        perform pgque.send(name, 'order.created', body::jsonb);
    end loop;
    return extract(epoch from clock_timestamp() - started) * 1e6;
end $$;
"""


def plain_table(n: int) -> str:
    return f"plain{n:05d}"


def grow(conn: Conn, have: int, want: int) -> None:
    """Queues and plain tables ``have`` .. ``want - 1``; each queue configured, subscribed,
    sent two events (a sequence's first value does not count as pending) and ticked until
    nothing is due, as in bench_ticker.py."""
    for start in range(have, want, CREATE_CHUNK):
        numbers = range(start, min(want, start + CREATE_CHUNK))
        with conn.transaction():
            for n in numbers:
                new_queue(conn, queue_name(n))
                conn.execute("select pgque.subscribe(%s, 'c')", (queue_name(n),))
                conn.execute("select pgque.send_batch(%s, array['x', 'y'])", (queue_name(n),))
                conn.execute(PLAIN_TABLE.replace("bench_plain_event", plain_table(n)).encode())
        tick_each(conn, [queue_name(n) for n in numbers])


def tick_each(conn: Conn, names: Sequence[str]) -> None:
    """Tick every queue on its own: one pass ticking thousands at once runs out of locks."""
    for name in names:
        while conn.execute("select pgque.ticker(%s)", (name,), prepare=True).fetchone() != (None,):
            pass


def send_to_each(conn: Conn, names: Sequence[str]) -> None:
    for start in range(0, len(names), CREATE_CHUNK):
        with conn.transaction():
            for name in names[start:start + CREATE_CHUNK]:
                conn.execute("select pgque.send(%s, 'x'::text)", (name,), prepare=True)


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def measure_send(dsn: str, size: int, rounds: int, per_round: int) -> dict[str, Any]:
    """Sends and plain INSERTs, round-robin over all queues / tables and on one alone."""
    names = [queue_name(n) for n in range(size)]
    inserts = [f"insert into {plain_table(n)} (ev_type, ev_data) values (%s, %s) returning ev_id"
               for n in range(size)]
    data = [json.dumps(payload(n)) for n in range(per_round)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        # One prepared INSERT per table, as the engine keeps one plan per event table;
        # psycopg's default cap of 100 would re-prepare them all the time.
        conn.prepared_max = None

        def engine(targets: Iterator[str]) -> Callable[[], None]:
            def run() -> None:
                for d in data:
                    conn.execute(SEND, (next(targets), EVENT_TYPE, d), prepare=True).fetchone()
            return run

        def plain(statements: Iterator[str]) -> Callable[[], None]:
            def run() -> None:
                for d in data:
                    conn.execute(next(statements), (EVENT_TYPE, d), prepare=True).fetchone()
            return run

        sides = {"engine": engine(itertools.cycle(names)),
                 "plain": plain(itertools.cycle(inserts))}
        if size > 1:
            sides["engine_one"] = engine(itertools.repeat(names[0]))
            sides["plain_one"] = plain(itertools.repeat(inserts[0]))
        # Warm: every statement prepared and every relation in this backend's caches,
        # so the rounds measure the steady round-robin rather than first touches.
        for name, insert in zip(names, inserts, strict=True):
            conn.execute(SEND, (name, EVENT_TYPE, data[0]), prepare=True)
            conn.execute(insert, (EVENT_TYPE, data[0]), prepare=True)
        checkpoint(conn)
        seconds = dict(zip(sides, alternate(list(sides.values()), rounds), strict=True))
        server = measure_server_loop(conn, names)
    result: dict[str, Any] = {
        "events_per_round": per_round, "rounds": rounds,
        **{f"{side}_ev_s": round(per_round / statistics.median(s)) for side, s in seconds.items()},
        "engine_vs_plain": round(median_ratio(seconds["plain"], seconds["engine"]), 3),
    }
    if size > 1:
        result["engine_vs_one_queue"] = round(
            median_ratio(seconds["engine_one"], seconds["engine"]), 3)
        result["plain_vs_one_table"] = round(
            median_ratio(seconds["plain_one"], seconds["plain"]), 3)
    result["server_us_per_send"] = server
    return result


def measure_server_loop(conn: Conn, names: list[str]) -> dict[str, float]:
    """Server time per send: each call sends to SERVER_LOOP_SENDS consecutive queues
    (or to one queue that many times), inside one transaction."""
    body = json.dumps(payload(7))
    spread = itertools.cycle(names)
    rr: list[float] = []
    one: list[float] = []
    for _ in range(SERVER_LOOP_CALLS):
        window = [next(spread) for _ in range(SERVER_LOOP_SENDS)]
        for targets, out in ((window, rr), ([names[0]] * SERVER_LOOP_SENDS, one)):
            row = conn.execute("select bench_send_loop(%s, %s)", (targets, body)).fetchone()
            assert row is not None
            out.append(float(row[0]) / SERVER_LOOP_SENDS)
    return {"round_robin": round(statistics.median(rr), 2),
            "one_queue": round(statistics.median(one), 2)}


def has_ticker_step(conn: Conn) -> bool:
    row = conn.execute(
        "select to_regprocedure('pgque.ticker_step(integer,integer)') is not null").fetchone()
    return bool(row and row[0])


def stepped_pass(conn: Conn) -> tuple[float, int, int]:
    """A whole pass by ``pgque.ticker_step``, each step its own transaction:
    (ms, queues ticked, steps)."""
    after = 0
    ticked = steps = 0
    started = time.perf_counter()
    while True:
        row = conn.execute("select ticked, next_queue_id from pgque.ticker_step(%s, %s)",
                           (after, STEP_QUEUES), prepare=True).fetchone()
        assert row is not None
        ticked += int(row[0] or 0)
        steps += 1
        if row[1] is None:
            break
        after = int(row[1])
    return (time.perf_counter() - started) * 1000.0, ticked, steps


def lock_table_entries(conn: Conn) -> int:
    """Roughly how many locks the server's shared lock table holds, for all sessions."""
    row = conn.execute(
        "select current_setting('max_locks_per_transaction')::int * "
        "(current_setting('max_connections')::int "
        "+ current_setting('max_prepared_transactions')::int)").fetchone()
    return int(row[0]) if row else 0


def measure_ticker(conn: Conn, size: int, single_all_busy: bool) -> dict[str, Any]:
    names = [queue_name(n) for n in range(size)]
    idle = measure_idle(conn)
    busy = min(100, size)
    result: dict[str, Any] = {"idle_ms": round(statistics.median(idle), 3),
                              "idle_min_ms": round(min(idle), 3),
                              f"busy_{busy}_ms": round(measure_busy(conn, size, busy), 3)}
    settle_passes(conn)
    if has_ticker_step(conn):
        passes = [stepped_pass(conn) for _ in range(STEPPED_PASSES)]
        if any(ticked for _, ticked, _ in passes):
            raise RuntimeError("an idle stepped pass ticked queues")
        result["stepped_idle_ms"] = round(statistics.median(ms for ms, _, _ in passes), 3)
        result["stepped_steps"] = passes[0][2]
        send_to_each(conn, names)
        ms, ticked, _ = stepped_pass(conn)
        if ticked != size:
            raise RuntimeError(f"a stepped pass with {size} busy queues ticked {ticked}")
        result["stepped_all_busy_ms"] = round(ms, 3)
    # Two lock-table entries per ticked queue (its event and tick sequences), held to
    # the end of the one transaction.
    needed, room = 2 * size, lock_table_entries(conn)
    if not single_all_busy and needed > room // 2:
        # The lock table is shared: running it out would fail other sessions' work too.
        result["single_all_busy"] = (f"skipped: needs about {needed} of the {room} entries "
                                     "of a shared lock table (--exhaust-lock-table runs it)")
        settle_passes(conn)
        return result
    send_to_each(conn, names)
    started = time.perf_counter()
    try:
        row = conn.execute("select pgque.ticker()").fetchone()
    except psycopg.Error as exc:
        # At thousands of busy queues the single pass needs more locks than the lock
        # table holds; that failure is a result, and the queues are ticked one by one.
        result["single_all_busy"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        tick_each(conn, names)
    else:
        elapsed = (time.perf_counter() - started) * 1000.0
        if row is None or int(row[0]) != size:
            raise RuntimeError(f"a pass with {size} busy queues ticked {row}")
        result["single_all_busy"] = round(elapsed, 3)
    settle_passes(conn)
    return result


def measure_latency(dsn: str, events: int, log_path: Path) -> dict[str, Any]:
    from_send, from_commit = run_case(dsn, events, [], {}, log_path)
    log_path.unlink()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Left behind with its default thresholds, the queue would tick in a later
        # size's idle passes and fail their checks.
        conn.execute("select pgque.drop_queue(%s, true)", (LATENCY_QUEUE,))
    return {"from_before_commit": summary(from_send), "from_commit_return": summary(from_commit)}


def queue_axis(args: argparse.Namespace, facts: dict[str, Any]) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    with scratch_database(args.dsn, "scale_q", setup=SETUP) as dsn, \
            psycopg.connect(dsn, autocommit=True) as conn:
        facts["server_version"] = conn.info.server_version
        facts["settings"] = server_settings(conn)
        facts["ticker_step"] = has_ticker_step(conn)
        have = 0
        for size in sorted(args.sizes):
            started = time.monotonic()
            grow(conn, have, size)
            have = size
            row: dict[str, Any] = {"grow_s": round(time.monotonic() - started, 1)}
            print(f"{size} queues and plain tables ready in {row['grow_s']} s", flush=True)
            row["send"] = measure_send(dsn, size, args.rounds, args.per_round)
            tick_each(conn, [queue_name(n) for n in range(size)])
            settle_passes(conn)
            row["ticker"] = measure_ticker(
                conn, size, single_all_busy=args.dsn is None or args.exhaust_lock_table)
            if args.latency_events:
                log_path = args.output.with_suffix(f".latency-{size}.log")
                log_path.parent.mkdir(parents=True, exist_ok=True)
                row["latency"] = measure_latency(dsn, args.latency_events, log_path)
            row["seconds"] = round(time.monotonic() - started, 1)
            sizes[str(size)] = row
            print(size, json.dumps(row), flush=True)
    base = sizes.get("1")
    if base:
        for row in sizes.values():
            for side in ("engine", "plain"):
                row["send"][f"{side}_vs_size_1"] = round(
                    row["send"][f"{side}_ev_s"] / base["send"][f"{side}_ev_s"], 3)
    return sizes


def receive_and_ack(conn: Conn, statement: str, params: tuple[Any, ...]) -> None:
    with conn.transaction():
        rows = conn.execute(statement, params, prepare=True).fetchall()
        if len(rows) != BATCH:
            raise RuntimeError(f"received {len(rows)} events, {BATCH} were ticked")
        conn.execute(ACK, (rows[0][BATCH_ID_COLUMN],), prepare=True)


def new_queue(conn: Conn, name: str) -> None:
    conn.execute("select pgque.create_queue(%s)", (name,))
    for param, value in CONFIG:
        conn.execute("select pgque.set_queue_config(%s, %s, %s)", (name, param, value))


def send_and_tick(conn: Conn, name: str, data: list[str]) -> float:
    """One batch of events, then the tick that closes it: the tick's ms."""
    conn.execute(SEND_BATCH, (name, EVENT_TYPE, data), prepare=True)
    started = time.perf_counter()
    row = conn.execute("select pgque.ticker(%s)", (name,), prepare=True).fetchone()
    elapsed = (time.perf_counter() - started) * 1000.0
    if row is None or row[0] is None:
        raise RuntimeError(f"queue {name} did not tick")
    return elapsed


def fanout_axis(dsn: str, counts: list[int], rounds: int) -> dict[str, Any]:
    """Per round and count: 50 events, a tick, then receive + ack by every consumer."""
    data = [json.dumps(payload(n)) for n in range(BATCH)]
    ticks: dict[int, list[float]] = {c: [] for c in counts}
    received: dict[int, list[float]] = {c: [] for c in counts}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for count in counts:
            new_queue(conn, f"fan{count}")
            for i in range(count):
                conn.execute("select pgque.subscribe(%s, %s)", (f"fan{count}", f"c{i}"))

        def variant(count: int) -> Callable[[], None]:
            name = f"fan{count}"

            def run() -> None:
                ticks[count].append(send_and_tick(conn, name, data))
                started = time.perf_counter()
                for i in range(count):
                    receive_and_ack(conn, RECEIVE, (name, f"c{i}", 2 * BATCH))
                received[count].append((time.perf_counter() - started) / count * 1000.0)
            return run

        variants = [variant(c) for c in counts]
        for run in variants:
            run()
        for values in (*ticks.values(), *received.values()):
            values.clear()
        alternate(variants, rounds)
    base = counts[0]
    return {str(c): {
        "tick_ms": round(statistics.median(ticks[c]), 3),
        "tick_vs_base": round(median_ratio(ticks[c], ticks[base]), 3),
        "receive_ack_per_consumer_ms": round(statistics.median(received[c]), 3),
        "per_consumer_vs_base": round(median_ratio(received[c], received[base]), 3),
    } for c in counts}


def coop_axis(dsn: str, counts: list[int], rounds: int) -> dict[str, Any]:
    """Per round and count: a ticked batch of 50 for every member, then each member's
    receive_coop + ack."""
    data = [json.dumps(payload(n)) for n in range(BATCH)]
    received: dict[int, list[float]] = {c: [] for c in counts}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for count in counts:
            new_queue(conn, f"coop{count}")
            for i in range(count):
                conn.execute("select pgque.subscribe_subconsumer(%s, 'g', %s)",
                             (f"coop{count}", f"m{i}"))

        def variant(count: int) -> Callable[[], None]:
            name = f"coop{count}"

            def run() -> None:
                for _ in range(count):
                    send_and_tick(conn, name, data)
                started = time.perf_counter()
                for i in range(count):
                    receive_and_ack(conn, RECEIVE_COOP, (name, "g", f"m{i}", 2 * BATCH))
                received[count].append((time.perf_counter() - started) / count * 1000.0)
            return run

        variants = [variant(c) for c in counts]
        for run in variants:
            run()
        for values in received.values():
            values.clear()
        alternate(variants, rounds)
    base = counts[0]
    return {str(c): {
        "receive_coop_ack_per_member_ms": round(statistics.median(received[c]), 3),
        "per_member_vs_base": round(median_ratio(received[c], received[base]), 3),
    } for c in counts}


def server_settings(conn: Conn) -> dict[str, str]:
    settings = {}
    for name in ("max_locks_per_transaction", "max_connections", "shared_buffers",
                 "synchronous_commit", "fsync"):
        row = conn.execute(sql.SQL("show {}").format(sql.Identifier(name))).fetchone()
        settings[name] = str(row[0]) if row else ""
    return settings


def print_table(result: dict[str, Any]) -> None:
    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    print(f"PostgreSQL {result['server_version']}, load average {load}")
    header = ("queues", "send ev/s", "x size1", "x 1q", "plain", "x size1", "x 1t", "send/pl",
              "srv us", "idle ms", "busy ms", "step ms", "step all", "all busy", "p50", "p95")
    widths = (6, 9, 7, 6, 6, 7, 6, 7, 6, 8, 8, 8, 8, 8, 6, 6)
    if result.get("queues"):
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for size, row in result.get("queues", {}).items():
        send, tick = row["send"], row["ticker"]
        single = tick["single_all_busy"]
        lat = row.get("latency", {}).get("from_before_commit", {})
        cells = (size, send["engine_ev_s"], send.get("engine_vs_size_1", ""),
                 send.get("engine_vs_one_queue", ""), send["plain_ev_s"],
                 send.get("plain_vs_size_1", ""), send.get("plain_vs_one_table", ""),
                 send["engine_vs_plain"], send["server_us_per_send"]["round_robin"],
                 tick["idle_ms"], next(v for k, v in tick.items() if k.startswith("busy_")),
                 tick.get("stepped_idle_ms", ""), tick.get("stepped_all_busy_ms", ""),
                 single if isinstance(single, float) else single.split(":")[0][:8],
                 lat.get("p50_ms", ""), lat.get("p95_ms", ""))
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
        if not isinstance(single, float):
            print(f"{'':>6} one pgque.ticker(), every queue busy: {single}")
    for axis, key, ratio in (("consumers", "receive_ack_per_consumer_ms", "per_consumer_vs_base"),
                             ("members", "receive_coop_ack_per_member_ms", "per_member_vs_base")):
        for count, row in result.get(axis, {}).items():
            tick = (f", tick {row['tick_ms']} ms (x{row['tick_vs_base']})"
                    if "tick_ms" in row else "")
            print(f"{count:>4} {axis}: {row[key]} ms per {axis[:-1]} (x{row[ratio]}){tick}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--consumers", type=int, nargs="+", default=list(CONSUMERS))
    parser.add_argument("--members", type=int, nargs="+", default=list(MEMBERS))
    parser.add_argument("--axes", nargs="+", choices=("queues", "consumers", "members"),
                        default=["queues", "consumers", "members"])
    parser.add_argument("--rounds", type=int, default=12, help="send rounds per size")
    parser.add_argument("--per-round", type=int, default=500, help="events per side and round")
    parser.add_argument("--latency-events", type=int, default=300, help="0 skips latency")
    parser.add_argument("--axis-rounds", type=int, default=15,
                        help="rounds of the consumer and member axes")
    parser.add_argument("--exhaust-lock-table", action="store_true",
                        help="with --dsn, also run the single ticker() pass over every queue "
                        "busy where it would take most of the server's lock table")
    parser.add_argument("--quick", action="store_true",
                        help="up to 1,000 queues, fewer rounds and latency events")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 1_000]
        args.rounds, args.per_round, args.axis_rounds = 6, 500, 5
        args.latency_events = min(args.latency_events, 100)
    started = time.monotonic()
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    if "queues" in args.axes:
        result["queues"] = queue_axis(args, facts)
        seconds["queues"] = round(time.monotonic() - started, 1)
    if "consumers" in args.axes or "members" in args.axes:
        axis_started = time.monotonic()
        with scratch_database(args.dsn, "scale_c") as dsn:
            with psycopg.connect(dsn) as conn:
                facts["server_version"] = conn.info.server_version
                facts.setdefault("settings", server_settings(conn))
            if "consumers" in args.axes:
                result["consumers"] = fanout_axis(dsn, sorted(args.consumers), args.axis_rounds)
            if "members" in args.axes:
                result["members"] = coop_axis(dsn, sorted(args.members), args.axis_rounds)
        seconds["consumers_members"] = round(time.monotonic() - axis_started, 1)
    seconds["total"] = round(time.monotonic() - started, 1)
    output = {
        **run_facts("scaling over queues, fan-out consumers and cooperative members",
                    facts["server_version"],
                    note=SHARED_MACHINE_NOTE + "; ratios within one run are what count"),
        "settings": facts["settings"],
        "ticker_step": facts.get("ticker_step"),
        "queue_config": dict(CONFIG),
        "batch": BATCH,
        "step_queues": STEP_QUEUES,
        "seconds": seconds,
        **result,
        "targets": {"engine_vs_one_queue": {"1000": 0.95, "10000": 0.95},
                    "per_consumer_vs_base": 1.0, "per_member_vs_base": 1.0},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    print_table(output)
    print(f"written to {args.output} in {seconds['total']} s")


if __name__ == "__main__":
    main()
