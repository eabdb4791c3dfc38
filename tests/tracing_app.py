"""A traced worker app for tests/layer/test_tracing.py (``python -m sqlalchemy_pgque.worker
tracing_app:consumer``).

It sets up the OpenTelemetry SDK as an application would, as the global tracer
provider, with an exporter that appends every finished span as one JSON line (the
SDK's own ``to_json``) to the file named by ``APP_SPANS_FILE``, for the test to read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Consumer, Message


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # Flushed line by line: the test polls the file and reads its whole lines.
        with open(self.path, "a", encoding="utf-8") as out:
            for span in spans:
                out.write(span.to_json(indent=None) + "\n")
                out.flush()
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["APP_SPANS_FILE"])))
trace.set_tracer_provider(provider)

consumer = Consumer(sessionmaker(), queue="orders", name="shipping", poll_interval=30)


@consumer.on("order.created")
def ship(msg: Message, session: Session) -> None:
    # Shows in the exported span only if the handler runs inside it.
    trace.get_current_span().set_attribute("app.order_id", msg.payload["order_id"])
