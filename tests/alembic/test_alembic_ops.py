"""alembic_ops operations run by real Alembic projects against a real database.

Each test writes an Alembic project (alembic.ini, env.py, versions/) into tmp_path and
drives it through ``alembic.command``. The helpers here are shared with
test_alembic_offline.py and test_alembic_autogenerate.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from engine_helpers import drain, ids, send, tick
from sqlalchemy.engine import URL

from alembic_ops import (
    CreateQueueOp,
    DropQueueOp,
    GrantOp,
    InstallOp,
    PgqueMigrationError,
    SetQueueConfigOp,
    SubscribeOp,
    SubscribeSubconsumerOp,
)
from sqlalchemy_pgque import ForeignSchemaError

ENV_PY = '''
import os
import runpy
from pathlib import Path

from alembic import context
from sqlalchemy import MetaData, create_engine, pool

import alembic_ops  # noqa: F401

config = context.config
models_path = Path(config.config_file_name).parent / "models.py"
models = runpy.run_path(str(models_path)) if models_path.exists() else {}
url = config.attributes.get("url") or os.environ["PGQUE_ALEMBIC_URL"]
options = dict(
    target_metadata=models.get("metadata", MetaData()),
    pgque_registry=models.get("registry"),
    **models.get("alembic_options", {}),
)

if context.is_offline_mode():
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **options)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **options)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
'''

SCRIPT_MAKO = '''"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""
from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
'''


class AlembicProject:
    """An Alembic project in a directory, bound to one test database."""

    def __init__(self, root: Path, url: URL) -> None:
        self.root = root
        self.url = url
        self.versions = root / "migrations" / "versions"
        self.versions.mkdir(parents=True)
        (root / "alembic.ini").write_text(
            "[alembic]\nscript_location = %(here)s/migrations\n", encoding="utf-8"
        )
        (root / "migrations" / "env.py").write_text(ENV_PY, encoding="utf-8")
        (root / "migrations" / "script.py.mako").write_text(SCRIPT_MAKO, encoding="utf-8")
        self._revisions: list[str] = []

    def config(self) -> Config:
        cfg = Config(str(self.root / "alembic.ini"), stdout=StringIO())
        cfg.attributes["url"] = self.url
        return cfg

    def models(self, source: str) -> None:
        """Write models.py: ``registry``, ``metadata`` and ``alembic_options`` for env.py."""
        (self.root / "models.py").write_text(textwrap.dedent(source), encoding="utf-8")

    def revision(self, upgrade: str, downgrade: str, *, imports: str = "") -> str:
        """Write a hand-made revision on top of the previous one; returns its id."""
        rev = f"r{len(self._revisions) + 1:03d}"
        down = repr(self._revisions[-1]) if self._revisions else "None"

        def block(source: str) -> str:
            return textwrap.indent(textwrap.dedent(source).strip(), "    ")

        body = (
            f"from alembic import op\n{imports}\n"
            f"revision = {rev!r}\ndown_revision = {down}\n"
            "branch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade() -> None:\n{block(upgrade)}\n\n\n"
            f"def downgrade() -> None:\n{block(downgrade)}\n"
        )
        (self.versions / f"{rev}.py").write_text(body, encoding="utf-8")
        self._revisions.append(rev)
        return rev

    def upgrade(self, target: str = "head") -> None:
        command.upgrade(self.config(), target)

    def downgrade(self, target: str) -> None:
        command.downgrade(self.config(), target)

    def autogenerate(self, message: str = "auto") -> str:
        """Run ``revision --autogenerate`` and return the text of the new file."""
        script = command.revision(self.config(), message=message, autogenerate=True)
        assert script is not None and not isinstance(script, list)
        assert script.path is not None
        self._revisions.append(script.revision)
        return Path(script.path).read_text(encoding="utf-8")

    def offline_sql(self, revision_range: str, *, downgrade: bool = False) -> str:
        buffer = StringIO()
        cfg = Config(str(self.root / "alembic.ini"), output_buffer=buffer, stdout=StringIO())
        cfg.attributes["url"] = self.url
        if downgrade:
            command.downgrade(cfg, revision_range, sql=True)
        else:
            command.upgrade(cfg, revision_range, sql=True)
        return buffer.getvalue()


def pgque_state(dsn: str) -> dict[str, Any]:
    """What a migration can change: queues with settings, subscriptions, functions."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        has_version_table = conn.execute("SELECT to_regclass('alembic_version')").fetchone()
        version = (
            conn.execute("SELECT version_num FROM alembic_version").fetchall()
            if has_version_table and has_version_table[0]
            else []
        )
        if not conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'pgque'").fetchall():
            return {"installed": False, "alembic": version}
        queues = conn.execute(
            "SELECT queue_name, queue_ticker_max_count, queue_ticker_max_lag::text,"
            " queue_ticker_idle_period::text, queue_ticker_paused, queue_rotation_period::text,"
            " queue_external_ticker, queue_max_retries FROM pgque.queue ORDER BY queue_name"
        ).fetchall()
        subscriptions = conn.execute(
            "SELECT q.queue_name, c.co_name, s.sub_role FROM pgque.subscription s"
            " JOIN pgque.queue q ON q.queue_id = s.sub_queue"
            " JOIN pgque.consumer c ON c.co_id = s.sub_consumer ORDER BY 1, 2"
        ).fetchall()
        consumers = conn.execute("SELECT co_name FROM pgque.consumer ORDER BY 1").fetchall()
        functions = conn.execute(
            "SELECT p.proname, pg_get_function_identity_arguments(p.oid), md5(p.prosrc)"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pgque' ORDER BY 1, 2"
        ).fetchall()
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pgque' ORDER BY 1"
        ).fetchall()
    return {
        "installed": True,
        "alembic": version,
        "queues": queues,
        "subscriptions": subscriptions,
        "consumers": consumers,
        "functions": functions,
        "tables": tables,
    }


