"""OpenTelemetry tracing: a PRODUCER span at send, a CONSUMER span around each handler,
the trace context carried in an event field, and nothing at all while it is off."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Database
from consumer_support import listening
from engine_helpers import Conn, make_queue, move_retries, tick, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from queue_helpers import captured_statements, pgque_calls
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import AsyncConsumer, Consumer, Message, Queue, tracing
from sqlalchemy_pgque.testing import deliver

orders_q = Queue("orders")

PRODUCER_ATTRIBUTES = {
    "messaging.system": "pgque",
    "messaging.operation.name": "send",
    "messaging.destination.name": "orders",
    "pgque.message.type": "order.created",
}


@dataclass
class Traced:
    exporter: InMemorySpanExporter
    provider: TracerProvider

    def spans(self, kind: SpanKind) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.kind is kind]

    def one(self, kind: SpanKind) -> ReadableSpan:
        [span] = self.spans(kind)
        return span


@pytest.fixture
def traced() -> Iterator[Traced]:
    """Tracing with an SDK provider of the test's own: setting the global provider
    (once per process) would trace every later test of the session."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(tracer_provider=provider)
    try:
        yield Traced(exporter, provider)
    finally:
        tracing.configure()
        provider.shutdown()


@pytest.fixture
def orders(conn: Conn) -> None:
    make_queue(conn, "orders", "shipping")


def traceparent(span: ReadableSpan) -> str:
    context = span.context
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def consume(engine: Engine) -> list[tuple[Message, trace.Span]]:
    """Deliver what ``orders`` holds to ``shipping``; each message with the span current
    in its handler."""
    seen: list[tuple[Message, trace.Span]] = []
    consumer = Consumer(sessionmaker(engine), queue=orders_q, name="shipping")

    @consumer.on("*")
    def handle(msg: Message, session: Session) -> None:
        seen.append((msg, trace.get_current_span()))

    assert len(deliver(consumer).handled) == len(seen) > 0
    return seen


def assert_child_of(process: ReadableSpan, producer: ReadableSpan) -> None:
    assert process.context is not None and producer.context is not None
    assert process.context.trace_id == producer.context.trace_id
    assert process.parent is not None and process.parent.span_id == producer.context.span_id
    assert [link.context.span_id for link in process.links] == [producer.context.span_id]


@pytest.mark.usefixtures("orders")
def test_a_send_in_a_session_and_its_handler_make_one_trace(engine: Engine, traced: Traced) -> None:
    tracer = traced.provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request, \
            Session(engine) as session, session.begin():
        pending = orders_q.send(session, {"order_id": 7}, type="order.created")

    [(msg, current)] = consume(engine)
    producer, process = traced.one(SpanKind.PRODUCER), traced.one(SpanKind.CONSUMER)
    assert producer.name == "send orders"
    assert producer.parent is not None
    assert producer.parent.span_id == request.get_span_context().span_id
    assert dict(producer.attributes or {}) == {**PRODUCER_ATTRIBUTES,
                                               "messaging.operation.type": "create"}
    assert (msg.extra1, msg.extra2, msg.extra3, msg.extra4) == (
        None, None, None, traceparent(producer))

    assert process.name == "process orders"
    assert_child_of(process, producer)
    assert dict(process.attributes or {}) == {
        "messaging.system": "pgque",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.consumer.group.name": "shipping",
        "messaging.message.id": str(pending.event_id),
        "pgque.message.type": "order.created",
        "pgque.batch_id": msg.batch_id,
        "pgque.retry_count": 0,
        "pgque.outcome": "handled",
    }
    assert process.status.status_code is StatusCode.UNSET
    assert current.get_span_context() == process.context
    assert not trace.get_current_span().get_span_context().is_valid  # detached after


@pytest.mark.usefixtures("orders")
def test_traced_sends_of_one_flush_still_go_out_in_one_statement(
    engine: Engine, traced: Traced
) -> None:
    with captured_statements(engine) as statements, Session(engine) as session, \
            session.begin():
        for n in range(3):
            orders_q.send(session, {"n": n}, type="order.created")
    assert len(pgque_calls(statements)) == 1

    seen = consume(engine)
    producers = traced.spans(SpanKind.PRODUCER)
    assert [msg.extra4 for msg, _ in seen] == [traceparent(p) for p in producers]
    for process, producer in zip(traced.spans(SpanKind.CONSUMER), producers, strict=True):
        assert_child_of(process, producer)


