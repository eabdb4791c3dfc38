"""Fault injection for worker processes, and the counts that must add up afterwards.

A run sets up one queue with the consumers of a *kind* (``single``: one consumer;
``coop``: a cooperative group run as ``--concurrency 3`` members; ``fanout``: two
consumers of the same events), starts ``python -m sqlalchemy_pgque.worker --ticker``
processes, and sends events with a :class:`Producer` through ``Queue.send`` in a
Session, one per transaction, each with a row in ``produced`` written in the same
transaction (the transactional outbox: the row exists exactly when the event does).
Faults are real: SIGKILL of the worker, ``pg_terminate_backend`` storms, server
restarts, SIGTERM. Afterwards :func:`tally` compares, per consumer, the rows the
handlers committed with the events that exist: every event handled exactly once.

``tests/processes/test_faults.py`` runs short versions in the suite; ``bench/bench_faults.py``
runs long ones and writes their figures.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from engine_helpers import wait_until
from sqlalchemy import URL, create_engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sqlalchemy_pgque import Queue, schema
from sqlalchemy_pgque.errors import _is_transient

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent

QUEUE = "q"
PRODUCER_APP = "faultkit producer"


@dataclass(frozen=True)
class Kind:
    """The consumers a run starts, and the names their handlers record."""

    target: str
    consumers: tuple[str, ...]
    worker_args: tuple[str, ...] = ()


KINDS = {
    "single": Kind("fault_app:single", ("c",)),
    "coop": Kind("fault_app:coop", ("group",), ("--concurrency", "3")),
    "fanout": Kind("fault_app:fanout", ("c1", "c2")),
}

_SETUP = """
CREATE TABLE produced (k bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE handled (
    msg_id bigint NOT NULL,
    consumer text NOT NULL,
    k bigint,
    member text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ON handled (consumer, k);
"""


def prepare(dsn: str, kind: Kind) -> None:
    """Create the queue, the subscriptions of ``kind`` and the bookkeeping tables."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_SETUP)
        conn.execute("SELECT pgque.create_queue(%s)", (QUEUE,))
        for consumer in kind.consumers:
            if kind.worker_args:
                # The group exists before the first event; members join at run time.
                conn.execute("SELECT pgque.subscribe_subconsumer(%s, %s, 'w-1')",
                             (QUEUE, consumer))
            else:
                conn.execute("SELECT pgque.subscribe(%s, %s)", (QUEUE, consumer))


class WorkerProcess:
    """One ``python -m sqlalchemy_pgque.worker`` process with its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path,
                 prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: a command the worker runs under (``ip netns exec NAME``)."""
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "sqlalchemy_pgque.worker", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=_ROOT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


def worker_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(_TESTS), str(_ROOT)])
    env.update(overrides)
    return env


@dataclass
class Workers:
    """Starts worker processes of one kind against one database."""

    url: URL
    kind: Kind
    log_dir: Path
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=worker_env)
    prefix: tuple[str, ...] = ()
    started: list[WorkerProcess] = field(default_factory=list)

    def start(self, *extra: str) -> WorkerProcess:
        args = [self.kind.target, "--url", self.url.render_as_string(hide_password=False),
                "--ticker", *self.kind.worker_args, *self.extra_args, *extra]
        worker = WorkerProcess(args, self.env, self.log_dir / f"worker{len(self.started)}.log",
                               self.prefix)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()

    def tracebacks(self) -> list[str]:
        """Logs of the started workers that show a traceback (there should be none)."""
        return [w.output() for w in self.started if "Traceback" in w.output()]


