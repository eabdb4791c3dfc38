"""The base install (no ``asyncio`` extra) has no greenlet: everything sync must work."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import Database

# Blocks the greenlet import the way a missing package would, then uses the sync API.
SCRIPT = """
import sys
sys.modules["greenlet"] = None
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
import alembic_ops, sqlalchemy_pgque.worker
from sqlalchemy_pgque import AsyncConsumer, Consumer, Queue

engine = create_engine(sys.argv[1])
q = Queue("plain")
with engine.begin() as conn:
    conn.exec_driver_sql("select pgque.create_queue('plain')")
with Session(engine) as session, session.begin():
    handle = q.send(session, {"n": 1})
assert handle.event_id is not None
Consumer(sessionmaker(engine), queue=q, name="c")
try:
    AsyncConsumer(engine, queue=q, name="c")
except ImportError as exc:
    assert "sqlalchemy-pgque[asyncio]" in str(exc), exc
else:
    raise AssertionError("AsyncConsumer without greenlet should name the extra")
print("sync ok")
"""


def test_sync_api_works_without_greenlet(db: Database) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, db.url.render_as_string(hide_password=False)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sync ok" in result.stdout