def send_and_tick(dsn: str, queue: str, payloads: list[str]) -> list[int]:
    """Send events, each committed, then make a tick that covers them; their ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        sent = [send(conn, queue, payload) for payload in payloads]
        tick(conn, queue)
    return sent


def receive_all(dsn: str, queue: str, consumer: str) -> list[int]:
    """Every event id the consumer gets up to the latest tick, acking each batch."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return ids(drain(conn, queue, consumer))


def _subscriptions(dsn: str) -> list[tuple[Any, ...]]:
    state = pgque_state(dsn)
    return list(state.get("subscriptions", []))


FIRST_REVISION_UP = """
    op.pgque_install()
    op.pgque_create_queue("orders", ticker_max_lag="1 second", max_retries=3)
    op.pgque_subscribe("orders", "billing")
"""
FIRST_REVISION_DOWN = """
    op.pgque_unsubscribe("orders", "billing")
    op.pgque_drop_queue("orders")
    op.pgque_uninstall()
"""


def test_upgrade_downgrade_upgrade_keeps_events_where_they_should(
    empty_db: Any, tmp_path: Path
) -> None:
    project = AlembicProject(tmp_path / "project", empty_db.url)
    project.revision(FIRST_REVISION_UP, FIRST_REVISION_DOWN)
    project.revision(
        'op.pgque_subscribe("orders", "shipping")', 'op.pgque_unsubscribe("orders", "shipping")'
    )

    project.upgrade()
    state = pgque_state(empty_db.dsn)
    assert state["alembic"] == [("r002",)]
    assert state["queues"] == [("orders", 500, "00:00:01", "00:01:00", False, "02:00:00", False, 3)]
    assert state["subscriptions"] == [
        ("orders", "billing", "normal"),
        ("orders", "shipping", "normal"),
    ]

    sent = send_and_tick(empty_db.dsn, "orders", ['{"n": 1}', '{"n": 2}'])
    # Downgrading only the second revision unsubscribes shipping; billing keeps its events.
    project.downgrade("r001")
    assert _subscriptions(empty_db.dsn) == [("orders", "billing", "normal")]
    assert receive_all(empty_db.dsn, "orders", "billing") == sent

    project.upgrade()
    later = send_and_tick(empty_db.dsn, "orders", ['{"n": 3}'])
    assert receive_all(empty_db.dsn, "orders", "shipping") == later
    assert receive_all(empty_db.dsn, "orders", "billing") == later

    project.downgrade("base")
    assert pgque_state(empty_db.dsn) == {"installed": False, "alembic": []}

    project.upgrade()
    state = pgque_state(empty_db.dsn)
    assert [s[:2] for s in state["subscriptions"]] == [
        ("orders", "billing"),
        ("orders", "shipping"),
    ]
    assert receive_all(empty_db.dsn, "orders", "billing") == []