class Producer(threading.Thread):
    """Sends ``total`` events (payload ``{"k": n}``), one per transaction, at ``rate``
    per second at most, retrying each until it is known to have committed.

    A failed commit may still have committed (the connection died after the server
    committed): the ``produced`` row, written in the same transaction, tells, so an
    event is never sent twice. ``confirmed`` holds the keys whose commit returned,
    ``found`` those whose commit failed but turned out to have committed.
    """

    def __init__(self, url: URL, total: int, rate: float | None = None, first: int = 0) -> None:
        super().__init__(name="producer", daemon=True)
        self.url = url
        self.keys = range(first, first + total)
        self.rate = rate
        self.confirmed: set[int] = set()
        self.found: set[int] = set()
        self.retries = 0
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._halt = threading.Event()
        self._finish = threading.Event()

    @property
    def found_after_failure(self) -> int:
        return len(self.found)

    def stop(self) -> None:
        """Stop at once, even in the middle of retrying an event."""
        self._halt.set()

    def finish(self) -> None:
        """Stop once the event in progress is known to have committed: every key sent
        is then in ``confirmed`` or ``found``."""
        self._finish.set()

    def run(self) -> None:
        engine = create_engine(self.url, connect_args={"application_name": PRODUCER_APP})
        queue = Queue(QUEUE)
        started = self.started_at = time.monotonic()
        try:
            for n, k in enumerate(self.keys):
                if self._halt.is_set() or self._finish.is_set():
                    return
                if self.rate:
                    pause = started + n / self.rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                self._send(engine, queue, k)
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            engine.dispose()

    def _send(self, engine: Any, queue: Queue, k: int) -> None:
        delay = 0.01
        while not self._halt.is_set():
            try:
                with Session(engine) as session, session.begin():
                    session.execute(text("INSERT INTO produced (k) VALUES (:k)"), {"k": k})
                    queue.send(session, {"k": k})
                self.confirmed.add(k)
                return
            except IntegrityError:
                # ``produced`` has k: an earlier attempt committed after all, though its
                # client saw the connection fail (and could not check at the time).
                self.found.add(k)
                return
            except Exception as exc:
                if not _is_transient(exc):
                    raise
            if self._committed(engine, k):
                self.found.add(k)
                return
            self.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    @staticmethod
    def _committed(engine: Any, k: int) -> bool:
        try:
            with engine.connect() as conn:
                return conn.execute(text("SELECT 1 FROM produced WHERE k = :k"),
                                    {"k": k}).first() is not None
        except Exception:
            return False  # unknown yet: the retry finds out


class Storm(threading.Thread):
    """Terminates the worker's backends (and the producer's) every 50-300 ms."""

    def __init__(self, dsn: str, duration: float, interval: tuple[float, float] = (0.05, 0.3)):
        super().__init__(name="storm", daemon=True)
        self.dsn = dsn
        self.duration = duration
        self.interval = interval
        self.terminated = 0
        self.rounds = 0
        self.ended_at: float | None = None

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            until = time.monotonic() + self.duration
            while time.monotonic() < until:
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND (application_name LIKE 'sqlalchemy_pgque %%' "
                    "OR application_name = %s)", (PRODUCER_APP,),
                ).fetchone()
                self.terminated += int(row[0]) if row else 0
                self.rounds += 1
                time.sleep(random.uniform(*self.interval))
        self.ended_at = time.monotonic()


@dataclass
class Tally:
    """What the handlers committed, compared with the events that exist."""

    events: int
    confirmed: int
    lost: dict[str, int]
    duplicated: dict[str, int]
    unknown: dict[str, int]
    """Rows for events that do not exist (never expected)."""

    @property
    def exact(self) -> bool:
        return not any(self.lost.values()) and not any(self.duplicated.values()) \
            and not any(self.unknown.values())


def tally(dsn: str, consumers: tuple[str, ...], confirmed: set[int]) -> Tally:
    with psycopg.connect(dsn, autocommit=True) as conn:
        produced = {int(r[0]) for r in conn.execute("SELECT k FROM produced")}
        lost, duplicated, unknown = {}, {}, {}
        for consumer in consumers:
            rows = conn.execute(
                "SELECT k, count(*) FROM handled WHERE consumer = %s GROUP BY k", (consumer,),
            ).fetchall()
            handled = {int(k): int(n) for k, n in rows}
            lost[consumer] = len(produced - handled.keys())
            duplicated[consumer] = sum(n - 1 for n in handled.values())
            unknown[consumer] = len(handled.keys() - produced)
    missing_confirmed = confirmed - produced
    assert not missing_confirmed, f"commits that returned but are not in the database: " \
        f"{sorted(missing_confirmed)[:10]}"
    return Tally(len(produced), len(confirmed), lost, duplicated, unknown)


