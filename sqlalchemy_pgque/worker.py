"""Run consumers (and optionally the ticker) as a process.

::

    python -m sqlalchemy_pgque.worker myapp.workers:consumer [more:consumers ...]
        [--url postgresql+psycopg://...] [--ticker] [--concurrency N] [--log-level INFO]

Each ``module:attribute`` names a :class:`~sqlalchemy_pgque.Consumer`, an
:class:`~sqlalchemy_pgque.AsyncConsumer`, or a list of them; each consumer runs in its
own thread. ``--url`` (or ``DATABASE_URL``) rebinds every consumer to that database;
without it each consumer uses the engine its session factory is bound to.
``--ticker`` also runs the :class:`~sqlalchemy_pgque.ticker.Ticker` (one process among
all those started with it ticks, elected by an advisory lock); ``--tick-period``
overrides ``pgque.config.tick_period_ms`` and ``--no-wake`` turns off ticking on
commit wake-ups.

``--concurrency N`` runs every cooperative consumer (one given ``subconsumer=``) as N
members of its group, ``<subconsumer>-1`` … ``<subconsumer>-N``, each in its own
thread; ``--subconsumer NAME`` replaces the member name set in code, so that worker
processes started from one command line can be given names of their own.

SIGTERM or SIGINT stops the consumers after their current batch; the exit code is then
0. Configuration problems (import path, URL, engine not installed, consumer not
subscribed) print one line on stderr and exit with code 2; a consumer failing later
stops the process with code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy import URL, Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from ._listen import stop_signals_handled
from .consumer import AsyncConsumer, Consumer, check_subscription
from .errors import InvalidName, PgqueError, first_line
from .ticker import Ticker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["main"]

log = logging.getLogger("sqlalchemy_pgque.worker")

EXIT_CONFIG_ERROR = 2
EXIT_RUNTIME_ERROR = 1

AnyConsumer = Consumer | AsyncConsumer


class ConfigError(Exception):
    """A problem to report in one line before anything runs."""


def load_consumers(target: str) -> list[AnyConsumer]:
    """The consumers named by ``module:attribute`` (a consumer or a list of them)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{target!r} is not of the form module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no attribute {attribute!r}") from None
    consumers: list[AnyConsumer] = []
    for item in list(obj) if isinstance(obj, (list, tuple)) else [obj]:
        if not isinstance(item, (Consumer, AsyncConsumer)):
            raise ConfigError(
                f"{target!r} is {type(item).__name__}, not a Consumer or a list of them"
            )
        consumers.append(item)
    return consumers


def expand_members(
    consumers: list[AnyConsumer], concurrency: int, subconsumer: str | None
) -> list[AnyConsumer]:
    """``consumers`` with each cooperative one replaced by the members to run."""
    if (concurrency > 1 or subconsumer) and all(c.subconsumer is None for c in consumers):
        raise ConfigError(
            "--concurrency and --subconsumer apply to cooperative consumers, and none is: "
            "give the Consumer a subconsumer= (it then shares its batches with the other "
            "members of its group)"
        )
    expanded: list[AnyConsumer] = []
    for consumer in consumers:
        if consumer.subconsumer is None:
            expanded.append(consumer)
            continue
        base = consumer.subconsumer if subconsumer is None else subconsumer
        names = [base] if concurrency == 1 else [f"{base}-{n}" for n in range(1, concurrency + 1)]
        if names == [consumer.subconsumer]:
            expanded.append(consumer)
            continue
        try:
            expanded.extend(consumer._as_member(name) for name in names)
        except InvalidName as exc:
            raise ConfigError(str(exc)) from None
    return expanded


@dataclass
class _Engines:
    """The engines the worker makes from --url (the sync one also serves checks)."""

    url: URL | None
    sync: Engine | None = None
    asynchronous: AsyncEngine | None = None
    pool_size: int = 5
    """Connections each engine keeps: one per consumer (their LISTEN connections are
    separate), so that --concurrency never leaves a member waiting for one."""

    def sync_engine(self) -> Engine:
        assert self.url is not None
        if self.sync is None:
            self.sync = create_engine(_sync_url(self.url), pool_size=self.pool_size)
        return self.sync

    def async_engine(self) -> AsyncEngine:
        assert self.url is not None
        if self.asynchronous is None:
            from sqlalchemy.ext.asyncio import create_async_engine  # needs greenlet

            self.asynchronous = create_async_engine(self.url, pool_size=self.pool_size)
        return self.asynchronous

    def dispose_sync(self) -> None:
        if self.sync is not None:
            self.sync.dispose()


def _sync_url(url: URL) -> URL:
    """``url`` with psycopg's synchronous driver, for the ticker and the checks."""
    return url.set(drivername="postgresql+psycopg")


def _parse_url(raw: str) -> URL:
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(f"bad database URL: {exc}") from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"bad database URL: {url.get_backend_name()!r} is not PostgreSQL")
    if url.drivername == "postgresql":
        # The package depends on psycopg; SQLAlchemy's default would be psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    return url


def _bind(consumers: list[AnyConsumer], engines: _Engines) -> None:
    for consumer in consumers:
        if engines.url is not None:
            try:
                if isinstance(consumer, AsyncConsumer):
                    consumer.use_engine(engines.async_engine())
                else:
                    consumer.use_engine(engines.sync_engine())
            except (ArgumentError, ImportError) as exc:
                raise ConfigError(f"bad database URL: {exc}") from None
        elif consumer.engine is None:
            raise ConfigError(
                f"{consumer!r} has no database: give --url or set DATABASE_URL, "
                "or bind its session factory to an engine"
            )


