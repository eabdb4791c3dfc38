"""Autogenerate: compare declared queues with the database, and hide the engine's tables.

The comparator runs at the ``"schema"`` level ahead of Alembic's own comparators. It
removes the ``pgque`` schema from the schemas Alembic reflects (so the engine's tables
never appear as tables to drop), then, when ``env.py`` passed a registry with
``context.configure(..., pgque_registry=registry)``, appends the PgQue operations that
bring the database in line with it. See the package docstring for the rules.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from alembic.autogenerate.compare import comparators
from alembic.operations.ops import UpgradeOps
from alembic.util import CommandError, DispatchPriority, PriorityDispatchResult
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from sqlalchemy_pgque import schema
from sqlalchemy_pgque._statements import SUBSCRIPTIONS, queue_settings, same_queue_setting
from sqlalchemy_pgque.errors import _first_line
from sqlalchemy_pgque.queue import Queue

from .filters import ENGINE_SCHEMA
from .ops import (
    QUEUE_PARAMETERS,
    CreateQueueOp,
    DropQueueOp,
    InstallOp,
    PgqueOperation,
    SetQueueConfigOp,
    SubscribeOp,
    SubscribeSubconsumerOp,
    UnsubscribeOp,
    UnsubscribeSubconsumerOp,
)

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["compare_queues", "diff_queues"]


@dataclass
class _QueueState:
    settings: dict[str, str | None] = field(default_factory=dict)
    non_default: dict[str, str | None] = field(default_factory=dict)
    consumers: list[str] = field(default_factory=list)
    """Every subscribed consumer but the subconsumers: normal and cooperative ones."""
    subconsumers: dict[str, list[str]] = field(default_factory=dict)
    """The subconsumers of each cooperative consumer."""


def _read_state(conn: Connection) -> dict[str, _QueueState]:
    state: dict[str, _QueueState] = {}
    for row in conn.execute(queue_settings(QUEUE_PARAMETERS)):
        queue = state[row[0]] = _QueueState()
        for i, param in enumerate(QUEUE_PARAMETERS):
            value, changed = row[1 + 2 * i], row[2 + 2 * i]
            queue.settings[param] = value
            if changed:
                queue.non_default[param] = value
    subscriptions = conn.execute(SUBSCRIPTIONS).all()
    mains: dict[tuple[str, int], str] = {}
    for queue_name, consumer, role, sub_id in subscriptions:
        if role != "coop_member":
            state[queue_name].consumers.append(consumer)
            mains[(queue_name, sub_id)] = consumer
    for queue_name, consumer, role, sub_id in subscriptions:
        if role == "coop_member":
            main = mains[(queue_name, sub_id)]
            state[queue_name].subconsumers.setdefault(main, []).append(
                consumer.removeprefix(main + ".")
            )
    return state


def _same_setting(conn: Connection, queue: str, param: str, value: str) -> bool:
    type_, _ = QUEUE_PARAMETERS[param]
    try:
        with conn.begin_nested():
            return bool(
                conn.execute(
                    same_queue_setting(param, type_), {"value": value, "queue": queue}
                ).scalar_one()
            )
    except DBAPIError as exc:
        raise CommandError(
            f"queue {queue!r}: declared {param}={value!r} is not a valid {type_}: "
            f"{_first_line(exc.orig or exc)}"
        ) from exc


def _remove_consumer(queue: str, consumer: str, state: _QueueState) -> list[PgqueOperation]:
    # A cooperative consumer can be unsubscribed only after its subconsumers.
    removals: list[PgqueOperation] = [
        UnsubscribeSubconsumerOp(queue, consumer, sub)
        for sub in state.subconsumers.get(consumer, [])
    ]
    removals.append(UnsubscribeOp(queue, consumer))
    return removals


def _create_cooperative_consumers(queue: Queue, state: _QueueState) -> list[PgqueOperation]:
    """Register the first subconsumer of each declared cooperative consumer the
    database lacks; a normal consumer of that name is converted (a cooperative consumer
    that has subconsumers is left alone)."""
    return [
        SubscribeSubconsumerOp(
            queue.name, consumer, subconsumer, convert_normal=consumer in state.consumers
        )
        for consumer, subconsumer in sorted(queue.cooperative.items())
        if consumer not in state.subconsumers
    ]


def diff_queues(
    conn: Connection, registry: Iterable[Queue], *, manage_all: bool = False
) -> list[PgqueOperation]:
    """The operations that turn the database's PgQue state into the declared one."""
    declared = sorted(registry, key=lambda q: q.name)
    operations: list[PgqueOperation] = []
    if schema.installed_version(conn) is None:
        if not declared:
            return []
        operations.append(InstallOp())
        current: dict[str, _QueueState] = {}
    else:
        current = _read_state(conn)
    for queue in declared:
        settings = queue.config  # names and values checked when the Queue was declared
        state = current.get(queue.name)
        if state is None:
            operations.append(CreateQueueOp(queue.name, settings))
            operations.extend(SubscribeOp(queue.name, c) for c in queue.consumers)
            operations.extend(_create_cooperative_consumers(queue, _QueueState()))
            continue
        for param, value in settings.items():
            if not _same_setting(conn, queue.name, param, value):
                operations.append(
                    SetQueueConfigOp(queue.name, param, value, previous=state.settings[param])
                )
        operations.extend(
            SubscribeOp(queue.name, c) for c in queue.consumers if c not in state.consumers
        )
        operations.extend(_create_cooperative_consumers(queue, state))
        # A cooperative consumer declared as a normal one: removing its last
        # subconsumer makes it one.
        operations.extend(
            UnsubscribeSubconsumerOp(queue.name, consumer, sub)
            for consumer in queue.consumers
            for sub in state.subconsumers.get(consumer, [])
        )
        for consumer in state.consumers:
            if consumer not in queue.consumers and consumer not in queue.cooperative:
                operations.extend(_remove_consumer(queue.name, consumer, state))
    if manage_all:
        names = {q.name for q in declared}
        for queue_name, state in sorted(current.items()):
            if queue_name in names:
                continue
            for consumer in state.consumers:
                operations.extend(_remove_consumer(queue_name, consumer, state))
            operations.append(DropQueueOp(queue_name, config=state.non_default))
    return operations


# The comparator may be registered twice, globally on import and as the "pgque" plugin
# when env.py enables it; each comparison fills one UpgradeOps, so remember those.
_compared: weakref.WeakSet[UpgradeOps] = weakref.WeakSet()


def compare_queues(
    autogen_context: AutogenContext, upgrade_ops: UpgradeOps, schemas: set[str | None]
) -> PriorityDispatchResult:
    """The ``"schema"`` comparator: hide the engine schema, then diff the registry."""
    schemas.discard(ENGINE_SCHEMA)
    if upgrade_ops in _compared:
        return PriorityDispatchResult.CONTINUE
    _compared.add(upgrade_ops)
    registry = autogen_context.opts.get("pgque_registry")
    if registry is None or autogen_context.connection is None:
        return PriorityDispatchResult.CONTINUE
    upgrade_ops.ops.extend(
        diff_queues(
            autogen_context.connection,
            registry,
            manage_all=bool(autogen_context.opts.get("pgque_manage_all", False)),
        )
    )
    return PriorityDispatchResult.CONTINUE


comparators.dispatch_for("schema", priority=DispatchPriority.FIRST, qualifier="postgresql")(
    compare_queues
)
