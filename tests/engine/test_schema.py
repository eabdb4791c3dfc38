"""schema.install / uninstall / installed_version, and the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Database
from sqlalchemy import create_engine, text

from sqlalchemy_pgque import ForeignSchemaError, schema

BUNDLED = not os.environ.get("PGQUE_SCHEMA_SQL")


def _cli(db: Database, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pgque", *args,
         "--url", db.url.render_as_string(hide_password=False)],
        capture_output=True, text=True, timeout=60,
    )


def test_install_then_uninstall_through_the_command_line(empty_db: Database) -> None:
    assert _cli(empty_db, "version").stdout.strip() == "not installed"
    installed = _cli(empty_db, "install")
    assert installed.returncode == 0, installed.stderr
    assert _cli(empty_db, "version").stdout.strip().startswith("0.2")
    removed = _cli(empty_db, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert _cli(empty_db, "version").stdout.strip() == "not installed"


def test_sql_command_prints_the_bundled_script() -> None:
    out = subprocess.run([sys.executable, "-m", "sqlalchemy_pgque", "sql"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == schema.engine_sql()
    assert "CREATE OR REPLACE FUNCTION pgque.send" in out


@pytest.mark.skipif(not BUNDLED, reason="checks the bundled engine's identity")
def test_engine_build_names_this_implementation(empty_db: Database) -> None:
    engine = create_engine(empty_db.url)
    try:
        with engine.begin() as conn:
            assert schema.engine_build(conn) is None
            assert schema.installed_version(conn) is None
            schema.install(conn)
            assert schema.installed_version(conn) == "0.2.0"
            build = schema.engine_build(conn)
            assert build is not None and build.startswith("sqlalchemy-pgque engine")
    finally:
        engine.dispose()


@pytest.mark.skipif(not BUNDLED, reason="the guard is part of the bundled engine")
def test_foreign_schema_is_refused_unless_taken_over(empty_db: Database) -> None:
    engine = create_engine(empty_db.url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE SCHEMA pgque"))
            conn.execute(text("CREATE TABLE pgque.theirs (x int)"))
        with engine.begin() as conn, pytest.raises(ForeignSchemaError):
            schema.install(conn)
        with engine.connect() as conn:
            # nothing of ours was left behind by the refused install
            assert schema.installed_version(conn) is None
        with engine.begin() as conn:
            schema.install(conn, take_over=True)
            assert schema.installed_version(conn) == "0.2.0"
            assert conn.execute(text("SELECT count(*) FROM pgque.theirs")).scalar_one() == 0
    finally:
        engine.dispose()


def test_console_script_runs_the_command_line_and_the_worker() -> None:
    script = Path(sys.executable).with_name("sqlalchemy-pgque")
    assert script.exists(), "the console script is installed with the package"
    out = subprocess.run([str(script), "sql"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out == schema.engine_sql()
    worker_help = subprocess.run([str(script), "worker", "--help"], capture_output=True,
                                 text=True, timeout=60, check=True).stdout
    assert "--shutdown-timeout" in worker_help
