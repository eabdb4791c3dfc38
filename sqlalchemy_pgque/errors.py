"""Exceptions raised by sqlalchemy-pgque.

Every error a user can cause has its own class; errors raised by the engine are
mapped from their SQLSTATE and chained (``raise ... from``) to the original SQLAlchemy
exception, so the SQL and its parameters stay available for debugging. The bundled
engine gives each kind of error its own code (the table heads ``sql/00_objects.sql``);
another PgQue 0.2 install raises the same texts as ``P0001``, and those are mapped by
their leading words.
"""

from __future__ import annotations

import re

import psycopg
from sqlalchemy.exc import DBAPIError, PendingRollbackError
from sqlalchemy.exc import TimeoutError as PoolTimeout

__all__ = [
    "BatchInProgress",
    "BatchNotFound",
    "ConsumerModeConflict",
    "ConsumerNotSubscribed",
    "DeadLetterNotFound",
    "EngineFeatureMissing",
    "EngineNotInstalled",
    "ForeignSchemaError",
    "InvalidName",
    "MessageNotInBatch",
    "PayloadError",
    "PermissionDenied",
    "PgqueError",
    "QueueHasConsumers",
    "QueueNotFound",
]


class PgqueError(Exception):
    """Base class of every exception raised by sqlalchemy-pgque."""


class EngineNotInstalled(PgqueError):
    """The ``pgque`` schema is missing from the database."""

    def __init__(self, detail: str = "") -> None:
        message = (
            "the PgQue engine is not installed in this database; install it with "
            "`python -m sqlalchemy_pgque install --url URL`, "
            "op.pgque_install() in an Alembic migration, or sqlalchemy_pgque.schema.install(conn)"
        )
        super().__init__(f"{message} ({detail})" if detail else message)
        self.detail = detail

    def __reduce__(self) -> tuple[type[EngineNotInstalled], tuple[str]]:
        return (type(self), (self.detail,))


class EngineFeatureMissing(PgqueError):
    """The installed engine lacks a function the call needs: delayed delivery,
    idempotent send and the observability functions are PgQue 0.3 functions, which
    the bundled engine has and a PgQue 0.2 install does not."""

    def __init__(self, function: str, detail: str = "") -> None:
        message = (
            f"pgque.{function}() is a PgQue 0.3 function, and the engine installed in this "
            "database does not have it (a PgQue 0.2 install?); install the bundled engine, "
            "which upgrades in place and keeps queued events: `python -m sqlalchemy_pgque "
            "install --url URL` or op.pgque_install() in an Alembic migration"
        )
        super().__init__(f"{message} ({detail})" if detail else message)
        self.function = function
        self.detail = detail

    def __reduce__(self) -> tuple[type[EngineFeatureMissing], tuple[str, str]]:
        return (type(self), (self.function, self.detail))


class ForeignSchemaError(PgqueError):
    """A ``pgque`` schema created by something else (e.g. upstream PgQue) is present."""


class InvalidName(PgqueError, ValueError):
    """A queue, consumer or subconsumer name that PgQue cannot accept."""


class QueueNotFound(PgqueError):
    """The queue does not exist: create it (``op.pgque_create_queue`` or ``pgque.create_queue``)."""


class QueueHasConsumers(PgqueError):
    """The queue still has consumers, so it cannot be dropped: unsubscribe them first,
    or drop it with ``force`` (which unsubscribes them, losing their place)."""


class ConsumerNotSubscribed(PgqueError):
    """The consumer is not subscribed to the queue: subscribe it first."""


class ConsumerModeConflict(PgqueError):
    """The consumer is registered as the other kind than the call needs: a normal
    consumer used as a cooperative one, a cooperative consumer used with a normal
    consumer's call (``receive``, or ``unsubscribe`` while it has subconsumers), or a
    subconsumer name already taken by another subscription."""


class BatchNotFound(PgqueError):
    """The batch id is unknown or the batch is already finished."""


class BatchInProgress(PgqueError):
    """The consumer or subconsumer holds an open batch, so it cannot be removed or
    converted now: let it ack, or unsubscribe the subconsumer with ``batch_handling=1``
    (its messages go to retry, or to the dead-letter queue once out of retries)."""


class MessageNotInBatch(PgqueError):
    """``nack`` was given a message that does not belong to the batch it names."""


