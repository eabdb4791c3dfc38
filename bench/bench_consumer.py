"""Consumer drain rate over a ticked backlog.

    .venv/bin/python bench/bench_consumer.py                      # embedded PostgreSQL 18
    .venv/bin/python bench/bench_consumer.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/consumer-pg15.json                  # a running server
    .venv/bin/python bench/bench_consumer.py --profile             # where our time goes

Creates a scratch database (dropped afterwards), installs the bundled engine, and for
each round builds a backlog of 50,000 events of ~80 bytes ticked as 50 batches of
1,000, then times ``Consumer.run()`` from start until its handler has seen the last
event (the handler then calls ``stop()``). Variants, alternating per round so that
background load on a shared machine hits them alike (median round reported):

* ``msg``: a no-op ``(msg)`` handler (no SAVEPOINT: it cannot write through the batch);
* ``msg_session``: a no-op ``(msg, session)`` handler, each in its own SAVEPOINT;
* ``async_msg``: :class:`AsyncConsumer` with a no-op ``async (msg)`` handler.

(pgque-py 0.2's ``Consumer`` waits for a NOTIFY or its poll interval between
batches, so on a backlog ticked before it started it drains one batch per poll.)

Target: ``msg`` >= 100,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from _common import payload, run_facts, scratch_database
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import AsyncConsumer, Consumer, Message
from sqlalchemy_pgque._listen import url_from_conninfo

QUEUE = "bench_consume"
BATCHES = 50
BATCH_SIZE = 1000
TOTAL = BATCHES * BATCH_SIZE
RESULTS = Path(__file__).resolve().parent / "results" / "consumer.json"


def payloads(start: int) -> list[str]:
    return [json.dumps(payload(n)) for n in range(start, start + BATCH_SIZE)]


def build_backlog(dsn: str, *consumers: str) -> None:
    """Subscribe ``consumers`` afresh and put 50 ticked batches of 1,000 events behind
    them (the same events behind each)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for consumer in consumers:
            conn.execute("select pgque.unsubscribe(%s, %s)", (QUEUE, consumer))
            conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, consumer))
        for batch in range(BATCHES):
            conn.execute("select pgque.send_batch(%s, %s, %b::jsonb[])",
                         (QUEUE, "order.created", payloads(batch * BATCH_SIZE)))
            conn.execute("select pgque.force_next_tick(%s)", (QUEUE,))
            conn.execute("select pgque.ticker(%s)", (QUEUE,))


class Counter:
    def __init__(self, stop: Callable[[], None]) -> None:
        self.seen = 0
        self._stop = stop

    def saw(self) -> None:
        self.seen += 1
        if self.seen == TOTAL:
            self._stop()


def drain_sync(dsn: str, with_session: bool) -> float:
    engine = create_engine(url_from_conninfo(dsn))
    try:
        name = "c_session" if with_session else "c_msg"
        build_backlog(dsn, name)
        consumer = Consumer(sessionmaker(engine), queue=QUEUE, name=name, poll_interval=30)
        counter = Counter(consumer.stop)
        if with_session:
            @consumer.on("*")
            def handle_with_session(msg: Message, session: Session) -> None:
                counter.saw()
        else:
            @consumer.on("*")
            def handle(msg: Message) -> None:
                counter.saw()
        started = time.perf_counter()
        consumer.run(install_signal_handlers=False)
        elapsed = time.perf_counter() - started
        assert counter.seen == TOTAL, counter.seen
        return TOTAL / elapsed
    finally:
        engine.dispose()


def drain_async(dsn: str) -> float:
    async def scenario() -> float:
        engine = create_async_engine(url_from_conninfo(dsn))
        try:
            consumer = AsyncConsumer(engine, queue=QUEUE, name="c_async", poll_interval=30)
            counter = Counter(consumer.stop)

            @consumer.on("*")
            async def handle(msg: Message) -> None:
                counter.saw()

            started = time.perf_counter()
            await consumer.run(install_signal_handlers=False)
            elapsed = time.perf_counter() - started
            assert counter.seen == TOTAL, counter.seen
            return TOTAL / elapsed
        finally:
            await engine.dispose()

    build_backlog(dsn, "c_async")
    return asyncio.run(scenario())


VARIANTS: dict[str, Callable[[str], float]] = {
    "msg": lambda dsn: drain_sync(dsn, with_session=False),
    "msg_session": lambda dsn: drain_sync(dsn, with_session=True),
    "async_msg": drain_async,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append")
    parser.add_argument("--profile", action="store_true", help="profile one 'msg' drain")
    args = parser.parse_args()
    with scratch_database(args.dsn, "consumer",
                          setup=f"select pgque.create_queue('{QUEUE}')") as dsn:
        with psycopg.connect(dsn) as conn:
            server = conn.info.server_version
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(drain_sync, dsn, False)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
            return
        names = args.only or list(VARIANTS)
        rates: dict[str, list[float]] = {name: [] for name in names}
        for round_no in range(args.rounds):
            for name in names:
                rates[name].append(VARIANTS[name](dsn))
                print(f"round {round_no + 1} {name:12s} {rates[name][-1]:>10,.0f} events/s")
    result = {
        **run_facts("consumer drain of 50 ticked batches of 1,000 events, no-op handler", server),
        "rounds": args.rounds,
        "events_per_second_median": {n: round(statistics.median(r)) for n, r in rates.items()},
        "events_per_second_rounds": {n: [round(x) for x in r] for n, r in rates.items()},
        "target_msg": 100_000,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["events_per_second_median"], indent=2))


if __name__ == "__main__":
    main()
