"""PgQue, the bloat-free PostgreSQL event queue, native to SQLAlchemy and Alembic."""

from __future__ import annotations

from .errors import EngineNotInstalled, ForeignSchemaError, PgqueError

__all__ = [
    "EngineNotInstalled",
    "ForeignSchemaError",
    "PgqueError",
]
