"""Queue.send through a SQLAlchemy Session against pgque-py's client, on one database.

    .venv/bin/python bench/bench_send.py                      # embedded PostgreSQL 18
    .venv/bin/python bench/bench_send.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/send-pg15.json                  # a running server
    .venv/bin/python bench/bench_send.py --profile             # where our time goes

Creates a scratch database (dropped afterwards), installs the bundled engine and
measures two workloads, each side alternating in rounds so that background load on a
shared machine hits both alike (the median round is reported):

(a) one event per transaction: ``PgqueClient.send`` + ``commit`` on a psycopg
    connection, against ``with sessionmaker.begin() as s: queue.send(s, payload)``;
    For reference, the statement Queue.send emits is also run by hand in the same
    kind of Session: the least any code going through a Session pays;
(b) 1,000 events per transaction: 1,000 ``PgqueClient.send`` calls + ``commit``,
    against 1,000 ``queue.send`` calls in one Session (emitted as one ``send_batch``).
    ``PgqueClient.send_batch`` of the same 1,000 payloads is reported for reference.

Our side includes the wake-up ``pg_notify`` that every sending transaction carries.
Payloads are ~80-byte dicts, JSON-encoded by each side. Target: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pgque
import psycopg
import sqlalchemy
from _common import payload, scratch_database
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import sessionmaker

from sqlalchemy_pgque import Queue

QUEUE = "bench_send"
EVENT_TYPE = "order.created"
RESULTS = Path(__file__).resolve().parent / "results" / "send.json"

bench_q = Queue(QUEUE)
FLOOR_STATEMENT = text("SELECT pgque.send(:queue, :type, CAST(:payload AS jsonb)), "
                       "pg_notify('sqlalchemy_pgque_wake', :queue)")


def sqlalchemy_engine(dsn: str) -> Engine:
    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))


def rate(count: int, run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


class Sides:
    """The workloads of both sides, on one psycopg connection and one SQLAlchemy engine."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)
        self.client = pgque.PgqueClient(self.conn)
        self.engine = sqlalchemy_engine(dsn)
        self.sessions = sessionmaker(self.engine)

    def close(self) -> None:
        self.engine.dispose()
        self.conn.close()

    def raw_single(self, data: list[dict[str, Any]]) -> None:
        for d in data:
            self.client.send(QUEUE, d, type=EVENT_TYPE)
            self.conn.commit()

    def floor_single(self, data: list[dict[str, Any]]) -> None:
        """The least a Session can do: the statement we emit, executed by hand."""
        for d in data:
            with self.sessions.begin() as session:
                session.execute(FLOOR_STATEMENT, {"queue": QUEUE, "type": EVENT_TYPE,
                                                  "payload": json.dumps(d)}).scalar_one()

    def ours_single(self, data: list[dict[str, Any]]) -> None:
        for d in data:
            with self.sessions.begin() as session:
                bench_q.send(session, d, type=EVENT_TYPE)

    def raw_many(self, data: list[dict[str, Any]], transactions: int) -> None:
        for _ in range(transactions):
            for d in data:
                self.client.send(QUEUE, d, type=EVENT_TYPE)
            self.conn.commit()

    def raw_batch(self, data: list[dict[str, Any]], transactions: int) -> None:
        for _ in range(transactions):
            self.client.send_batch(QUEUE, EVENT_TYPE, data)
            self.conn.commit()

    def ours_many(self, data: list[dict[str, Any]], transactions: int) -> None:
        for _ in range(transactions):
            with self.sessions.begin() as session:
                for d in data:
                    bench_q.send(session, d, type=EVENT_TYPE)


def summarise(raw_rates: list[float], ours_rates: list[float], per_round: int) -> dict[str, Any]:
    raw, ours = statistics.median(raw_rates), statistics.median(ours_rates)
    return {
        "events_per_round": per_round,
        "rounds": len(raw_rates),
        "raw_events_per_s": raw,
        "ours_events_per_s": ours,
        "raw_rounds": raw_rates,
        "ours_rounds": ours_rates,
        "ratio": ours / raw,
        "target": 0.9,
        "meets_target": ours / raw >= 0.9,
    }