class PayloadError(PgqueError, ValueError):
    """A payload that cannot be encoded as JSON for PostgreSQL's ``jsonb``."""


class DeadLetterNotFound(PgqueError):
    """No dead-letter entry has this id (never, or already replayed or purged)."""


class PermissionDenied(PgqueError):
    """The database role lacks the pgque role needed for the call."""

    def __init__(self, detail: str, required_role: str | None = None) -> None:
        if required_role is not None:
            advice = f"needs the {required_role} role: GRANT {required_role} TO <user>"
        else:
            advice = (
                "needs a pgque role (pgque_reader to consume, pgque_writer to send, "
                "pgque_admin to manage queues and tick): GRANT <role> TO <user>"
            )
        super().__init__(f"permission denied: the database user {advice} ({detail})")
        self.detail = detail
        self.required_role = required_role

    def __reduce__(self) -> tuple[type[PermissionDenied], tuple[str, str | None]]:
        return (type(self), (self.detail, self.required_role))


# The bundled engine's own SQLSTATEs that have a class here.
_CODE_MAP: dict[str, type[PgqueError]] = {
    "PQ001": QueueNotFound,
    "PQ002": ConsumerNotSubscribed,
    "PQ003": BatchNotFound,
    "PQ004": MessageNotInBatch,
    "PQ006": DeadLetterNotFound,
    "PQ101": ConsumerModeConflict,
    "PQ102": BatchInProgress,
    "PQ103": QueueHasConsumers,
    "PQ201": InvalidName,
    "PQ301": ForeignSchemaError,
}

# Another PgQue 0.2 install raises every error as a plain RAISE EXCEPTION; its texts
# keep stable leading words (spec §6.2). Substrings, lower-cased.
_RAISE_EXCEPTION = "P0001"
_MESSAGE_MAP: tuple[tuple[str, type[PgqueError]], ...] = (
    ("queue not found", QueueNotFound),
    ("no such event queue", QueueNotFound),
    ("no such queue", QueueNotFound),
    ("event queue not created yet", QueueNotFound),
    ("not subscriber to queue", ConsumerNotSubscribed),
    ("dead letter entry not found", DeadLetterNotFound),
    ("consumer not registered", ConsumerNotSubscribed),
    ("consumer not found", ConsumerNotSubscribed),
    ("explicit conversion is required", ConsumerModeConflict),
    ("with registered subconsumers", ConsumerModeConflict),
    ("cannot convert active normal consumer", BatchInProgress),
    ("cannot unregister active cooperative subconsumer", BatchInProgress),
    ("with active subconsumer batches", BatchInProgress),
    ("a cooperative main consumer", ConsumerModeConflict),
    ("is a cooperative subconsumer", ConsumerModeConflict),
    ("registered incompatibly", ConsumerModeConflict),
    ("batch not found", BatchNotFound),
    ("cannot find data for batch", BatchNotFound),
    ("not found in batch", MessageNotInBatch),
    ("queue name too long", InvalidName),
    ("must not contain dot", InvalidName),
    ("name must not be empty", InvalidName),
    ("consumers still attached", QueueHasConsumers),
)

