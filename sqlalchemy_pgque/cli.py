"""The command line: ``sqlalchemy-pgque`` (or ``python -m sqlalchemy_pgque``).

::

    sqlalchemy-pgque install --url postgresql+psycopg://...   # or DATABASE_URL
    sqlalchemy-pgque uninstall | version --url ...
    sqlalchemy-pgque sql > pgque.sql                          # the engine, for psql
    sqlalchemy-pgque worker myapp.workers:consumer --ticker   # = python -m sqlalchemy_pgque.worker
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sqlalchemy import create_engine

from . import schema
from .errors import ForeignSchemaError

__all__ = ["main"]

_ENGINE_COMMANDS = ("install", "uninstall", "version", "sql")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "worker":
        # The worker parses its own options; it is also `python -m sqlalchemy_pgque.worker`.
        from .worker import main as worker_main

        return worker_main(args[1:])
    return _engine_command(args)


def _engine_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sqlalchemy-pgque",
        description="Manage the PgQue engine, or run a worker ('sqlalchemy-pgque worker "
                    "--help').",
    )
    parser.add_argument("command", choices=[*_ENGINE_COMMANDS, "worker"])
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"), help="SQLAlchemy URL")
    parser.add_argument("--sql-path", help="install this PgQue SQL file instead of the bundled one")
    parser.add_argument("--take-over", action="store_true", help="replace a foreign pgque schema")
    args = parser.parse_args(argv)
    if args.command == "sql":
        sys.stdout.write(schema.engine_sql())
        return 0
    if not args.url:
        parser.error("give --url or set DATABASE_URL")
    engine = create_engine(args.url)
    try:
        with engine.begin() as conn:
            if args.command == "install":
                schema.install(conn, args.sql_path, take_over=args.take_over)
                print(f"pgque {schema.installed_version(conn)} installed")
            elif args.command == "uninstall":
                schema.uninstall(conn)
                print("pgque uninstalled")
            else:
                print(schema.installed_version(conn) or "not installed")
    except ForeignSchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0
