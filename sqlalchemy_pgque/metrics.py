"""Prometheus metrics and health checks for consumers: ``/metrics``, ``/healthz``, ``/readyz``.

::

    python -m sqlalchemy_pgque.worker myapp.workers:consumer --metrics-port 9100

or, in a process of your own::

    metrics = Metrics(engine)
    metrics.watch([consumer], ticker)
    server = MetricsServer(metrics, port=9100)
    server.start()
    metrics.worker_running(True)

Needs prometheus-client (``pip install 'sqlalchemy-pgque[metrics]'``). What the
consumers do is counted as they do it, through :class:`~sqlalchemy_pgque.ConsumerObserver`;
what the database knows (lag, pending events, dead letters, tick age) is read when
scraped, from :func:`sqlalchemy_pgque.admin.queues` and
:func:`~sqlalchemy_pgque.admin.consumers`, in one short transaction and cached for a
few seconds. Each :class:`Metrics` has a registry of its own, never the global one, so
several of them (several workers or tests in one process) do not clash.

Labels: ``queue``, ``consumer`` and ``subconsumer``, the last empty for a plain
consumer and for a cooperative consumer's own row; for a subconsumer ``consumer`` is
the cooperative consumer, so ``sum by (consumer)`` adds its subconsumers up.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import accumulate
from typing import Any

from sqlalchemy import Engine

from . import _statements as statements
from . import admin
from .consumer import AsyncConsumer, Consumer, ConsumerObserver, Outcome, _ConsumerBase
from .errors import _first_line
from .message import Message
from .ticker import Ticker

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        ProcessCollector,
        generate_latest,
    )
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(
        "sqlalchemy_pgque.metrics needs prometheus-client: "
        "pip install 'sqlalchemy-pgque[metrics]'", name="prometheus_client",
    ) from exc

__all__ = ["DEFAULT_HEALTH_TIMEOUT", "HealthReport", "Metrics", "MetricsServer"]

log = logging.getLogger(__name__)

DEFAULT_HEALTH_TIMEOUT = 60.0
"""Seconds a consumer loop or the ticker may go without completing a round, beyond its
own idle wait (the consumer's ``poll_interval``, the ticker's period), before
``/healthz`` calls it stale. A round is one whole batch, so this must exceed the
longest batch; and it outlasts what the worker rides out by itself: reconnect backoff
(2 s at most), a server restart, a partition found dead by TCP keepalives (about 30 s)
and a reconnect attempt (10 s ``connect_timeout``)."""

DEFAULT_FIGURES_TTL = 5.0
"""Seconds the database's figures are reused between scrapes: several scrapers and
probes in one interval cost one read."""

DEFAULT_FIGURES_WAIT = 2.0
"""Seconds a scrape or a readiness probe waits for the figures being read; past that it
reports what it has, with ``pgque_database_up`` 0 (well inside Prometheus's default
10 s scrape timeout)."""

_FIGURES_STATEMENT_TIMEOUT = "5s"

_HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

_CONSUMER_LABELS = ("queue", "consumer", "subconsumer")

AnyConsumer = Consumer | AsyncConsumer


def _labels(consumer: _ConsumerBase) -> tuple[str, str, str]:
    return consumer.queue.name, consumer.name, consumer.subconsumer or ""


@dataclass(frozen=True)
class _Figures:
    queues: Sequence[admin.QueueStatus] = ()
    consumers: Sequence[admin.ConsumerStatus] = ()
    up: bool = False
    """The latest read answered, and no read is overdue."""


class _DatabaseFigures:
    """The database's own figures, read at scrape time, cached, never waited on long.

    A read runs in a thread of its own, one at a time, at most once per ``ttl``
    seconds; a scrape waits for it ``wait`` seconds at most, so a database that does
    not answer (down, partitioned, locked up) makes the scrape report the figures last
    read and ``pgque_database_up 0`` instead of hanging it.
    """

    def __init__(self, engine: Engine, ttl: float, wait: float) -> None:
        self._engine = engine
        self._ttl = ttl
        self._wait = wait
        self._lock = threading.Lock()
        self._figures = _Figures()
        self._tried_at: float | None = None
        self._reading: threading.Thread | None = None
        self._failing = False
        """The latest read failed (only the reading thread, one at a time, uses it)."""

    def current(self) -> _Figures:
        with self._lock:
            now = time.monotonic()
            if self._reading is None and (
                    self._tried_at is None or now - self._tried_at >= self._ttl):
                self._tried_at = now
                self._reading = threading.Thread(target=self._read, name="pgque metrics read",
                                                 daemon=True)
                self._reading.start()
            reading = self._reading
        if reading is not None:
            reading.join(self._wait)
        with self._lock:
            figures = self._figures
            if self._reading is not None and self._tried_at is not None \
                    and time.monotonic() - self._tried_at >= self._wait:
                return _Figures(figures.queues, figures.consumers, up=False)
            return figures

    def _read(self) -> None:
        try:
            with self._engine.connect() as connection, connection.begin():
                connection.execute(statements.FIGURES_STATEMENT_TIMEOUT,
                                   {"timeout": _FIGURES_STATEMENT_TIMEOUT})
                figures = _Figures(admin.queues(connection), admin.consumers(connection),
                                   up=True)
        except Exception as exc:
            # Once per outage: scrapes come every few seconds.
            if not self._failing:
                log.warning("metrics: cannot read the database's figures (reporting the "
                            "last ones read, pgque_database_up 0): %s", _first_line(exc))
            self._failing = True
            with self._lock:
                self._figures = _Figures(self._figures.queues, self._figures.consumers,
                                         up=False)
                self._reading = None
            return
        if self._failing:
            log.info("metrics: reading the database's figures again")
        self._failing = False
        with self._lock:
            self._figures = figures
            self._reading = None

    def describe(self) -> Iterator[Metric]:
        return self._families(_Figures())

    def collect(self) -> Iterator[Metric]:
        return self._families(self.current())

    @staticmethod
    def _families(figures: _Figures) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "pgque_consumer_lag_seconds",
            "Age of the tick the consumer's cursor is at: how far behind it is",
            labels=_CONSUMER_LABELS)
        pending = GaugeMetricFamily(
            "pgque_consumer_pending_events",
            "Events ticked past the consumer's cursor, not yet acked by it",
            labels=_CONSUMER_LABELS)
        for c in figures.consumers:
            labels = (c.queue, c.consumer, c.subconsumer or "")
            if c.lag_seconds is not None:
                lag.add_metric(labels, c.lag_seconds)
            pending.add_metric(labels, c.pending_events)
        dlq = GaugeMetricFamily("pgque_dlq_events", "Events in the queue's dead-letter queue",
                                labels=("queue",))
        tick_age = GaugeMetricFamily("pgque_tick_age_seconds",
                                     "Age of the queue's latest tick", labels=("queue",))
        for q in figures.queues:
            dlq.add_metric((q.queue,), q.dlq_events)
            if q.ticker_lag_seconds is not None:
                tick_age.add_metric((q.queue,), q.ticker_lag_seconds)
        up = GaugeMetricFamily(
            "pgque_database_up",
            "1 when the database answered the latest read of these figures; 0 when it "
            "failed or is overdue (the figures shown are then the last ones read)",
            value=1 if figures.up else 0)
        yield from (lag, pending, dlq, tick_age, up)


class _Series:
    """One histogram series: observation counts per bucket (not cumulative) and sum."""

    __slots__ = ("counts", "labels", "sum")

    def __init__(self, labels: tuple[str, ...], buckets: int) -> None:
        self.labels = labels
        self.counts = [0] * buckets
        self.sum = 0.0


class _HandlerDurations:
    """``pgque_handler_duration_seconds``, counted by hand.

    prometheus_client's ``Histogram.observe`` takes a lock per update and costs about
    0.7 µs, a sixth of a no-op handler's whole round trip through the consumer; this
    costs a dictionary lookup, a bisection and two additions. Each series belongs to
    one consumer, whose hooks run in one thread or task, so it has a single writer; a
    scrape copies the counts and derives the total from them, so ``_count`` always
    equals the ``+Inf`` bucket (``_sum`` may trail by the observation in progress).
    :meth:`Metrics.handler_finished` does the counting.
    """

    NAME = "pgque_handler_duration_seconds"

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._les = [*map(floatToGoString, self.bounds), "+Inf"]
        self.series: dict[tuple[_ConsumerBase, str | None], _Series] = {}

    def new_series(self, consumer: _ConsumerBase, type_: str | None) -> _Series:
        series = _Series((*_labels(consumer), type_ or ""), len(self.bounds) + 1)
        self.series[consumer, type_] = series
        return series

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for series in list(self.series.values()):
            cumulative = accumulate(list(series.counts))
            family.add_metric(series.labels, list(zip(self._les, cumulative, strict=True)),
                              series.sum)
        yield family

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.NAME, "Time in the handler, per message",
                                     labels=(*_CONSUMER_LABELS, "type"))


@dataclass(frozen=True)
class HealthReport:
    """The answer of ``/healthz`` or ``/readyz``: ``ok`` (HTTP 200, else 503) and why."""

    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


class Metrics(ConsumerObserver):
    """The metrics and health of the consumers (and ticker) of one process.

    :param engine: the database whose figures are read at scrape time.
    :param health_timeout: see :data:`DEFAULT_HEALTH_TIMEOUT`.
    :param figures_ttl: see :data:`DEFAULT_FIGURES_TTL`.
    :param figures_wait: see :data:`DEFAULT_FIGURES_WAIT`.

    Messages are counted when their batch ends: the outcomes of a committed batch, or
    ``failed`` for each message of a batch rolled back (it comes back), so the counts
    hold only what committed. Handler durations are observed as handlers return.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        figures_ttl: float = DEFAULT_FIGURES_TTL,
        figures_wait: float = DEFAULT_FIGURES_WAIT,
    ) -> None:
        self.health_timeout = health_timeout
        self.registry = CollectorRegistry()
        self._messages = Counter(
            "pgque_messages", "Messages delivered, by what became of them",
            (*_CONSUMER_LABELS, "type", "outcome"), registry=self.registry)
        self._handler_seconds = _HandlerDurations(_HANDLER_BUCKETS)
        self.registry.register(self._handler_seconds)
        self._batch_seconds = Histogram(
            "pgque_batch_duration_seconds",
            "Time from receiving a batch to its commit, for committed batches",
            _CONSUMER_LABELS, buckets=_BATCH_BUCKETS, registry=self.registry)
        self._batch_size = Histogram(
            "pgque_batch_size", "Messages per committed batch",
            _CONSUMER_LABELS, buckets=_SIZE_BUCKETS, registry=self.registry)
        self._worker_up = Gauge("pgque_worker_up", "1 while the worker runs its consumers",
                                registry=self.registry)
        self._figures = _DatabaseFigures(engine, figures_ttl, figures_wait)
        self.registry.register(self._figures)
        ProcessCollector(registry=self.registry)
        self._consumers: list[AnyConsumer] = []
        self._ticker: Ticker | None = None
        self._running_since: float | None = None

    def watch(self, consumers: Iterable[AnyConsumer], ticker: Ticker | None = None) -> None:
        """Observe ``consumers`` and include them (and ``ticker``) in the health checks."""
        for consumer in consumers:
            consumer.observe(self)
            self._consumers.append(consumer)
        if ticker is not None:
            self._ticker = ticker

    def worker_running(self, running: bool) -> None:
        """Say the consumers started (``pgque_worker_up`` 1; the health checks' clock
        starts) or stopped."""
        self._running_since = time.monotonic() if running else None
        self._worker_up.set(1 if running else 0)

    # -- the observer's hooks ------------------------------------------------------

    def handler_finished(self, consumer: _ConsumerBase, message: Message, state: Any,
                         outcome: Outcome, error: BaseException | None,
                         seconds: float) -> None:
        # _HandlerDurations.observe, inlined: this runs once per message.
        durations = self._handler_seconds
        series = durations.series.get((consumer, message.type))
        if series is None:
            series = durations.new_series(consumer, message.type)
        series.counts[bisect_left(durations.bounds, seconds)] += 1
        series.sum += seconds

    def batch_finished(self, consumer: _ConsumerBase, outcomes: Sequence[tuple[Message, Outcome]],
                       seconds: float, committed: bool) -> None:
        labels = _labels(consumer)
        for (type_, outcome), count in Tally((m.type, o) for m, o in outcomes).items():
            self._messages.labels(*labels, type_ or "", outcome).inc(count)
        if committed:
            self._batch_seconds.labels(*labels).observe(seconds)
            self._batch_size.labels(*labels).observe(len(outcomes))

    # -- what the server serves ----------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)

    def health(self) -> HealthReport:
        """Whether every consumer loop and the ticker completed a round lately."""
        since = self._running_since
        if since is None:
            return HealthReport(False, {"status": "not running"})
        now = time.monotonic()
        loops: dict[str, dict[str, Any]] = {}
        for consumer in self._consumers:
            loops[consumer.label] = _loop(now, consumer.progress_at, since,
                                          self.health_timeout + consumer.poll_interval)
        ticker = self._ticker
        if ticker is not None:
            idle = max(ticker.tick_period or 0.0, ticker.lock_retry_interval)
            loops["ticker"] = _loop(now, ticker.progress_at, since, self.health_timeout + idle)
        stale = sorted(label for label, loop in loops.items() if loop["stale"])
        return HealthReport(not stale, {"status": "stale" if stale else "ok",
                                        "stale": stale, "loops": loops})

    def readiness(self) -> HealthReport:
        """Whether every consumer is listening and the database answers."""
        if self._running_since is None:
            return HealthReport(False, {"status": "not running"})
        not_listening = sorted(c.label for c in self._consumers if not c.listening.is_set())
        database_up = self._figures.current().up
        ready = database_up and not not_listening
        return HealthReport(ready, {"status": "ready" if ready else "not ready",
                                    "database": "up" if database_up else "down",
                                    "not_listening": not_listening})