_UNDEFINED_FUNCTION = "42883"
# Functions of the PgQue 0.3 API that a 0.2 install lacks.
_API_0_3_FUNCTIONS = frozenset({
    "send_at", "maint_deliver_delayed", "next_delayed_due", "send_idem", "maint_idem",
    "queue_stats", "consumer_stats", "queue_health", "otel_metrics", "in_flight",
    "throughput", "error_rate", "pause_queue", "resume_queue",
})
_MISSING_FUNCTION = re.compile(r"function pgque\.(\w+)\(")
_UNDEFINED_TABLE = "42P01"
_UNDEFINED_OBJECT = "42704"
_INVALID_SCHEMA_NAME = "3F000"
_INSUFFICIENT_PRIVILEGE = "42501"


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line logs and error texts."""
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def _sqlstate(orig: BaseException | None) -> str | None:
    """The SQLSTATE of a driver exception (``DBAPIError.orig``), if it has one."""
    # psycopg exposes ``sqlstate``; psycopg2 and asyncpg adapters use ``pgcode``.
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def _translate(
    exc: DBAPIError, *, required_role: str | None = None, queue: str | None = None
) -> PgqueError | None:
    """Map a database error raised by a pgque call to a :class:`PgqueError`.

    Returns ``None`` when the error is not one the engine defines; the caller then
    re-raises the original exception. ``required_role`` names the pgque role the
    failed call needs, for the :class:`PermissionDenied` message; ``queue`` names the
    queue the call was about, for :class:`QueueNotFound`.
    """
    orig = exc.orig
    if orig is None:
        return None
    detail = _first_line(orig)
    state = _sqlstate(orig)
    lowered = detail.lower()
    if state in (_UNDEFINED_FUNCTION, _UNDEFINED_TABLE, _UNDEFINED_OBJECT, _INVALID_SCHEMA_NAME):
        missing = _MISSING_FUNCTION.search(detail) if state == _UNDEFINED_FUNCTION else None
        if missing is not None and missing.group(1) in _API_0_3_FUNCTIONS:
            return EngineFeatureMissing(missing.group(1), detail)
        if "pgque" in lowered:
            return EngineNotInstalled(detail)
        return None
    if state == _INSUFFICIENT_PRIVILEGE:
        return PermissionDenied(detail, required_role)
    if state is None or state == _RAISE_EXCEPTION:
        # Another install's error, or a driver that exposes no SQLSTATE: only the text
        # tells the kind.
        error_class = next((cls for needle, cls in _MESSAGE_MAP if needle in lowered), None)
    else:
        error_class = _CODE_MAP.get(state)
    if error_class is None:
        return None
    if error_class is QueueNotFound and queue is not None:
        return QueueNotFound(
            f"queue {queue!r} does not exist; create it with "
            f"op.pgque_create_queue({queue!r}) in an Alembic migration or "
            f"SELECT pgque.create_queue({queue!r}) ({detail})"
        )
    return error_class(detail)


# The server ended the session for reasons outside the statement: admin_shutdown
# (pg_terminate_backend, a fast shutdown), crash_shutdown, cannot_connect_now (starting
# up or in recovery), idle_session_timeout. Class 08 (connection_exception) is checked
# separately.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P05"})

# Errors of one statement on a healthy connection that succeed when simply tried again:
# serialization_failure, deadlock_detected, lock_not_available, query_canceled,
# read_only_sql_transaction (a standby, until a failover promotes it or the connection
# moves to the new primary), and the insufficient_resources class (too many
# connections, out of memory, disk full).
_RETRY_LATER = frozenset({"40001", "40P01", "55P03", "57014", "25006"})

# Connection attempts fail without a SQLSTATE. A refusal by the server ("FATAL: ...")
# means wrong settings (a bad password, no such database or role, pg_hba, no CONNECT
# privilege) except for these texts (the server's, in English), which say it is not
# ready yet; failures below the server (refused, timed out, no such socket) are
# transient too.
_SERVER_NOT_READY = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
    "too many clients already",
    "remaining connection slots are reserved",
    "terminating connection",
    "out of memory",
)


def _is_connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the database connection, or the transaction on it, cannot be
    used any more: the server went away, restarted or ended the session, or SQLAlchemy
    invalidated the connection and wants the transaction rolled back.

    Errors of one statement on a connection that is still good (a constraint, a
    timeout, a deadlock, a missing privilege) are not.
    """
    if isinstance(exc, PendingRollbackError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        if exc.orig is None:
            return False
        exc = exc.orig
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        # Raised by the client, not the server: "server closed the connection
        # unexpectedly", "the connection is closed", a failed connection attempt.
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return state.startswith("08") or state in _SESSION_ENDED


def _is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed where ``exc`` failed: a lost connection,
    a server that is down, restarting or out of resources, a conflict with another
    transaction, an exhausted connection pool. Wrong settings (a bad password, a
    database that does not exist) and errors of the SQL itself are not transient.
    """
    if isinstance(exc, PoolTimeout):
        return True
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    if isinstance(orig, psycopg.Error) and orig.sqlstate is None:
        message = str(orig)
        if "FATAL:" in message:
            lowered = message.lower()
            return any(text in lowered for text in _SERVER_NOT_READY)
    if _is_connection_lost(exc):
        return True
    state = _sqlstate(orig)
    return state is not None and (state in _RETRY_LATER or state.startswith("53"))
