"""PgQue, the bloat-free PostgreSQL event queue, native to SQLAlchemy and Alembic."""

from __future__ import annotations

from . import functions as functions  # registers func.pgque.*
from ._duration import Duration
from ._statements import Bind
from .consumer import AsyncConsumer, Consumer, ConsumerObserver, Outcome
from .errors import (
    BatchInProgress,
    BatchNotFound,
    ConsumerModeConflict,
    ConsumerNotSubscribed,
    DeadLetterNotFound,
    EngineFeatureMissing,
    EngineNotInstalled,
    ForeignSchemaError,
    InvalidName,
    MessageNotInBatch,
    PayloadError,
    PermissionDenied,
    PgqueError,
    QueueHasConsumers,
    QueueNotFound,
)
from .message import Message
from .queue import WAKE_CHANNEL, PendingEvent, Queue, QueueRegistry
from .ticker import Ticker

__all__ = [
    "WAKE_CHANNEL",
    "AsyncConsumer",
    "BatchInProgress",
    "BatchNotFound",
    "Bind",
    "Consumer",
    "ConsumerModeConflict",
    "ConsumerNotSubscribed",
    "ConsumerObserver",
    "DeadLetterNotFound",
    "Duration",
    "EngineFeatureMissing",
    "EngineNotInstalled",
    "ForeignSchemaError",
    "InvalidName",
    "Message",
    "MessageNotInBatch",
    "Outcome",
    "PayloadError",
    "PendingEvent",
    "PermissionDenied",
    "PgqueError",
    "Queue",
    "QueueHasConsumers",
    "QueueNotFound",
    "QueueRegistry",
    "Ticker",
]

# Tracebacks and reprs show the public import path, not the private module layout.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