@pytest.mark.usefixtures("orders")
def test_send_batch_shares_one_span_and_another_field_can_carry_it(
    engine: Engine, traced: Traced
) -> None:
    tracing.configure(context_field="extra1", tracer_provider=traced.provider)
    with Session(engine) as session, session.begin():
        orders_q.send_batch(session, [{"n": 1}, {"n": 2}, {"n": 3}], type="order.created")

    seen = consume(engine)
    producer = traced.one(SpanKind.PRODUCER)
    assert (producer.attributes or {})["messaging.batch.message_count"] == 3
    assert [(msg.extra1, msg.extra4) for msg, _ in seen] == [(traceparent(producer), None)] * 3
    for process in traced.spans(SpanKind.CONSUMER):
        assert_child_of(process, producer)


@pytest.mark.usefixtures("orders")
def test_send_now_traces_its_insert_with_the_event_id(engine: Engine, traced: Traced) -> None:
    current_at_insert: list[trace.Span] = []

    def on_execute(*args: Any) -> None:
        if "pgque." in args[2]:
            current_at_insert.append(trace.get_current_span())

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        with Session(engine) as session, session.begin():
            event_id = orders_q.send_now(session, {"order_id": 1}, type="order.created",
                                         extra1="kept")
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)

    producer = traced.one(SpanKind.PRODUCER)
    assert dict(producer.attributes or {}) == {
        **PRODUCER_ATTRIBUTES, "messaging.operation.type": "send",
        "messaging.message.id": str(event_id)}
    assert [span.get_span_context() for span in current_at_insert] == [producer.context]
    [(msg, _)] = consume(engine)
    assert (msg.extra1, msg.extra4) == ("kept", traceparent(producer))
    assert_child_of(traced.one(SpanKind.CONSUMER), producer)


@pytest.mark.usefixtures("orders")
def test_a_failing_handler_is_recorded_and_its_retry_traced_again(
    conn: Conn, engine: Engine, traced: Traced
) -> None:
    with Session(engine) as session, session.begin():
        orders_q.send(session, {"order_id": 1}, type="order.created")
    consumer = Consumer(sessionmaker(engine), queue=orders_q, name="shipping", retry_after=0)

    @consumer.on("order.created")
    def ship(msg: Message) -> None:
        if msg.retry_count == 0:
            raise ValueError("carrier down")

    tick(conn, "orders")
    assert consumer.process_batch() == 1
    assert move_retries(conn) == 1
    tick(conn, "orders")
    assert consumer.process_batch() == 1

    producer = traced.one(SpanKind.PRODUCER)
    failed, retried = traced.spans(SpanKind.CONSUMER)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: carrier down"
    attributes = failed.attributes or {}
    assert (attributes["pgque.outcome"], attributes["error.type"],
            attributes["pgque.retry_count"]) == ("nacked", "ValueError", 0)
    [exception] = failed.events
    assert exception.name == "exception"
    assert (exception.attributes or {})["exception.message"] == "carrier down"

    assert retried.status.status_code is StatusCode.UNSET
    attributes = retried.attributes or {}
    assert (attributes["pgque.outcome"], attributes["pgque.retry_count"]) == ("handled", 1)
    assert attributes["messaging.message.id"] == (failed.attributes or {})["messaging.message.id"]
    assert_child_of(failed, producer)
    assert_child_of(retried, producer)  # the retry keeps the event's trace context


@pytest.mark.usefixtures("orders")
def test_an_async_handler_runs_inside_its_span(
    conn: Conn, db: Database, engine: Engine, traced: Traced
) -> None:
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    with Session(engine) as session, session.begin():
        orders_q.send(session, {}, type="note")
        orders_q.send(session, {}, type="write")
    tick(conn, "orders")
    seen: dict[str, trace.SpanContext] = {}

    async def main() -> None:
        async_engine = create_async_engine(db.url)
        consumer = AsyncConsumer(async_engine, queue=orders_q, name="shipping")

        @consumer.on("note")
        async def note(msg: Message) -> None:
            await asyncio.sleep(0)
            seen[msg.type] = trace.get_current_span().get_span_context()

        @consumer.on("write")
        async def write(msg: Message, session: AsyncSession) -> None:
            await session.connection()
            seen[msg.type] = trace.get_current_span().get_span_context()

        try:
            assert await consumer.process_batch() == 2
        finally:
            await async_engine.dispose()

    asyncio.run(main())
    processes = traced.spans(SpanKind.CONSUMER)
    assert [seen["note"], seen["write"]] == [span.context for span in processes]
    for process, producer in zip(processes, traced.spans(SpanKind.PRODUCER), strict=True):
        assert_child_of(process, producer)