def handled_count(dsn: str, consumers: tuple[str, ...]) -> int:
    """Rows committed by the handlers of the consumer that is furthest behind."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return min(_counts(conn, consumers).values())


def produced_count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM produced").fetchone()
    return int(row[0]) if row else 0


def wait_drained(dsn: str, consumers: tuple[str, ...], timeout: float) -> None:
    """Wait until every consumer has handled every event (or fail with the counts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            expected = produced_count(dsn)
            done = handled_count(dsn, consumers)
        except psycopg.OperationalError:
            expected, done = -1, -2
        if done >= expected >= 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained after {timeout} s: {done} of {expected} handled")
        time.sleep(0.05)


_marker_keys = iter(range(-1, -1_000_000, -1))


def measure_recovery(dsn: str, consumers: tuple[str, ...], since: float,
                     timeout: float = 60) -> tuple[float, float]:
    """Seconds from ``since`` (a fault's end) until every consumer handled its next
    event, and until every consumer handled an event sent now (after the backlog that
    built up during the fault): ``(resumed, caught_up)``.

    The event sent now also guarantees that there is a next event to handle.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = _counts(conn, consumers)
    k = next(_marker_keys)
    _send_marker(dsn, k, timeout)
    resumed: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            now = time.monotonic()
            for consumer, n in _counts(conn, consumers).items():
                if n > before[consumer]:
                    resumed.setdefault(consumer, now)
            row = conn.execute("SELECT count(DISTINCT consumer) FROM handled WHERE k = %s",
                               (k,)).fetchone()
            if row is not None and row[0] == len(consumers):
                # A consumer whose next event was the marker itself may have committed
                # it between the two reads above.
                for consumer in consumers:
                    resumed.setdefault(consumer, now)
                return max(resumed.values()) - since, now - since
            if now > deadline:
                raise AssertionError(f"marker {k} not handled within {timeout} s")
            time.sleep(0.005)


def _counts(conn: psycopg.Connection[Any], consumers: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(consumers, 0)
    for consumer, n in conn.execute(
        "SELECT consumer, count(*) FROM handled GROUP BY consumer"
    ).fetchall():
        counts[str(consumer)] = int(n)
    return counts


def _send_marker(dsn: str, k: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, autocommit=False, connect_timeout=5) as conn:
                conn.execute("INSERT INTO produced (k) VALUES (%s)", (k,))
                conn.execute(
                    "SELECT pgque.send(%s, 'marker', %s::jsonb), "
                    "pg_notify('sqlalchemy_pgque_wake', %s)", (QUEUE, f'{{"k": {k}}}', QUEUE),
                )
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextmanager
def producing(producer: Producer) -> Iterator[Producer]:
    producer.start()
    try:
        yield producer
    finally:
        producer.stop()
        producer.join(60)


# -- the cases ---------------------------------------------------------------------


@dataclass
class Figures:
    """What one case measured; written by the bench, asserted by the tests."""

    case: str
    kind: str
    events: int = 0
    lost: int = 0
    duplicated: int = 0
    faults: int = 0
    worker_exits: int = 0
    recovery_s: list[float] = field(default_factory=list)
    """Per fault: seconds from its end (the server accepting connections again) until
    every consumer handled its next event."""
    catch_up_s: list[float] = field(default_factory=list)
    """Per fault: seconds from its end until an event sent then was handled, after the
    backlog the fault left."""
    extra: dict[str, Any] = field(default_factory=dict)

    def add_tally(self, result: Tally) -> None:
        self.events = result.events
        self.lost = sum(result.lost.values()) + sum(result.unknown.values())
        self.duplicated = sum(result.duplicated.values())


def sigkill_case(dsn: str, url: URL, kind_name: str, log_dir: Path, *, events: int,
                 kills: int, rate: float, interval: tuple[float, float] = (0.4, 0.9),
                 handler_delay: float = 0.001, drain_timeout: float = 120) -> Figures:
    """SIGKILL the worker at random moments while events flow, restarting it each time."""
    kind = KINDS[kind_name]
    prepare(dsn, kind)
    workers = Workers(url, kind, log_dir, env=worker_env(FAULT_HANDLER_DELAY=str(handler_delay)))
    figures = Figures("sigkill", kind_name, faults=kills)
    try:
        worker = workers.start()
        with producing(Producer(url, events, rate)) as producer:
            for _ in range(kills):
                time.sleep(random.uniform(*interval))
                assert worker.process.poll() is None, worker.output()
                worker.kill()
                worker = workers.start()
            producer.join(drain_timeout)
        _finish(figures, dsn, kind, workers, producer, drain_timeout)
    finally:
        workers.kill_all()
    return figures


def storm_case(dsn: str, url: URL, kind_name: str, log_dir: Path, *, events: int,
               duration: float, rate: float, handler_delay: float = 0.001,
               drain_timeout: float = 120) -> Figures:
    """Terminate the worker's backends for ``duration`` s while events flow; the worker
    is never restarted. Measures the time from the storm's end to the next handled event."""
    kind = KINDS[kind_name]
    prepare(dsn, kind)
    workers = Workers(url, kind, log_dir, env=worker_env(FAULT_HANDLER_DELAY=str(handler_delay)))
    figures = Figures("storm", kind_name)
    try:
        workers.start()
        wait_for_worker(dsn, kind)
        with producing(Producer(url, events, rate)) as producer:
            storm = Storm(dsn, duration)
            storm.start()
            storm.join(duration + 30)
            assert storm.ended_at is not None
            figures.faults = storm.terminated
            figures.extra["storm_rounds"] = storm.rounds
            resumed, caught_up = measure_recovery(dsn, kind.consumers, storm.ended_at)
            figures.recovery_s.append(resumed)
            figures.catch_up_s.append(caught_up)
            producer.join(drain_timeout)
        _finish(figures, dsn, kind, workers, producer, drain_timeout)
    finally:
        workers.kill_all()
    return figures


def restart_case(cluster: Any, dsn: str, url: URL, kind_name: str, log_dir: Path, *,
                 events: int, rate: float, mode: str, restarts: int = 1,
                 handler_delay: float = 0.001, drain_timeout: float = 120) -> Figures:
    """Restart the server (``pg_ctl restart -m mode``) while events are produced and
    consumed; the worker must recover by itself. Recovery is measured from the moment
    the server accepts connections again."""
    kind = KINDS[kind_name]
    prepare(dsn, kind)
    workers = Workers(url, kind, log_dir, env=worker_env(FAULT_HANDLER_DELAY=str(handler_delay)))
    figures = Figures(f"restart-{mode}", kind_name, faults=restarts)
    try:
        workers.start()
        wait_for_worker(dsn, kind)
        with producing(Producer(url, events, rate)) as producer:
            for _ in range(restarts):
                wait_for_progress(dsn, kind.consumers)
                cluster.restart(mode)
                up = cluster.wait_ready()
                resumed, caught_up = measure_recovery(dsn, kind.consumers, up)
                figures.recovery_s.append(resumed)
                figures.catch_up_s.append(caught_up)
            producer.join(drain_timeout)
        _finish(figures, dsn, kind, workers, producer, drain_timeout)
    finally:
        workers.kill_all()
    return figures


def _finish(figures: Figures, dsn: str, kind: Kind, workers: Workers, producer: Producer,
            drain_timeout: float) -> None:
    """After the faults: drain, count, and stop the last worker with SIGTERM."""
    assert producer.error is None, producer.error
    figures.extra["producer_retries"] = producer.retries
    figures.extra["commits_found_after_failure"] = producer.found_after_failure
    wait_drained(dsn, kind.consumers, drain_timeout)
    figures.add_tally(tally(dsn, kind.consumers, producer.confirmed))
    worker = workers.started[-1]
    figures.worker_exits = 0 if worker.process.poll() is None else 1
    worker.signal(signal.SIGTERM)
    figures.extra["exit_code"] = worker.wait()
    figures.extra["tracebacks"] = len(workers.tracebacks())


def wait_for_worker(dsn: str, kind: Kind, timeout: float = 30) -> None:
    """Until the worker listens on the queue's channel and its ticker holds the lock."""
    listening = len(kind.consumers) * (3 if kind.worker_args else 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        def started() -> bool:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE query = %s), "
                "count(*) FILTER (WHERE application_name LIKE 'sqlalchemy_pgque ticker %%') "
                "FROM pg_stat_activity WHERE datname = current_database()",
                (f'LISTEN "pgque_{QUEUE}"',),
            ).fetchone()
            return row is not None and row[0] >= listening and row[1] >= 1

        wait_until(started, timeout, "the worker to listen and tick")


