"""The command line: ``sqlalchemy-pgque`` (or ``python -m sqlalchemy_pgque``).

::

    sqlalchemy-pgque install --url postgresql+psycopg://...   # or DATABASE_URL
    sqlalchemy-pgque uninstall | version --url ...
    sqlalchemy-pgque sql > pgque.sql                          # the engine, for psql
    sqlalchemy-pgque status [--json] [--watch 2] [--check --max-lag 600 ...]
    sqlalchemy-pgque dlq list|show|replay|purge ...
    sqlalchemy-pgque tick [QUEUE]
    sqlalchemy-pgque worker myapp.workers:consumer --ticker   # = python -m sqlalchemy_pgque.worker
    sqlalchemy-pgque dashboard [--host 127.0.0.1] [--port 8580] [--allow-writes] ...

Exit codes: 0 done (``status --check``: everything within the thresholds); 1 a check
over its threshold, or a refused confirmation; 2 a usage or connection problem, a
missing engine or a missing role, told in one line.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, DBAPIError

from . import _statements as statements
from . import admin, schema
from ._duration import as_seconds
from ._duration import short as short_duration
from ._pooler import on_pool_connect
from .errors import PgqueError, _first_line, _translate
from .logs import configure_logging

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "worker":
        # The worker parses its own options; it is also `python -m sqlalchemy_pgque.worker`.
        from .worker import main as worker_main

        return worker_main(args[1:])
    parsed = _parser().parse_args(args)
    if parsed.command == "sql":
        sys.stdout.write(schema.engine_sql())
        return 0
    configure_logging(parsed.log_level, parsed.log_format)
    if not parsed.url:
        print("error: give --url or set DATABASE_URL", file=sys.stderr)
        return 2
    if parsed.command == "dashboard":
        return _dashboard(parsed)
    try:
        engine = create_engine(parsed.url)
    except (ArgumentError, ValueError) as exc:
        print(f"error: bad database URL: {_first_line(exc)}", file=sys.stderr)
        return 2
    # `status --watch` repeats its statements on one connection: psycopg would prepare
    # them, which a pooler in transaction mode breaks.
    event.listen(engine.pool, "connect", on_pool_connect)
    try:
        return int(parsed.run(engine, parsed))
    except (PgqueError, DBAPIError) as exc:
        print(f"error: {_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        engine.dispose()


def _error_line(exc: Exception) -> str:
    """What a command prints of a library or database error: one line, the library's
    named error where the database's error has one."""
    if isinstance(exc, DBAPIError):
        error = _translate(exc)
        return str(error) if error is not None else _first_line(exc.orig or exc)
    return str(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqlalchemy-pgque",
        description="Install, inspect and operate PgQue; run a worker "
                    "('sqlalchemy-pgque worker --help').",
    )
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--url", default=os.environ.get("DATABASE_URL"),
                     help="SQLAlchemy database URL (default: $DATABASE_URL)")
    url.add_argument("--log-format", default="text", choices=["text", "json"],
                     help="format of the log lines on stderr")
    url.add_argument("--log-level", default="WARNING", type=str.upper,
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    install = commands.add_parser("install", parents=[url], help="install or upgrade the engine")
    install.add_argument("--sql-path",
                         help="install this PgQue SQL file instead of the bundled one")
    install.add_argument("--take-over", action="store_true", help="replace a foreign pgque schema")
    install.set_defaults(run=_install)
    commands.add_parser("uninstall", parents=[url], help="drop the engine and every queue"
                        ).set_defaults(run=_uninstall)
    commands.add_parser("version", parents=[url], help="the installed engine's version"
                        ).set_defaults(run=_version)
    commands.add_parser("sql", help="print the bundled engine as one SQL script")
    commands.add_parser("worker", help="run consumers (see 'sqlalchemy-pgque worker --help')")

    status = commands.add_parser("status", parents=[url], help="queues and consumers")
    status.add_argument("--queue", help="only this queue")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", type=float, metavar="SECONDS",
                        help="refresh in place every SECONDS until Ctrl-C")
    status.add_argument("--check", action="store_true",
                        help="exit 1 when a figure is over its threshold (for cron or probes)")
    status.add_argument("--max-lag", type=as_seconds, metavar="DURATION",
                        help="consumer lag limit (seconds or text such as '10 minutes')")
    status.add_argument("--max-pending", type=int, metavar="N",
                        help="pending events limit per consumer")
    status.add_argument("--max-dlq", type=int, metavar="N", help="dead letters limit per queue")
    status.add_argument("--max-tick-age", type=as_seconds, metavar="DURATION",
                        help="age limit of a queue's latest tick")
    status.set_defaults(run=_status)

    tick = commands.add_parser("tick", parents=[url], help="one ticker pass")
    tick.add_argument("queue", nargs="?", help="tick only this queue")
    tick.add_argument("--force", action="store_true",
                      help="tick even below the queue's thresholds (force_next_tick first)")
    tick.set_defaults(run=_tick)

    dlq = commands.add_parser("dlq", help="the dead-letter queue")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--queue")
    filters.add_argument("--consumer")
    filters.add_argument("--type", help="event type")
    filters.add_argument("--reason", help="reason contains this (any case)")
    filters.add_argument("--since", type=_moment, metavar="WHEN",
                         help="dead-lettered at or after WHEN: ISO time, or a duration ago "
                              "('1 hour')")
    filters.add_argument("--before", type=_moment, metavar="WHEN", help="dead-lettered before WHEN")
    listing = actions.add_parser("list", parents=[url, filters], help="list dead letters")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--after-id", type=int, help="the page after this id")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_dlq_list)
    show = actions.add_parser("show", parents=[url], help="one dead letter, whole")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_dlq_show)
    replay = actions.add_parser("replay", parents=[url, filters],
                                help="send dead letters back to their queue")
    replay.add_argument("ids", nargs="*", type=int, help="dead-letter ids (or use filters)")
    replay.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    replay.set_defaults(run=_dlq_replay)
    purge = actions.add_parser("purge", parents=[url, filters],
                               help="delete dead letters for good")
    purge.add_argument("ids", nargs="*", type=int, help="dead-letter ids (or use filters)")
    purge.add_argument("--older-than", type=as_seconds, metavar="DURATION",
                       help="those dead-lettered longer ago than DURATION")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(run=_dlq_purge)

    dashboard = commands.add_parser(
        "dashboard", parents=[url],
        help="serve the web dashboard (needs: pip install 'sqlalchemy-pgque[dashboard]')")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1: this machine only)")
    dashboard.add_argument("--port", type=int, default=8580)
    dashboard.add_argument("--allow-writes", action="store_true",
                           help="offer replay and purge of dead letters (default: read-only)")
    dashboard.add_argument("--token", default=os.environ.get("PGQUE_DASHBOARD_TOKEN"),
                           help="require this token: 'Authorization: Bearer TOKEN', or open "
                                "the page once with ?token=TOKEN (default: "
                                "$PGQUE_DASHBOARD_TOKEN)")
    dashboard.add_argument("--basic-auth", metavar="USER:PASSWORD",
                           default=os.environ.get("PGQUE_DASHBOARD_BASIC_AUTH"),
                           help="require HTTP basic auth (default: $PGQUE_DASHBOARD_BASIC_AUTH)")
    dashboard.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS",
                           help="how often the pages refresh their figures (0: never)")
    dashboard.add_argument("--root-path", default="", metavar="PATH",
                           help="the path a reverse proxy serves the dashboard under")
    return parser


