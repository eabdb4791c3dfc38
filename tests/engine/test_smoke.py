from __future__ import annotations

from sqlalchemy import Engine, text

from sqlalchemy_pgque import schema


def test_template_has_engine_objects(engine: Engine) -> None:
    with engine.connect() as c:
        tables = set(c.execute(text(
            "select tablename from pg_tables where schemaname = 'pgque'")).scalars())
    assert {"queue", "consumer", "subscription", "tick", "retry_queue", "dead_letter",
            "config", "event_template"} <= tables
    assert schema.engine_sql().count("CREATE") > 10
