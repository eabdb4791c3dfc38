"""Prometheus metrics, /healthz and /readyz: in process, and from a worker subprocess."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
from conftest import Database
from consumer_support import one_error_line
from engine_helpers import Conn, make_queue, move_retries, send_many, tick, wait_until
from faultkit import worker_env
from pgcluster import PgCluster
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from sqlalchemy_pgque import Consumer, Message
from sqlalchemy_pgque.metrics import Metrics, MetricsServer

HANDLED, FAILING, UNKNOWN = 20, 4, 3
MAX_RETRIES = 2

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Scraped samples by name and labels."""


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _scrape(base: str) -> Samples:
    status, text = _get(f"{base}/metrics")
    assert status == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def _scrape_when(base: str, predicate: Callable[[Samples], bool]) -> Samples | None:
    samples = _scrape(base)
    return samples if predicate(samples) else None


def _value(samples: Samples, name: str,
           **labels: str) -> float | None:
    """The sum of the samples ``name`` whose labels include ``labels``; None if none."""
    wanted = set(labels.items())
    found = [value for (n, have), value in samples.items() if n == name and wanted <= have]
    return sum(found) if found else None


def _base_url(worker: Any) -> str:
    match = wait_until(
        lambda: re.search(r"serving metrics on (http://[\w.:\[\]]+)", worker.output()),
        what="the metrics server's log line")
    return match.group(1)


def _status_is(url: str, status: int) -> tuple[int, Any] | None:
    got, body = _get(url)
    return (got, json.loads(body)) if got == status else None


def _tick_alongside(conn: Conn, queue: str) -> None:
    """Tick ``queue`` now, next to a worker's ticker: when that one ticked first, the
    second ``ticker(queue)`` finds nothing to tick, and that is fine."""
    conn.execute("SELECT pgque.force_next_tick(%s)", (queue,))
    conn.execute("SELECT pgque.ticker(%s)", (queue,))


def _metrics_args(*extra: str) -> tuple[str, ...]:
    return ("--ticker", "--metrics-port", "0", "--metrics-host", "127.0.0.1", *extra)


def test_worker_metrics_add_up_to_what_was_sent(conn: Conn, workers: Any) -> None:
    make_queue(conn, "q", "c", max_retries=MAX_RETRIES)
    worker = workers("metrics_app:consumer", extra_args=_metrics_args())
    base = _base_url(worker)
    wait_until(lambda: _status_is(f"{base}/readyz", 200), what="/readyz 200")

    send_many(conn, "q", HANDLED, type="ok")
    send_many(conn, "q", FAILING, type="boom")
    send_many(conn, "q", UNKNOWN, type="mystery")
    _tick_alongside(conn, "q")
    assert _value(_scrape(base), "pgque_worker_up") == 1  # scraped while it works

    def counts() -> dict[str, float] | None:
        # The worker's ticker moves due retries every 30 s: move them now.
        move_retries(conn)
        _tick_alongside(conn, "q")
        samples = _scrape(base)
        found = {outcome: _value(samples, "pgque_messages_total", queue="q", consumer="c",
                                 subconsumer="", outcome=outcome) or 0.0
                 for outcome in ("handled", "nacked", "dead_lettered", "unknown_type",
                                 "failed")}
        return found if found["dead_lettered"] == FAILING else None

    found = wait_until(counts, timeout=30, what="every event handled or dead-lettered")
    assert found == {"handled": HANDLED, "nacked": FAILING * MAX_RETRIES,
                     "dead_lettered": FAILING, "unknown_type": UNKNOWN, "failed": 0}
    assert found["handled"] + found["dead_lettered"] + found["unknown_type"] \
        == HANDLED + FAILING + UNKNOWN

    consumer = {"queue": "q", "consumer": "c", "subconsumer": ""}
    samples = wait_until(
        lambda: _scrape_when(base, lambda s: _value(s, "pgque_dlq_events", queue="q") == FAILING
                             and _value(s, "pgque_consumer_pending_events", **consumer) == 0),
        timeout=20, what="the database's figures to catch up")
    deliveries = HANDLED + FAILING * (MAX_RETRIES + 1) + UNKNOWN
    assert _value(samples, "pgque_batch_size_sum", **consumer) == deliveries
    assert _value(samples, "pgque_handler_duration_seconds_count", type="ok") == HANDLED
    assert _value(samples, "pgque_handler_duration_seconds_count", type="boom") \
        == FAILING * (MAX_RETRIES + 1)
    assert (_value(samples, "pgque_batch_duration_seconds_count", **consumer) or 0) >= 1
    assert _value(samples, "pgque_consumer_lag_seconds", **consumer) is not None
    assert _value(samples, "pgque_tick_age_seconds", queue="q") is not None
    assert _value(samples, "pgque_database_up") == 1

    _, health = wait_until(lambda: _status_is(f"{base}/healthz", 200), what="/healthz")
    assert set(health["loops"]) == {"q/c", "ticker"} and health["stale"] == []
    assert _status_is(f"{base}/readyz", 200) == (
        200, {"status": "ready", "database": "up", "not_listening": []})
    assert _get(f"{base}/nothing")[0] == 404

    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()
    # The handler's failures log their tracebacks; observing and serving log none.
    assert "observer" not in worker.output() and "metrics:" not in worker.output()