def wait_for_progress(dsn: str, consumers: tuple[str, ...], timeout: float = 30) -> None:
    """Until the handlers commit some rows beyond those committed now."""
    before = handled_count(dsn, consumers)
    wait_until(lambda: handled_count(dsn, consumers) > before, timeout, "handlers' progress")


def sigterm_case(dsn: str, url: URL, log_dir: Path, *, batch_size: int, handler_delay: float,
                 shutdown_timeout: float | None, signals: int = 1) -> Figures:
    """SIGTERM (``signals`` times, 0.3 s apart) a worker in the middle of one batch of
    ``batch_size`` events; then restart it and count."""
    kind = KINDS["single"]
    prepare(dsn, kind)
    extra = () if shutdown_timeout is None else ("--shutdown-timeout", str(shutdown_timeout))
    workers = Workers(url, kind, log_dir, extra_args=extra,
                      env=worker_env(FAULT_HANDLER_DELAY=str(handler_delay)))
    figures = Figures("sigterm" if shutdown_timeout is None else
                      f"sigterm-timeout-{shutdown_timeout:g}s", "single", faults=signals)
    figures.extra["batch_size"] = batch_size
    try:
        worker = workers.start()
        wait_for_worker(dsn, kind)
        keys = list(range(batch_size))
        send_one_batch(dsn, keys)
        wait_for_batch_in_progress(dsn)
        signalled = time.monotonic()
        for n in range(signals):
            if n:
                time.sleep(0.3)
            worker.signal(signal.SIGTERM)
        figures.extra["exit_code"] = worker.wait(timeout=120)
        figures.extra["exit_s"] = round(time.monotonic() - signalled, 3)
        figures.extra["committed_at_exit"] = handled_count(dsn, kind.consumers)
        output = worker.output()
        figures.extra["logged_redelivery"] = f"its {batch_size} messages will be redelivered" \
            in output
        figures.extra["tracebacks"] = int("Traceback" in output)
        workers.start()
        wait_drained(dsn, kind.consumers, 120)
        figures.add_tally(tally(dsn, kind.consumers, set(keys)))
    finally:
        workers.kill_all()
    return figures


