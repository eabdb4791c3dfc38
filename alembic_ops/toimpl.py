"""How each PgQue operation runs its SQL.

The statements themselves are composed by ``sqlalchemy_pgque._statements``. Every
statement goes through ``operations.execute`` as finished SQL text with the
values quoted in, so that ``alembic upgrade --sql`` prints a script psql can run and
the online path runs exactly the same text. Only the portable PgQue 0.2 calls of
ENGINE.md §6.3 are used, positionally, so the operations work on any PgQue 0.2 install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.operations import Operations
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

from sqlalchemy_pgque import schema
from sqlalchemy_pgque._statements import (
    grant_roles,
    literal_call,
    quote_identifier,
    quote_literal,
    revoke_roles,
    unsubscribe_if_normal,
)
from sqlalchemy_pgque.errors import (
    EngineNotInstalled,
    PermissionDenied,
    PgqueError,
    QueueHasConsumers,
    QueueNotFound,
    _first_line,
    _translate,
)

from .ops import (
    CreateQueueOp,
    DropQueueOp,
    GrantOp,
    InstallOp,
    PgqueOperation,
    RevokeOp,
    SetQueueConfigOp,
    SubscribeOp,
    SubscribeSubconsumerOp,
    UninstallOp,
    UnsubscribeOp,
    UnsubscribeSubconsumerOp,
)

__all__ = ["PgqueMigrationError", "quote_identifier", "quote_literal"]


class PgqueMigrationError(PgqueError):
    """A PgQue operation failed in a migration; the migration's transaction rolls back.

    The message names the operation, the engine's error and what to do about it; the
    SQLAlchemy exception is chained as ``__cause__``.
    """

    def __init__(self, operation: PgqueOperation, detail: str, hint: str | None = None) -> None:
        self.operation = operation
        super().__init__(
            f"op.{operation.source(prefix='')} failed: {detail}" + (f" ({hint})" if hint else "")
        )


# What a migration can do about an engine error, by the error's class.
_HINTS: dict[type[PgqueError], str] = {
    QueueHasConsumers: (
        "unsubscribe its consumers first with op.pgque_unsubscribe, or pass force=True"
    ),
    QueueNotFound: "create the queue first with op.pgque_create_queue",
    EngineNotInstalled: "install the engine first with op.pgque_install()",
    PermissionDenied: (
        "run migrations as the owner of the pgque schema or a member of pgque_admin"
    ),
}


def _failure(operation: PgqueOperation, exc: DBAPIError) -> PgqueMigrationError:
    error = _translate(exc)
    hint = _HINTS.get(type(error)) if error is not None else None
    return PgqueMigrationError(operation, _first_line(exc.orig or exc), hint)


class VerbatimSQL(Executable, ClauseElement):
    """SQL text sent as written: no bind parameters are parsed out of it.

    ``text()`` would read ``:word`` inside a quoted value as a parameter. Online, ``%``
    is doubled for drivers whose paramstyle needs it; offline it is printed unchanged.
    """

    inherit_cache = False

    def __init__(self, sql: str, *, offline: bool) -> None:
        self.sql = sql
        self.offline = offline


@compiles(VerbatimSQL)
def _compile_verbatim(element: VerbatimSQL, compiler: SQLCompiler, **kw: Any) -> str:
    if element.offline:
        return element.sql
    # SQLAlchemy's own hook for text that bypasses parameter parsing; it is untyped.
    return compiler.post_process_text(element.sql)  # type: ignore[no-untyped-call,no-any-return]


def _run(operations: Operations, operation: PgqueOperation, *statements: str) -> None:
    offline = operations.get_context().as_sql
    for sql in statements:
        if offline:
            operations.execute(VerbatimSQL(sql, offline=True))
            continue
        try:
            operations.execute(VerbatimSQL(sql, offline=False))
        except DBAPIError as exc:
            raise _failure(operation, exc) from exc


@Operations.implementation_for(InstallOp)
def install(operations: Operations, operation: InstallOp) -> None:
    if operations.get_context().as_sql:
        script = (
            Path(operation.sql_path).read_text(encoding="utf-8")
            if operation.sql_path
            else schema.engine_sql()
        )
        # Alembic appends its own terminator to every statement it prints.
        operations.execute(VerbatimSQL(script.strip().rstrip(";"), offline=True))
        return
    # Online the installer runs the script on the migration's connection, inside a
    # savepoint of its transaction, and recognises a foreign pgque schema.
    try:
        schema.install(operations.get_bind(), operation.sql_path)
    except DBAPIError as exc:
        raise _failure(operation, exc) from exc


@Operations.implementation_for(UninstallOp)
def uninstall(operations: Operations, operation: UninstallOp) -> None:
    _run(operations, operation, literal_call("uninstall"))


@Operations.implementation_for(CreateQueueOp)
def create_queue(operations: Operations, operation: CreateQueueOp) -> None:
    _run(
        operations,
        operation,
        literal_call("create_queue", operation.name),
        *(
            literal_call("set_queue_config", operation.name, param, value)
            for param, value in operation.config.items()
        ),
    )


@Operations.implementation_for(DropQueueOp)
def drop_queue(operations: Operations, operation: DropQueueOp) -> None:
    _run(operations, operation, literal_call("drop_queue", operation.name, operation.force))


@Operations.implementation_for(SubscribeOp)
def subscribe(operations: Operations, operation: SubscribeOp) -> None:
    _run(operations, operation, literal_call("subscribe", operation.queue, operation.consumer))


@Operations.implementation_for(UnsubscribeOp)
def unsubscribe(operations: Operations, operation: UnsubscribeOp) -> None:
    _run(operations, operation, literal_call("unsubscribe", operation.queue, operation.consumer))


@Operations.implementation_for(SubscribeSubconsumerOp)
def subscribe_subconsumer(operations: Operations, operation: SubscribeSubconsumerOp) -> None:
    args = (operation.queue, operation.consumer, operation.subconsumer)
    _run(
        operations,
        operation,
        literal_call("register_subconsumer", *args, True)
        if operation.convert_normal
        else literal_call("register_subconsumer", *args),
    )


@Operations.implementation_for(UnsubscribeSubconsumerOp)
def unsubscribe_subconsumer(operations: Operations, operation: UnsubscribeSubconsumerOp) -> None:
    statements = [
        literal_call(
            "unregister_subconsumer",
            operation.queue,
            operation.consumer,
            operation.subconsumer,
            operation.batch_handling,
        )
    ]
    if operation.unsubscribe_if_last:
        # PgQue turns the main consumer back into a normal one when its last
        # subconsumer goes; only then is it unsubscribed.
        statements.append(unsubscribe_if_normal(operation.queue, operation.consumer))
    _run(operations, operation, *statements)


@Operations.implementation_for(SetQueueConfigOp)
def set_queue_config(operations: Operations, operation: SetQueueConfigOp) -> None:
    _run(
        operations,
        operation,
        literal_call("set_queue_config", operation.queue, operation.param, operation.value),
    )


@Operations.implementation_for(GrantOp)
def grant(operations: Operations, operation: GrantOp) -> None:
    _run(operations, operation, grant_roles(operation.pgque_roles, operation.role))


@Operations.implementation_for(RevokeOp)
def revoke(operations: Operations, operation: RevokeOp) -> None:
    _run(operations, operation, revoke_roles(operation.pgque_roles, operation.role))
