"""OpenTelemetry tracing, the part the producer calls: settings, the tracer, the
PRODUCER spans, and the trace context an event carries.

The public face is :mod:`sqlalchemy_pgque.tracing` (``configure()`` and the
consumer's spans); this module sits at the bottom of the import graph, so that
``_outbox`` and ``queue`` can call it. Nothing here imports OpenTelemetry unless
the application has imported it first: an application that traces has imported
``opentelemetry.trace`` to set its tracer provider, so when that module is not loaded
tracing is off, and finding that out costs one dictionary lookup per call.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._outbox import PendingEvent

__all__ = [
    "CONTEXT_FIELDS",
    "ContextField",
    "context_field",
    "created",
    "record_error",
    "sent_now",
    "settings",
    "tracer",
]

log = logging.getLogger("sqlalchemy_pgque.tracing")

ContextField: TypeAlias = Literal["extra1", "extra2", "extra3", "extra4"]
"""An event field that can carry the trace context."""

CONTEXT_FIELDS: Final[tuple[ContextField, ...]] = ("extra1", "extra2", "extra3", "extra4")

# OpenTelemetry's messaging semantic conventions; the pgque.* names are ours, for
# what the conventions have no name for.
SYSTEM: Final = "messaging.system"
OPERATION_TYPE: Final = "messaging.operation.type"
OPERATION_NAME: Final = "messaging.operation.name"
DESTINATION: Final = "messaging.destination.name"
MESSAGE_ID: Final = "messaging.message.id"
BATCH_MESSAGE_COUNT: Final = "messaging.batch.message_count"
CONSUMER_GROUP: Final = "messaging.consumer.group.name"
ERROR_TYPE: Final = "error.type"
MESSAGE_TYPE: Final = "pgque.message.type"
BATCH_ID: Final = "pgque.batch_id"
RETRY_COUNT: Final = "pgque.retry_count"
SUBCONSUMER: Final = "pgque.subconsumer"
OUTCOME: Final = "pgque.outcome"

_TRACEPARENT: Final = "traceparent"

_lock = threading.Lock()
_enabled = True
_context_field: ContextField | None = "extra4"
_provider: TracerProvider | None = None
_tracer: Tracer | None = None
"""The tracer, once a provider that records spans is found: from then on the check
is this one global."""
_warned_queues: set[str] = set()


def settings(enabled: bool, context_field: ContextField | None,
             tracer_provider: TracerProvider | None) -> None:
    """Replace the settings (``tracing.configure`` checks and documents them)."""
    global _enabled, _context_field, _provider, _tracer
    with _lock:
        _enabled = enabled
        _context_field = context_field
        _provider = tracer_provider
        _tracer = None
        _warned_queues.clear()


def context_field() -> ContextField | None:
    """The event field the trace context goes in, ``None`` for none."""
    return _context_field


def tracer() -> Tracer | None:
    """The tracer to record spans with, or ``None`` while tracing is off."""
    found = _tracer
    if found is not None:
        return found
    if not _enabled or (_provider is None and "opentelemetry.trace" not in sys.modules):
        return None
    return _find_tracer()


def _find_tracer() -> Tracer | None:
    global _tracer
    from opentelemetry import trace

    provider = _provider if _provider is not None else trace.get_tracer_provider()
    # Until the application sets a provider, the API hands out a proxy whose spans
    # record nothing and carry no context: tracing stays off, and is looked for again
    # on the next call (a provider may be set at any time).
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    found = provider.get_tracer("sqlalchemy_pgque", _version())
    with _lock:
        if _enabled and (_provider is None or _provider is provider):
            _tracer = found
    return found


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("sqlalchemy-pgque")
    except metadata.PackageNotFoundError:
        return None


def _traceparent(span: Span) -> str | None:
    """The W3C ``traceparent`` of ``span``; ``None`` for a span without a context
    (what a disabled SDK hands out)."""
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # The W3C format whatever propagator the application set globally (B3, Jaeger, ...):
    # the stored value must mean the same to every consumer, in any language.
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier.get(_TRACEPARENT)


def record_error(span: Span, error: BaseException) -> None:
    """Mark ``span`` failed with ``error``."""
    from opentelemetry.trace import Status, StatusCode

    cls = type(error)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    span.record_exception(error)
    span.set_attribute(ERROR_TYPE, name)
    span.set_status(Status(StatusCode.ERROR, f"{cls.__name__}: {error}"))


def _producer_span(tracer_: Tracer, queue: str, type_: str, operation_type: str,
                   count: int) -> Span:
    from opentelemetry.trace import SpanKind

    attributes: dict[str, str | int] = {
        SYSTEM: "pgque",
        OPERATION_TYPE: operation_type,
        OPERATION_NAME: "send",
        DESTINATION: queue,
        MESSAGE_TYPE: type_,
    }
    if count > 1:
        attributes[BATCH_MESSAGE_COUNT] = count
    return tracer_.start_span(f"send {queue}", kind=SpanKind.PRODUCER, attributes=attributes)


def _field_taken(queue: str, field: ContextField) -> None:
    # The user's value stays; the trace of this event stops at the producer. Said once
    # per queue, not per event, with what to do about it.
    if queue in _warned_queues:
        return
    _warned_queues.add(queue)
    log.warning(
        "queue %r: an event was sent with its own %s, which sqlalchemy_pgque.tracing "
        "uses for the trace context; the value is kept and the event carries no trace "
        "context (choose a free field with tracing.configure(context_field=...))",
        queue, field)


def created(events: Sequence[PendingEvent]) -> None:
    """Give ``events``, recorded by one ``send``/``send_batch`` call, the creation
    context of a PRODUCER span, in the configured field of each that left it empty.

    The span starts and ends here, in the caller's context, so that its parent is
    the caller's span (a web request, say) rather than whatever runs when the Session
    happens to flush. It records the send, not the insert: the operation type is
    ``create``, and the id of the event is not known yet.
    """
    tracer_ = tracer()
    if tracer_ is None or not events:
        return
    first = events[0]
    span = _producer_span(tracer_, first.queue.name, first.type, "create", len(events))
    try:
        field = _context_field
        context = _traceparent(span) if field is not None else None
        if field is None or context is None:
            return
        index = CONTEXT_FIELDS.index(field)
        for pending in events:
            if not pending._set_extra(index, context):
                _field_taken(first.queue.name, field)
    finally:
        span.end()


def _stamped(extras: tuple[str | None, str | None, str | None, str | None],
            context: str | None, queue: str) -> tuple[str | None, ...]:
    """``extras`` with ``context`` in the configured field, unless that field is
    taken (the user's value stays) or there is no context."""
    field = _context_field
    if field is None or context is None:
        return extras
    index = CONTEXT_FIELDS.index(field)
    if extras[index] is not None:
        _field_taken(queue, field)
        return extras
    return (*extras[:index], context, *extras[index + 1:])


def sent_now(queue: str, type_: str,
             extras: tuple[str | None, str | None, str | None, str | None],
             insert: Callable[[tuple[str | None, ...]], int]) -> int:
    """``insert(extras)`` (``Queue.send_now``), inside a PRODUCER span when tracing is
    on: the span is current during the insert and carries the new event's id."""
    tracer_ = tracer()
    if tracer_ is None:
        return insert(extras)
    from opentelemetry.trace import use_span

    span = _producer_span(tracer_, queue, type_, "send", 1)
    try:
        with use_span(span, record_exception=False, set_status_on_exception=False):
            event_id = insert(_stamped(extras, _traceparent(span), queue))
    except BaseException as exc:
        record_error(span, exc)
        raise
    else:
        span.set_attribute(MESSAGE_ID, str(event_id))
        return event_id
    finally:
        span.end()
