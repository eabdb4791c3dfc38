"""Logs a person can read, or one JSON object per line for a log pipeline.

While a consumer works, every log record made in its thread or task, by the library
or by your handler, knows which queue, consumer, subconsumer, batch and message it is
about. :class:`JsonFormatter` writes those as fields::

    {"time": "2026-11-29T23:40:01.123+00:00", "level": "ERROR",
     "logger": "sqlalchemy_pgque.consumer", "message": "orders/billing: handler ...",
     "queue": "orders", "consumer": "billing", "batch_id": 412, "msg_id": 90311,
     "exception": "Traceback ..."}

The worker and the command line take ``--log-format json``; in your own process,
``configure_logging(format="json")`` or put :class:`JsonFormatter` on a handler.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Literal

__all__ = ["JsonFormatter", "LogFormat", "configure_logging", "log_fields"]

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Contextvars follow the consumer's thread, and each asyncio task gets its own copy, so
# two consumers running side by side never see each other's fields.
_fields: ContextVar[Mapping[str, Any]] = ContextVar(
    "sqlalchemy_pgque_log_fields", default=MappingProxyType({}))


def log_fields() -> dict[str, Any]:
    """The consumer's fields of the current thread or task (queue, consumer,
    subconsumer, batch_id, msg_id, as far as they apply); ``{}`` outside a consumer."""
    return dict(_fields.get())


def _bind_fields(**fields: Any) -> Any:
    """Add ``fields`` to the log context; hand the result to :func:`_unbind_fields`.
    A token rather than a ``with`` block, for the consumer's steps."""
    return _fields.set({**_fields.get(), **fields})


def _unbind_fields(token: Any) -> None:
    _fields.reset(token)


_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the consumer's fields
    (:func:`log_fields`), anything passed as ``extra=``, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "pgque", None) or log_fields())
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key != "pgque" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _CaptureFields(logging.Filter):
    """Copies the log context onto the record when it is made, before any handler
    that formats it in another thread (a QueueHandler) loses the context."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "pgque"):
            record.pgque = log_fields()
        return True


def configure_logging(level: str | int = "INFO", format: LogFormat = "text") -> None:
    """Log to stderr at ``level``, as text or JSON lines; replaces the root logger's
    handlers (what the worker and the command line do at start)."""
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(_CaptureFields())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
