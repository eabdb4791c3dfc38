"""What every benchmark here needs: a scratch database and realistic payloads.

The benchmarks run as scripts (``python bench/bench_x.py``), so this module is imported
from the script's own directory.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import psycopg
import sqlalchemy
from psycopg import conninfo, sql

from sqlalchemy_pgque import schema
from sqlalchemy_pgque._listen import url_from_conninfo

SHARED_MACHINE_NOTE = ("shared 2-core machine: other sessions' work may run alongside; "
                       "load_average is taken at the end of the run")


def run_facts(benchmark: str, server_version: int, note: str = SHARED_MACHINE_NOTE
              ) -> dict[str, Any]:
    """The header of a results file: what ran, when, on what, and how busy it was."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "server_version": server_version,
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "note": note,
    }


def payload(n: int) -> dict[str, Any]:
    """About 80 bytes of JSON once encoded, varying per event like real traffic."""
    return {"order_id": 1_000_000 + n, "customer": f"cust-{n % 9973:05d}",
            "total": round(n * 0.37 % 1000, 2), "currency": "EUR"}


@contextmanager
def scratch_database(
    dsn: str | None, label: str, *, sql_path: str | None = None, setup: str | None = None
) -> Iterator[str]:
    """The dsn of a fresh database, dropped afterwards; on an embedded server if no dsn.

    The engine is installed with ``schema.install`` (the bundled one, or the PgQue SQL
    file ``sql_path``); ``setup`` is SQL run after it.
    """
    embedded = None
    if dsn is None:
        from sqlalchemy_pgque.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres().start()
        dsn = embedded.dsn
    name = f"pgque_bench_{label}_{os.getpid()}"
    admin_dsn = conninfo.make_conninfo(dsn, dbname="postgres")
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        try:
            scratch = conninfo.make_conninfo(dsn, dbname=name)
            engine = sqlalchemy.create_engine(url_from_conninfo(scratch))
            try:
                with engine.begin() as conn:
                    schema.install(conn, sql_path)
            finally:
                engine.dispose()
            if setup:
                with psycopg.connect(scratch) as conn:
                    conn.execute(setup.encode())
            yield scratch
        finally:
            with psycopg.connect(admin_dsn, autocommit=True) as admin:
                admin.execute(sql.SQL("drop database if exists {} with (force)")
                              .format(sql.Identifier(name)))
    finally:
        if embedded is not None:
            embedded.stop()

