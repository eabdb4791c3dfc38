"""Failover of a replicated PostgreSQL under a working worker and producers, and the
counts that must add up afterwards.

:func:`failover_case` runs one stream of events over a :class:`~replication.ReplicatedPair`.
Everything connects the way an application would, through the pair's multi-host URL
(both nodes, ``target_session_attrs=read-write``): the producers (threads sending one
event per transaction through ``Queue.send``, with a row in ``produced`` in the same
transaction, see :class:`faultkit.Producer`) and one ``python -m sqlalchemy_pgque.worker
--ticker`` process whose handler writes a row in ``handled`` through the batch Session.

Mid-stream, the primary is stopped in ``immediate`` mode. Before the standby is
promoted, the test waits until the worker has tried to connect to it while it is still
read-only (the standby logs its connections), so that refusal is part of every run;
then the standby is promoted, the worker and the producers find it by themselves, and
with ``failovers > 1`` the dead node is rebuilt as a standby of the new primary
(``pg_basebackup``) for the next failover, while events keep flowing.

Counted on the final primary: every event whose commit returned to a producer (or was
found committed after a failed commit) exists, and every event that exists was handled
exactly once. With synchronous replication nothing may be lost; with asynchronous
replication the events that committed on a primary but had not reached its standby when
it died are reported as ``lost_committed``, not asserted. Without a worker
(``worker=False``, producers as fast as their commits return) a run measures only
that: what the producers' commits became.
"""

from __future__ import annotations

import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faultkit
import psycopg
from engine_helpers import wait_until
from replication import Failover, ReplicatedPair

__all__ = ["FailoverFigures", "failover_case"]

DATABASE = "failover"
_WORKER_APP = "application_name=sqlalchemy_pgque worker"
_PRODUCER_APP = f"application_name={faultkit.PRODUCER_APP}"


@dataclass
class FailoverFigures:
    """What one run measured; written by the bench, asserted by the test."""

    synchronous: bool
    failovers: int = 0
    sent: int = 0
    """Events the producers sent: each known to have committed, on some primary."""
    committed_after_failure: int = 0
    """Of those, events whose commit raised (in doubt) but turned out to have committed."""
    producer_retries: int = 0
    lost_committed: int = 0
    """Sent events missing from the final primary (asynchronous replication only)."""
    lost_per_failover: list[int] = field(default_factory=list)
    """Per failover: events committed on the primary before it died that the promoted
    standby does not have."""
    events: int = 0
    """Events on the final primary (the producers' and the probes sent after failovers)."""
    unhandled: int = 0
    duplicated: int = 0
    unknown: int = 0
    """Handled rows of events that do not exist (never expected)."""
    worker_exits: int = 0
    exit_code: int | None = None
    tracebacks: int = 0
    stop_s: list[float] = field(default_factory=list)
    """Per failover: the immediate stop of the primary, until it was down."""
    read_only_s: list[float] = field(default_factory=list)
    """Per failover: from the primary's death until the worker had been turned away by
    the still read-only standby (the promotion waits for it)."""
    promote_s: list[float] = field(default_factory=list)
    """Per failover: ``pg_ctl promote``, until the standby accepted writes."""
    resume_s: list[float] = field(default_factory=list)
    """Per failover: from ``pg_ctl promote`` until the first event was handled on the
    new primary (the handler's write, by the server's clock)."""
    ticker_back_s: list[float] = field(default_factory=list)
    """Per failover: from ``pg_ctl promote`` until the worker's ticker held the ticker
    lock on the new primary."""
    catch_up_s: list[float] = field(default_factory=list)
    """Per failover: from ``pg_ctl promote`` until an event sent once the ticker led on
    the new primary was handled, behind the backlog of the outage."""
    rebuild_s: list[float] = field(default_factory=list)
    """Per rebuild of the dead node as the new primary's standby, until it streamed."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Every event that exists handled exactly once, nothing committed lost."""
        return (self.lost_committed, self.unhandled, self.duplicated, self.unknown) \
            == (0, 0, 0, 0)


