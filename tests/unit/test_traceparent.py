"""The consumer's own W3C traceparent parser agrees with OpenTelemetry's propagator."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.trace")

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

from sqlalchemy_pgque.tracing import _api, _producer_context

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("value", [
    VALID,
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future",
    " " + VALID + " ",
    VALID.upper(),
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
    "customer-42",
    "",
])
def test_parser_agrees_with_the_propagator(value: str) -> None:
    extracted = TraceContextTextMapPropagator().extract({"traceparent": value})
    expected = trace.get_current_span(extracted).get_span_context()
    ours = _producer_context(value, _api())
    if not expected.is_valid:
        assert ours is None
    else:
        assert ours is not None
        assert (ours.trace_id, ours.span_id, ours.trace_flags, ours.is_remote) == (
            expected.trace_id, expected.span_id, expected.trace_flags, True)
