"""Soak: a million events through rotation, against a SKIP LOCKED + DELETE job table.

    .venv/bin/python bench/bench_soak.py                     # embedded PostgreSQL 18
    .venv/bin/python bench/bench_soak.py --major 15 \\
        --output-prefix bench/results/soak-pg15              # a private cluster
    .venv/bin/python bench/bench_soak.py --dsn "host=127.0.0.1 user=postgres" \\
        --output-prefix bench/results/soak-pg15-autovacuum-off   # a running server
    .venv/bin/python bench/bench_soak.py --events 100000     # a quick trial
    .venv/bin/python bench/bench_soak.py --chart-only        # redraw from the CSVs

Each system gets a fresh scratch database (on its own embedded server by default; with
``--major`` on a throwaway cluster of that major at initdb's defaults) and the same
load: ``--events`` events of ~80 bytes, sent at a steady ``--rate`` in
transactions of ``--txn-size``, each consumed by three consumers: two plain ones
(fan-out) and a cooperative group of ``--group-members``. While the producer goes from
``--hold-from`` to ``--hold-to`` of the events, another session keeps a REPEATABLE
READ transaction open on an unrelated table: an old snapshot, which holds back the
horizon VACUUM may clean up to (``--holder xid``: a transaction that also wrote, so
has a transaction id). Handlers only count.

* ``ours``: one queue with a ``--rotation-period`` rotation; one real worker process,
  ``python -m sqlalchemy_pgque.worker bench_soak:consumers --ticker --concurrency N``
  (the two plain consumers, the group as N subconsumers, and the ticker, which runs
  ``maint()`` and so rotation every 30 s). Producer: ``Queue.send_batch`` on a Session.
* ``skiplocked``: a plain ``jobs`` table, one row per event and consumer (the usual way
  to fan out with a job table: three rows per event), consumed by one worker process
  with a thread per consumer and ``--group-members`` threads for the group, each
  taking ``--skiplocked-batch`` rows at a time with ``SELECT ... ORDER BY id LIMIT n
  FOR UPDATE SKIP LOCKED`` and ``DELETE ... RETURNING`` in one statement and
  transaction, polling every 50 ms when empty. Autovacuum as the server has it (its
  settings are recorded with the figures).

Every ``--sample-interval`` seconds a row goes to ``<prefix>-<system>.csv``: events
sent and handled per consumer, dead and live tuples of the queue's tables (the event
tables; ``jobs``) from ``pg_stat_user_tables``, dead tuples of the engine's other
tables, the total size of all the system's tables, the rotation state, the oldest
snapshot's age, and the worker process's RSS and CPU time. After each rotation (ours)
or every 30 s (skiplocked) the dead tuples are also counted on the pages themselves
with ``pgstattuple``. Once every consumer has handled every event, sampling goes on
for ``--tail`` seconds. Then ``<prefix>.json`` (the figures) and ``<prefix>.png`` (the
chart; needs the ``bench`` extra, matplotlib) are written.

This module is also the worker's app: ``consumers`` below.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]  # no stubs in dev
import psycopg
from _common import payload, run_facts, scratch_database
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Consumer, Message, Queue, admin
from sqlalchemy_pgque._listen import url_from_conninfo

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_PREFIX = BENCH_DIR / "results" / "soak"
QUEUE = "soak"
CONSUMER_NAMES = ("fanout_a", "fanout_b", "group")
SYSTEMS = ("ours", "skiplocked")
EVENT_TABLE = re.compile(r"^event_\d+_\d+$")

# --- the worker's app -------------------------------------------------------------------
# Handlers count in memory; a thread writes the counts to the file named by
# SOAK_COUNTS_FILE, so that the bench can follow every consumer's progress without the
# handlers writing to the database (which would add work the comparison does not have).

_counts = dict.fromkeys(CONSUMER_NAMES, 0)
_counts_lock = threading.Lock()


def _counter(name: str) -> Callable[[Message], None]:
    def count(msg: Message) -> None:
        with _counts_lock:
            _counts[name] += 1
    return count


# A long poll_interval: the consumers wake on each tick's NOTIFY, the poll is a floor.
fanout_a = Consumer(sessionmaker(), queue=QUEUE, name="fanout_a", poll_interval=5)
fanout_b = Consumer(sessionmaker(), queue=QUEUE, name="fanout_b", poll_interval=5)
group = Consumer(sessionmaker(), queue=QUEUE, name="group", subconsumer="m",
                 poll_interval=5, dead_interval=60)
for _consumer, _name in zip((fanout_a, fanout_b, group), CONSUMER_NAMES, strict=True):
    _consumer.on("*")(_counter(_name))
consumers = [fanout_a, fanout_b, group]


def _write_counts(path: str) -> None:
    with _counts_lock:
        snapshot = dict(_counts)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(snapshot))
    os.replace(tmp, path)   # the reader never sees a half-written file


def _report_counts(path: str, stop: threading.Event | None = None) -> None:
    """Every 0.5 s until ``stop`` (or for ever, in a daemon thread); once more at exit."""
    atexit.register(_write_counts, path)
    while not (stop is not None and stop.is_set()):
        _write_counts(path)
        time.sleep(0.5)


if os.environ.get("SOAK_COUNTS_FILE") and __name__ != "__main__":
    # Imported by the worker: a side effect at import is the only hook its CLI offers.
    threading.Thread(target=_report_counts, args=(os.environ["SOAK_COUNTS_FILE"],),
                     daemon=True, name="soak-counts").start()


# --- the comparison: a job table consumed with SKIP LOCKED + DELETE ----------------------

WORKER_NAME = "soak skiplocked worker"

JOBS_DDL = """
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    consumer smallint NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- each consumer takes its own rows, oldest first
CREATE INDEX jobs_consumer_id ON jobs (consumer, id);
"""

# One row per consumer and event: consumer 1 and 2 are the fan-out, 3 the group.
JOBS_INSERT = """
INSERT INTO jobs (consumer, payload)
SELECT c, p::jsonb FROM generate_series(1, 3) AS c, unnest(%s::text[]) AS p
"""

# The rows are picked once, by an InitPlan, and the DELETE finds them by the primary key
# from that array, so no join order can make it scan the table. Two other forms were
# tried first, and in both a prepared statement's plan ran away (shared 2-core machine,
# PostgreSQL 18): DELETE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n) ran
# as a nested loop that executed the locking subquery again for each outer row (three
# DELETEs of the group still running after 800 s); a MATERIALIZED CTE joined with USING,
# once an autovacuum had found the table nearly empty, as a nested loop over the whole
# primary key with the CTE on the inner side (auto_explain: over 1 s per DELETE with
# 4,000 rows in the table, and growing with the backlog that made).
JOBS_TAKE = """
DELETE FROM jobs WHERE id = ANY(ARRAY(
    SELECT id FROM jobs WHERE consumer = %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
)) RETURNING id, payload
"""


def skiplocked_worker(dsn: str, counts_file: str, group_members: int, batch: int) -> None:
    """Run the job table's consumers until SIGTERM: a thread per consumer, as ours."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def work(consumer_id: int, name: str) -> None:
        with psycopg.connect(dsn, autocommit=True, application_name=WORKER_NAME) as conn:
            if os.environ.get("SOAK_EXPLAIN_SLOW"):
                # Diagnosis: the plan of every take slower than a second, in the log.
                conn.add_notice_handler(lambda d: print(d.message_primary, flush=True))
                conn.execute("LOAD 'auto_explain'")
                conn.execute("SET auto_explain.log_min_duration = '1s'")
                conn.execute("SET auto_explain.log_analyze = on")
                conn.execute("SET auto_explain.log_buffers = on")
                conn.execute("SET client_min_messages = log")
            while not stop.is_set():
                rows = conn.execute(JOBS_TAKE, (consumer_id, batch), prepare=True).fetchall()
                if rows:
                    with _counts_lock:
                        _counts[name] += len(rows)
                else:
                    stop.wait(0.05)

    threads = [threading.Thread(target=work, args=(1, "fanout_a")),
               threading.Thread(target=work, args=(2, "fanout_b"))]
    threads += [threading.Thread(target=work, args=(3, "group"))
                for _ in range(group_members)]
    for thread in threads:
        thread.start()
    reporter = threading.Thread(target=_report_counts, args=(counts_file, stop))
    reporter.start()
    for thread in threads:
        thread.join()
    reporter.join()
    _write_counts(counts_file)