def test_a_subconsumer_is_named_on_its_spans(conn: Conn, engine: Engine, traced: Traced) -> None:
    make_queue(conn, "orders", "shipping")
    conn.execute("SELECT pgque.subscribe_subconsumer('orders', 'packing', 'w-1')")
    with Session(engine) as session, session.begin():
        orders_q.send(session, {}, type="order.created")
    tick(conn, "orders")
    consumer = Consumer(sessionmaker(engine), queue=orders_q, name="packing",
                        subconsumer="w-1")
    consumer.on("*")(lambda msg: None)
    assert consumer.process_batch() == 1

    attributes = traced.one(SpanKind.CONSUMER).attributes or {}
    assert attributes["messaging.consumer.group.name"] == "packing"
    assert attributes["pgque.subconsumer"] == "w-1"
    assert_child_of(traced.one(SpanKind.CONSUMER), traced.one(SpanKind.PRODUCER))


@pytest.mark.usefixtures("orders")
def test_a_senders_own_extra4_is_kept_and_said_once(
    engine: Engine, traced: Traced, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_pgque.tracing"), \
            Session(engine) as session, session.begin():
        orders_q.send(session, {}, type="order.created", extra4="mine")
        orders_q.send(session, {}, type="order.created", extra4="")
    [warning] = [r for r in caplog.records if r.name == "sqlalchemy_pgque.tracing"]
    assert "'orders'" in warning.getMessage() and "extra4" in warning.getMessage()

    seen = consume(engine)
    assert [msg.extra4 for msg, _ in seen] == ["mine", ""]
    assert len(traced.spans(SpanKind.PRODUCER)) == 2
    for process in traced.spans(SpanKind.CONSUMER):
        assert process.parent is None and not process.links


@pytest.mark.usefixtures("orders")
def test_with_no_context_field_nothing_is_stored_and_sends_batch_as_without_tracing(
    engine: Engine, traced: Traced
) -> None:
    tracing.configure(context_field=None, tracer_provider=traced.provider)
    with captured_statements(engine) as statements, Session(engine) as session, \
            session.begin():
        orders_q.send(session, {"n": 1}, type="order.created")
        orders_q.send(session, {"n": 2}, type="order.created")
    [call] = pgque_calls(statements)
    assert "pgque.send_batch(" in call

    seen = consume(engine)
    assert [(m.extra1, m.extra2, m.extra3, m.extra4) for m, _ in seen] == [(None,) * 4] * 2
    assert len(traced.spans(SpanKind.PRODUCER)) == 2
    for process in traced.spans(SpanKind.CONSUMER):
        assert process.parent is None and not process.links


@pytest.mark.usefixtures("orders")
def test_a_field_holding_something_else_starts_a_trace_of_its_own(
    conn: Conn, engine: Engine, traced: Traced
) -> None:
    # Another producer's own use of extra4, written without this library.
    conn.execute("SELECT pgque.insert_event('orders', 'order.created', '{}', "
                 "NULL, NULL, NULL, 'not a traceparent')")
    [(msg, current)] = consume(engine)
    process = traced.one(SpanKind.CONSUMER)
    assert msg.extra4 == "not a traceparent"
    assert process.parent is None and not process.links
    assert current.get_span_context() == process.context


@pytest.mark.usefixtures("orders")
def test_turned_off_nothing_is_traced_or_stored(engine: Engine, traced: Traced) -> None:
    tracing.configure(enabled=False, tracer_provider=traced.provider)
    with Session(engine) as session, session.begin():
        orders_q.send(session, {}, type="order.created")
        orders_q.send_now(session, {}, type="order.created")
    seen = consume(engine)
    assert [(m.extra1, m.extra2, m.extra3, m.extra4) for m, _ in seen] == [(None,) * 4] * 2
    assert not any(current.get_span_context().is_valid for _, current in seen)
    assert traced.exporter.get_finished_spans() == ()


@pytest.mark.usefixtures("orders")
def test_without_a_tracer_provider_nothing_is_traced_or_stored(engine: Engine) -> None:
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a global tracer provider is set in this process")
    with Session(engine) as session, session.begin():
        orders_q.send(session, {}, type="order.created")
    [(msg, current)] = consume(engine)
    assert msg.extra4 is None
    assert not current.get_span_context().is_valid


def test_configure_refuses_a_field_that_is_not_an_extra() -> None:
    with pytest.raises(ValueError, match="context_field must be one of extra1"):
        tracing.configure(context_field="payload")  # type: ignore[arg-type]


_UNTRACED_APP = """
import sys
if sys.argv[2] == "absent":
    sys.modules["opentelemetry"] = None  # what an install without the otel extra sees
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy_pgque import Consumer, Queue

engine = create_engine(sys.argv[1])
orders = Queue("orders")
with Session(engine) as session, session.begin():
    orders.send(session, {"n": 1}, type="order.created")
    orders.send_now(session, {"n": 2}, type="order.created")
with engine.begin() as conn:
    orders.force_next_tick(conn)
    orders.ticker(conn)
consumer = Consumer(sessionmaker(engine), queue=orders, name="shipping")
seen = []
consumer.on("order.created")(lambda msg: seen.append((msg.extra1, msg.extra2, msg.extra3,
                                                        msg.extra4)))
assert consumer.process_batch() == 2
assert seen == [(None, None, None, None)] * 2, seen
print(sorted(name for name, module in sys.modules.items()
             if name.split(".")[0] == "opentelemetry" and module is not None))
"""


@pytest.mark.parametrize("opentelemetry", ["absent", "installed"])
@pytest.mark.usefixtures("orders")
def test_untraced_processes_send_and_consume_without_importing_opentelemetry(
    db: Database, opentelemetry: str
) -> None:
    url = db.url.render_as_string(hide_password=False)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_UNTRACED_APP), url, opentelemetry],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _exported(path: Path, name: str) -> dict[str, Any] | None:
    """The first span called ``name`` in the worker's JSON lines, if written yet."""
    if not path.exists():
        return None
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n"):
            span: dict[str, Any] = json.loads(line)
            if span["name"] == name:
                return span
    return None


