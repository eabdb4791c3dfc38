"""Loops written once for blocking and asyncio code: steps, backoff, stop and signals.

A loop that must run both in a thread and on an event loop (the consumer's, and
opening a LISTEN connection) is written as a generator of *steps*: each ``yield``
hands the driver a call to make (``session.commit``, a handler with its arguments, a
wait) and receives its result, or has its exception raised at the ``yield``. The
generator holds every decision; :func:`drive` makes the calls, :func:`adrive` also
awaits those that return an awaitable. This is psycopg's own design (its connection
logic is I/O-free generators under a sync and an async wait function). SQLAlchemy's
alternative, running the sync code under greenlet and bridging back to coroutines,
would make async handlers depend on SQLAlchemy's private greenlet helpers; the steps
need nothing but the language.

Also here: the reconnect backoff and outage logging, and the stop mechanics (a waker
for a thread blocked in ``select``, SIGTERM / SIGINT routing) of blocking loops.
"""

from __future__ import annotations

import inspect
import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from types import FrameType
from typing import Any, TypeAlias, TypeVar

__all__ = [
    "Backoff",
    "Outage",
    "Step",
    "Steps",
    "Waker",
    "adrive",
    "blocking_run",
    "drive",
    "in_main_thread",
    "stop_signals_handled",
    "within",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

Step: TypeAlias = Callable[[], Any]
"""A call for the driver to make; under :func:`adrive` its result may be an awaitable."""

Steps: TypeAlias = Generator[Step, Any, T]
"""A generator of :data:`Step` returning ``T``."""


def drive(steps: Steps[T]) -> T:
    """Run ``steps`` in this thread: make each call, send its result back."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(result) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        error = None
        try:
            result = step()
        except BaseException as exc:
            result, error = None, exc


async def adrive(steps: Steps[T]) -> T:
    """Run ``steps`` on the running event loop: :func:`drive`, awaiting awaitables."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(result) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        error = None
        try:
            result = step()
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            result, error = None, exc


def within(context: Any, body: Steps[T]) -> Steps[T]:
    """``with context: return (yield from body)`` for a sync or an async context
    manager (a Session or AsyncSession, their transactions), as steps. An error raised
    on exit replaces the body's, as in a ``with`` block; ``context`` must not suppress
    exceptions (no SQLAlchemy context manager does)."""
    is_async = hasattr(context, "__aexit__")
    yield context.__aenter__ if is_async else context.__enter__
    exit_ = context.__aexit__ if is_async else context.__exit__
    try:
        result = yield from body
    except BaseException as exc:
        yield partial(exit_, type(exc), exc, exc.__traceback__)
        raise
    yield partial(exit_, None, None, None)
    return result


class Backoff:
    """Delays between reconnection attempts: from 0.1 s, doubling, capped at 2 s.

    Each delay is drawn from the upper half of its step, so that processes that lost
    the server together do not come back in lockstep. The cap is low on purpose: an
    attempt against a server that is down costs next to nothing, and a worker should
    be delivering again within a couple of seconds of the server's return.
    """

    FIRST = 0.1
    MAX = 2.0

    def __init__(self, first: float = FIRST, cap: float = MAX) -> None:
        self._first = first
        self._cap = cap
        self._step = first

    def next(self) -> float:
        step = self._step
        self._step = min(step * 2, self._cap)
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        self._step = self._first


class Outage:
    """Backoff and logging for a loop that lost its database.

    The first failure is logged with its error; while the failures go on, one line
    every :attr:`REPEAT_LOG_INTERVAL` seconds says how long it has lasted, so a
    restarting server does not flood the log; the recovery is logged once.
    """

    REPEAT_LOG_INTERVAL = 30.0

    def __init__(self, label: str, logger: logging.Logger) -> None:
        self.label = label
        self._log = logger
        self.backoff = Backoff()
        self.started: float | None = None
        """``time.monotonic()`` of the first failure of the outage in progress."""
        self.failures = 0
        self._next_log = 0.0

    def failed(self, description: str, action: str = "reconnecting") -> float:
        """Record a failure described by ``description``; the delay before ``action``."""
        now = time.monotonic()
        delay = self.backoff.next()
        self.failures += 1
        if self.started is None:
            self.started = now
            self._next_log = now + self.REPEAT_LOG_INTERVAL
            self._log.warning("%s: %s; %s in %.2f s", self.label, description, action, delay)
        elif now >= self._next_log:
            self._next_log = now + self.REPEAT_LOG_INTERVAL
            self._log.warning("%s: still failing after %.0f s and %d attempts: %s",
                              self.label, now - self.started, self.failures, description)
        else:
            self._log.debug("%s: %s; %s in %.2f s", self.label, description, action, delay)
        return delay

    def succeeded(self) -> None:
        """Record a success; ends (and logs the end of) the outage in progress."""
        if self.started is None:
            return
        self._log.info("%s: database back after %.1f s (%d failed attempts)",
                       self.label, time.monotonic() - self.started, self.failures)
        self.started = None
        self.failures = 0
        self.backoff.reset()


def in_main_thread() -> bool:
    """Whether signal handlers may be installed here (the main thread only)."""
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_signals_handled(on_signal: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``on_signal`` inside the block, then restore the
    previous handlers (installing a handler is allowed in the main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal(signal.Signals(signum))

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Waker:
    """Wakes a thread blocked in ``Listener.wait`` from any thread or signal handler.

    A socket pair rather than a pipe, so that ``select`` accepts it on every platform.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            # A full buffer already holds a pending wake-up; a closed one has no waiter.
            pass

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


@contextmanager
def blocking_run(
    install_signal_handlers: bool | None, on_signal: Callable[[signal.Signals], None]
) -> Iterator[Waker]:
    """The frame of a blocking ``run()``: a :class:`Waker` for its waits, and SIGTERM /
    SIGINT routed to ``on_signal`` when ``install_signal_handlers`` is true (or
    ``None`` in the main thread)."""
    if install_signal_handlers is None:
        install_signal_handlers = in_main_thread()
    waker = Waker()
    try:
        with stop_signals_handled(on_signal) if install_signal_handlers else nullcontext():
            yield waker
    finally:
        waker.close()