# --- the bench ---------------------------------------------------------------------------

def payload_json(n: int) -> str:
    """The same ~80 bytes as ``_common.payload``, already encoded for the job table."""
    return json.dumps(payload(n), separators=(",", ":"))


@dataclass
class Settings:
    events: int
    rate: float
    txn_size: int
    hold_from: float
    hold_to: float
    holder: str
    rotation_period: float
    group_members: int
    skiplocked_batch: int
    sample_interval: float
    tail: float
    drain_timeout: float


@dataclass
class Progress:
    """What the producer has done, read by the sampler."""

    sent: int = 0
    holding: bool = False
    hold_start: float | None = None
    hold_end: float | None = None
    send_end: float | None = None


CSV_FIELDS = [
    "elapsed_s", "events_sent", "handled_fanout_a", "handled_fanout_b", "handled_group",
    "backlog_max", "lag_s_max", "snapshot_held", "oldest_xmin_age",
    "queue_dead_tup", "queue_live_tup", "queue_phys_dead_tup", "other_dead_tup",
    "queue_bytes", "total_bytes", "cur_table", "rotations", "vacuums",
    "worker_rss_bytes", "worker_cpu_s",
]

# Dead and live tuples of a system's tables, from the statistics collector: the queue's
# own tables apart (the event tables; jobs), the rest of the schema beside them.
STATS_SQL = {
    "ours": r"""
SELECT coalesce(sum(n_dead_tup) FILTER (WHERE relname ~ '^event_\d+_\d+$'), 0),
       coalesce(sum(n_live_tup) FILTER (WHERE relname ~ '^event_\d+_\d+$'), 0),
       coalesce(sum(n_dead_tup) FILTER (WHERE relname !~ '^event_\d+_\d+$'), 0),
       coalesce(sum(autovacuum_count + vacuum_count), 0)
FROM pg_stat_user_tables WHERE schemaname = 'pgque'
""",
    "skiplocked": """
SELECT n_dead_tup, n_live_tup, 0, autovacuum_count + vacuum_count
FROM pg_stat_user_tables WHERE relid = 'public.jobs'::regclass
""",
}