def _check(consumer: AnyConsumer) -> None:
    """Fail early, in one line, on what the consumer cannot recover from at run time."""
    try:
        if isinstance(consumer, Consumer):
            consumer.check()
        else:
            # Checked on a synchronous engine: an asyncio.run() here would leave the
            # async engine's pool holding connections of a closed event loop.
            async_engine = consumer.engine
            assert async_engine is not None
            engine = create_engine(_sync_url(async_engine.url))
            try:
                with engine.connect() as connection:
                    check_subscription(connection, consumer.queue.name, consumer.name,
                                       consumer.subconsumer)
            finally:
                engine.dispose()
    except PgqueError as exc:
        raise ConfigError(f"{consumer.label}: {exc}") from None
    except DBAPIError as exc:
        raise ConfigError(
            f"{consumer.label}: cannot use the database: {first_line(exc.orig or exc)}"
        ) from None


def _ticker_engine(consumers: list[AnyConsumer], engines: _Engines) -> Engine:
    if engines.url is None:
        first = consumers[0]
        if isinstance(first, Consumer):
            engine = first.engine
            assert engine is not None
            return engine
        async_engine = first.engine
        assert async_engine is not None
        engines.url = async_engine.url
    return engines.sync_engine()


class _Runner:
    """Threads running the consumers and the ticker, stopped together.

    Every async consumer runs in one thread's event loop, so an async engine they
    share never sees two loops.
    """

    def __init__(
        self, consumers: list[AnyConsumer], ticker: Ticker | None, engines: _Engines
    ) -> None:
        self.consumers = consumers
        self.ticker = ticker
        self.engines = engines
        self.failed = threading.Event()
        self._threads: list[threading.Thread] = []

    def stop(self) -> None:
        for consumer in self.consumers:
            consumer.stop()
        if self.ticker is not None:
            self.ticker.stop()

    def _failure(self, label: str, exc: Exception) -> None:
        log.error("%s failed: %s", label, exc, exc_info=not isinstance(exc, PgqueError))
        self.failed.set()
        self.stop()

    def _run_blocking(self, label: str, target: Consumer | Ticker) -> None:
        try:
            target.run(install_signal_handlers=False)
        except Exception as exc:
            self._failure(label, exc)

    async def _run_one_async(self, consumer: AsyncConsumer) -> None:
        try:
            await consumer.run(install_signal_handlers=False)
        except Exception as exc:
            self._failure(consumer.label, exc)

    async def _run_all_async(self, consumers: list[AsyncConsumer]) -> None:
        try:
            await asyncio.gather(*(self._run_one_async(c) for c in consumers))
        finally:
            if self.engines.asynchronous is not None:
                await self.engines.asynchronous.dispose()

    def _spawn(self, name: str, target: Callable[[], object]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def start(self) -> None:
        async_consumers = [c for c in self.consumers if isinstance(c, AsyncConsumer)]
        for consumer in self.consumers:
            if isinstance(consumer, Consumer):
                self._spawn(consumer.label, partial(self._run_blocking, consumer.label, consumer))
        if async_consumers:
            self._spawn("asyncio", partial(asyncio.run, self._run_all_async(async_consumers)))
        if self.ticker is not None:
            self._spawn("ticker", partial(self._run_blocking, "ticker", self.ticker))

    def join(self) -> None:
        for thread in self._threads:
            thread.join()


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_pgque.worker",
        description="Run sqlalchemy-pgque consumers until SIGTERM or SIGINT.",
    )
    parser.add_argument("targets", nargs="+", metavar="module:attribute",
                        help="a Consumer, an AsyncConsumer or a list of them")
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL"),
                        help="SQLAlchemy database URL (default: $DATABASE_URL); rebinds "
                             "every consumer to it")
    parser.add_argument("--ticker", action="store_true",
                        help="also tick the database's queues and run their maintenance "
                             "(one process among those started with --ticker ticks)")
    parser.add_argument("--tick-period", type=float, default=None, metavar="SECONDS",
                        help="ticker period (default: pgque.config.tick_period_ms)")
    parser.add_argument("--no-wake", action="store_true",
                        help="the ticker ticks on its period only, not on commit wake-ups")
    parser.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                        help="run each cooperative consumer as N members of its group, "
                             "in N threads (default: 1)")
    parser.add_argument("--subconsumer", default=None, metavar="NAME",
                        help="member name of the cooperative consumers (NAME-1 … NAME-N "
                             "with --concurrency), instead of the one set in code")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    engines = _Engines(url=None)
    try:
        try:
            if args.url:
                engines.url = _parse_url(args.url)
            consumers = [c for target in args.targets for c in load_consumers(target)]
            consumers = expand_members(consumers, args.concurrency, args.subconsumer)
            engines.pool_size = max(engines.pool_size, len(consumers) + 1)
            _bind(consumers, engines)
            for consumer in consumers:
                _check(consumer)
            ticker = None
            if args.ticker:
                ticker = Ticker(_ticker_engine(consumers, engines),
                                tick_period=args.tick_period, wake=not args.no_wake)
        except ConfigError as exc:
            print(f"sqlalchemy_pgque.worker: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        return _run(_Runner(consumers, ticker, engines))
    finally:
        engines.dispose_sync()


def _run(runner: _Runner) -> int:
    consumers, ticker = runner.consumers, runner.ticker

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s received: stopping after the current batches", sig.name)
        runner.stop()

    with stop_signals_handled(on_signal):
        log.info("worker started: %s%s", ", ".join(c.label for c in consumers),
                 " and the ticker" if ticker else "")
        runner.start()
        runner.join()
    if runner.failed.is_set():
        return EXIT_RUNTIME_ERROR
    log.info("worker stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