def _moment(value: str) -> datetime:
    """An ISO time, or a duration meaning that long ago."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return datetime.now(timezone.utc) - timedelta(seconds=as_seconds(value))
    return moment if moment.tzinfo else moment.astimezone()


# -- dashboard -------------------------------------------------------------------------


def _dashboard(args: argparse.Namespace) -> int:
    hint = "pip install 'sqlalchemy-pgque[dashboard]'"
    try:
        import uvicorn

        from .dashboard import MissingExtra, create_app
        from .dashboard._app import engine_from
    except ImportError as exc:
        print(f"error: the dashboard needs {exc.name}: {hint}", file=sys.stderr)
        return 2
    if args.token and args.basic_auth:
        print("error: give --token or --basic-auth, not both", file=sys.stderr)
        return 2
    auth: str | tuple[str, str] | None = args.token or None
    if args.basic_auth:
        user, colon, password = args.basic_auth.partition(":")
        if not (user and colon and password):
            print("error: --basic-auth takes USER:PASSWORD", file=sys.stderr)
            return 2
        auth = (user, password)
    if args.allow_writes and auth is None and not _is_loopback(args.host):
        print(f"error: refusing --allow-writes on {args.host} without --token or "
              "--basic-auth: anyone who can reach the port could replay or purge dead "
              "letters", file=sys.stderr)
        return 2
    try:
        engine = engine_from(args.url)
    except (ArgumentError, ValueError) as exc:
        print(f"error: bad database URL: {_first_line(exc)}", file=sys.stderr)
        return 2
    try:
        # Fail now, in one line, rather than on the first page.
        _with_engine_check(engine, lambda conn: None)
        app = create_app(engine, allow_writes=args.allow_writes,
                         refresh_seconds=args.refresh, auth=auth)
    except (MissingExtra, PgqueError, DBAPIError) as exc:
        print(f"error: {_error_line(exc)}", file=sys.stderr)
        return 2
    served: Any = app
    if _is_loopback(args.host):
        # Only the names of this machine: a web page whose DNS name is rebound to
        # 127.0.0.1 would otherwise talk to the dashboard as if it were the same site
        # (read it, and with --allow-writes, take a CSRF token and post it back).
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        served = TrustedHostMiddleware(app, allowed_hosts=[
            "localhost", "127.0.0.1", "::1", "[::1]", args.host])
    shown = f"[{args.host}]" if ":" in args.host else args.host
    details = ["read-write" if args.allow_writes else "read-only"]
    if auth:
        details.append("login required")
    if args.root_path:
        details.append(f"links under {args.root_path}")
    print(f"serving the dashboard on http://{shown}:{args.port}/ ({', '.join(details)}); "
          "Ctrl-C ends", file=sys.stderr, flush=True)
    # uvicorn stops cleanly on SIGTERM, then raises the signal again for the handler
    # it found: a handler that ignores it makes that stop exit 0, as the worker does.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        # log_config=None: uvicorn's records go through the logging set up above.
        uvicorn.run(served, host=args.host, port=args.port, root_path=args.root_path,
                    log_config=None, log_level=args.log_level.lower())
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.dispose()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- engine ----------------------------------------------------------------------------


def _install(engine: Engine, args: argparse.Namespace) -> int:
    with engine.begin() as conn:
        schema.install(conn, args.sql_path, take_over=args.take_over)
        print(f"pgque {schema.installed_version(conn)} installed")
    return 0


def _uninstall(engine: Engine, args: argparse.Namespace) -> int:
    with engine.begin() as conn:
        schema.uninstall(conn)
    print("pgque uninstalled")
    return 0


def _version(engine: Engine, args: argparse.Namespace) -> int:
    with engine.connect() as conn:
        print(schema.installed_version(conn) or "not installed")
    return 0


def _tick(engine: Engine, args: argparse.Namespace) -> int:
    params = {"queue": args.queue}
    if args.force:
        with engine.begin() as conn:
            names = [args.queue] if args.queue else list(
                conn.execute(statements.QUEUE_NAMES).scalars())
            for name in names:
                statements.execute(conn, statements.FORCE_NEXT_TICK, {"queue": name},
                                   statements.ADMIN)
    # A forced tick must come from a later transaction than the forcing one.
    with engine.begin() as conn:
        schema._require_installed(conn)
        if args.queue:
            tick_id = statements.execute(conn, statements.TICKER, params,
                                         statements.ADMIN).scalar()
            print(f"{args.queue}: tick {tick_id}" if tick_id is not None
                  else f"{args.queue}: no tick needed")
        else:
            ticked = statements.execute(conn, statements.TICKER_ALL, {},
                                        statements.ADMIN).scalar()
            print(f"{ticked or 0} queues ticked")
    return 0


# -- status ----------------------------------------------------------------------------


def _status(engine: Engine, args: argparse.Namespace) -> int:
    if args.watch is not None:
        if args.watch <= 0:
            print("error: --watch needs a positive number of seconds", file=sys.stderr)
            return 2
        # The screen says Ctrl-C ends it: Python installs that only when SIGINT was not
        # ignored at start, and a process started in the background by a
        # non-interactive shell (a script's `cmd &`) inherits it ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        while True:
            queues, consumers = _read_status(engine, args.queue)
            # Home and clear, then draw: the table refreshes in place.
            sys.stdout.write("\x1b[H\x1b[2J")
            print(datetime.now().strftime("%H:%M:%S"), f"every {args.watch:g} s, Ctrl-C ends")
            _print_status(queues, consumers, args.json, sys.stdout)
            sys.stdout.flush()
            time.sleep(args.watch)
    queues, consumers = _read_status(engine, args.queue)
    if args.check:
        over = _over_thresholds(queues, consumers, args)
        if args.json:
            print(json.dumps({"ok": not over, "over": over}))
        else:
            for line in over:
                print(f"over: {line}")
            if not over:
                print(f"ok: {len(queues)} queues and {len(consumers)} consumers within the "
                      "thresholds")
        return 1 if over else 0
    _print_status(queues, consumers, args.json, sys.stdout)
    return 0


def _read_status(
    engine: Engine, queue: str | None
) -> tuple[list[admin.QueueStatus], list[admin.ConsumerStatus]]:
    return _with_engine_check(  # type: ignore[no-any-return]
        engine, lambda conn: (admin.queues(conn, queue), admin.consumers(conn, queue)))


def _over_thresholds(queues: list[admin.QueueStatus], consumers: list[admin.ConsumerStatus],
                     args: argparse.Namespace) -> list[str]:
    over: list[str] = []
    for q in queues:
        if args.max_dlq is not None and q.dlq_events > args.max_dlq:
            over.append(f"{q.queue}: {q.dlq_events} dead letters > {args.max_dlq}")
        if args.max_tick_age is not None and not q.ticker_paused and (
                q.ticker_lag_seconds is None or q.ticker_lag_seconds > args.max_tick_age):
            age = "never ticked" if q.ticker_lag_seconds is None \
                else f"last tick {short_duration(q.ticker_lag_seconds)} ago"
            over.append(f"{q.queue}: {age} > {short_duration(args.max_tick_age)}")
    for c in consumers:
        if c.cooperative:
            continue  # judged by its subconsumers
        if args.max_lag is not None and c.lag_seconds is not None \
                and c.lag_seconds > args.max_lag:
            over.append(f"{c.label}: lag {short_duration(c.lag_seconds)} > "
                        f"{short_duration(args.max_lag)}")
        if args.max_pending is not None and c.pending_events > args.max_pending:
            over.append(f"{c.label}: {c.pending_events} pending events > {args.max_pending}")
    return over


def _print_status(queues: list[admin.QueueStatus], consumers: list[admin.ConsumerStatus],
                  as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps({"queues": [q.as_dict() for q in queues],
                              "consumers": [c.as_dict() for c in consumers]}, indent=2))
        out.write("\n")
        return
    _table(out, ["QUEUE", "PENDING", "NOT TICKED", "EVENTS/S", "LAST TICK", "DLQ", "TABLE",
                 "ROTATED", "ROTATION BLOCKED BY"], [
        [q.queue, q.pending_events, q.events_not_ticked,
         "-" if q.events_per_second is None else f"{q.events_per_second:.1f}",
         "never" if q.ticker_lag_seconds is None else f"{short_duration(q.ticker_lag_seconds)} ago"
         + (" (paused)" if q.ticker_paused else ""),
         q.dlq_events, f"{q.current_table + 1}/{q.tables}",
         f"{short_duration(q.seconds_since_rotation)} ago"
         + (" (step 2 pending)" if q.rotation_pending_step2 else ""),
         ", ".join(q.rotation_blocked_by) or "-"]
        for q in queues
    ], empty="no queues")
    out.write("\n")
    _table(out, ["QUEUE", "CONSUMER", "LAG", "LAST SEEN", "PENDING", "BATCH", "BATCH AGE"], [
        [c.queue, c.consumer + (f".{c.subconsumer}" if c.subconsumer else "")
         + (" (cooperative)" if c.cooperative else ""),
         "-" if c.lag_seconds is None else short_duration(c.lag_seconds),
         f"{short_duration(c.last_seen_seconds)} ago", c.pending_events,
         "-" if c.batch_id is None else c.batch_id,
         "-" if c.batch_age_seconds is None else short_duration(c.batch_age_seconds)]
        for c in consumers
    ], empty="no consumers")


def _table(out: TextIO, header: list[str], rows: list[list[Any]], empty: str) -> None:
    if not rows:
        out.write(f"({empty})\n")
        return
    cells = [header, *[[str(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ).rstrip() + "\n")


def _is_number(value: object) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


# -- dead letters ----------------------------------------------------------------------


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"queue": args.queue, "consumer": args.consumer, "type": args.type,
            "reason": args.reason, "since": args.since, "before": args.before}


def _dlq_list(engine: Engine, args: argparse.Namespace) -> int:
    entries = _with_engine_check(engine, lambda conn: admin.dlq_list(
        conn, limit=args.limit, after_id=args.after_id, **_filters(args)))
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    _table(sys.stdout, ["ID", "QUEUE", "CONSUMER", "TYPE", "DEAD SINCE", "RETRIES", "REASON"], [
        [e.id, e.queue, e.consumer, e.type or "-", e.time.astimezone().strftime(
            "%Y-%m-%d %H:%M:%S"), "-" if e.retry_count is None else e.retry_count,
         _one_line(e.reason or "-", 60)]
        for e in entries
    ], empty="no dead letters")
    if args.limit and len(entries) == args.limit:
        print(f"(first {args.limit}; next page: --after-id {entries[-1].id})")
    return 0


def _dlq_show(engine: Engine, args: argparse.Namespace) -> int:
    entry = _with_engine_check(engine, lambda conn: admin.dlq_show(conn, args.id))
    data = entry.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    payload = data.pop("payload")
    width = max(len(key) for key in data)
    for key, value in data.items():
        if value is not None:
            print(f"{key.ljust(width)}  {value}")
    print("payload:")
    print(json.dumps(payload, indent=2, ensure_ascii=False))
    return 0


def _dlq_replay(engine: Engine, args: argparse.Namespace) -> int:
    filters = _filters(args)
    if not args.ids and all(value is None for value in filters.values()):
        print("error: give dead-letter ids or a filter (--queue, --consumer, --type, "
              "--reason, --since, --before)", file=sys.stderr)
        return 2
    with engine.begin() as conn:
        schema._require_installed(conn)
        chosen = admin.dlq_list(conn, limit=None, **filters) if not args.ids else None
        count = len(args.ids) if chosen is None else len(chosen)
        if count == 0:
            print("no dead letters match")
            return 0
        if not _confirm(args.yes, f"replay {count} dead letters to their queues?"):
            return 1
        ids = args.ids or [entry.id for entry in chosen or []]
        replayed = admin.dlq_replay(conn, ids)
    print(f"replayed {len(replayed)} dead letters")
    return 0


def _dlq_purge(engine: Engine, args: argparse.Namespace) -> int:
    filters = {name: value for name, value in _filters(args).items() if value is not None}
    if args.older_than is not None:
        filters["older_than"] = args.older_than
    if bool(args.ids) == bool(filters):
        print("error: give dead-letter ids or filters (--older-than, --queue, --consumer, "
              "--type, --reason, --since, --before), one of them", file=sys.stderr)
        return 2
    if args.ids:
        what = f"{len(args.ids)} dead letters"
    else:
        described = ", ".join(
            f"{name.replace('_', ' ')} {short_duration(value) if name == 'older_than' else value}"
            for name, value in filters.items())
        what = f"the dead letters matching {described}"
    if not _confirm(args.yes, f"delete {what} for good?"):
        return 1
    with engine.begin() as conn:
        schema._require_installed(conn)
        purged = admin.dlq_purge(conn, args.ids or None, **filters)
    print(f"purged {purged} dead letters")
    return 0


def _with_engine_check(engine: Engine, read: Callable[[Any], Any]) -> Any:
    with engine.begin() as conn:
        schema._require_installed(conn)
        return read(conn)


def _confirm(yes: bool, question: str) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        print(f"{question} Not confirmed: stdin is not a terminal; add --yes", file=sys.stderr)
        return False
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        print("nothing done")
        return False
    return True


def _one_line(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