def test_install_on_a_database_that_has_the_engine_keeps_its_queues(
    db: Any, tmp_path: Path
) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SELECT pgque.create_queue('existing')")
        conn.execute("SELECT pgque.subscribe('existing', 'reader')")
    sent = send_and_tick(db.dsn, "existing", ['{"kept": true}'])
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision("op.pgque_install()", "pass")
    project.upgrade()
    assert receive_all(db.dsn, "existing", "reader") == sent


def test_typed_functions_run_the_same_operations(db: Any, tmp_path: Path) -> None:
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(
        """
        pgque.create_queue("typed", ticker_paused=True)
        pgque.subscribe("typed", "worker")
        pgque.set_queue_config("typed", "queue_ticker_max_count", 10)
        """,
        """
        pgque.unsubscribe("typed", "worker")
        pgque.drop_queue("typed")
        """,
        imports="import alembic_ops as pgque",
    )
    project.upgrade()
    state = pgque_state(db.dsn)
    assert state["queues"] == [("typed", 10, "00:00:03", "00:01:00", True, "02:00:00", False, None)]
    assert state["subscriptions"] == [("typed", "worker", "normal")]
    project.downgrade("base")
    state = pgque_state(db.dsn)
    assert state["queues"] == [] and state["subscriptions"] == []


def test_set_queue_config_and_its_reverse(db: Any, tmp_path: Path) -> None:
    forward = SetQueueConfigOp("cfg", "ticker_max_lag", "250 milliseconds", previous="00:00:02")
    hand_written = SetQueueConfigOp("cfg", "max_retries", 7)
    assert forward.reverse().to_diff_tuple() == (
        "pgque_set_queue_config", "cfg", "ticker_max_lag", "00:00:02",
    )
    # Unknown previous value: the reverse resets to the default (NULL).
    assert hand_written.reverse().value is None

    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(
        """
        op.pgque_create_queue("cfg", ticker_max_lag="2 seconds")
        op.pgque_set_queue_config("cfg", "ticker_max_lag", "250 milliseconds")
        op.pgque_set_queue_config("cfg", "max_retries", 7)
        """,
        """
        op.invoke(SetQueueConfigOp("cfg", "max_retries", 7).reverse())
        op.invoke(
            SetQueueConfigOp(
                "cfg", "ticker_max_lag", "250 milliseconds", previous="00:00:02"
            ).reverse()
        )
        """,
        imports="from alembic_ops import SetQueueConfigOp",
    )
    project.upgrade()
    (queue,) = pgque_state(db.dsn)["queues"]
    assert (queue[2], queue[7]) == ("00:00:00.25", 7)
    project.downgrade("base")
    (queue,) = pgque_state(db.dsn)["queues"]
    assert (queue[2], queue[7]) == ("00:00:02", None)


def test_names_with_quotes_percent_and_colons(db: Any, tmp_path: Path) -> None:
    name = "it's:50%_\\done"
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(
        f"op.pgque_create_queue({name!r})\nop.pgque_subscribe({name!r}, 'c:%s')",
        f"op.pgque_unsubscribe({name!r}, 'c:%s')\nop.pgque_drop_queue({name!r})",
    )
    project.upgrade()
    assert _subscriptions(db.dsn) == [(name, "c:%s", "normal")]
    project.downgrade("base")
    assert pgque_state(db.dsn)["queues"] == []


