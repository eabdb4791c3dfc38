"""What one ``pgque.ticker()`` pass costs over many queues, idle and with a few busy.

    .venv/bin/python bench/bench_ticker.py                  # embedded PostgreSQL 18
    .venv/bin/python bench/bench_ticker.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/ticker-pg15.json              # a running server

Creates a scratch database (dropped afterwards) with the engine (or ``--sql-path``)
and grows it to 1, 100, 1,000 and 10,000 queues (``--sizes``). Every queue has one
consumer and one event sent and ticked, so its event sequence has handed out values,
and is configured with ``ticker_max_count`` 1 (one new event is enough to tick) and
``ticker_max_lag`` / ``ticker_idle_period`` of one hour (no idle tick falls due while
measuring): a pass ticks exactly the queues given new events, which each measurement
checks. At each size, on one warm connection:

* ``idle``: a pass over queues none of which has anything new (median and minimum of
  15: on a shared machine the minimum is the pass undisturbed);
* ``busy_<b>``: ``b`` queues (1, 10, 100; spread over the names) each get one event in
  one transaction, then one pass ticks them (median of 5 rounds);
* ``idle_cold``: the first idle pass of a new connection (relation caches empty, as for
  a scheduler that connects for each run, like pg_cron).

Times are wall-clock round trips of ``select pgque.ticker()`` from this process, in ms.
Results go to ``bench/results/ticker.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from _common import run_facts, scratch_database

Conn = psycopg.Connection[tuple[Any, ...]]

RESULTS = Path(__file__).resolve().parent / "results" / "ticker.json"
SIZES = (1, 100, 1_000, 10_000)
BUSY = (1, 10, 100)
IDLE_PASSES = 15
BUSY_ROUNDS = 5
# create_queue takes a dozen relation locks; a transaction of this many queues stays well
# inside the default lock table.
CREATE_CHUNK = 25
CONFIG = (("ticker_max_count", "1"), ("ticker_max_lag", "1 hour"),
          ("ticker_idle_period", "1 hour"))


def queue_name(n: int) -> str:
    return f"tq{n:05d}"


def grow(conn: Conn, have: int, want: int) -> None:
    """Create queues ``have`` .. ``want - 1``, each configured, subscribed, sent to and
    ticked until it has nothing due."""
    for start in range(have, want, CREATE_CHUNK):
        names = [queue_name(n) for n in range(start, min(want, start + CREATE_CHUNK))]
        with conn.transaction():
            for name in names:
                conn.execute("select pgque.create_queue(%s)", (name,))
                for param, value in CONFIG:
                    conn.execute("select pgque.set_queue_config(%s, %s, %s)",
                                 (name, param, value))
                conn.execute("select pgque.subscribe(%s, 'c')", (name,))
                # Two events: a sequence's first value does not count as pending.
                conn.execute("select pgque.send_batch(%s, array['x', 'y'])", (name,))
        # Each queue on its own: a pass ticking thousands of queues at once would need
        # two sequence locks per queue in one transaction, more than the default lock
        # table holds.
        for name in names:
            while conn.execute("select pgque.ticker(%s)", (name,)).fetchone() != (None,):
                pass
    settle(conn)


def settle(conn: Conn) -> None:
    """Pass until a pass ticks nothing."""
    while timed_pass(conn)[1]:
        pass


def timed_pass(conn: Conn) -> tuple[float, int]:
    start = time.perf_counter()
    row = conn.execute("select pgque.ticker()").fetchone()
    elapsed = (time.perf_counter() - start) * 1000.0
    assert row is not None
    return elapsed, int(row[0])


def measure_idle(conn: Conn) -> list[float]:
    times = []
    for _ in range(IDLE_PASSES):
        elapsed, ticked = timed_pass(conn)
        if ticked:
            raise RuntimeError(f"an idle pass ticked {ticked} queues")
        times.append(elapsed)
    return times


def measure_busy(conn: Conn, size: int, busy: int) -> float:
    step = size // busy
    names = [queue_name(n * step) for n in range(busy)]
    times = []
    for _ in range(BUSY_ROUNDS):
        with conn.transaction():
            for name in names:
                conn.execute("select pgque.send(%s, 'x'::text)", (name,))
        elapsed, ticked = timed_pass(conn)
        if ticked != busy:
            raise RuntimeError(f"a pass with {busy} busy queues ticked {ticked}")
        times.append(elapsed)
    return statistics.median(times)


def measure_cold(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as fresh:
        elapsed, ticked = timed_pass(fresh)
    if ticked:
        raise RuntimeError(f"an idle pass ticked {ticked} queues")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--sql-path", help="a PgQue SQL file to install instead of ours")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes: dict[str, dict[str, float]] = {}
    with scratch_database(args.dsn, "ticker", sql_path=args.sql_path) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            server = conn.info.server_version
            have = 0
            for size in sorted(args.sizes):
                started = time.monotonic()
                grow(conn, have, size)
                have = size
                print(f"{size} queues ready in {time.monotonic() - started:.0f} s", flush=True)
                idle = measure_idle(conn)
                row: dict[str, float] = {"idle_ms": round(statistics.median(idle), 3),
                                         "idle_min_ms": round(min(idle), 3)}
                for busy in BUSY:
                    if busy <= size:
                        row[f"busy_{busy}_ms"] = round(measure_busy(conn, size, busy), 3)
                settle(conn)
                row["idle_cold_ms"] = round(measure_cold(dsn), 3)
                sizes[str(size)] = row
                print(size, row, flush=True)
    result = {
        **run_facts("one pgque.ticker() pass over N queues, idle and with b busy", server),
        "engine": args.sql_path or "bundled",
        "queue_config": dict(CONFIG),
        "queues": sizes,
        "targets": {"idle_ms": {"1000": 5, "10000": 50}},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