def send_one_batch(dsn: str, keys: list[int]) -> None:
    """Send one event per key in one transaction, so they are delivered as one batch."""
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("INSERT INTO produced (k) SELECT unnest(%s::bigint[])", (keys,))
        conn.execute(
            "SELECT pgque.send_batch(%s, 'default', %s::jsonb[]), "
            "pg_notify('sqlalchemy_pgque_wake', %s)",
            (QUEUE, [f'{{"k": {k}}}' for k in keys], QUEUE),
        )


def create_database(cluster: Any, name: str) -> tuple[str, URL]:
    """A database on ``cluster`` with the engine installed: its dsn and URL."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(cluster.url(name))
    try:
        with engine.begin() as conn:
            schema.install(conn)
    finally:
        engine.dispose()
    return cluster.dsn(name), cluster.url(name)


def wait_for_batch_in_progress(dsn: str, timeout: float = 30) -> None:
    """Until a handler has written in an open batch transaction (its INSERT holds a
    lock on ``handled`` until the batch commits or rolls back)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        def in_progress() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.relation = 'handled'::regclass "
                "AND a.application_name LIKE 'sqlalchemy_pgque worker %'"
            ).fetchone()
            return row is not None and bool(row[0])

        wait_until(in_progress, timeout, "a batch in progress")
