"""What the dashboard costs: the admin reads behind each page, and the pages over HTTP,
on 100 and on 1,000 queues.

    .venv/bin/python bench/bench_dashboard.py                       # embedded PostgreSQL 18
    .venv/bin/python bench/bench_dashboard.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/dashboard-pg15.json                   # a running server

Creates a scratch database (dropped afterwards), installs the bundled engine and builds
the queues in steps (100, then up to 1,000), measuring after each step. Every queue has
two consumers: ``fast`` has taken everything, ``slow`` none of it (its lag is the age of
the tick it subscribed at; on every tenth queue it also holds a batch open). Traffic:
``--ticks`` rounds of 5 events and a tick per queue, the ticks then dated back so that
they spread over the last ~10 minutes (the sparkline's window), as a ticker running
for that long would have left them; every tenth queue has a rotation period of one
second, so the status read weighs which consumers block its rotation. Every fifth
queue holds 25 dead letters (inserted as ``event_dead`` would, dated over the last
hour, five types and reasons). The queue shown on the queue page (``d0001``) also has
real retries: 40 nacked events that the retry mover brought back, ticked.

Measured (median of ``--runs``; the statements a call or page sends counted with a
SQLAlchemy ``before_cursor_execute`` listener):

* ``admin``: each read the pages make, alone, in its own transaction;
* ``pages``: ``create_app(engine)`` served by uvicorn in a thread, fetched with urllib:
  the overview, its live JSON refresh, a queue page and its refresh, the DLQ page
  (50 entries) and one entry.

Targets: a page under 1 s with 1,000 queues; the live refresh cheaper than its page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from _common import run_facts, scratch_database
from sqlalchemy import Engine, create_engine

from sqlalchemy_pgque import admin
from sqlalchemy_pgque._listen import url_from_conninfo

# From the tests: asgi_server (uvicorn in a thread) and queue_helpers (statement capture).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from queue_helpers import captured_statements

SIZES = (100, 1000)
SHOWN = "d0001"
RESULTS = Path(__file__).resolve().parent / "results" / "dashboard.json"
CHUNK = 50  # queues per transaction: each creates tables, and locks pile up


def name(n: int) -> str:
    return f"d{n:04}"


def build(dsn: str, first: int, last: int, ticks: int) -> None:
    """Queues ``first``..``last`` with their consumers, traffic and dead letters."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(first, last + 1, CHUNK):
            end = min(start + CHUNK - 1, last)
            conn.execute(f"""
                DO $$
                DECLARE
                  q text;
                BEGIN
                  FOR i IN {start}..{end} LOOP
                    q := 'd' || lpad(i::text, 4, '0');
                    PERFORM pgque.create_queue(q);
                    -- Plain ticker() calls tick at every event, as in the tests.
                    PERFORM pgque.set_queue_config(q, 'ticker_max_count', '1');
                    IF i % 10 = 0 THEN
                      PERFORM pgque.set_queue_config(q, 'rotation_period', '1 second');
                    END IF;
                    PERFORM pgque.send(q, 'warm-up', '{{}}'::jsonb);
                    PERFORM pgque.ticker(q);
                    PERFORM pgque.subscribe(q, 'fast');
                    PERFORM pgque.subscribe(q, 'slow');
                  END LOOP;
                END $$""")
            for _ in range(ticks):
                # One transaction a round: each tick sees the previous round committed.
                conn.execute(f"""
                    DO $$
                    DECLARE
                      q text;
                    BEGIN
                      FOR i IN {start}..{end} LOOP
                        q := 'd' || lpad(i::text, 4, '0');
                        PERFORM pgque.send_batch(q, 'order.created', ARRAY(
                          SELECT jsonb_build_object('order_id', n, 'total', n * 3)
                            FROM generate_series(1, 5) n));
                      END LOOP;
                    END $$""")
                conn.execute(f"""
                    DO $$
                    BEGIN
                      FOR i IN {start}..{end} LOOP
                        PERFORM pgque.ticker('d' || lpad(i::text, 4, '0'));
                      END LOOP;
                    END $$""")
            conn.execute(f"""
                DO $$
                DECLARE
                  q text;
                  b bigint;
                BEGIN
                  FOR i IN {start}..{end} LOOP
                    q := 'd' || lpad(i::text, 4, '0');
                    LOOP
                      b := pgque.next_batch(q, 'fast');
                      EXIT WHEN b IS NULL;
                      PERFORM pgque.finish_batch(b);
                    END LOOP;
                    IF i % 10 = 0 THEN
                      PERFORM pgque.next_batch(q, 'slow');
                    END IF;
                  END LOOP;
                END $$""")
        # Spread each new queue's ticks over the last ~10 minutes, in tick order.
        conn.execute("""
            UPDATE pgque.tick t
               SET tick_time = now() - (r.last - r.n) * interval '25 seconds'
              FROM (SELECT tick_queue, tick_id,
                           row_number() OVER (PARTITION BY tick_queue ORDER BY tick_id) AS n,
                           count(*) OVER (PARTITION BY tick_queue) AS last
                      FROM pgque.tick
                     WHERE tick_queue IN (SELECT queue_id FROM pgque.queue
                                           WHERE queue_name BETWEEN %s AND %s)) r
             WHERE t.tick_queue = r.tick_queue AND t.tick_id = r.tick_id""",
                     (name(first), name(last)))
        conn.execute("""
            INSERT INTO pgque.dead_letter (dl_queue_id, dl_consumer_id, dl_time, dl_reason,
                                           ev_id, ev_time, ev_retry, ev_type, ev_data)
            SELECT q.queue_id, c.co_id, now() - n * interval '2 minutes',
                   (ARRAY['timeout talking to the bank', 'card declined', 'bad address',
                          'SMTP 550', 'max retries exceeded'])[n %% 5 + 1],
                   1000000 + n, now() - n * interval '3 minutes', 5,
                   (ARRAY['order.created', 'order.paid', 'order.shipped', 'mail.send',
                          'invoice.issued'])[n %% 5 + 1],
                   jsonb_build_object('order_id', n, 'note', repeat('x', 40))::text
              FROM pgque.queue q
              CROSS JOIN generate_series(1, 25) n
              JOIN pgque.consumer c ON c.co_name = 'fast'
             WHERE q.queue_name BETWEEN %s AND %s
               AND right(q.queue_name, 4)::int %% 5 = 0""", (name(first), name(last)))