# Table sizes with their indexes and TOAST: every table of the engine's schema (or
# the job table), and the queue's own tables among them.
SIZE_SQL = {
    "ours": r"""
SELECT coalesce(sum(pg_total_relation_size(c.oid))
                FILTER (WHERE c.relname ~ '^event_\d+_\d+$'), 0),
       coalesce(sum(pg_total_relation_size(c.oid)), 0)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgque' AND c.relkind IN ('r', 'p')
""",
    "skiplocked": "SELECT pg_total_relation_size('public.jobs'), "
                  "pg_total_relation_size('public.jobs')",
}

# Dead tuples counted on the pages, not estimated by the statistics.
PHYS_SQL = {
    "ours": r"""
SELECT coalesce(sum((pgstattuple(c.oid)).dead_tuple_count), 0)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgque' AND c.relname ~ '^event_\d+_\d+$'
""",
    "skiplocked": "SELECT (pgstattuple('public.jobs')).dead_tuple_count",
}

# What decides how a DELETE-based table is cleaned up, recorded with the figures.
SERVER_SETTINGS = ("autovacuum", "autovacuum_naptime", "autovacuum_vacuum_scale_factor",
                   "autovacuum_vacuum_cost_limit", "shared_buffers")

# The age of the oldest snapshot a backend of this database holds: what VACUUM may not
# clean beyond. (Counted in transactions; the held one shows as a growing age.)
XMIN_AGE_SQL = """
SELECT coalesce(max(age(backend_xmin)), 0) FROM pg_stat_activity
WHERE datname = current_database()
"""