def _loop(now: float, progress_at: float | None, since: float, limit: float) -> dict[str, Any]:
    """One loop's line of ``/healthz``; a loop yet to complete a round is timed from
    ``since``, when the worker started."""
    age = now - (since if progress_at is None else max(progress_at, since))
    return {"seconds_since_progress": round(age, 3), "limit_seconds": limit,
            "stale": age > limit}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        # ThreadingHTTPServer binds IPv4 only unless told otherwise.
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.metrics = metrics
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that connects and sends nothing must not keep a thread forever.
    timeout = 10

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        metrics = self.server.metrics
        try:
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path in ("/healthz", "/readyz"):
                report = metrics.health() if path == "/healthz" else metrics.readiness()
                body = json.dumps(report.detail, sort_keys=True).encode() + b"\n"
                self._reply(200 if report.ok else 503, "application/json", body)
            else:
                self._reply(404, "text/plain; charset=utf-8",
                            b"not found: try /metrics, /healthz or /readyz\n")
        except Exception:
            log.exception("metrics: answering %s failed", path)
            self._reply(500, "text/plain; charset=utf-8", b"internal error\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes arrive every few seconds: not worth a line each at INFO.
        log.debug("metrics: %s %s", self.address_string(), format % args)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` of ``metrics`` over HTTP, in a thread.

    The port is bound here (``OSError`` when it is taken); ``port=0`` takes a free one,
    which :attr:`port` tells.
    """

    def __init__(self, metrics: Metrics, host: str = "0.0.0.0", port: int = 0) -> None:
        self.metrics = metrics
        self._server = _Server(metrics, host, port)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Serve in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="pgque metrics server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