def add_retries(dsn: str) -> None:
    """40 events of the shown queue nacked by ``fast`` and brought back by the mover."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SELECT pgque.send_batch('{SHOWN}', 'order.paid', ARRAY("
                     "SELECT jsonb_build_object('n', n) FROM generate_series(1, 40) n))")
        conn.execute(f"SELECT pgque.ticker('{SHOWN}')")
        conn.execute(f"""
            DO $$
            DECLARE
              m pgque.message;
              b bigint;
            BEGIN
              FOR m IN SELECT * FROM pgque.receive('{SHOWN}', 'fast', 1000) LOOP
                b := m.batch_id;
                PERFORM pgque.nack(b, m, interval '0 seconds', 'bench');
              END LOOP;
              PERFORM pgque.ack(b);
            END $$""")
        while conn.execute("SELECT pgque.maint_retry_events()").fetchone() != (0,):
            pass
        conn.execute(f"SELECT pgque.ticker('{SHOWN}')")


def timed(runs: int, engine: Engine, call: Callable[[], object]) -> dict[str, object]:
    call()  # warm: connection pool, compiled statements, server caches
    seconds, statements = [], 0
    for _ in range(runs):
        with captured_statements(engine) as seen:
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
        statements = len(seen)
    return {"seconds_median": round(statistics.median(seconds), 4),
            "seconds_max": round(max(seconds), 4), "statements": statements}


def measure_admin(engine: Engine, runs: int) -> dict[str, object]:
    def read(call: Callable[[Any], object]) -> Callable[[], object]:
        def run() -> object:
            with engine.begin() as conn:
                return call(conn)
        return run

    with engine.begin() as conn:
        entry = admin.dlq_list(conn, limit=1)[0].id
    reads: dict[str, Callable[[Any], object]] = {
        "queues": lambda c: admin.queues(c),
        "consumers": lambda c: admin.consumers(c),
        "throughput_history (all, 10 min / 30 s)": lambda c: admin.throughput_history(c),
        "dlq_growth": lambda c: admin.dlq_growth(c),
        "queues (one)": lambda c: admin.queues(c, SHOWN),
        "consumers (one)": lambda c: admin.consumers(c, SHOWN),
        "throughput_history (one, 60 min / 60 s)": lambda c: admin.throughput_history(
            c, queue=SHOWN, minutes=60, bucket_seconds=60),
        "error_history (one, 60 min / 60 s)": lambda c: admin.error_history(c, SHOWN),
        "dlq_list (50)": lambda c: admin.dlq_list(c, limit=50),
        "dlq_count": lambda c: admin.dlq_count(c),
        "dlq_list (reason filter, 50)": lambda c: admin.dlq_list(c, reason="declined",
                                                                 limit=50),
        "dlq_show": lambda c: admin.dlq_show(c, entry),
    }
    return {label: timed(runs, engine, read(call)) for label, call in reads.items()}


def measure_pages(engine: Engine, runs: int) -> dict[str, object]:
    with engine.begin() as conn:
        entry = admin.dlq_list(conn, limit=1)[0].id
    paths = {
        "overview": "/",
        "overview live (JSON)": "/api/overview",
        "queue": f"/queues/{SHOWN}",
        "queue live (JSON)": f"/api/queues/{SHOWN}",
        "dlq": "/dlq",
        "dlq entry": f"/dlq/{entry}",
    }
    result: dict[str, object] = {}
    from asgi_server import served

    from sqlalchemy_pgque.dashboard import create_app

    with served(create_app(engine), lifespan="off") as base:
        for label, path in paths.items():
            sizes: list[int] = []

            def fetch(path: str = path, sizes: list[int] = sizes) -> None:
                with urllib.request.urlopen(base + path, timeout=60) as response:
                    assert response.status == 200
                    sizes.append(len(response.read()))

            result[label] = {"path": path, **timed(runs, engine, fetch),
                             "bytes": sizes[-1]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ticks", type=int, default=20, help="traffic rounds per queue")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--no-pages", action="store_true", help="admin reads only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps: list[dict[str, object]] = []
    with scratch_database(args.dsn, "dashboard") as dsn:
        with psycopg.connect(dsn) as conn:
            server = conn.info.server_version
        engine = create_engine(url_from_conninfo(dsn))
        try:
            built = 0
            for size in sorted(args.sizes):
                started = time.perf_counter()
                build(dsn, built + 1, size, args.ticks)
                if built == 0:
                    add_retries(dsn)
                built = size
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("ANALYZE")
                    facts = conn.execute(
                        "SELECT (SELECT count(*) FROM pgque.queue),"
                        "       (SELECT count(*) FROM pgque.subscription),"
                        "       (SELECT count(*) FROM pgque.tick),"
                        "       (SELECT count(*) FROM pgque.dead_letter)").fetchone()
                assert facts is not None
                print(f"{size} queues built in {time.perf_counter() - started:.1f} s",
                      flush=True)
                with engine.begin() as conn:
                    blocked = sum(1 for q in admin.queues(conn) if q.rotation_blocked_by)
                step: dict[str, object] = {
                    "queues": facts[0], "subscriptions": facts[1], "ticks": facts[2],
                    "dead_letters": facts[3], "queues_with_blocked_rotation": blocked,
                    "admin": measure_admin(engine, args.runs),
                }
                if not args.no_pages:
                    step["pages"] = measure_pages(engine, args.runs)
                print(json.dumps(step, indent=2), flush=True)
                steps.append(step)
        finally:
            engine.dispose()
    result = {**run_facts("dashboard: admin reads and pages on "
                          f"{', '.join(map(str, sorted(args.sizes)))} queues", server),
              # A queue's first tick, its warm-up event's, then the rounds'.
              "runs": args.runs, "ticks_per_queue": args.ticks + 2,
              "target_page_seconds": 1.0, "steps": steps}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
