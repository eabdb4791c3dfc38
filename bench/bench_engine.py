"""Engine throughput next to the physical limit, measured in one run on one database.

    .venv/bin/python bench/bench_engine.py                 # embedded PostgreSQL 18
    .venv/bin/python bench/bench_engine.py --dsn "host=127.0.0.1 user=postgres"

Creates a scratch database on the server (dropped afterwards), installs the bundled
engine (or ``--sql-path``) and measures, alternating the two sides of each pair in
rounds so that background load on a shared machine hits both alike:

(a) one event per transaction: a plain INSERT of the same row shape (same columns,
    bigserial id, the same ``ev_txid`` index as an event table) against
    ``pgque.send(queue, type, payload::jsonb)``, both prepared, autocommit;
(b) 1000 events per transaction: ``COPY`` of 1000 rows into that plain table against
    ``pgque.send_batch(queue, type, payloads::jsonb[])`` (and the ``text[]`` form);
(c) draining a backlog: ``receive`` + ``ack`` in one transaction per batch until
    every event is consumed, in events per second.

Results go to ``bench/results/engine.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from _common import payload as common_payload
from _common import scratch_database
from psycopg import sql

Conn = psycopg.Connection[tuple[Any, ...]]

QUEUE = "bench_q"
CONSUMER = "bench_c"
EVENT_TYPE = "order.created"
RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"

PLAIN_TABLE = """
create table bench_plain_event (
    ev_id     bigserial,
    ev_time   timestamptz not null default now(),
    ev_txid   xid8 not null default pg_current_xact_id(),
    ev_owner  int4,
    ev_retry  int4,
    ev_type   text,
    ev_data   text,
    ev_extra1 text,
    ev_extra2 text,
    ev_extra3 text,
    ev_extra4 text
) with (fillfactor = 100, autovacuum_enabled = off, toast.autovacuum_enabled = off);
create index on bench_plain_event (ev_txid);
"""
PLAIN_INSERT = "insert into bench_plain_event (ev_type, ev_data) values (%s, %s) returning ev_id"
SEND = "select pgque.send(%s, %s, %s::jsonb)"
# The payload array goes in binary (%b): psycopg's text dumper for a list of 1000 strings
# costs ~7 ms of client CPU per call, more than the whole server side of send_batch.
SEND_BATCH_JSONB = "select pgque.send_batch(%s, %s, %b::jsonb[])"
SEND_BATCH_TEXT = "select pgque.send_batch(%s, %s, %b::text[])"
COPY = "copy bench_plain_event (ev_type, ev_data) from stdin"


def payload(n: int) -> str:
    return json.dumps(common_payload(n))


SETUP = PLAIN_TABLE + (
    f"select pgque.create_queue('{QUEUE}');\n"
    f"select pgque.subscribe('{QUEUE}', '{CONSUMER}');\n"
)


def checkpoint(conn: Conn) -> None:
    """Start each measurement without a pending checkpoint, where we are allowed to."""
    try:
        conn.execute("checkpoint")
    except psycopg.errors.InsufficientPrivilege:
        pass


def alternate(sides: list[Callable[[], None]], rounds: int) -> list[list[float]]:
    """Seconds per round for each side, rotating which side goes first every round."""
    seconds: list[list[float]] = [[] for _ in sides]
    for round_no in range(rounds):
        order = list(range(len(sides)))
        shift = round_no % len(sides)
        for index in order[shift:] + order[:shift]:
            started = time.perf_counter()
            sides[index]()
            seconds[index].append(time.perf_counter() - started)
    return seconds


def measure_single(conn: Conn, events: int, rounds: int) -> dict[str, Any]:
    """(a) one event per transaction, both sides prepared."""
    per_round = max(1, events // rounds)
    data = [payload(n) for n in range(per_round)]

    def plain() -> None:
        for d in data:
            conn.execute(PLAIN_INSERT, (EVENT_TYPE, d), prepare=True).fetchone()

    def send() -> None:
        for d in data:
            conn.execute(SEND, (QUEUE, EVENT_TYPE, d), prepare=True).fetchone()

    for d in data[:200]:
        conn.execute(PLAIN_INSERT, (EVENT_TYPE, d), prepare=True)
        conn.execute(SEND, (QUEUE, EVENT_TYPE, d), prepare=True)
    checkpoint(conn)
    plain_s, send_s = alternate([plain, send], rounds)
    return summarise("plain INSERT", plain_s, "pgque.send", send_s, per_round, 0.9)


def measure_batch(conn: Conn, batches: int, rounds: int, batch_size: int) -> dict[str, Any]:
    """(b) 1000 events per transaction: COPY against send_batch (jsonb[] and text[])."""
    per_round = max(1, batches // rounds)
    data = [payload(n) for n in range(batch_size)]
    copy_rows = "".join(f"{EVENT_TYPE}\t{d}\n" for d in data).encode()

    def copy() -> None:
        for _ in range(per_round):
            with conn.cursor() as cur, cur.copy(COPY) as copier:
                copier.write(copy_rows)

    def batch(statement: str) -> Callable[[], None]:
        def run() -> None:
            for _ in range(per_round):
                conn.execute(statement, (QUEUE, EVENT_TYPE, data), prepare=True).fetchone()
        return run

    jsonb_batch, text_batch = batch(SEND_BATCH_JSONB), batch(SEND_BATCH_TEXT)
    conn.execute(SEND_BATCH_JSONB, (QUEUE, EVENT_TYPE, data), prepare=True)
    conn.execute(SEND_BATCH_TEXT, (QUEUE, EVENT_TYPE, data), prepare=True)
    copy()
    checkpoint(conn)
    copy_s, jsonb_s, text_s = alternate([copy, jsonb_batch, text_batch], rounds)
    events = per_round * batch_size
    result = summarise(f"COPY {batch_size} rows", copy_s,
                       f"pgque.send_batch({batch_size}) jsonb[]", jsonb_s, events, 0.6)
    text_form = summarise("", copy_s, "", text_s, events, 0.6)
    result["send_batch_text_events_per_s"] = text_form["engine_events_per_s"]
    result["send_batch_text_ratio"] = text_form["ratio"]
    return result


def summarise(baseline: str, baseline_seconds: list[float], engine: str,
              engine_seconds: list[float], events_per_round: int, target: float) -> dict[str, Any]:
    """Rates from the median round; the ratio is the median of the per-round ratios,
    so a burst of outside load only spoils the rounds it overlaps."""
    ratio = statistics.median(b / e for b, e in zip(baseline_seconds, engine_seconds,
                                                      strict=True))
    return {
        "baseline": baseline,
        "engine": engine,
        "events_per_round": events_per_round,
        "rounds": len(baseline_seconds),
        "baseline_events_per_s": events_per_round / statistics.median(baseline_seconds),
        "engine_events_per_s": events_per_round / statistics.median(engine_seconds),
        "baseline_round_seconds": baseline_seconds,
        "engine_round_seconds": engine_seconds,
        "ratio": ratio,
        "target": target,
        "meets_target": ratio >= target,
    }


def measure_drain(conn: Conn, total: int, batch_size: int) -> dict[str, Any]:
    """(c) load a backlog ticked every ``batch_size`` events, then receive + ack it all."""
    # Start the consumer after everything (a) and (b) sent: tick, then resubscribe there.
    conn.execute("select pgque.force_next_tick(%s)", (QUEUE,))
    conn.execute("select pgque.ticker(%s)", (QUEUE,))
    conn.execute("select pgque.unsubscribe(%s, %s)", (QUEUE, CONSUMER))
    conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, CONSUMER))
    data = [payload(n) for n in range(batch_size)]
    for _ in range(total // batch_size):
        conn.execute(SEND_BATCH_JSONB, (QUEUE, EVENT_TYPE, data), prepare=True)
        conn.execute("select pgque.force_next_tick(%s)", (QUEUE,))
        conn.execute("select pgque.ticker(%s)", (QUEUE,))
    checkpoint(conn)

    received = batches = 0
    started = time.perf_counter()
    while received < total:
        with conn.transaction():
            rows = conn.execute("select * from pgque.receive(%s, %s, %s)",
                                (QUEUE, CONSUMER, 2_147_483_647), prepare=True).fetchall()
            if not rows:
                raise RuntimeError(f"backlog ran dry after {received} of {total} events")
            conn.execute("select pgque.ack(%s)", (rows[0][1],), prepare=True)
        received += len(rows)
        batches += 1
    elapsed = time.perf_counter() - started
    if received != total:
        raise RuntimeError(f"received {received} events, {total} were queued")
    return {"events": received, "batches": batches, "seconds": elapsed,
            "events_per_s": received / elapsed}


def measure_server_cpu(conn: Conn, calls: int, rounds: int) -> dict[str, Any]:
    """Server time per call, without round trips or commits: a loop in one DO block.

    Explains (a): whatever send costs beyond the plain INSERT here is engine overhead
    (function calls, queue lookup, dynamic SQL) rather than I/O.
    """
    body = payload(7).replace("'", "''")
    statements = {
        "plain INSERT": f"INSERT INTO bench_plain_event (ev_type, ev_data) "
                        f"VALUES ('{EVENT_TYPE}', '{body}')",
        "pgque.send(text, text, jsonb)": f"PERFORM pgque.send('{QUEUE}', '{EVENT_TYPE}', "
                                         f"'{body}'::jsonb)",
        "pgque.send(text, text, text)": f"PERFORM pgque.send('{QUEUE}', '{EVENT_TYPE}', "
                                        f"'{body}'::text)",
        "pgque.insert_event(7 args)": f"PERFORM pgque.insert_event('{QUEUE}', '{EVENT_TYPE}', "
                                      f"'{body}', NULL, NULL, NULL, NULL)",
    }
    timings: dict[str, list[float]] = {name: [] for name in statements}
    for _ in range(rounds):
        for name, statement in statements.items():
            started = time.perf_counter()
            with conn.transaction():
                conn.execute(f"DO $$ BEGIN FOR i IN 1..{calls} LOOP {statement}; END LOOP; "
                             f"END $$".encode())
            timings[name].append((time.perf_counter() - started) / calls * 1e6)
    return {name: statistics.median(values) for name, values in timings.items()}


def server_settings(conn: Conn) -> dict[str, str]:
    names = ["server_version", "synchronous_commit", "fsync", "wal_level", "shared_buffers",
             "max_wal_size"]
    return {n: str(conn.execute(sql.SQL("show {}").format(sql.Identifier(n))).fetchone()[0])  # type: ignore[index]
            for n in names}


def print_table(results: dict[str, Any]) -> None:
    single, batch, drain = results["single"], results["batch"], results["drain"]
    nosync = results["single_no_sync_commit"]
    rows = [
        ("(a) 1 event / transaction", single["baseline"], single["baseline_events_per_s"],
         single["engine"], single["engine_events_per_s"], single["ratio"], single["target"]),
        ("    same, synchronous_commit=off", nosync["baseline"], nosync["baseline_events_per_s"],
         nosync["engine"], nosync["engine_events_per_s"], nosync["ratio"], None),
        ("(b) 1000 events / transaction", batch["baseline"], batch["baseline_events_per_s"],
         batch["engine"], batch["engine_events_per_s"], batch["ratio"], batch["target"]),
        ("", "", None, "pgque.send_batch text[]", batch["send_batch_text_events_per_s"],
         batch["send_batch_text_ratio"], None),
    ]
    print(f"PostgreSQL {results['settings']['server_version']} "
          f"({results['server']}), {results['cpus']} CPUs")
    print(f"{'measurement':32} {'baseline':22} {'ev/s':>10}  {'engine':34} {'ev/s':>10} "
          f"{'ratio':>6} {'target':>7}")
    for what, base, base_rate, engine, engine_rate, ratio, target in rows:
        print(f"{what:32} {base:22} {'' if base_rate is None else f'{base_rate:10.0f}':>10}  "
              f"{engine:34} {engine_rate:10.0f} {ratio:6.2f} "
              f"{'' if target is None else f'>= {target}':>7}")
    print(f"{'(c) receive + ack drain':32} {drain['events']} events in {drain['batches']} "
          f"batches: {drain['events_per_s']:.0f} events/s")
    print("server time per call (one transaction, no round trips): " + ", ".join(
        f"{name} {us:.1f} us" for name, us in results["server_us_per_call"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="libpq string of a server to use instead of the embedded one")
    parser.add_argument("--sql-path", help="install this PgQue SQL file instead of the bundled one")
    parser.add_argument("--events", type=int, default=20_000, help="(a) events per side")
    parser.add_argument("--batches", type=int, default=100, help="(b) batches per side")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--drain", type=int, default=100_000, help="(c) backlog size")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    with scratch_database(args.dsn, "engine", sql_path=args.sql_path, setup=SETUP) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            results: dict[str, Any] = {
                "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "server": "dsn" if args.dsn else "embedded",
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "psycopg": psycopg.__version__,
                "settings": server_settings(conn),
                "payload_bytes": len(payload(12345)),
            }
            results["single"] = measure_single(conn, args.events, args.rounds)
            # Without the WAL flush per commit the per-call CPU cost shows undiluted.
            conn.execute("set synchronous_commit = off")
            results["single_no_sync_commit"] = measure_single(conn, args.events, args.rounds)
            conn.execute("reset synchronous_commit")
            results["server_us_per_call"] = measure_server_cpu(conn, 5000, 5)
            results["batch"] = measure_batch(conn, args.batches, args.rounds, args.batch_size)
            results["drain"] = measure_drain(conn, args.drain, args.batch_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
