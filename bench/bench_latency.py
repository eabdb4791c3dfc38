"""Send -> handler latency through the worker, commit-woken ticker against periodic.

    .venv/bin/python bench/bench_latency.py                      # embedded PostgreSQL 18
    .venv/bin/python bench/bench_latency.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/latency-pg15.json                  # a running server

Creates a scratch database (dropped afterwards) with the engine and one queue, starts
``python -m sqlalchemy_pgque.worker bench_latency:consumer --ticker`` as a subprocess,
and sends events at a steady 50 per second, one per transaction, through
``Queue.send`` on a Session. Each payload (~80 bytes) carries the wall-clock time taken
just before the commit; the handler notes the time it is called and stores the pair
with its batch. Two cases, each with a fresh worker:

* ``commit_woken``: the worker's ticker ticks the queue on each commit's wake-up
  (default queue settings; the periodic tick would deliver in ~1.5 s);
* ``periodic_100ms``: ``--no-wake --tick-period 0.1`` with the queue's
  ``ticker_max_lag`` at 1 ms, so every 100 ms check ticks pending events.

* ``delayed_1s``: each event is sent with ``deliver_at`` one second ahead and carries
  that due time; measured from it (the worker's ticker moves it into the queue at its
  due time: ``pgque.next_delayed_due()``, ``pgque.maint_deliver_delayed()``).

Targets: commit_woken p50 <= 3 ms and p95 <= 10 ms; periodic_100ms p50 near 50 ms;
delayed_1s within one tick period (100 ms) plus 50 ms of the due time.
This module is also the worker's app (``consumer`` below), imported by the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy
from _common import SHARED_MACHINE_NOTE, run_facts, scratch_database
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Consumer, Message, Queue
from sqlalchemy_pgque._listen import url_from_conninfo

QUEUE = "bench_latency"
RATE = 50.0
RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

latency_q = Queue(QUEUE)

consumer = Consumer(sessionmaker(), queue=QUEUE, name="latency", poll_interval=30)


@consumer.on("*")
def note_arrival(msg: Message, session: Session) -> None:
    handled_at = time.time()
    session.execute(
        text("INSERT INTO latency (msg_id, sent_at, handled_at) VALUES (:id, :sent, :handled)"),
        {"id": msg.msg_id, "sent": msg.payload["sent_at"], "handled": handled_at},
    )


def reset_queue(dsn: str, config: dict[str, str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pgque.drop_queue(%s, true) from pgque.queue where queue_name = %s",
                     (QUEUE, QUEUE))
        conn.execute("select pgque.create_queue(%s)", (QUEUE,))
        for param, value in config.items():
            conn.execute("select pgque.set_queue_config(%s, %s, %s)", (QUEUE, param, value))
        conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, "latency"))
        conn.execute("truncate latency")


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_case(dsn: str, events: int, worker_args: list[str], config: dict[str, str],
             log_path: Path, delay: float = 0.0) -> tuple[list[float], list[float]]:
    """Latencies in ms: from just before each commit (with ``delay``: from each event's
    due time), and from the commit's return (none with ``delay``: a delayed send's
    handle carries no event id of the queue)."""
    reset_queue(dsn, config)
    url = url_from_conninfo(dsn)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH_DIR), str(ROOT)]))
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sqlalchemy_pgque.worker", "bench_latency:consumer",
             "--url", url.render_as_string(hide_password=False), "--ticker",
             "--log-level", "WARNING", *worker_args],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        engine = create_engine(url)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_for(lambda: _ready(conn), 30, "the worker to listen and hold the lock")
                # Warm-up events, not measured: first connections, caches, imports.
                _send_paced(engine, 20)
                wait_for(lambda: _handled(conn) >= 20, 30, "the warm-up events")
                conn.execute("truncate latency")
                committed_at = _send_paced(engine, events, delay)
                wait_for(lambda: _handled(conn) >= events, 60, "the measured events")
                rows = conn.execute("select msg_id, sent_at, handled_at from latency").fetchall()
        finally:
            engine.dispose()
            worker.terminate()
            worker.wait(30)
    from_send = [(handled - sent) * 1000.0 for _, sent, handled in rows]
    if delay:
        return from_send, []
    from_commit = [(handled - committed_at[msg_id]) * 1000.0 for msg_id, _, handled in rows]
    return from_send, from_commit


def _ready(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "select (select count(*) from pg_stat_activity where datname = current_database() "
        "and query = %s) > 0 and exists (select 1 from pg_locks where locktype = 'advisory' "
        "and granted and database = (select oid from pg_database "
        "where datname = current_database()))",
        (f'LISTEN "pgque_{QUEUE}"',),
    ).fetchone()
    return bool(row and row[0])


def _handled(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select count(*) from latency").fetchone()
    return int(row[0]) if row else 0


def _send_paced(engine: sqlalchemy.Engine, events: int, delay: float = 0.0
                ) -> dict[int, float]:
    """Send at RATE per second; return each event's wall-clock time after its commit.
    With ``delay``, each event is due that many seconds after its send, and its payload
    carries that due time instead of the send time."""
    committed_at: dict[int, float] = {}
    start = time.monotonic()
    with Session(engine) as session:
        for n in range(events):
            wait = start + n / RATE - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with session.begin():
                due = time.time() + delay
                pending = latency_q.send(
                    session, {"order_id": 1_000_000 + n, "customer": "cust-00042",
                              "currency": "EUR", "sent_at": due},
                    deliver_at=datetime.fromtimestamp(due, timezone.utc) if delay else None)
            committed_at[pending.event_id or 0] = time.time()
    return committed_at


def summary(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

    return {"count": len(ordered), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "max_ms": round(ordered[-1], 2), "mean_ms": round(statistics.fmean(ordered), 2)}


CASES: dict[str, tuple[list[str], dict[str, str], float]] = {
    "commit_woken": ([], {}, 0.0),
    "periodic_100ms": (["--no-wake", "--tick-period", "0.1"],
                       {"ticker_max_lag": "1 millisecond"}, 0.0),
    # Sent with deliver_at one second ahead; measured from that due time.
    "delayed_1s": ([], {}, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with scratch_database(args.dsn, "latency", setup="create table latency "
                          "(msg_id bigint, sent_at float8, handled_at float8)") as dsn:
        with psycopg.connect(dsn) as conn:
            server = conn.info.server_version
        for name in args.cases:
            worker_args, config, delay = CASES[name]
            log_path = args.output.with_suffix(f".{name}.log")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            from_send, from_commit = run_case(dsn, args.events, worker_args, config, log_path,
                                              delay)
            if delay:
                results[name] = {"from_due_time": summary(from_send)}
            else:
                results[name] = {"from_before_commit": summary(from_send),
                                 "from_commit_return": summary(from_commit)}
            log_path.unlink()
            print(name, results[name])
    result = {
        **run_facts(
            "send -> handler latency at 50 events/s, worker subprocess", server,
            note=SHARED_MACHINE_NOTE + ". from_before_commit: wall clock just before the "
            "producer's commit (includes its WAL flush) to the handler call; "
            "from_commit_return: from when the commit returned",
        ),
        "events_per_case": args.events,
        "cases": results,
        "targets": {"commit_woken": {"p50_ms": 3, "p95_ms": 10},
                    "periodic_100ms": {"p50_ms": 50}, "delayed_1s": {"max_ms": 150}},
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