class Sampler:
    """Samples one system every ``interval`` seconds into a CSV, in a thread."""

    def __init__(self, system: str, dsn: str, csv_path: Path, worker: psutil.Process,
                 counts_file: Path, progress: Progress, interval: float) -> None:
        self.system = system
        self.dsn = dsn
        self.worker = worker
        self.counts_file = counts_file
        self.progress = progress
        self.interval = interval
        self.rows: list[dict[str, Any]] = []
        self.rotation_times: list[float] = []
        self.counts = dict.fromkeys(CONSUMER_NAMES, 0)
        self.t0 = time.monotonic()
        self._csv_file = csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS)
        self._csv.writeheader()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{system}")
        self._last_switch: Any = None
        self._last_phys = -1e9
        self._rotations = 0
        self._engine = create_engine(url_from_conninfo(dsn)) if system == "ours" else None

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()   # the final figures, with the worker still running
        self._csv_file.close()
        if self._engine is not None:
            self._engine.dispose()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def read_counts(self) -> dict[str, int]:
        try:
            self.counts = json.loads(self.counts_file.read_text())
        except (OSError, ValueError):
            pass   # not written yet: keep the last counts
        return self.counts

    def sample(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            # Each autocommit statement reads the statistics afresh; the counters
            # themselves may be up to about a second behind (backends flush them at
            # most once a second from PostgreSQL 15 on).
            conn.execute("SELECT pg_stat_clear_snapshot()")
            dead, live, other_dead, vacuums = _row(conn, STATS_SQL[self.system])
            queue_bytes, total_bytes = _row(conn, SIZE_SQL[self.system])
            xmin_age = _row(conn, XMIN_AGE_SQL)[0]
            cur_table: Any = ""
            lag: Any = ""
            phys: Any = ""
            rotated = False
            if self.system == "ours":
                cur_table, switch_time = _row(
                    conn, "SELECT queue_cur_table, queue_switch_time FROM pgque.queue "
                          "WHERE queue_name = %s", (QUEUE,))
                if self._last_switch is not None and switch_time != self._last_switch:
                    rotated = True
                    self._rotations += 1
                    self.rotation_times.append(self.elapsed())
                self._last_switch = switch_time
                lag = self._max_lag()
            # Ours: right after each rotation, when the truncated table should be back
            # to nothing. The job table has no such moment: every 30 s.
            if rotated or (self.system == "skiplocked" and
                           time.monotonic() - self._last_phys >= 30):
                phys = _row(conn, PHYS_SQL[self.system])[0]
                self._last_phys = time.monotonic()
        counts = self.read_counts()
        sent = self.progress.sent
        rss, cpu = _process_figures(self.worker)
        row = {
            "elapsed_s": round(self.elapsed(), 2),
            "events_sent": sent,
            **{f"handled_{name}": counts.get(name, 0) for name in CONSUMER_NAMES},
            "backlog_max": max(sent - counts.get(name, 0) for name in CONSUMER_NAMES),
            "lag_s_max": lag,
            "snapshot_held": int(self.progress.holding),
            "oldest_xmin_age": xmin_age,
            "queue_dead_tup": dead,
            "queue_live_tup": live,
            "queue_phys_dead_tup": phys,
            "other_dead_tup": other_dead,
            "queue_bytes": queue_bytes,
            "total_bytes": total_bytes,
            "cur_table": cur_table,
            "rotations": self._rotations if self.system == "ours" else "",
            "vacuums": vacuums,
            "worker_rss_bytes": rss,
            "worker_cpu_s": round(cpu, 2),
        }
        self.rows.append(row)
        self._csv.writerow(row)
        self._csv_file.flush()

    def _max_lag(self) -> float | str:
        assert self._engine is not None
        lags = [c.lag_seconds for c in admin.consumers(self._engine, QUEUE)
                if c.lag_seconds is not None]
        return round(max(lags), 2) if lags else ""


def _row(conn: psycopg.Connection[Any], query: str, params: Any = None) -> tuple[Any, ...]:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    # sum() of bigint counters comes back as numeric
    return tuple(int(v) if isinstance(v, Decimal) else v for v in row)


def _process_figures(process: psutil.Process) -> tuple[int, float]:
    """RSS and CPU seconds of the worker and its children (none today, but a worker
    that forked helpers would count them too)."""
    rss, cpu = 0, 0.0
    try:
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0, 0.0
    for proc in family:
        try:
            rss += proc.memory_info().rss
            times = proc.cpu_times()
            cpu += times.user + times.system
        except psutil.Error:
            continue
    return rss, cpu


@contextmanager
def held_snapshot(dsn: str, holder: str) -> Iterator[None]:
    """A session with a transaction open: ``snapshot``, a reader's REPEATABLE READ
    snapshot (no transaction id), or ``xid``, one that also wrote (a transaction id,
    which every later snapshot lists as running)."""
    with psycopg.connect(dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        if holder == "snapshot":
            conn.execute("SELECT count(*) FROM soak_marker")
        else:
            conn.execute("INSERT INTO soak_marker VALUES (2)")
        try:
            yield
        finally:
            conn.rollback()


def produce(system: str, dsn: str, settings: Settings, progress: Progress,
            sampler: Sampler) -> None:
    """Send ``settings.events`` at ``settings.rate``, holding the snapshot on the way."""
    hold_at = int(settings.events * settings.hold_from)
    release_at = int(settings.events * settings.hold_to)
    with ExitStack() as stack:
        send: Callable[[list[int]], None]
        if system == "ours":
            engine = create_engine(url_from_conninfo(dsn))
            stack.callback(engine.dispose)
            session = stack.enter_context(Session(engine))
            soak_q = Queue(QUEUE)

            def send(numbers: list[int]) -> None:
                with session.begin():
                    soak_q.send_batch(session, [payload(n) for n in numbers])
        else:
            conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))

            def send(numbers: list[int]) -> None:
                conn.execute(JOBS_INSERT, ([payload_json(n) for n in numbers],),
                             prepare=True)

        holder: ExitStack | None = None
        start = time.monotonic()
        try:
            while progress.sent < settings.events:
                if holder is None and progress.hold_start is None and \
                        progress.sent >= hold_at:
                    holder = ExitStack()
                    holder.enter_context(held_snapshot(dsn, settings.holder))
                    progress.holding = True
                    progress.hold_start = sampler.elapsed()
                elif holder is not None and progress.sent >= release_at:
                    holder.close()
                    holder = None
                    progress.holding = False
                    progress.hold_end = sampler.elapsed()
                # Paced: each transaction at its due time; a producer that fell behind
                # sends at once until it catches up.
                wait = start + progress.sent / settings.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                count = min(settings.txn_size, settings.events - progress.sent)
                send(list(range(progress.sent, progress.sent + count)))
                progress.sent += count
            progress.send_end = sampler.elapsed()
        finally:
            if holder is not None:
                holder.close()
                progress.holding = False
                progress.hold_end = sampler.elapsed()


