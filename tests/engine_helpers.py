"""Helpers shared by the engine tests (``test_engine_*.py``): plain psycopg calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

Conn = psycopg.Connection[tuple[Any, ...]]
ConnectAs = Callable[[str], Conn]
"""The ``role_conn`` fixture: a connection acting as a fresh member of a pgque role."""


def scalar(conn: Conn, query: str, *params: object) -> Any:
    """The first column of the one row ``query`` returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def make_queue(conn: Conn, name: str = "q", *consumers: str) -> None:
    """Create queue ``name`` and subscribe ``consumers``, each call asserting it was new."""
    assert scalar(conn, "select pgque.create_queue(%s)", name) == 1
    for consumer in consumers:
        assert scalar(conn, "select pgque.subscribe(%s, %s)", name, consumer) == 1
