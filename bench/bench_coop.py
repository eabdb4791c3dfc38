"""Drain rate of a cooperative consumer group with 1, 2 and 4 members.

    .venv/bin/python bench/bench_coop.py                          # embedded PostgreSQL 18
    .venv/bin/python bench/bench_coop.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/coop-pg15.json                      # a running server
    .venv/bin/python bench/bench_coop.py --time-lock               # wait for the group row

Creates a scratch database (dropped afterwards), installs the bundled engine, and for
each variant subscribes a fresh cooperative group (``pgque.subscribe_subconsumer`` for
each member), puts a backlog of 1,200 events of ~80 bytes behind it ticked as 60
batches of 20, then runs one ``Consumer(..., subconsumer=f"m{i}")`` per member, each
in its own thread of this process (as the worker's ``--concurrency N`` does). The
shared ``(msg)`` handler sleeps 5 ms, standing in for I/O-bound work such as an HTTP
call, so one member can drain at most 200 events/s and N members N times that. The
time runs from starting the threads until the handler has seen the last event; then
every member is stopped. Every event must be seen exactly once, or the run fails.

Variants ``1``, ``2`` and ``4`` members alternate per round (default 5; the median is
reported), so that background load on a shared machine hits them alike. Reported: the
events/s of each, the scaling factors 1->2 and 1->4 (ideal 2.0 and 4.0; the median of
the per-round ratios), how much of the members' time went into the handler (the rest
is receive, ack, commits and waiting for the group's row, which every allocation
locks), and when the last member to start got its first message (each member opens
two connections before it can receive, which counts against the drain time).

``--time-lock`` locks the group's main row with a separate statement before each
allocation and reports the mean time of that statement: with one member it is a round
trip, with more the difference is the wait for the other members' allocations, which
hold the row until their receiving transaction commits. The extra statement makes each
allocation longer, so it is off for the reported numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from _common import payload, run_facts, scratch_database
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from sqlalchemy_pgque import Consumer, Message
from sqlalchemy_pgque._listen import url_from_conninfo

QUEUE = "bench_coop"
BATCHES = 60
BATCH_SIZE = 20
TOTAL = BATCHES * BATCH_SIZE
HANDLER_SECONDS = 0.005
MEMBERS = (1, 2, 4)
TIMEOUT = 120.0
RESULTS = Path(__file__).resolve().parent / "results" / "coop.json"


def build_backlog(dsn: str, group: str, members: int) -> None:
    """Subscribe a new group of ``members`` and put the ticked batches behind it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(members):
            conn.execute("select pgque.subscribe_subconsumer(%s, %s, %s)",
                         (QUEUE, group, f"m{i}"))
        for batch in range(BATCHES):
            start = batch * BATCH_SIZE
            conn.execute("select pgque.send_batch(%s, %s, %b::jsonb[])",
                         (QUEUE, "order.created",
                          [json.dumps(payload(n)) for n in range(start, start + BATCH_SIZE)]))
            conn.execute("select pgque.force_next_tick(%s)", (QUEUE,))
            conn.execute("select pgque.ticker(%s)", (QUEUE,))