def setup_ours(dsn: str, settings: Settings) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgque.create_queue(%s)", (QUEUE,))
        config = {
            "rotation_period": f"{settings.rotation_period} seconds",
            # The worker ticks on each sending commit; this is the floor for a tick
            # without a wake-up.
            "ticker_max_lag": "500 milliseconds",
        }
        for param, value in config.items():
            conn.execute("SELECT pgque.set_queue_config(%s, %s, %s)", (QUEUE, param, value))
        conn.execute("SELECT pgque.subscribe(%s, 'fanout_a')", (QUEUE,))
        conn.execute("SELECT pgque.subscribe(%s, 'fanout_b')", (QUEUE,))
        # The cooperative consumer exists before its subconsumers join on their first
        # receive; its first subconsumer is the worker's first.
        conn.execute("SELECT pgque.subscribe_subconsumer(%s, 'group', 'm-1')", (QUEUE,))


def start_worker(system: str, dsn: str, settings: Settings, counts_file: Path,
                 log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH_DIR), str(ROOT)]),
               SOAK_COUNTS_FILE=str(counts_file))
    if system == "ours":
        url = url_from_conninfo(dsn).render_as_string(hide_password=False)
        command = [sys.executable, "-m", "sqlalchemy_pgque.worker", "bench_soak:consumers",
                   "--url", url, "--ticker", "--concurrency", str(settings.group_members),
                   "--log-level", "WARNING"]
    else:
        env.pop("SOAK_COUNTS_FILE")
        command = [sys.executable, str(Path(__file__).resolve()), "--skiplocked-worker",
                   "--dsn", dsn, "--counts-file", str(counts_file),
                   "--group-members", str(settings.group_members),
                   "--skiplocked-batch", str(settings.skiplocked_batch)]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT)