def test_cooperative_subconsumers_and_their_reverse(db: Any, tmp_path: Path) -> None:
    subscribe = SubscribeSubconsumerOp("coop", "group", "s2")
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(
        """
        op.pgque_create_queue("coop")
        op.pgque_subscribe_subconsumer("coop", "group", "s1")
        op.pgque_subscribe_subconsumer("coop", "group", "s2")
        """,
        """
        op.invoke(SubscribeSubconsumerOp("coop", "group", "s2").reverse())
        op.invoke(SubscribeSubconsumerOp("coop", "group", "s1").reverse())
        op.pgque_drop_queue("coop")
        """,
        imports="from alembic_ops import SubscribeSubconsumerOp",
    )
    assert subscribe.reverse().to_diff_tuple() == (
        "pgque_unsubscribe_subconsumer", "coop", "group", "s2", ("unsubscribe_if_last", True),
    )
    project.upgrade()
    assert _subscriptions(db.dsn) == [
        ("coop", "group", "coop_main"),
        ("coop", "group.s1", "coop_member"),
        ("coop", "group.s2", "coop_member"),
    ]
    # The reverse of the last subscribe_subconsumer also unsubscribes the group, so
    # the downgrade's drop_queue (without force) succeeds.
    project.downgrade("base")
    assert pgque_state(db.dsn)["queues"] == []


def test_unsubscribe_subconsumer_reverse_converts_back_to_cooperative(
    db: Any, tmp_path: Path
) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SELECT pgque.create_queue('coop')")
        conn.execute("SELECT pgque.register_subconsumer('coop', 'group', 's1')")
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(
        'op.pgque_unsubscribe_subconsumer("coop", "group", "s1")',
        'op.invoke(UnsubscribeSubconsumerOp("coop", "group", "s1").reverse())',
        imports="from alembic_ops import UnsubscribeSubconsumerOp",
    )
    project.upgrade()
    # The last subconsumer gone, PgQue keeps the group as a normal consumer.
    assert _subscriptions(db.dsn) == [("coop", "group", "normal")]
    project.downgrade("base")
    assert _subscriptions(db.dsn) == [
        ("coop", "group", "coop_main"),
        ("coop", "group.s1", "coop_member"),
    ]