def test_one_event_from_a_session_through_a_worker_to_its_handler_is_one_trace(
    conn: Conn, engine: Engine, traced: Traced, workers: Any, tmp_path: Path
) -> None:
    make_queue(conn, "orders", "shipping", ticker_max_lag="50 milliseconds")
    spans_file = tmp_path / "spans.jsonl"
    worker = workers("tracing_app:consumer", extra_args=("--ticker",),
                     APP_SPANS_FILE=str(spans_file))
    wait_until(lambda: listening(conn, "pgque_orders"), timeout=20,
               what="the worker to listen")

    tracer = traced.provider.get_tracer("test")
    with tracer.start_as_current_span("request"), Session(engine) as session, \
            session.begin():
        pending = orders_q.send(session, {"order_id": 42}, type="order.created")
    producer = traced.one(SpanKind.PRODUCER)
    assert producer.context is not None

    try:
        process = wait_until(lambda: _exported(spans_file, "process orders"), timeout=20,
                             what="the worker's consumer span")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the worker said:\n{worker.output()}") from None
    assert process["kind"] == "SpanKind.CONSUMER"
    assert process["context"]["trace_id"] == f"0x{producer.context.trace_id:032x}"
    assert process["parent_id"] == f"0x{producer.context.span_id:016x}"
    assert [link["context"]["span_id"] for link in process["links"]] == [
        f"0x{producer.context.span_id:016x}"]
    assert process["status"] == {"status_code": "UNSET"}
    assert process["attributes"] == {
        "messaging.system": "pgque",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.consumer.group.name": "shipping",
        "messaging.message.id": str(pending.event_id),
        "pgque.message.type": "order.created",
        "pgque.batch_id": process["attributes"]["pgque.batch_id"],
        "pgque.retry_count": 0,
        "pgque.outcome": "handled",
        "app.order_id": 42,  # set by the handler on the current span
    }
