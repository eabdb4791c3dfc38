"""OpenTelemetry tracing of sends and handlers (the ``otel`` extra).

Nothing to call in the common case: install ``opentelemetry-api`` (the ``otel`` extra)
and set an SDK tracer provider as usual, and then

* ``Queue.send`` / ``send_batch`` record a PRODUCER span ``send <queue>`` in the
  caller's context and store its W3C ``traceparent`` in the event's ``extra4``
  (unless the sender put a value of its own there, which is kept);
  ``Queue.send_now`` records one around its insert;
* every consumer runs each handler inside a CONSUMER span ``process <queue>``, a
  child of the producer's span (and linked to it), current while the handler runs,
  with the handler's exception recorded on it.

:func:`configure` turns it off, picks another field for the trace context (or none),
or names a tracer provider other than the global one. Without OpenTelemetry, or
until a tracer provider is set, nothing is traced and nothing is imported.
"""

from __future__ import annotations

import functools
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from . import _trace
from ._trace import CONTEXT_FIELDS, ContextField
from .consumer import ConsumerObserver, Outcome
from .message import Message

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .consumer import _ConsumerBase

__all__ = ["ContextField", "configure"]


def configure(
    *,
    enabled: bool = True,
    context_field: ContextField | None = "extra4",
    tracer_provider: TracerProvider | None = None,
) -> None:
    """Set how sends and handlers are traced; each call replaces all the settings
    (``configure()`` restores the defaults).

    :param enabled: ``False`` records no spans and stores no trace context, whatever
        tracer provider is set.
    :param context_field: the event field (``"extra1"`` ... ``"extra4"``) that carries
        the producer's W3C ``traceparent`` to the consumers, or ``None`` to store none
        (the consumer spans then start traces of their own). A send that gives the
        field a value of its own keeps it: that event carries no trace context, and
        a warning says so once per queue. Consumers read the context from the same
        field, so producers and consumers of a queue must agree on it.
    :param tracer_provider: the provider to trace with; by default, the global one
        (``opentelemetry.trace.set_tracer_provider``), once it is set.
    """
    if context_field is not None and context_field not in CONTEXT_FIELDS:
        raise ValueError(
            f"context_field must be one of {', '.join(CONTEXT_FIELDS)} or None, "
            f"got {context_field!r}"
        )
    _trace.settings(enabled, context_field, tracer_provider)


class _TracingObserver(ConsumerObserver):
    """One CONSUMER span per handler call, current while the handler runs.

    The hooks run in the consumer's own thread or task right around the handler, so
    the context attached in :meth:`handler_started` is the handler's, sync or async,
    and is detached in :meth:`handler_finished`.
    """

    def handler_started(self, consumer: _ConsumerBase, message: Message) -> Any:
        tracer = _trace.tracer()
        if tracer is None:
            return None
        otel = _api()
        field = _trace.context_field()
        stored = getattr(message, field) if field is not None else None
        producer = _producer_context(stored, otel) if stored else None
        parent = links = None
        if producer is not None:
            # A child, so that one trace shows the event from the send to its handlers;
            # and a link, which the messaging conventions ask of a "process" span and
            # which tools that pair producers with consumers follow.
            parent = otel.set_span_in_context(otel.NonRecordingSpan(producer))
            links = [otel.Link(producer)]
        attributes: dict[str, str | int] = {
            _trace.SYSTEM: "pgque",
            _trace.OPERATION_TYPE: "process",
            _trace.OPERATION_NAME: "process",
            _trace.DESTINATION: consumer.queue.name,
            _trace.CONSUMER_GROUP: consumer.name,
            _trace.MESSAGE_ID: str(message.msg_id),
            _trace.MESSAGE_TYPE: message.type,
            _trace.BATCH_ID: message.batch_id,
            _trace.RETRY_COUNT: message.retry_count or 0,
        }
        if consumer.subconsumer is not None:
            attributes[_trace.SUBCONSUMER] = consumer.subconsumer
        span = tracer.start_span(f"process {consumer.queue.name}", context=parent,
                                 kind=otel.CONSUMER, attributes=attributes, links=links)
        return span, otel.attach(otel.set_span_in_context(span))

    def handler_finished(self, consumer: _ConsumerBase, message: Message, state: Any,
                         outcome: Outcome, error: BaseException | None,
                         seconds: float) -> None:
        if state is None:
            return
        otel = _api()
        span, token = state
        try:
            if span.is_recording():
                span.set_attribute(_trace.OUTCOME, outcome)
                if error is not None:
                    _trace.record_error(span, error)
                elif outcome == "failed":
                    span.set_status(otel.Status(otel.ERROR,
                                                "the batch failed as a whole and comes back"))
        finally:
            otel.detach(token)
            span.end()


@functools.cache
def _api() -> Any:
    """The OpenTelemetry names the handler hooks use, imported once: an import
    statement per message was a tenth of the observer's cost."""
    from types import SimpleNamespace

    from opentelemetry import context, trace

    return SimpleNamespace(
        attach=context.attach, detach=context.detach,
        set_span_in_context=trace.set_span_in_context, NonRecordingSpan=trace.NonRecordingSpan,
        Link=trace.Link, SpanContext=trace.SpanContext, TraceFlags=trace.TraceFlags,
        CONSUMER=trace.SpanKind.CONSUMER, Status=trace.Status, ERROR=trace.StatusCode.ERROR,
    )


def _producer_context(traceparent: str, otel: Any) -> Any:
    """The remote span context in a W3C ``traceparent``, ``None`` when the text is not
    one (another producer's own use of the field: the span then starts its own trace).

    Parsed here rather than by the W3C propagator, which builds a carrier, a regular
    expression match and two contexts per message, a third of the hook's time; the
    format is ``version-traceid-spanid-flags`` in lower-case hex, version ``ff``
    invalid, all-zero ids invalid, and a later version may append fields.
    """
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or (parts[0] == "00" and len(parts) != 4):
        return None
    version, trace_id, span_id, flags = parts[:4]
    if len(version) != 2 or version == "ff" or len(trace_id) != 32 or len(span_id) != 16 \
            or len(flags) != 2:
        return None
    try:
        trace_number, span_number = int(trace_id, 16), int(span_id, 16)
        flag_bits = int(flags, 16)
        int(version, 16)
    except ValueError:
        return None
    if not trace_number or not span_number or traceparent.lower() != traceparent:
        return None
    return otel.SpanContext(trace_number, span_number, is_remote=True,
                            trace_flags=otel.TraceFlags(flag_bits & 0x01))


_OBSERVER = _TracingObserver()


def default_observers() -> list[ConsumerObserver]:
    """The observers every new consumer starts with: the tracing one when
    OpenTelemetry is installed (it does nothing while tracing is off), else none, so
    that an install without it pays nothing per message."""
    return [_OBSERVER] if _installed() else []


@functools.cache
def _installed() -> bool:
    # find_spec of a top-level name only locates it: nothing is imported.
    return find_spec("opentelemetry") is not None
