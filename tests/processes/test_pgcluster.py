"""The test-owned server (``own_server`` / ``own_db``): restarts, stops and crashes."""

from __future__ import annotations

import time

import psycopg
import pytest
from conftest import Database, Server
from engine_helpers import Conn, scalar
from pgcluster import PgCluster
from sqlalchemy import create_engine, text

_RECOVERY = "database system was not properly shut down; automatic recovery in progress"


def _connect(dsn: str) -> Conn:
    return psycopg.connect(dsn, autocommit=True)


def _recoveries(cluster: PgCluster) -> int:
    return cluster.log_text().count(_RECOVERY)


def test_same_major_as_suite_server_on_socket_and_tcp(
    own_server: PgCluster, pg_server: Server
) -> None:
    for dsn in (own_server.dsn(), own_server.tcp_dsn()):
        with _connect(dsn) as conn:
            assert int(scalar(conn, "show server_version_num")) // 10000 == pg_server.major
    with _connect(own_server.tcp_dsn()) as conn:
        assert scalar(conn, "select inet_server_port()") == own_server.port


def test_own_db_has_the_engine(own_db: Database) -> None:
    engine = create_engine(own_db.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text(
                "select count(*) from pg_namespace where nspname = 'pgque'")).scalar() == 1
    finally:
        engine.dispose()


def test_immediate_restart_keeps_commits_and_breaks_open_connections(
    own_db: Database, own_server: PgCluster
) -> None:
    with _connect(own_db.dsn) as conn:
        conn.execute("create table survivor (x int)")
        conn.execute("insert into survivor values (1)")
    across = _connect(own_db.dsn)
    recoveries = _recoveries(own_server)
    before = time.monotonic()
    own_server.restart("immediate")
    assert own_server.wait_ready(timeout=10) >= before
    assert _recoveries(own_server) == recoveries + 1
    with pytest.raises(psycopg.OperationalError):
        across.execute("select 1")
    across.close()
    with _connect(own_db.dsn) as conn:
        assert scalar(conn, "select x from survivor") == 1


def test_stopped_server_refuses_connections_until_started(own_server: PgCluster) -> None:
    own_server.stop()
    assert own_server.pid is None
    with pytest.raises(psycopg.OperationalError):
        _connect(own_server.dsn())
    own_server.start()
    with _connect(own_server.dsn()) as conn:
        assert scalar(conn, "select 1") == 1


def test_killed_postmaster_recovers_on_start(own_db: Database, own_server: PgCluster) -> None:
    with _connect(own_db.dsn) as conn:
        conn.execute("create table survivor (x int)")
        conn.execute("insert into survivor values (2)")
    across = _connect(own_db.dsn)
    recoveries = _recoveries(own_server)
    own_server.kill_postmaster()
    assert own_server.pid is None
    with pytest.raises(psycopg.OperationalError):
        across.execute("select 1")
    across.close()
    own_server.start()
    assert _recoveries(own_server) == recoveries + 1
    with _connect(own_db.dsn) as conn:
        assert scalar(conn, "select x from survivor") == 2


def test_own_db_starts_a_server_left_down(
    own_server: PgCluster, request: pytest.FixtureRequest
) -> None:
    own_server.kill_postmaster()
    database: Database = request.getfixturevalue("own_db")
    assert own_server.pid is not None
    with _connect(database.dsn) as conn:
        assert scalar(conn, "select count(*) from pg_namespace where nspname = 'pgque'") == 1
