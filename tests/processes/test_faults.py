"""Fault injection against real worker processes and a PostgreSQL the module owns.

Short versions of the runs in ``bench/bench_faults.py`` (see tests/faultkit.py): SIGKILL
of the worker, backend termination storms, server restarts, SIGTERM mid-batch, for one
consumer, a cooperative group of three members and two fan-out consumers. Every case
ends with the same counts: every event that exists was handled exactly once by every
consumer, none was lost, no worker exited on a fault, and none logged a traceback.
"""

from __future__ import annotations

import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faultkit
import netns
import pytest
from conftest import Database
from faultkit import Figures
from pgcluster import PgCluster, find_bindir

# Recovery must come within this many seconds of the database being usable again.
RECOVERY_LIMIT = 5.0


def assert_exact(figures: Figures) -> None:
    assert figures.events > 0
    assert (figures.lost, figures.duplicated) == (0, 0), figures
    assert figures.worker_exits == 0, figures
    assert figures.extra.get("tracebacks", 0) == 0, figures
    assert figures.extra.get("exit_code", 0) == 0, figures


@pytest.mark.parametrize(("kind", "events", "kills"),
                         [("single", 5000, 10), ("coop", 2000, 5), ("fanout", 2000, 5)])
def test_sigkill_at_random_moments_loses_and_repeats_nothing(
    own_db: Database, tmp_path: Path, kind: str, events: int, kills: int
) -> None:
    figures = faultkit.sigkill_case(own_db.dsn, own_db.url, kind, tmp_path, events=events,
                                    kills=kills, rate=events / (kills * 0.8))
    assert_exact(figures)
    assert figures.events == events


@pytest.mark.parametrize("kind", ["single", "coop", "fanout"])
def test_backend_termination_storm_is_survived_without_a_restart(
    own_db: Database, tmp_path: Path, kind: str
) -> None:
    figures = faultkit.storm_case(own_db.dsn, own_db.url, kind, tmp_path, events=1500,
                                  duration=4, rate=250)
    assert_exact(figures)
    assert figures.faults >= 10, figures  # backends terminated
    assert figures.recovery_s[0] < RECOVERY_LIMIT, figures


@pytest.mark.parametrize(("mode", "kind"),
                         [("immediate", "single"), ("fast", "single"), ("immediate", "coop")])
def test_server_restart_is_survived_by_producer_and_worker(
    own_server: PgCluster, own_db: Database, tmp_path: Path, mode: str, kind: str
) -> None:
    figures = faultkit.restart_case(own_server, own_db.dsn, own_db.url, kind, tmp_path,
                                    events=1500, rate=300, mode=mode)
    assert_exact(figures)
    assert figures.recovery_s[0] < RECOVERY_LIMIT, figures


def test_sigterm_with_the_default_timeout_finishes_the_batch(
    own_db: Database, tmp_path: Path
) -> None:
    figures = faultkit.sigterm_case(own_db.dsn, own_db.url, tmp_path, batch_size=40,
                                    handler_delay=0.05, shutdown_timeout=None)
    assert_exact(figures)
    assert figures.extra["committed_at_exit"] == 40, figures


def test_sigterm_with_timeout_abandons_the_batch_and_exits_zero(
    own_db: Database, tmp_path: Path
) -> None:
    # The batch would take 300 x 50 ms = 15 s.
    figures = faultkit.sigterm_case(own_db.dsn, own_db.url, tmp_path, batch_size=300,
                                    handler_delay=0.05, shutdown_timeout=1)
    assert_exact(figures)
    assert figures.extra["exit_s"] < 4, figures
    assert figures.extra["committed_at_exit"] == 0, figures
    assert figures.extra["logged_redelivery"], figures


def test_second_sigterm_abandons_at_once(own_db: Database, tmp_path: Path) -> None:
    figures = faultkit.sigterm_case(own_db.dsn, own_db.url, tmp_path, batch_size=300,
                                    handler_delay=0.05, shutdown_timeout=60, signals=2)
    assert_exact(figures)
    assert figures.extra["exit_s"] < 3, figures
    assert figures.extra["committed_at_exit"] == 0, figures
    assert figures.extra["logged_redelivery"], figures