def failover_case(pair: ReplicatedPair, log_dir: Path, *, rate: float | None,
                  failovers: int = 1, producers: int = 2, worker: bool = True,
                  before_first: float = 1.0, between: tuple[float, float] = (1.0, 1.0),
                  after_last: float = 1.0, handler_delay: float = 0.001,
                  drain_timeout: float = 120) -> FailoverFigures:
    """Stream events through ``failovers`` failovers of ``pair`` (started) and count.

    ``producers`` threads send ``rate`` events per second in all (``None``: each as
    fast as its commits return). The first failover comes ``before_first`` seconds
    into the stream, once the handlers have committed something; later ones a random
    ``between`` seconds after the dead node streams again as the new standby; the
    stream ends ``after_last`` seconds after the last promotion. ``worker=False``
    runs the producers alone: only what the producers' commits became is counted.
    """
    kind = faultkit.KINDS["single"]
    faultkit.create_database(pair.primary, DATABASE)
    faultkit.prepare(pair.dsn(DATABASE), kind)
    url = pair.url(DATABASE)
    workers = faultkit.Workers(
        url, kind, log_dir, env=faultkit.worker_env(FAULT_HANDLER_DELAY=str(handler_delay)))
    figures = FailoverFigures(pair.synchronous, failovers=failovers)
    with psycopg.connect(pair.dsn(DATABASE)) as conn:
        figures.extra["server_version"] = conn.info.server_version
    stream: list[faultkit.Producer] = [
        # Open-ended: the stream ends with finish(), between two events.
        faultkit.Producer(url, 10**9, None if rate is None else rate / producers,
                          first=n * 10**9)
        for n in range(producers)
    ]
    figures.extra["commit_ms_p50"] = _commit_latency(pair.dsn(DATABASE))
    process: faultkit.WorkerProcess | None = None
    try:
        if worker:
            process = workers.start()
            faultkit.wait_for_worker(pair.dsn(DATABASE), kind, timeout=60)
        for producer in stream:
            producer.start()
        for n in range(failovers):
            if n:
                started = time.monotonic()
                pair.rebuild_standby()
                figures.rebuild_s.append(time.monotonic() - started)
            # How long events flow between failovers: the scenario, not a wait for
            # anything (the waits below poll for what they need).
            time.sleep(before_first if n == 0 else random.uniform(*between))
            if process is not None:
                faultkit.wait_for_progress(pair.dsn(DATABASE), kind.consumers, timeout=60)
                failover = _fail_over(pair, figures, stream, _WORKER_APP)
                _measure_recovery(pair, figures, kind, failover)
                assert process.process.poll() is None, process.output()
            else:
                _wait_for_sends(pair.dsn(DATABASE))
                _fail_over(pair, figures, stream, _PRODUCER_APP)
        time.sleep(after_last)
        for producer in stream:
            producer.finish()
        for producer in stream:
            producer.join(drain_timeout)
            assert not producer.is_alive(), "a producer did not finish"
            assert producer.error is None, producer.error
        figures.extra["sent_per_s"] = round(
            sum(len(p.confirmed) + len(p.found) for p in stream)
            / (max(p.finished_at or 0 for p in stream) - min(p.started_at for p in stream)), 1)
        if process is not None:
            faultkit.wait_drained(pair.dsn(DATABASE), kind.consumers, drain_timeout)
        _count(figures, pair.dsn(DATABASE), stream, handled=process is not None)
        if process is not None:
            figures.worker_exits = 0 if process.process.poll() is None else 1
            process.signal(signal.SIGTERM)
            figures.exit_code = process.wait(60)
            figures.tracebacks = len(workers.tracebacks())
    finally:
        for producer in stream:
            producer.stop()
        workers.kill_all()
    return figures


def _commit_latency(dsn: str, commits: int = 100) -> float:
    """Milliseconds a one-row commit takes, the median of ``commits``, from a quiet
    connection before anything else runs: what the replication mode costs a commit."""
    taken = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE commit_probe (n int)")
        for n in range(commits):
            started = time.perf_counter()
            conn.execute("INSERT INTO commit_probe VALUES (%s)", (n,))
            taken.append(time.perf_counter() - started)
        conn.execute("DROP TABLE commit_probe")
    return round(statistics.median(taken) * 1000, 2)