def wait_ready(system: str, dsn: str, settings: Settings,
               worker: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until every consumer of the worker is at work (and ours's ticker leads)."""
    want = 2 + settings.group_members
    if system == "ours":
        # Each consumer listens on the queue's channel; the ticker holds its lock.
        query = ("SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = "
                 "current_database() AND query = %s) >= %s AND EXISTS (SELECT 1 FROM "
                 "pg_locks WHERE locktype = 'advisory' AND granted AND database = "
                 "(SELECT oid FROM pg_database WHERE datname = current_database()))")
        params: tuple[Any, ...] = (f'LISTEN "pgque_{QUEUE}"', want)
    else:
        query = ("SELECT count(*) >= %s FROM pg_stat_activity WHERE datname = "
                 "current_database() AND application_name = %s")
        params = (want, WORKER_NAME)
    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(query, params).fetchone()
            if row and row[0]:
                return
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{system} worker did not start:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.2)


@dataclass
class Run:
    system: str
    rows: list[dict[str, Any]]
    rotation_times: list[float]
    hold_start: float | None
    hold_end: float | None
    send_end: float | None
    drained_at: float | None
    end: float
    counts: dict[str, int]
    worker_exit: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def run_system(system: str, dsn: str | None, settings: Settings, prefix: Path,
               workdir: Path) -> tuple[Run, int]:
    setup = "CREATE TABLE soak_marker (x int); INSERT INTO soak_marker VALUES (1);"
    if system == "skiplocked":
        setup += JOBS_DDL
    with scratch_database(dsn, f"soak_{system}", setup=setup) as db:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
            server = conn.info.server_version
            server_settings = {name: _row(conn, f"SHOW {name}")[0] for name in SERVER_SETTINGS}
        if system == "ours":
            setup_ours(db, settings)
        counts_file = workdir / f"{system}-counts.json"
        log_path = workdir / f"{system}-worker.log"
        worker = start_worker(system, db, settings, counts_file, log_path)
        progress = Progress()
        try:
            wait_ready(system, db, settings, worker, log_path)
            sampler = Sampler(system, db, Path(f"{prefix}-{system}.csv"),
                              psutil.Process(worker.pid), counts_file, progress,
                              settings.sample_interval)
            sampler.start()
            print(f"{system}: worker ready, sending {settings.events} events", flush=True)
            try:
                produce(system, db, settings, progress, sampler)
                print(f"{system}: sent in {progress.send_end:.0f} s", flush=True)
                drained_at = None
                deadline = time.monotonic() + settings.drain_timeout
                while drained_at is None:
                    counts = sampler.read_counts()
                    if min(counts.values()) >= settings.events:
                        drained_at = sampler.elapsed()
                    elif time.monotonic() > deadline:
                        raise RuntimeError(f"{system}: not drained: {counts}")
                    elif worker.poll() is not None:
                        raise RuntimeError(f"{system}: worker exited:\n"
                                           + log_path.read_text(errors="replace")[-3000:])
                    else:
                        time.sleep(0.5)
                print(f"{system}: drained at {drained_at:.0f} s; tail of {settings.tail} s",
                      flush=True)
                time.sleep(settings.tail)
            finally:
                sampler.stop()
        finally:
            worker.terminate()
            try:
                exit_code: int | None = worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                exit_code = worker.wait()
        counts = sampler.read_counts()
        if system == "ours" and exit_code == 0:
            # The final counts are written at the worker's exit.
            counts = json.loads(counts_file.read_text())
        return Run(system, sampler.rows, sampler.rotation_times, progress.hold_start,
                   progress.hold_end, progress.send_end, drained_at, sampler.elapsed(),
                   counts, exit_code, {"server_settings": server_settings}), server


# --- figures and chart -------------------------------------------------------------------

def summarize(run: Run, settings: Settings) -> dict[str, Any]:
    rows = run.rows
    rss = [r["worker_rss_bytes"] for r in rows if r["worker_rss_bytes"]]
    held = [r for r in rows if r["snapshot_held"]]
    result: dict[str, Any] = {
        "events": settings.events,
        "handled": run.counts,
        "worker_exit_code": run.worker_exit,
        "send_duration_s": _round(run.send_end),
        "drained_at_s": _round(run.drained_at),
        "run_duration_s": _round(run.end),
        "snapshot_held_s": [_round(run.hold_start), _round(run.hold_end)],
        "queue_dead_tup_max": max(r["queue_dead_tup"] for r in rows),
        "queue_dead_tup_final": rows[-1]["queue_dead_tup"],
        "queue_dead_tup_max_while_held": max((r["queue_dead_tup"] for r in held), default=0),
        "queue_phys_dead_tup_max": max((r["queue_phys_dead_tup"] for r in rows
                                        if r["queue_phys_dead_tup"] != ""), default=None),
        "other_dead_tup_max": max(r["other_dead_tup"] for r in rows),
        "queue_bytes_max": max(r["queue_bytes"] for r in rows),
        "queue_bytes_final": rows[-1]["queue_bytes"],
        "total_bytes_max": max(r["total_bytes"] for r in rows),
        "total_bytes_final": rows[-1]["total_bytes"],
        "total_bytes_max_before_hold": max(
            (r["total_bytes"] for r in rows if run.hold_start is None
             or r["elapsed_s"] < run.hold_start), default=None),
        "backlog_max": max(r["backlog_max"] for r in rows),
        "vacuums": rows[-1]["vacuums"],
        "worker_rss_start_bytes": rss[0] if rss else None,
        "worker_rss_end_bytes": rss[-1] if rss else None,
        "worker_rss_max_bytes": max(rss) if rss else None,
        "worker_cpu_s": rows[-1]["worker_cpu_s"],
        "samples": len(rows),
        **run.extra,
    }
    if run.system == "ours":
        after = _after_rotations(rows)
        held_rotations = [t for t in run.rotation_times
                          if run.hold_start is not None and run.hold_end is not None
                          and run.hold_start <= t <= run.hold_end]
        result.update({
            "rotations": len(run.rotation_times),
            "rotations_while_held": len(held_rotations),
            "rotation_times_s": [round(t, 1) for t in run.rotation_times],
            "queue_dead_tup_after_rotations": [r["queue_dead_tup"] for r in after],
            "queue_phys_dead_tup_after_rotations": [r["queue_phys_dead_tup"] for r in after],
            "queue_dead_tup_after_rotation_max": max(
                (r["queue_dead_tup"] for r in after), default=None),
            # While events flow: once they stop, an idle queue ticks only every
            # ticker_idle_period and the age of the cursor's tick grows meaningless.
            "lag_s_max_while_sending": max(
                (r["lag_s_max"] for r in rows if r["lag_s_max"] != ""
                 and run.send_end is not None and r["elapsed_s"] <= run.send_end),
                default=None),
        })
    return result


def _after_rotations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first sample taken after each rotation."""
    return [row for before, row in itertools.pairwise(rows)
            if row["rotations"] != before["rotations"]]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def read_csv(path: Path) -> list[dict[str, Any]]:
    def convert(value: str) -> Any:
        if value == "":
            return ""
        try:
            return int(value)
        except ValueError:
            return float(value)
    with path.open(newline="") as f:
        return [{k: convert(v) for k, v in row.items()} for row in csv.DictReader(f)]


def chart(runs: dict[str, list[dict[str, Any]]], png: Path, title: str) -> None:
    """Dead tuples, table size and worker RSS over time, both systems, on one PNG."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("the chart needs matplotlib: pip install 'sqlalchemy-pgque[bench]' "
                 "(or pip install matplotlib); the CSVs are written")
    matplotlib.use("Agg")   # no display on a server
    import matplotlib.pyplot as plt

    style = {"ours": ("sqlalchemy-pgque (rotation + TRUNCATE)", "tab:blue"),
             "skiplocked": ("SKIP LOCKED + DELETE job table", "tab:red")}
    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    dead_ax, size_ax, rss_ax = axes
    for system, rows in runs.items():
        label, color = style[system]
        minutes = [r["elapsed_s"] / 60 for r in rows]
        # Ours on top and thicker: its dead tuples stay on the axis line otherwise.
        line = {"color": color, "label": label, "zorder": 3 if system == "ours" else 2,
                "linewidth": 2.2 if system == "ours" else 1.5}
        dead_ax.plot(minutes, [r["queue_dead_tup"] for r in rows], **line)
        size_ax.plot(minutes, [r["total_bytes"] / 2**20 for r in rows], **line)
        rss_ax.plot(minutes, [r["worker_rss_bytes"] / 2**20 for r in rows], **line)
        held = [m for m, r in zip(minutes, rows, strict=True) if r["snapshot_held"]]
        if held:
            # The producers are paced alike, so the two windows nearly coincide.
            for ax in axes:
                ax.axvspan(min(held), max(held), color="grey", alpha=0.08, zorder=1)
        if system == "ours":
            for before, row in itertools.pairwise(rows):
                if row["rotations"] != before["rotations"]:
                    for ax in axes:
                        ax.axvline(row["elapsed_s"] / 60, color=color, alpha=0.25,
                                   linewidth=0.8, linestyle=":")
    dead_ax.set_ylabel("dead tuples\n(event tables / jobs)")
    size_ax.set_ylabel("total size of the\nsystem's tables (MiB)")
    rss_ax.set_ylabel("worker RSS (MiB)")
    rss_ax.set_xlabel("minutes (shaded: the other session's transaction open; dotted: rotations)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    dead_ax.legend(loc="upper left")
    dead_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    keys = ["send_duration_s", "drained_at_s", "queue_dead_tup_max",
            "queue_dead_tup_after_rotation_max", "queue_phys_dead_tup_max",
            "other_dead_tup_max", "total_bytes_max_before_hold", "total_bytes_max",
            "total_bytes_final", "backlog_max", "rotations", "rotations_while_held",
            "vacuums", "worker_rss_start_bytes", "worker_rss_end_bytes", "worker_cpu_s"]
    systems = list(summary)
    print(f"{'':36}" + "".join(f"{s:>16}" for s in systems))
    for key in keys:
        print(f"{key:36}" + "".join(f"{summary[s].get(key, '')!s:>16}" for s in systems))


@contextmanager
def private_cluster(major: int) -> Iterator[str]:
    """A throwaway cluster of PostgreSQL ``major`` at the defaults of its initdb (the
    tests' PgCluster, with its smaller shared_buffers put back), for a comparison that
    a shared server's configuration (autovacuum turned off, say) would change."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pgcluster import (  # type: ignore[import-not-found, unused-ignore]  # tests/
        PgCluster,
        find_bindir,
    )

    bindir = find_bindir(major)
    if bindir is None:
        sys.exit(f"no PostgreSQL {major} programs found")
    with PgCluster(bindir, Path(tempfile.mkdtemp(prefix="pgque-soak-cluster-"))) as cluster:
        cluster.init()
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '128MB'")
        cluster.restart()
        yield cluster.dsn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="libpq string of a running server (default: embedded)")
    parser.add_argument("--major", type=int,
                        help="run a private cluster of this PostgreSQL major version, at "
                             "default settings (instead of the embedded server or --dsn)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--txn-size", type=int, default=250, help="events per transaction")
    parser.add_argument("--hold-from", type=float, default=0.25)
    parser.add_argument("--hold-to", type=float, default=0.60)
    parser.add_argument("--holder", choices=("snapshot", "xid"), default="snapshot",
                        help="snapshot: a reader's open transaction; xid: one that wrote")
    parser.add_argument("--rotation-period", type=float, default=20.0, help="seconds")
    parser.add_argument("--group-members", type=int, default=3)
    parser.add_argument("--skiplocked-batch", type=int, default=250)
    parser.add_argument("--sample-interval", type=float, default=3.0)
    parser.add_argument("--tail", type=float, default=120.0,
                        help="seconds of sampling once everything is handled")
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--output-prefix", type=Path, default=RESULTS_PREFIX)
    parser.add_argument("--workdir", type=Path,
                        help="keep the workers' logs here (default: a temporary directory)")
    parser.add_argument("--chart-only", action="store_true",
                        help="redraw the chart from the CSVs of --output-prefix")
    parser.add_argument("--skiplocked-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--counts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.skiplocked_worker:
        skiplocked_worker(args.dsn, args.counts_file, args.group_members,
                          args.skiplocked_batch)
        return
    prefix: Path = args.output_prefix
    png = prefix.with_name(prefix.name + ".png")
    if args.chart_only:
        summary_file = prefix.with_name(prefix.name + ".json")
        title = json.loads(summary_file.read_text())["title"]
        chart({s: read_csv(Path(f"{prefix}-{s}.csv")) for s in args.systems
               if Path(f"{prefix}-{s}.csv").exists()}, png, title)
        return
    settings = Settings(
        events=args.events, rate=args.rate, txn_size=args.txn_size,
        hold_from=args.hold_from, hold_to=args.hold_to, holder=args.holder,
        rotation_period=args.rotation_period, group_members=args.group_members,
        skiplocked_batch=args.skiplocked_batch, sample_interval=args.sample_interval,
        tail=args.tail, drain_timeout=args.drain_timeout)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, Any]] = {}
    server = 0
    with ExitStack() as stack:
        # The workers' logs and counts; --workdir keeps them for a look afterwards.
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="pgque-soak-")))
        workdir.mkdir(parents=True, exist_ok=True)
        dsn = args.dsn
        if args.major is not None:
            dsn = stack.enter_context(private_cluster(args.major))
        for system in args.systems:
            run, server = run_system(system, dsn, settings, prefix, workdir)
            summary[system] = summarize(run, settings)
            print(system, json.dumps(summary[system]), flush=True)
    major = server // 10000
    vacuum_note = ""
    if any(v.get("server_settings", {}).get("autovacuum") == "off" for v in summary.values()):
        vacuum_note = ", autovacuum off"
    holder_note = "old snapshot" if settings.holder == "snapshot" else "transaction with an xid"
    title = (f"{settings.events:,} events, 3 consumers (2 fan-out + group of "
             f"{settings.group_members}), PostgreSQL {major}{vacuum_note};\n{holder_note} "
             f"held {settings.hold_from:.0%}-{settings.hold_to:.0%} of sends")
    result = {
        **run_facts("soak: dead tuples, table size and worker memory over a long run, "
                    "against a SKIP LOCKED + DELETE job table", server),
        "title": title,
        "settings": settings.__dict__,
        "systems": summary,
    }
    prefix.with_name(prefix.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(summary)
    chart({s: read_csv(Path(f"{prefix}-{s}.csv")) for s in args.systems}, png, title)


if __name__ == "__main__":
    main()