def measure_single(sides: Sides, events: int, rounds: int) -> dict[str, Any]:
    per_round = events // rounds
    data = [payload(n) for n in range(per_round)]
    sides.raw_single(data[:100])
    sides.floor_single(data[:100])
    sides.ours_single(data[:100])
    raw_rates, floor_rates, ours_rates = [], [], []
    for _ in range(rounds):
        raw_rates.append(rate(per_round, lambda: sides.raw_single(data)))
        floor_rates.append(rate(per_round, lambda: sides.floor_single(data)))
        ours_rates.append(rate(per_round, lambda: sides.ours_single(data)))
    result = {"raw": "PgqueClient.send + commit", "ours": "Queue.send in sessionmaker.begin()",
              **summarise(raw_rates, ours_rates, per_round)}
    floor = statistics.median(floor_rates)
    result["session_floor"] = "the same send + pg_notify statement via session.execute"
    result["session_floor_events_per_s"] = floor
    result["session_floor_rounds"] = floor_rates
    result["ratio_to_session_floor"] = result["ours_events_per_s"] / floor
    return result


def measure_many(sides: Sides, transactions: int, rounds: int, size: int) -> dict[str, Any]:
    per_round = max(1, transactions // rounds)
    data = [payload(n) for n in range(size)]
    sides.raw_many(data, 1)
    sides.raw_batch(data, 1)
    sides.ours_many(data, 1)
    raw_rates, batch_rates, ours_rates = [], [], []
    events = per_round * size
    for _ in range(rounds):
        raw_rates.append(rate(events, lambda: sides.raw_many(data, per_round)))
        batch_rates.append(rate(events, lambda: sides.raw_batch(data, per_round)))
        ours_rates.append(rate(events, lambda: sides.ours_many(data, per_round)))
    result = {"raw": f"{size} x PgqueClient.send + commit",
              "ours": f"{size} x Queue.send in one Session",
              **summarise(raw_rates, ours_rates, events)}
    batch = statistics.median(batch_rates)
    result["raw_send_batch_events_per_s"] = batch
    result["raw_send_batch_rounds"] = batch_rates
    result["ratio_to_raw_send_batch"] = result["ours_events_per_s"] / batch
    return result


def profile(sides: Sides, events: int, size: int) -> None:
    data = [payload(n) for n in range(size)]
    for title, run in (
        (f"{events} x one event per transaction", lambda: sides.ours_single(data[:1] * events)),
        (f"10 x {size} events per transaction", lambda: sides.ours_many(data, 10)),
    ):
        profiler = cProfile.Profile()
        profiler.runcall(run)
        print(f"--- {title}")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


def server_version(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("show server_version").fetchone()
    return str(row[0]) if row else "?"


def print_table(results: dict[str, Any]) -> None:
    single, many = results["single"], results["many"]
    print(f"PostgreSQL {results['server_version']} ({results['server']}), "
          f"{results['cpus']} CPUs, SQLAlchemy {results['sqlalchemy']}")
    print(f"{'workload':30} {'raw pgque-py ev/s':>18} {'Queue.send ev/s':>16} {'ratio':>6}")
    for what, r in (("(a) 1 event / transaction", single),
                    ("(b) 1000 events / transaction", many)):
        print(f"{what:30} {r['raw_events_per_s']:18.0f} {r['ours_events_per_s']:16.0f} "
              f"{r['ratio']:6.2f}")
    print(f"{'    pgque-py send_batch(1000)':30} {many['raw_send_batch_events_per_s']:18.0f} "
          f"{'':16} {many['ratio_to_raw_send_batch']:6.2f}")
    print(f"(a) against the same statement run by hand in a Session "
          f"({single['session_floor_events_per_s']:.0f} ev/s): "
          f"ratio {single['ratio_to_session_floor']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="libpq string of a server to use instead of the embedded one")
    parser.add_argument("--events", type=int, default=5_000, help="(a) events per side")
    parser.add_argument("--transactions", type=int, default=25, help="(b) transactions per side")
    parser.add_argument("--size", type=int, default=1000, help="(b) events per transaction")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="profile our side, no results")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    with scratch_database(args.dsn, "send",
                          setup=f"select pgque.create_queue('{QUEUE}')") as dsn:
        sides = Sides(dsn)
        try:
            if args.profile:
                profile(sides, args.events, args.size)
                return 0
            results: dict[str, Any] = {
                "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "server": "dsn" if args.dsn else "embedded",
                "server_version": server_version(sides.conn),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "psycopg": psycopg.__version__,
                "sqlalchemy": sqlalchemy.__version__,
                "payload_bytes": len(json.dumps(payload(12345))),
            }
            results["single"] = measure_single(sides, args.events, args.rounds)
            results["many"] = measure_many(sides, args.transactions, args.rounds, args.size)
        finally:
            sides.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