def _wait_for_sends(dsn: str, timeout: float = 60) -> None:
    before = faultkit.produced_count(dsn)
    wait_until(lambda: faultkit.produced_count(dsn) > before, timeout, "producers' progress")


def _fail_over(pair: ReplicatedPair, figures: FailoverFigures,
               stream: list[faultkit.Producer], turned_away: str) -> Failover:
    standby = pair.standby
    assert standby is not None
    sent_before: set[int] = set()

    def hold_read_only() -> None:
        # The primary is dead: from here on, a connection the standby authorizes for
        # the worker (or the producers: each carries its application_name) is one
        # libpq then drops for being read-only.
        died, log_before = time.monotonic(), len(standby.log_text())
        wait_until(lambda: turned_away in standby.log_text()[log_before:], 60,
                   "a client to try the read-only standby")
        figures.read_only_s.append(time.monotonic() - died)
        # Nothing commits until the promotion, and the producers have long noted the
        # last commits the dead primary returned: these are all it committed (each
        # copy is atomic under the GIL).
        sent_before.update(*(set(p.confirmed) | set(p.found) for p in stream))

    failover = pair.fail_over(before_promote=hold_read_only)
    figures.stop_s.append(failover.stop_s)
    figures.promote_s.append(failover.promote_s)
    with psycopg.connect(pair.dsn(DATABASE), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM produced WHERE k = ANY(%s)",
                           (sorted(sent_before),)).fetchone()
    assert row is not None
    # Missing now: lost in this failover or an earlier one (a lost event stays lost).
    figures.lost_per_failover.append(
        len(sent_before) - int(row[0]) - sum(figures.lost_per_failover))
    return failover


def _measure_recovery(pair: ReplicatedPair, figures: FailoverFigures,
                      kind: faultkit.Kind, failover: Failover) -> None:
    dsn = pair.dsn(DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        def ticker_leading() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.granted "
                "AND a.application_name LIKE 'sqlalchemy_pgque ticker %'").fetchone()
            return bool(row and row[0])

        wait_until(ticker_leading, 60, "the ticker to lead on the new primary")
        figures.ticker_back_s.append(time.monotonic() - failover.promote_started)
        _, caught_up = faultkit.measure_recovery(dsn, kind.consumers,
                                                 failover.promote_started, timeout=120)
        figures.catch_up_s.append(caught_up)
        # Only the new primary's own writes are later than the promotion: it was
        # read-only until then, and the old primary already dead.
        row = conn.execute(
            "SELECT extract(epoch FROM min(at)) FROM handled WHERE at > to_timestamp(%s)",
            (failover.promote_started_wall,),
        ).fetchone()
        assert row is not None and row[0] is not None
        figures.resume_s.append(float(row[0]) - failover.promote_started_wall)


def _count(figures: FailoverFigures, dsn: str, stream: list[faultkit.Producer], *,
           handled: bool) -> None:
    sent = {k for producer in stream for k in producer.confirmed | producer.found}
    figures.sent = len(sent)
    figures.committed_after_failure = sum(len(p.found) for p in stream)
    figures.producer_retries = sum(p.retries for p in stream)
    with psycopg.connect(dsn, autocommit=True) as conn:
        produced = {int(k) for (k,) in conn.execute("SELECT k FROM produced")}
        handled_counts = {int(k): int(n) for k, n in conn.execute(
            "SELECT k, count(*) FROM handled GROUP BY k")}
    # Negative keys: the probes measure_recovery sends straight to the new primary.
    strays = {k for k in produced - sent if k >= 0}
    assert not strays, f"events no producer sent: {sorted(strays)[:10]}"
    figures.lost_committed = len(sent - produced)
    figures.events = len(produced)
    if handled:
        figures.unhandled = len(produced - handled_counts.keys())
        figures.duplicated = sum(n - 1 for n in handled_counts.values() if n > 1)
        figures.unknown = len(handled_counts.keys() - produced)
