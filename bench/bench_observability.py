"""What observing costs: a backlog drained with and without metrics, and ``status``.

    .venv/bin/python bench/bench_observability.py                  # embedded PostgreSQL 18
    .venv/bin/python bench/bench_observability.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/observability-pg15.json              # a running server

Creates a scratch database (dropped afterwards), installs the bundled engine, then:

* drain: each round puts one backlog of 50,000 events of ~80 bytes, ticked as 50
  batches of 1,000 (built by ``bench_consumer.py``), behind a fresh consumer per entry
  of ``OBSERVERS``; they drain it one after the other, each timed from ``run()`` until
  its handler saw the last event, and who goes first rotates. Background load on a
  shared machine then hits the entries alike; a slowdown is the median of the
  per-round ratios against ``off``, wall-clock and in the draining thread's CPU time
  (which other processes disturb less). Handlers: ``msg`` (a no-op ``(msg)`` handler,
  where the observer's cost is most visible) and ``msg_session`` (a no-op ``(msg,
  session)`` handler, each in its own SAVEPOINT). Observers: ``off`` (none) and
  ``metrics`` (:class:`sqlalchemy_pgque.metrics.Metrics` watching the consumer),
  ``metrics+otel`` (and OpenTelemetry tracing, every message a span) and
  ``metrics+otel-1%`` (tracing with 1 % of the traces sampled).
* status: ``admin.queues`` + ``admin.consumers`` in one transaction, as ``sqlalchemy-pgque
  status`` and the metrics' scrape-time read do, on 1,000 queues with a consumer each,
  some events and a tick (median of ``--status-runs``).

Targets: metrics and tracing at most 10 % slower than ``off``; ``status`` under 1 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
from _common import run_facts, scratch_database
from bench_consumer import QUEUE, TOTAL, build_backlog
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Consumer, Message, admin, tracing
from sqlalchemy_pgque._listen import url_from_conninfo
from sqlalchemy_pgque.metrics import Metrics

STATUS_QUEUES = 1000
RESULTS = Path(__file__).resolve().parent / "results" / "observability.json"


Undo = Callable[[], None]


def _no_observer(consumer: Consumer, engine: Engine) -> Undo | None:
    return None


def _metrics(consumer: Consumer, engine: Engine) -> Undo | None:
    Metrics(engine).watch([consumer])
    return None


def _metrics_and_tracing(sample: float | None) -> Callable[[Consumer, Engine], Undo | None]:
    """Metrics, and an OpenTelemetry SDK provider whose spans are batched to an exporter
    that drops them (the cost measured is the library's and the SDK's, not a
    collector's); ``sample``: the ratio of a ParentBased(TraceIdRatioBased) sampler,
    ``None`` for the SDK default (every span)."""

    def setup(consumer: Consumer, engine: Engine) -> Undo | None:
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class Discard(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = (TracerProvider() if sample is None else
                    TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample))))
        provider.add_span_processor(BatchSpanProcessor(Discard()))
        tracing.configure(tracer_provider=provider)
        Metrics(engine).watch([consumer])

        def undo() -> None:
            tracing.configure()
            provider.shutdown()

        return undo

    return setup


OBSERVERS: dict[str, Callable[[Consumer, Engine], Undo | None]] = {
    "off": _no_observer,
    "metrics": _metrics,
    "metrics+otel": _metrics_and_tracing(None),
    "metrics+otel-1%": _metrics_and_tracing(0.01),
}
"""What watches the consumer in each variant; ``off`` is the baseline."""

HANDLERS = ("msg", "msg_session")


def drain(dsn: str, handler: str, observer: str) -> tuple[float, float]:
    """Events per second of one drain of the backlog built for this handler and observer,
    and the draining thread's CPU time per event in µs."""
    name = _consumer_name(handler, observer)
    engine = create_engine(url_from_conninfo(dsn))
    try:
        consumer = Consumer(sessionmaker(engine), queue=QUEUE, name=name, poll_interval=30)
        seen = 0

        def saw() -> None:
            nonlocal seen
            seen += 1
            if seen == TOTAL:
                consumer.stop()

        if handler == "msg_session":
            @consumer.on("*")
            def handle_with_session(msg: Message, session: Session) -> None:
                saw()
        else:
            @consumer.on("*")
            def handle(msg: Message) -> None:
                saw()
        undo = OBSERVERS[observer](consumer, engine)
        try:
            started, cpu_started = time.perf_counter(), time.thread_time()
            consumer.run(install_signal_handlers=False)
            elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
        finally:
            if undo is not None:
                undo()
        assert seen == TOTAL, seen
        return TOTAL / elapsed, cpu / TOTAL * 1e6
    finally:
        engine.dispose()


def _consumer_name(handler: str, observer: str) -> str:
    return "c_{}_{}".format(handler, observer.replace("+", "_").replace("-", "_").rstrip("%"))


def measure_drain(dsn: str, rounds: int, handlers: list[str]) -> dict[str, object]:
    rates: dict[str, dict[str, list[float]]] = {h: {o: [] for o in OBSERVERS} for h in handlers}
    cpu: dict[str, dict[str, list[float]]] = {h: {o: [] for o in OBSERVERS} for h in handlers}
    for round_no in range(rounds):
        for handler in handlers:
            # One backlog behind a consumer per observer: they drain the same events,
            # one after the other, whoever goes first rotating so that none always
            # drains a warmer server.
            build_backlog(dsn, *(_consumer_name(handler, o) for o in OBSERVERS))
            order = list(OBSERVERS)[round_no % len(OBSERVERS):] + \
                list(OBSERVERS)[:round_no % len(OBSERVERS)]
            for observer in order:
                rate, cpu_us = drain(dsn, handler, observer)
                rates[handler][observer].append(rate)
                cpu[handler][observer].append(cpu_us)
                print(f"round {round_no + 1} {handler:12s} {observer:8s} {rate:>10,.0f} "
                      f"events/s {cpu_us:6.2f} µs CPU/event")
    return {handler: _summary(rates[handler], cpu[handler]) for handler in handlers}


def _summary(rates: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, object]:
    others = [o for o in rates if o != "off"]
    return {
        "events_per_second_median": {o: round(statistics.median(r)) for o, r in rates.items()},
        "events_per_second_rounds": {o: [round(x) for x in r] for o, r in rates.items()},
        "slowdown_vs_off_median": {
            o: round(1 - statistics.median(
                x / base for x, base in zip(rates[o], rates["off"], strict=True)), 3)
            for o in others},
        "cpu_us_per_event_median": {o: round(statistics.median(c), 2) for o, c in cpu.items()},
        "cpu_added_vs_off_median": {
            o: round(statistics.median(
                x / base - 1 for x, base in zip(cpu[o], cpu["off"], strict=True)), 3)
            for o in others},
    }


def build_queues(dsn: str) -> None:
    """1,000 queues, each with a consumer, a few events and a tick."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # 50 queues per transaction: each creates tables, and one transaction's locks
        # on all of them would exceed max_locks_per_transaction.
        for first in range(1, STATUS_QUEUES + 1, 50):
            conn.execute(f"""
                DO $$
                BEGIN
                  FOR i IN {first}..{min(first + 49, STATUS_QUEUES)} LOOP
                    PERFORM pgque.create_queue('s' || i);
                    PERFORM pgque.subscribe('s' || i, 'c');
                    PERFORM pgque.send('s' || i, 'x', '{{}}'::jsonb);
                  END LOOP;
                END $$""")
        conn.execute("select pgque.ticker()")


def measure_status(dsn: str, runs: int) -> dict[str, object]:
    build_queues(dsn)
    engine = create_engine(url_from_conninfo(dsn))
    try:
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            with engine.begin() as conn:
                queues, consumers = admin.queues(conn), admin.consumers(conn)
            seconds.append(time.perf_counter() - started)
            assert len(queues) >= STATUS_QUEUES and len(consumers) >= STATUS_QUEUES
        print(f"status on {len(queues)} queues: median {statistics.median(seconds):.3f} s")
        return {"queues": len(queues), "consumers": len(consumers),
                "seconds_median": round(statistics.median(seconds), 4),
                "seconds_runs": [round(s, 4) for s in seconds], "target_seconds": 1.0}
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--status-runs", type=int, default=5)
    parser.add_argument("--handler", choices=HANDLERS, action="append")
    parser.add_argument("--only", choices=["drain", "status"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    result: dict[str, object] = {}
    with scratch_database(args.dsn, "observe",
                          setup=f"select pgque.create_queue('{QUEUE}')") as dsn:
        with psycopg.connect(dsn) as conn:
            server = conn.info.server_version
        if args.only != "status":
            result["drain"] = {
                "events": TOTAL, "rounds": args.rounds, "target_slowdown_at_most": 0.10,
                **measure_drain(dsn, args.rounds, args.handler or list(HANDLERS)),
            }
        if args.only != "drain":
            result["status"] = measure_status(dsn, args.status_runs)
    result = {**run_facts("observability: drain with and without metrics; status on "
                          f"{STATUS_QUEUES} queues", server), **result}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("drain", "status")}, indent=2))


if __name__ == "__main__":
    main()
