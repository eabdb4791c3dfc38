"""Producers, a ticker and consumers running at once: every consumer sees every event once.

Real threads on separate connections: 4 producers commit small transactions of sends
while a ticker thread loops over ``pgque.ticker()`` and 2 subscribed consumers each
receive and ack one batch per transaction. The check compares exact ids: the event ids
the producers got back from ``send`` and the payload ids they put in, against what each
consumer received — no duplicates, nothing missing, nothing extra.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from conftest import Database
from engine_helpers import Conn

QUEUE = "concurrency_q"
CONSUMERS = ("consumer_a", "consumer_b")
PRODUCERS = 4
EVENTS_PER_PRODUCER = 5_000
SENDS_PER_TRANSACTION = 10
DEADLINE_SECONDS = 90


@dataclass
class Received:
    """What one consumer got: every (event id, payload id, batch id) in arrival order."""

    name: str
    events: list[tuple[int, str, int]] = field(default_factory=list)
    batches: int = 0


def test_every_consumer_receives_every_event_exactly_once(db: Database, conn: Conn) -> None:
    conn.execute("select pgque.create_queue(%s)", (QUEUE,))
    # A short lag keeps the tail of the run (fewer than ticker_max_count pending) quick.
    conn.execute("select pgque.set_queue_config(%s, 'ticker_max_lag', '200 milliseconds')",
                 (QUEUE,))
    for name in CONSUMERS:
        conn.execute("select pgque.subscribe(%s, %s)", (QUEUE, name))

    deadline = time.monotonic() + DEADLINE_SECONDS
    failures: list[BaseException] = []
    abort = threading.Event()
    ticker_stop = threading.Event()
    start = threading.Barrier(PRODUCERS + len(CONSUMERS) + 1)
    sent: list[dict[int, str]] = [{} for _ in range(PRODUCERS)]
    received = [Received(name) for name in CONSUMERS]
    expected_total = PRODUCERS * EVENTS_PER_PRODUCER

    def produce(producer: int) -> None:
        ids = sent[producer]
        with psycopg.connect(db.dsn) as pconn:
            start.wait(timeout=30)
            for first in range(0, EVENTS_PER_PRODUCER, SENDS_PER_TRANSACTION):
                if abort.is_set() or time.monotonic() > deadline:
                    return
                with pconn.transaction():
                    for seq in range(first, first + SENDS_PER_TRANSACTION):
                        payload_id = f"{producer}-{seq}"
                        row = pconn.execute(
                            "select pgque.send(%s, %s::jsonb)",
                            (QUEUE, json.dumps({"pid": payload_id, "producer": producer,
                                                "seq": seq})),
                        ).fetchone()
                        assert row is not None and row[0] is not None
                        ids[int(row[0])] = payload_id

    def ticker_loop() -> None:
        with psycopg.connect(db.dsn, autocommit=True) as tconn:
            start.wait(timeout=30)
            while not (ticker_stop.is_set() or abort.is_set()) and time.monotonic() < deadline:
                tconn.execute("select pgque.ticker()")
                ticker_stop.wait(0.02)

    def consume(into: Received) -> None:
        with psycopg.connect(db.dsn) as cconn:
            start.wait(timeout=30)
            while len(into.events) < expected_total:
                if abort.is_set() or time.monotonic() > deadline:
                    return
                with cconn.transaction():
                    rows = cconn.execute(
                        "select * from pgque.receive(%s, %s, %s)",
                        (QUEUE, into.name, 2_147_483_647)).fetchall()
                    if rows:
                        batch_ids = {r[1] for r in rows}
                        assert len(batch_ids) == 1, f"one batch per receive, got {batch_ids}"
                        (batch_id,) = batch_ids
                        into.events += [(r[0], json.loads(r[3])["pid"], r[1]) for r in rows]
                        acked = cconn.execute("select pgque.ack(%s)", (batch_id,)).fetchone()
                        assert acked == (1,), f"ack of open batch {batch_id} returned {acked}"
                        into.batches += 1
                if not rows:
                    # Nothing ticked yet: give the ticker a moment instead of spinning.
                    abort.wait(0.01)

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        """Record a thread's exception for the test and tell the other threads to stop."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:
                failures.append(exc)
                abort.set()
                start.abort()

        return run

    threads = [threading.Thread(target=guarded(lambda p=p: produce(p)),
                                name=f"producer-{p}") for p in range(PRODUCERS)]
    threads += [threading.Thread(target=guarded(lambda r=r: consume(r)),
                                 name=f"consumer-{r.name}") for r in received]
    ticker = threading.Thread(target=guarded(ticker_loop), name="ticker")
    for thread in (*threads, ticker):
        thread.daemon = True
        thread.start()
    try:
        for thread in threads[:PRODUCERS]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for thread in threads[PRODUCERS:]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        ticker_stop.set()
        abort.set()
        ticker.join(timeout=10)
        for thread in threads:
            thread.join(timeout=10)

    assert not failures, failures
    assert not any(t.is_alive() for t in (*threads, ticker)), "threads must stop by themselves"

    sent_ids = {event_id: pid for ids in sent for event_id, pid in ids.items()}
    assert len(sent_ids) == expected_total, "send must return a distinct id for every event"
    expected_pids = {f"{p}-{s}" for p in range(PRODUCERS) for s in range(EVENTS_PER_PRODUCER)}
    assert set(sent_ids.values()) == expected_pids

    for got in received:
        event_ids = [event_id for event_id, _, _ in got.events]
        duplicates = len(event_ids) - len(set(event_ids))
        assert duplicates == 0, f"{got.name} received {duplicates} events twice"
        missing = set(sent_ids) - set(event_ids)
        extra = set(event_ids) - set(sent_ids)
        assert not missing, f"{got.name} never received {len(missing)} events, e.g. " \
                            f"{sorted(missing)[:5]}"
        assert not extra, f"{got.name} received unknown events {sorted(extra)[:5]}"
        pids = [pid for _, pid, _ in got.events]
        assert len(set(pids)) == len(pids) and set(pids) == expected_pids
        assert all(sent_ids[event_id] == pid for event_id, pid, _ in got.events), \
            "each event id carries the payload its producer sent with it"
        assert got.batches > 1, "the run should span several batches"
        # Within one batch, rows come in ev_id order.
        by_batch: dict[int, list[int]] = {}
        for event_id, _, batch_id in got.events:
            by_batch.setdefault(batch_id, []).append(event_id)
        assert all(ids == sorted(ids) for ids in by_batch.values())

    # Nothing further is pending for either consumer once everything was acked.
    conn.execute("select pgque.force_next_tick(%s)", (QUEUE,))
    conn.execute("select pgque.ticker(%s)", (QUEUE,))
    for name in CONSUMERS:
        assert conn.execute("select * from pgque.receive(%s, %s, 100)",
                            (QUEUE, name)).fetchall() == []