def drop_group(dsn: str, group: str, members: int) -> None:
    """Remove the group so later backlogs are not kept for it.

    ``batch_handling = 0``: a member still holding a batch after a complete drain
    would be a bug, and unregistering it then raises.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(members):
            conn.execute("select pgque.unsubscribe_subconsumer(%s, %s, %s, 0)",
                         (QUEUE, group, f"m{i}"))
        conn.execute("select pgque.unsubscribe(%s, %s)", (QUEUE, group))


@dataclass
class Tally:
    """What the members' handlers saw, shared by their threads."""

    consumers: list[Consumer]
    started: float = 0.0
    finished: float | None = None
    seen: set[int] = field(default_factory=set)
    duplicates: list[int] = field(default_factory=list)
    per_member: Counter[str] = field(default_factory=Counter)
    first_call: dict[str, float] = field(default_factory=dict)
    handler_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    def stop_all(self) -> None:
        for consumer in self.consumers:
            consumer.stop()
        self.done.set()

    def run(self, consumer: Consumer) -> None:
        """A member's thread: a member that dies must not leave the others draining alone."""
        try:
            consumer.run(install_signal_handlers=False)
        except BaseException as exc:
            self.errors.append(exc)
            self.stop_all()
            raise

    def saw(self, member: str, msg_id: int, spent: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.first_call.setdefault(member, now - spent)
            if msg_id in self.seen:
                self.duplicates.append(msg_id)
            self.seen.add(msg_id)
            self.per_member[member] += 1
            self.handler_seconds += spent
            done = len(self.seen) == TOTAL and self.finished is None
            if done:
                self.finished = now
        if done:
            self.stop_all()


_LOCK_GROUP_ROW = text(
    "SELECT 1 FROM pgque.subscription s"
    " JOIN pgque.consumer c ON c.co_id = s.sub_consumer"
    " JOIN pgque.queue q ON q.queue_id = s.sub_queue"
    " WHERE q.queue_name = :queue AND c.co_name = :consumer FOR UPDATE OF s"
)


class LockTimedConsumer(Consumer):
    """Takes the group's main row with a statement of its own before each allocation.

    ``receive_coop`` locks that row first thing and keeps it until the receiving
    transaction commits; locking it one statement earlier, in the same transaction and
    order, moves the whole wait for it into a statement that can be timed alone.
    """

    lock_seconds: list[float]

    def _receive(self, session: Session) -> list[Message]:
        began = time.perf_counter()
        session.execute(_LOCK_GROUP_ROW, {"queue": self.queue.name, "consumer": self.name})
        self.lock_seconds.append(time.perf_counter() - began)
        return super()._receive(session)


@dataclass
class Drain:
    rate: float
    handler_busy: float
    per_member: dict[str, int]
    last_start: float
    lock_statement: float | None = None


def handler(tally: Tally, member: str) -> Callable[[Message], None]:
    """A ``(msg)`` handler for one member (a second parameter would be the session)."""

    def handle(msg: Message) -> None:
        began = time.perf_counter()
        time.sleep(HANDLER_SECONDS)
        tally.saw(member, msg.msg_id, time.perf_counter() - began)

    return handle


def drain(dsn: str, members: int, group: str, time_lock: bool) -> Drain:
    build_backlog(dsn, group, members)
    engine = create_engine(url_from_conninfo(dsn), pool_size=members + 1)
    try:
        kind = LockTimedConsumer if time_lock else Consumer
        consumers = [
            kind(engine, queue=QUEUE, name=group, subconsumer=f"m{i}",
                 poll_interval=0.05, dead_interval=None)
            for i in range(members)
        ]
        lock_seconds: list[float] = []
        for consumer in consumers:
            if isinstance(consumer, LockTimedConsumer):
                consumer.lock_seconds = lock_seconds
        tally = Tally(consumers)
        for consumer in consumers:
            consumer.on("*")(handler(tally, consumer.subconsumer or ""))

        threads = [
            threading.Thread(target=tally.run, args=(c,), name=f"coop-{c.subconsumer}")
            for c in consumers
        ]
        tally.started = time.perf_counter()
        for thread in threads:
            thread.start()
        # A lost or duplicated event keeps the count short of TOTAL forever.
        timed_out = not tally.done.wait(TIMEOUT)
        tally.stop_all()
        for thread in threads:
            thread.join()
        assert not tally.errors, f"a member failed: {tally.errors[0]!r}"
        assert not tally.duplicates, f"events seen twice: {tally.duplicates[:10]}"
        assert not timed_out, f"saw {len(tally.seen)} of {TOTAL} events in {TIMEOUT} s"
        assert len(tally.seen) == TOTAL, f"saw {len(tally.seen)} of {TOTAL} events"
        assert tally.finished is not None
        elapsed = tally.finished - tally.started
        result = Drain(rate=TOTAL / elapsed,
                       handler_busy=tally.handler_seconds / (members * elapsed),
                       per_member=dict(sorted(tally.per_member.items())),
                       last_start=max(tally.first_call.values()) - tally.started)
        if lock_seconds:
            result.lock_statement = statistics.mean(lock_seconds)
    finally:
        engine.dispose()
    drop_group(dsn, group, members)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--time-lock", action="store_true",
                        help="time the wait for the group's row before each allocation "
                             "(one more statement per batch)")
    args = parser.parse_args()
    runs: dict[int, list[Drain]] = {m: [] for m in MEMBERS}
    with scratch_database(args.dsn, "coop",
                          setup=f"select pgque.create_queue('{QUEUE}')") as dsn:
        with psycopg.connect(dsn) as conn:
            server = conn.info.server_version
        for round_no in range(args.rounds):
            # Rotate which variant goes first, so none always runs on a cold cache.
            order = MEMBERS[round_no % len(MEMBERS):] + MEMBERS[:round_no % len(MEMBERS)]
            for members in order:
                run = drain(dsn, members, f"g{members}r{round_no}", args.time_lock)
                runs[members].append(run)
                waits = (f"  group row locked in {run.lock_statement * 1000:.2f} ms"
                         if run.lock_statement is not None else "")
                print(f"round {round_no + 1} members={members} {run.rate:>7,.0f} events/s"
                      f"  handler busy {run.handler_busy:.0%}"
                      f"  last member started after {run.last_start * 1000:.0f} ms"
                      f"  per member {list(run.per_member.values())}{waits}")
    rate = {m: statistics.median(r.rate for r in runs[m]) for m in MEMBERS}
    busy = {m: statistics.median(r.handler_busy for r in runs[m]) for m in MEMBERS}
    start = {m: statistics.median(r.last_start for r in runs[m]) for m in MEMBERS}
    locked = {m: statistics.median(r.lock_statement for r in runs[m]
                                   if r.lock_statement is not None)
              for m in MEMBERS if args.time_lock}
    # Per round, so a burst of outside load spoils one ratio rather than all medians.
    factor = {m: statistics.median(runs[m][i].rate / runs[1][i].rate
                                   for i in range(args.rounds)) for m in MEMBERS[1:]}
    print(f"\n{'members':>7} {'events/s':>9} {'ideal':>6} {'vs 1':>6} {'handler busy':>13} "
          f"{'last start':>11}{'  group row lock' if locked else ''}")
    for m in MEMBERS:
        vs_one = f"{factor[m]:.2f}" if m in factor else ""
        lock = f" {locked[m] * 1000:>12.2f} ms" if locked else ""
        print(f"{m:>7} {rate[m]:>9,.0f} {m / HANDLER_SECONDS:>6,.0f} {vs_one:>6} "
              f"{busy[m]:>13.0%} {start[m] * 1000:>8.0f} ms{lock}")
    result: dict[str, Any] = {
        **run_facts(f"cooperative group drain of {BATCHES} ticked batches of {BATCH_SIZE} "
                     f"events, (msg) handler sleeping {HANDLER_SECONDS * 1000:g} ms, "
                     "one thread per member", server),
        "rounds": args.rounds,
        "time_lock": args.time_lock,
        "events_per_second_median": {str(m): round(rate[m]) for m in MEMBERS},
        "events_per_second_ideal": {str(m): round(m / HANDLER_SECONDS) for m in MEMBERS},
        "scaling_median": {f"1->{m}": round(factor[m], 2) for m in MEMBERS[1:]},
        "handler_busy_median": {str(m): round(busy[m], 3) for m in MEMBERS},
        "last_member_first_message_ms_median": {str(m): round(start[m] * 1000, 1)
                                                for m in MEMBERS},
        **({"group_row_lock_ms_median": {str(m): round(locked[m] * 1000, 2) for m in MEMBERS}}
           if locked else {}),
        "rounds_detail": {
            str(m): [{"events_per_second": round(r.rate), "handler_busy": round(r.handler_busy, 3),
                      "last_member_first_message_ms": round(r.last_start * 1000, 1),
                      "events_per_member": r.per_member,
                      **({"group_row_lock_ms_mean": round(r.lock_statement * 1000, 2)}
                         if r.lock_statement is not None else {})}
                     for r in runs[m]]
            for m in MEMBERS
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"events_per_second_median": result["events_per_second_median"],
                      "scaling_median": result["scaling_median"]}, indent=2))


if __name__ == "__main__":
    main()
