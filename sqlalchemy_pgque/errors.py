"""Exceptions raised by sqlalchemy-pgque.

Every error a user can cause has its own class; errors raised by the engine are
mapped from the database message and chained (``raise ... from``) to the original
SQLAlchemy exception, so the SQL and its parameters stay available for debugging.
"""

from __future__ import annotations

__all__ = [
    "EngineNotInstalled",
    "ForeignSchemaError",
    "PgqueError",
]


class PgqueError(Exception):
    """Base class of every exception raised by sqlalchemy-pgque."""


class EngineNotInstalled(PgqueError):
    """The ``pgque`` schema is missing from the database."""

    def __init__(self, detail: str = "") -> None:
        message = (
            "the PgQue engine is not installed in this database; install it with "
            "`python -m sqlalchemy_pgque.schema install --url URL`, "
            "op.pgque_install() in an Alembic migration, or sqlalchemy_pgque.schema.install(conn)"
        )
        super().__init__(f"{message} ({detail})" if detail else message)


class ForeignSchemaError(PgqueError):
    """A ``pgque`` schema created by something else (e.g. upstream PgQue) is present."""
