"""Alembic environment of the orders example."""

from __future__ import annotations

import os

from alembic import context
from orders.models import Base, registry
from sqlalchemy import create_engine

import alembic_ops  # noqa: F401  registers op.pgque_* and the queue comparator

config = context.config
url = config.get_main_option("sqlalchemy.url") or os.environ["DATABASE_URL"]


def run_offline() -> None:
    context.configure(url=url, literal_binds=True, pgque_registry=registry)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            pgque_registry=registry,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
