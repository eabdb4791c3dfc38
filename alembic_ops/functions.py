"""Typed equivalents of the ``op.pgque_*`` operations.

``op.pgque_*`` is attached to Alembic's ``op`` at run time, so a type checker does not
know it. These functions run the same operations through ``op.invoke`` and are fully
typed; use them in migrations that are type-checked::

    import alembic_ops as pgque_ops

    def upgrade() -> None:
        pgque_ops.install()
        pgque_ops.create_queue("orders", ticker_max_lag="500 milliseconds")
        pgque_ops.subscribe("orders", "order_worker")
"""

from __future__ import annotations

from alembic import op

from .ops import (
    ConfigValue,
    CreateQueueOp,
    DropQueueOp,
    GrantOp,
    InstallOp,
    RevokeOp,
    SetQueueConfigOp,
    SubscribeOp,
    SubscribeSubconsumerOp,
    UninstallOp,
    UnsubscribeOp,
    UnsubscribeSubconsumerOp,
)

__all__ = [
    "create_queue",
    "drop_queue",
    "grant",
    "install",
    "revoke",
    "set_queue_config",
    "subscribe",
    "subscribe_subconsumer",
    "uninstall",
    "unsubscribe",
    "unsubscribe_subconsumer",
]


def install(sql_path: str | None = None) -> None:
    """``op.pgque_install``: install the bundled engine or the PgQue SQL file ``sql_path``."""
    op.invoke(InstallOp(sql_path))


def uninstall() -> None:
    """``op.pgque_uninstall``: remove the engine with every queue and event."""
    op.invoke(UninstallOp())


def create_queue(name: str, **config: ConfigValue) -> None:
    """``op.pgque_create_queue``: create a queue, then apply the ``set_queue_config`` settings."""
    op.invoke(CreateQueueOp(name, config))


def drop_queue(name: str, force: bool = False) -> None:
    """``op.pgque_drop_queue``: drop a queue and its events."""
    op.invoke(DropQueueOp(name, force))


def subscribe(queue: str, consumer: str) -> None:
    """``op.pgque_subscribe``: subscribe ``consumer`` to ``queue``."""
    op.invoke(SubscribeOp(queue, consumer))


def unsubscribe(queue: str, consumer: str) -> None:
    """``op.pgque_unsubscribe``: unsubscribe ``consumer`` from ``queue``."""
    op.invoke(UnsubscribeOp(queue, consumer))


def subscribe_subconsumer(
    queue: str, consumer: str, subconsumer: str, *, convert_normal: bool = False
) -> None:
    """``op.pgque_subscribe_subconsumer``: register a cooperative subconsumer."""
    op.invoke(SubscribeSubconsumerOp(queue, consumer, subconsumer, convert_normal=convert_normal))


def unsubscribe_subconsumer(
    queue: str,
    consumer: str,
    subconsumer: str,
    batch_handling: int = 0,
    *,
    unsubscribe_if_last: bool = False,
) -> None:
    """``op.pgque_unsubscribe_subconsumer``: remove a cooperative subconsumer."""
    op.invoke(
        UnsubscribeSubconsumerOp(
            queue, consumer, subconsumer, batch_handling, unsubscribe_if_last=unsubscribe_if_last
        )
    )


def set_queue_config(queue: str, param: str, value: ConfigValue) -> None:
    """``op.pgque_set_queue_config``: change one queue setting; ``None`` resets it."""
    op.invoke(SetQueueConfigOp(queue, param, value))


def grant(role: str, reader: bool = True, writer: bool = True) -> None:
    """``op.pgque_grant``: grant ``pgque_reader`` and/or ``pgque_writer`` to ``role``."""
    op.invoke(GrantOp(role, reader, writer))


def revoke(role: str, reader: bool = True, writer: bool = True) -> None:
    """``op.pgque_revoke``: revoke ``pgque_reader`` and/or ``pgque_writer`` from ``role``."""
    op.invoke(RevokeOp(role, reader, writer))