def test_health_and_readiness_fail_while_the_database_is_down(
    own_server: PgCluster, own_db: Database, workers: Any
) -> None:
    with psycopg.connect(own_db.dsn, autocommit=True) as own:
        make_queue(own, "q", "c")
    url = own_db.url.render_as_string(hide_password=False)
    worker = workers("metrics_app:consumer", with_url=False, APP_POLL_INTERVAL="0.5",
                     extra_args=_metrics_args("--url", url, "--health-timeout", "1"))
    base = _base_url(worker)
    wait_until(lambda: _status_is(f"{base}/readyz", 200), timeout=15, what="/readyz 200")
    wait_until(lambda: _status_is(f"{base}/healthz", 200), what="/healthz 200")

    own_server.stop()
    _, ready = wait_until(lambda: _status_is(f"{base}/readyz", 503), timeout=15,
                          what="/readyz 503")
    assert ready["database"] == "down" or ready["not_listening"] == ["q/c"]
    _, health = wait_until(lambda: _status_is(f"{base}/healthz", 503), timeout=15,
                           what="/healthz 503")
    assert "q/c" in health["stale"]
    started = time.monotonic()
    samples = wait_until(
        lambda: _scrape_when(base, lambda s: _value(s, "pgque_database_up") == 0),
        timeout=15, what="pgque_database_up 0")
    assert time.monotonic() - started < 10  # the scrape never waited for the database
    assert _value(samples, "pgque_worker_up") == 1
    assert "metrics: cannot read the database's figures" in worker.output()

    own_server.start()
    wait_until(lambda: _status_is(f"{base}/readyz", 200), timeout=30, what="/readyz back")
    wait_until(lambda: _status_is(f"{base}/healthz", 200), timeout=30, what="/healthz back")
    assert worker.process.poll() is None, worker.output()


def test_metrics_port_in_use_is_a_configuration_error(conn: Conn, workers: Any) -> None:
    make_queue(conn, "q", "c")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = workers("metrics_app:consumer", extra_args=(
            "--metrics-port", str(port), "--metrics-host", "127.0.0.1"))
        assert f"cannot listen on 127.0.0.1 port {port}" in one_error_line(worker)


# Blocks prometheus_client the way a missing package would.
_WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None
from sqlalchemy_pgque.worker import main
try:
    import sqlalchemy_pgque.metrics
except ImportError as exc:
    assert "pip install 'sqlalchemy-pgque[metrics]'" in str(exc), exc
else:
    raise AssertionError("sqlalchemy_pgque.metrics imported without prometheus_client")
sys.exit(main(["metrics_app:consumer", "--metrics-port", "0"]))
"""


def test_metrics_without_the_extra_say_what_to_install() -> None:
    result = subprocess.run([sys.executable, "-c", _WITHOUT_PROMETHEUS], env=worker_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "sqlalchemy_pgque.worker: error: --metrics-port needs prometheus-client: "
        "pip install 'sqlalchemy-pgque[metrics]'"), result.stderr


def test_metrics_in_process_with_a_cooperative_consumer(engine: Engine, conn: Conn) -> None:
    make_queue(conn, "q", "c")
    conn.execute("SELECT pgque.subscribe_subconsumer('q', 'group', 'w1')")
    seen: list[int] = []
    consumer = Consumer(sessionmaker(engine), queue="q", name="group", subconsumer="w1")

    @consumer.on("ok")
    def ok(msg: Message) -> None:
        seen.append(msg.msg_id)

    metrics = Metrics(engine, figures_ttl=0)
    Metrics(engine)  # a registry of its own each: a second one does not clash
    metrics.watch([consumer])
    assert not metrics.readiness().ok  # not running yet
    metrics.worker_running(True)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signal_handlers": False})
    thread.start()
    try:
        wait_until(lambda: metrics.readiness().ok, what="the consumer listening")
        ids = send_many(conn, "q", 3, type="ok")
        tick(conn, "q")
        wait_until(lambda: sorted(seen) == sorted(ids), what="the handler")
        labels = {"queue": "q", "consumer": "group", "subconsumer": "w1"}
        registry = metrics.registry
        wait_until(lambda: registry.get_sample_value(
            "pgque_messages_total", {**labels, "type": "ok", "outcome": "handled"}) == 3,
            what="the batch's commit to be counted")
        assert registry.get_sample_value("pgque_batch_size_count", labels) == 1
        assert registry.get_sample_value("pgque_consumer_pending_events", labels) == 0
        assert registry.get_sample_value("pgque_consumer_pending_events",
                                         {"queue": "q", "consumer": "c",
                                          "subconsumer": ""}) == 3
        assert registry.get_sample_value("pgque_dlq_events", {"queue": "q"}) == 0
        assert registry.get_sample_value("pgque_database_up") == 1
        health = metrics.health()
        assert health.ok and set(health.detail["loops"]) == {"q/group.w1"}
    finally:
        consumer.stop()
        thread.join(10)
    metrics.worker_running(False)
    assert registry.get_sample_value("pgque_worker_up") == 0
    assert not metrics.health().ok


def test_a_database_that_does_not_answer_does_not_hang_the_scrape(
    engine: Engine, db: Database, conn: Conn
) -> None:
    make_queue(conn, "q", "c")
    metrics = Metrics(engine, figures_ttl=0, figures_wait=0.5)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        assert _value(_scrape(server.url), "pgque_dlq_events", queue="q") == 0
        with psycopg.connect(db.dsn) as locker:
            # The figures' read queues behind this lock, as behind a stuck database.
            locker.execute("LOCK TABLE pgque.queue IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            samples = _scrape(server.url)
            assert time.monotonic() - started < 3
            assert _value(samples, "pgque_database_up") == 0
            assert _value(samples, "pgque_dlq_events", queue="q") == 0  # the last read
            locker.rollback()
        wait_until(lambda: _value(_scrape(server.url), "pgque_database_up") == 1,
                   what="the figures read again")
    finally:
        server.stop()