def memberships(dsn: str, role: str) -> tuple[bool, bool]:
    """Whether ``role`` is a member of (pgque_reader, pgque_writer)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_has_role(%s, 'pgque_reader', 'MEMBER'),"
            " pg_has_role(%s, 'pgque_writer', 'MEMBER')",
            (role, role),
        ).fetchone()
    assert row is not None
    return bool(row[0]), bool(row[1])


def test_grant_and_revoke(db: Any, tmp_path: Path, app_role: str) -> None:
    assert GrantOp(app_role, writer=False).reverse().to_diff_tuple() == (
        "pgque_revoke", app_role, ("writer", False),
    )
    with pytest.raises(ValueError, match="at least one"):
        GrantOp(app_role, reader=False, writer=False)
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(f"op.pgque_grant({app_role!r})", f"op.pgque_revoke({app_role!r})")
    project.revision(
        f"op.pgque_revoke({app_role!r}, reader=False)",
        f"op.pgque_grant({app_role!r}, reader=False)",
    )
    project.upgrade("r001")
    assert memberships(db.dsn, app_role) == (True, True)
    project.upgrade("r002")
    assert memberships(db.dsn, app_role) == (True, False)
    project.downgrade("r001")
    assert memberships(db.dsn, app_role) == (True, True)
    project.downgrade("base")
    assert memberships(db.dsn, app_role) == (False, False)


def test_reverse_pairs() -> None:
    pairs = [
        (InstallOp(), "pgque_uninstall"),
        (CreateQueueOp("q", {"max_retries": 2}), "pgque_drop_queue"),
        (DropQueueOp("q", config={"ticker_paused": True}), "pgque_create_queue"),
        (SubscribeOp("q", "c"), "pgque_unsubscribe"),
        (GrantOp("r"), "pgque_revoke"),
    ]
    for operation, reverse_name in pairs:
        assert operation.reverse().op_name == reverse_name
        assert operation.reverse().reverse().to_diff_tuple() == operation.to_diff_tuple()
    assert DropQueueOp("q", config={"ticker_paused": True}).reverse().config == {
        "ticker_paused": "true"
    }
    with pytest.raises(ValueError, match="unknown PgQue queue parameter 'ticker_speed'"):
        CreateQueueOp("q", {"ticker_speed": 1})


# Bad input: a clear error and the migration's transaction rolled back.


def test_subscribing_to_an_unknown_queue_rolls_back_the_migration(
    db: Any, tmp_path: Path
) -> None:
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision('op.pgque_create_queue("orders")', 'op.pgque_drop_queue("orders")')
    project.upgrade()
    before = pgque_state(db.dsn)
    project.revision(
        """
        op.pgque_create_queue("made_then_rolled_back")
        op.pgque_subscribe("missing", "worker")
        """,
        "pass",
    )
    with pytest.raises(PgqueMigrationError) as failure:
        project.upgrade()
    message = str(failure.value)
    assert "op.pgque_subscribe('missing', 'worker') failed" in message
    assert "create the queue first" in message
    assert pgque_state(db.dsn) == before


def test_dropping_a_queue_with_consumers_needs_force(db: Any, tmp_path: Path) -> None:
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(
        'op.pgque_create_queue("orders")\nop.pgque_subscribe("orders", "billing")', "pass"
    )
    project.revision('op.pgque_drop_queue("orders")', 'op.pgque_create_queue("orders")')
    project.revision("pass", "pass")
    project.upgrade("r001")
    sent = send_and_tick(db.dsn, "orders", ['{"n": 1}'])
    before = pgque_state(db.dsn)
    with pytest.raises(PgqueMigrationError, match=r"consumers still attached.*force=True"):
        project.upgrade("head")
    assert pgque_state(db.dsn) == before
    assert receive_all(db.dsn, "orders", "billing") == sent


def test_forced_drop_removes_the_consumers(db: Any, tmp_path: Path) -> None:
    project = AlembicProject(tmp_path / "project", db.url)
    project.revision(
        'op.pgque_create_queue("orders")\nop.pgque_subscribe("orders", "billing")', "pass"
    )
    project.revision('op.pgque_drop_queue("orders", force=True)', "pass")
    project.upgrade()
    state = pgque_state(db.dsn)
    assert state["queues"] == [] and state["subscriptions"] == []


def test_install_over_a_foreign_pgque_schema_rolls_back(
    empty_db: Any, tmp_path: Path
) -> None:
    with psycopg.connect(empty_db.dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pgque")
        conn.execute("CREATE TABLE pgque.queue (queue_name text)")
        conn.execute("CREATE TABLE app_table (id int)")
    project = AlembicProject(tmp_path / "project", empty_db.url)
    project.revision("op.pgque_install()", "op.pgque_uninstall()")
    with pytest.raises(ForeignSchemaError, match="not created by sqlalchemy-pgque"):
        project.upgrade()
    with psycopg.connect(empty_db.dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'pgque'"
        ).fetchall() == [("queue",)]
        assert conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,)
        assert conn.execute(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'pgque'"
        ).fetchone() == (0,)


def test_operations_need_the_engine(empty_db: Any, tmp_path: Path) -> None:
    project = AlembicProject(tmp_path / "project", empty_db.url)
    project.revision('op.pgque_create_queue("orders")', "pass")
    with pytest.raises(PgqueMigrationError, match=r"install the engine first"):
        project.upgrade()
    assert pgque_state(empty_db.dsn) == {"installed": False, "alembic": []}


OPERATION_NAMES = (
    "pgque_install", "pgque_uninstall", "pgque_create_queue", "pgque_drop_queue",
    "pgque_subscribe", "pgque_unsubscribe", "pgque_subscribe_subconsumer",
    "pgque_unsubscribe_subconsumer", "pgque_set_queue_config", "pgque_grant", "pgque_revoke",
)

ACTIVATION_PROBE = """
import sys
{imports}
from alembic.autogenerate.compare import comparators
from alembic.operations import Operations
from alembic.runtime.plugins import _all_plugins
from alembic_ops.compare import compare_queues
names = {names!r}
assert all(callable(getattr(Operations, n, None)) for n in names), "operations"
assert "pgque" in _all_plugins, "plugin"
registered = [fn for fns in comparators._registry.values() for fn, _ in fns]
assert registered == [compare_queues], registered
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import alembic_ops",
        "import alembic\nimport alembic_ops",
        "from alembic import op\nimport alembic_ops.ops\nimport alembic_ops",
    ],
)
def test_activation_in_any_import_order(imports: str) -> None:
    # The entry point loads alembic_ops while Alembic itself is being imported; in every
    # order the operations, the plugin and exactly one global comparator must exist.
    probe = ACTIVATION_PROBE.format(imports=imports, names=OPERATION_NAMES)
    subprocess.run([sys.executable, "-W", "error", "-c", probe], check=True)