def test_worker_started_while_the_server_is_down_waits_for_it(
    own_server: PgCluster, own_db: Database, tmp_path: Path
) -> None:
    kind = faultkit.KINDS["single"]
    faultkit.prepare(own_db.dsn, kind)
    workers = faultkit.Workers(own_db.url, kind, tmp_path)
    own_server.stop("immediate")
    try:
        worker = workers.start()
        _wait_for_output(worker, "waiting for the database")
        own_server.start()
        up = own_server.wait_ready()
        resumed, _ = faultkit.measure_recovery(own_db.dsn, kind.consumers, up)
        assert resumed < RECOVERY_LIMIT
        assert worker.process.poll() is None
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output()
        assert "Traceback" not in worker.output()
    finally:
        workers.kill_all()
        if own_server.pid is None:
            own_server.start()


def _wait_for_output(worker: Any, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.output():
        assert worker.process.poll() is None, worker.output()
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.05)


@contextmanager
def worker_on_another_host(
    pg_server: Any, tmp_path: Path, kind: faultkit.Kind, handler_delay: float,
    query: dict[str, str],
) -> Iterator[tuple[netns.NetworkNamespace, str, faultkit.Workers]]:
    """A cluster of our own reached over TCP from a network namespace, where the
    workers run: ``(namespace, dsn for the test, workers)``."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    bindir = find_bindir(pg_server.major)
    if bindir is None:
        pytest.skip(f"no PostgreSQL {pg_server.major} programs to run a server of our own")
    with netns.NetworkNamespace() as ns, PgCluster(
        bindir, Path(tempfile.mkdtemp(prefix="pgque-cluster-")), also_on=ns.host_address
    ) as cluster:
        cluster.init()
        cluster.start()
        dsn, unix_url = faultkit.create_database(cluster, "partition")
        url = unix_url.set(host=ns.host_address, port=cluster.port, query=query)
        faultkit.prepare(dsn, kind)
        workers = faultkit.Workers(
            url, kind, tmp_path, prefix=ns.exec_prefix,
            env=faultkit.worker_env(FAULT_HANDLER_DELAY=str(handler_delay)))
        try:
            yield ns, dsn, workers
        finally:
            if ns.partitioned:
                ns.heal()
            workers.kill_all()


def test_partitioned_worker_notices_and_resumes_when_the_network_heals(
    pg_server: Any, tmp_path: Path
) -> None:
    """The server stays up, but the network between it and the worker drops every
    packet: nothing closes, so only keepalives and timeouts can tell. Here they are
    shortened through the URL (the worker's own defaults notice in about 30 s)."""
    kind = faultkit.KINDS["single"]
    fast_keepalives = {"keepalives_idle": "1", "keepalives_interval": "1",
                       "keepalives_count": "2", "tcp_user_timeout": "3000",
                       "connect_timeout": "2"}
    with worker_on_another_host(pg_server, tmp_path, kind, 0.2, fast_keepalives) \
            as (ns, dsn, workers):
        worker = workers.start()
        faultkit.wait_for_worker(dsn, kind)
        keys = list(range(30))
        faultkit.send_one_batch(dsn, keys)
        faultkit.wait_for_batch_in_progress(dsn)
        ns.partition()
        cut = time.monotonic()
        _wait_for_output(worker, "reconnecting in", timeout=20)
        assert time.monotonic() - cut < 10, worker.output()
        ns.heal()
        faultkit.wait_drained(dsn, kind.consumers, 60)
        result = faultkit.tally(dsn, kind.consumers, set(keys))
        assert result.exact, result
        assert worker.process.poll() is None, worker.output()
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output()
        assert "Traceback" not in worker.output()


def test_second_sigterm_during_a_partition_exits_at_once(
    pg_server: Any, tmp_path: Path
) -> None:
    """Abandoning sends each busy consumer's cancel from a thread of its own: towards
    a partitioned server that takes seconds, and must hold up neither the process
    nor the other consumers."""
    kind = faultkit.KINDS["fanout"]
    with worker_on_another_host(pg_server, tmp_path, kind, 0.5, {}) as (ns, dsn, workers):
        worker = workers.start()
        faultkit.wait_for_worker(dsn, kind)
        faultkit.send_one_batch(dsn, list(range(30)))
        faultkit.wait_for_batch_in_progress(dsn)
        ns.partition()
        worker.signal(signal.SIGTERM)
        _wait_for_output(worker, "stopping after the current batches")
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, worker.output()
        # The deadline after a second signal: the 3 s the abandoned batches get.
        assert time.monotonic() - signalled < 5, worker.output()
        assert "its 30 messages will be redelivered" in worker.output()
