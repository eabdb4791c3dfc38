"""The PgQue migration operations: what each ``op.pgque_*`` call means and how it reverses.

Each class is registered on :class:`alembic.operations.Operations` under the name of its
``op.pgque_*`` method; :mod:`alembic_ops.toimpl` runs it with the statements of
``sqlalchemy_pgque._statements``. ``reverse()`` is what autogenerate renders into
``downgrade()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from alembic.operations import MigrateOperation, Operations

from sqlalchemy_pgque._statements import READER, WRITER
from sqlalchemy_pgque.queue import QUEUE_PARAMETERS, ConfigValue
from sqlalchemy_pgque.queue import _config_text as config_text
from sqlalchemy_pgque.queue import _parameter_name as parameter_name

__all__ = [
    "OPERATIONS",
    "QUEUE_PARAMETERS",
    "ConfigValue",
    "CreateQueueOp",
    "DropQueueOp",
    "GrantOp",
    "InstallOp",
    "PgqueOperation",
    "RevokeOp",
    "SetQueueConfigOp",
    "SubscribeOp",
    "SubscribeSubconsumerOp",
    "UninstallOp",
    "UnsubscribeOp",
    "UnsubscribeSubconsumerOp",
]

def normalize_config(config: Mapping[str, ConfigValue]) -> dict[str, str | None]:
    """``config`` with checked parameter names and the texts PgQue receives."""
    return {parameter_name(k): config_text(v) for k, v in config.items()}


def _call_source(name: str, args: tuple[object, ...], kwargs: Mapping[str, object]) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class PgqueOperation(MigrateOperation):
    """Base of the PgQue operations: a name and the arguments that reproduce the call."""

    op_name: ClassVar[str]

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        """Positional and keyword arguments of the ``op.<op_name>(...)`` call (no defaults)."""
        raise NotImplementedError

    def source(self, prefix: str = "op.", name: str | None = None) -> str:
        """This operation as Python source, e.g. ``op.pgque_subscribe('orders', 'worker')``."""
        args, kwargs = self.call_args()
        return _call_source(prefix + (name or self.op_name), args, kwargs)

    def reverse(self) -> PgqueOperation:
        """The operation that undoes this one; autogenerate renders it into ``downgrade()``."""
        raise NotImplementedError

    def to_diff_tuple(self) -> tuple[Any, ...]:
        """This operation as Alembic's ``compare_metadata()`` diff entry."""
        args, kwargs = self.call_args()
        return (self.op_name, *args, *sorted(kwargs.items()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source(prefix='')}>"


@Operations.register_operation("pgque_install")
class InstallOp(PgqueOperation):
    """Install or upgrade the PgQue engine; the reverse removes it with every queue.

    Online, the engine is installed on the migration's connection in its transaction
    (a foreign ``pgque`` schema raises :class:`sqlalchemy_pgque.ForeignSchemaError`);
    offline (``alembic upgrade --sql``) the whole engine script is printed.
    """

    op_name = "pgque_install"

    def __init__(self, sql_path: str | None = None) -> None:
        self.sql_path = sql_path

    @classmethod
    def pgque_install(cls, operations: Operations, sql_path: str | None = None) -> None:
        """Install the bundled PgQue engine, or the PgQue SQL file at ``sql_path``.

        A relative ``sql_path`` is read from the directory Alembic runs in, when the
        migration runs (online) or when the script is printed (``--sql``).

        Idempotent: installing again keeps queues, subscriptions and queued events.
        Reverse: :meth:`pgque_uninstall`.
        """
        operations.invoke(cls(None if sql_path is None else str(sql_path)))

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        return ((), {} if self.sql_path is None else {"sql_path": self.sql_path})

    def reverse(self) -> UninstallOp:
        return UninstallOp()


@Operations.register_operation("pgque_uninstall")
class UninstallOp(PgqueOperation):
    """Remove the engine (``pgque.uninstall()``): every queue and queued event is dropped.

    The cluster-wide roles stay. The reverse installs the bundled engine again, empty:
    dropped queues and events cannot be brought back.
    """

    op_name = "pgque_uninstall"

    @classmethod
    def pgque_uninstall(cls, operations: Operations) -> None:
        """Remove the PgQue engine with all queues and events. Reverse: :meth:`pgque_install`."""
        operations.invoke(cls())

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        return ((), {})

    def reverse(self) -> InstallOp:
        return InstallOp()


@Operations.register_operation("pgque_create_queue")
class CreateQueueOp(PgqueOperation):
    """Create a queue (``pgque.create_queue``), then apply each setting of ``config``.

    Reverse: drop the queue (without force, so a consumer subscribed outside the
    migration history makes the downgrade fail instead of silently losing its cursor).
    """

    op_name = "pgque_create_queue"

    def __init__(self, name: str, config: Mapping[str, ConfigValue] | None = None) -> None:
        self.name = name
        self.config = normalize_config(config or {})

    @classmethod
    def pgque_create_queue(cls, operations: Operations, name: str, **config: ConfigValue) -> None:
        """Create queue ``name``; keyword arguments are ``set_queue_config`` settings.

        ``op.pgque_create_queue("orders", ticker_max_lag="500 milliseconds", max_retries=3)``
        """
        operations.invoke(cls(name, config))

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        return ((self.name,), dict(self.config))

    def reverse(self) -> DropQueueOp:
        return DropQueueOp(self.name, config=self.config)


@Operations.register_operation("pgque_drop_queue")
class DropQueueOp(PgqueOperation):
    """Drop a queue and its events (``pgque.drop_queue(name, force)``).

    Without ``force`` the engine refuses while consumers are subscribed. ``config`` is
    the queue's non-default settings, known to autogenerate, so that the reverse
    recreates the queue as it was; consumers removed by ``force`` are not recreated.
    """

    op_name = "pgque_drop_queue"

    def __init__(
        self,
        name: str,
        force: bool = False,
        *,
        config: Mapping[str, ConfigValue] | None = None,
    ) -> None:
        self.name = name
        self.force = force
        self.config = normalize_config(config or {})

    @classmethod
    def pgque_drop_queue(cls, operations: Operations, name: str, force: bool = False) -> None:
        """Drop queue ``name`` with its events; ``force=True`` unsubscribes its consumers first.

        Reverse: :meth:`pgque_create_queue`.
        """
        operations.invoke(cls(name, force))

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        return ((self.name,), {"force": True} if self.force else {})

    def reverse(self) -> CreateQueueOp:
        return CreateQueueOp(self.name, self.config)


class _SubscriptionOp(PgqueOperation):
    def __init__(self, queue: str, consumer: str) -> None:
        self.queue = queue
        self.consumer = consumer

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        return ((self.queue, self.consumer), {})


@Operations.register_operation("pgque_subscribe")
class SubscribeOp(_SubscriptionOp):
    """Subscribe a consumer to a queue; it sees events sent after this point."""

    op_name = "pgque_subscribe"

    @classmethod
    def pgque_subscribe(cls, operations: Operations, queue: str, consumer: str) -> None:
        """Subscribe ``consumer`` to ``queue``. Reverse: :meth:`pgque_unsubscribe`."""
        operations.invoke(cls(queue, consumer))

    def reverse(self) -> UnsubscribeOp:
        return UnsubscribeOp(self.queue, self.consumer)


@Operations.register_operation("pgque_unsubscribe")
class UnsubscribeOp(_SubscriptionOp):
    """Unsubscribe a consumer: its cursor and pending retries are dropped.

    The reverse subscribes it again at the latest tick; events sent in between are not
    delivered to it.
    """

    op_name = "pgque_unsubscribe"

    @classmethod
    def pgque_unsubscribe(cls, operations: Operations, queue: str, consumer: str) -> None:
        """Unsubscribe ``consumer`` from ``queue``. Reverse: :meth:`pgque_subscribe`."""
        operations.invoke(cls(queue, consumer))

    def reverse(self) -> SubscribeOp:
        return SubscribeOp(self.queue, self.consumer)


@Operations.register_operation("pgque_subscribe_subconsumer")
class SubscribeSubconsumerOp(PgqueOperation):
    """Register a cooperative subconsumer (``pgque.register_subconsumer``).

    The main consumer is created as a cooperative consumer if it is not subscribed; a
    normal consumer is converted only with ``convert_normal=True``. The reverse removes
    the subconsumer and, when ``convert_normal`` is false (so the main consumer was
    created by this call or was cooperative already), also unsubscribes the main
    consumer once its last subconsumer is gone.
    """

    op_name = "pgque_subscribe_subconsumer"

    def __init__(
        self, queue: str, consumer: str, subconsumer: str, *, convert_normal: bool = False
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.subconsumer = subconsumer
        self.convert_normal = convert_normal

    @classmethod
    def pgque_subscribe_subconsumer(
        cls,
        operations: Operations,
        queue: str,
        consumer: str,
        subconsumer: str,
        *,
        convert_normal: bool = False,
    ) -> None:
        """Register ``subconsumer`` of cooperative consumer ``consumer`` on ``queue``.

        Reverse: :meth:`pgque_unsubscribe_subconsumer`.
        """
        operations.invoke(cls(queue, consumer, subconsumer, convert_normal=convert_normal))

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        kwargs: dict[str, object] = {"convert_normal": True} if self.convert_normal else {}
        return ((self.queue, self.consumer, self.subconsumer), kwargs)

    def reverse(self) -> UnsubscribeSubconsumerOp:
        return UnsubscribeSubconsumerOp(
            self.queue,
            self.consumer,
            self.subconsumer,
            unsubscribe_if_last=not self.convert_normal,
        )


@Operations.register_operation("pgque_unsubscribe_subconsumer")
class UnsubscribeSubconsumerOp(PgqueOperation):
    """Remove a cooperative subconsumer (``pgque.unregister_subconsumer``).

    ``batch_handling=0`` refuses while the subconsumer holds a batch; ``1`` sends that
    batch's events to retry (or the dead letter queue). When the last subconsumer goes,
    PgQue turns the main consumer back into a normal one; ``unsubscribe_if_last=True``
    then unsubscribes it as well. The reverse registers the subconsumer again,
    converting the main consumer back to cooperative if needed.
    """

    op_name = "pgque_unsubscribe_subconsumer"

    def __init__(
        self,
        queue: str,
        consumer: str,
        subconsumer: str,
        batch_handling: int = 0,
        *,
        unsubscribe_if_last: bool = False,
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.subconsumer = subconsumer
        self.batch_handling = batch_handling
        self.unsubscribe_if_last = unsubscribe_if_last

    @classmethod
    def pgque_unsubscribe_subconsumer(
        cls,
        operations: Operations,
        queue: str,
        consumer: str,
        subconsumer: str,
        batch_handling: int = 0,
        *,
        unsubscribe_if_last: bool = False,
    ) -> None:
        """Remove ``subconsumer`` of ``consumer`` on ``queue``.

        Reverse: :meth:`pgque_subscribe_subconsumer`.
        """
        operations.invoke(
            cls(
                queue,
                consumer,
                subconsumer,
                batch_handling,
                unsubscribe_if_last=unsubscribe_if_last,
            )
        )

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        kwargs: dict[str, object] = {}
        if self.batch_handling:
            kwargs["batch_handling"] = self.batch_handling
        if self.unsubscribe_if_last:
            kwargs["unsubscribe_if_last"] = True
        return ((self.queue, self.consumer, self.subconsumer), kwargs)

    def reverse(self) -> SubscribeSubconsumerOp:
        return SubscribeSubconsumerOp(
            self.queue, self.consumer, self.subconsumer, convert_normal=True
        )


@Operations.register_operation("pgque_set_queue_config")
class SetQueueConfigOp(PgqueOperation):
    """Change one queue setting (``pgque.set_queue_config``); ``None`` resets the default.

    The reverse restores ``previous``. Autogenerate fills ``previous`` from the
    database; for a hand-written call it is unknown and the reverse resets the
    setting to its default (NULL), which is the previous value only if it was unset.
    """

    op_name = "pgque_set_queue_config"

    def __init__(
        self,
        queue: str,
        param: str,
        value: ConfigValue,
        *,
        previous: ConfigValue = None,
    ) -> None:
        self.queue = queue
        self.param = parameter_name(param)
        self.value = config_text(value)
        self.previous = config_text(previous)

    @classmethod
    def pgque_set_queue_config(
        cls, operations: Operations, queue: str, param: str, value: ConfigValue
    ) -> None:
        """Set ``param`` (e.g. ``"ticker_max_lag"``) of ``queue``; ``None`` resets it.

        Reverse: back to the default (the previous value is known only to autogenerate).
        """
        operations.invoke(cls(queue, param, value))

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        return ((self.queue, self.param, self.value), {})

    def reverse(self) -> SetQueueConfigOp:
        return SetQueueConfigOp(self.queue, self.param, self.previous, previous=self.value)


class _RoleMembershipOp(PgqueOperation):
    def __init__(self, role: str, reader: bool = True, writer: bool = True) -> None:
        if not (reader or writer):
            raise ValueError(f"{self.op_name}: give at least one of reader=True, writer=True")
        self.role = role
        self.reader = reader
        self.writer = writer

    @property
    def pgque_roles(self) -> tuple[str, ...]:
        return tuple(
            name
            for name, wanted in ((READER, self.reader), (WRITER, self.writer))
            if wanted
        )

    def call_args(self) -> tuple[tuple[object, ...], dict[str, object]]:
        kwargs: dict[str, object] = {}
        if not self.reader:
            kwargs["reader"] = False
        if not self.writer:
            kwargs["writer"] = False
        return ((self.role,), kwargs)


@Operations.register_operation("pgque_grant")
class GrantOp(_RoleMembershipOp):
    """``GRANT pgque_reader, pgque_writer TO role``: let an application role consume and send.

    The reverse revokes the same memberships, also when the role had them before.
    """

    op_name = "pgque_grant"

    @classmethod
    def pgque_grant(
        cls, operations: Operations, role: str, reader: bool = True, writer: bool = True
    ) -> None:
        """Grant ``pgque_reader`` and/or ``pgque_writer`` to ``role``.

        Reverse: ``pgque_revoke``.
        """
        operations.invoke(cls(role, reader, writer))

    def reverse(self) -> RevokeOp:
        return RevokeOp(self.role, self.reader, self.writer)


@Operations.register_operation("pgque_revoke")
class RevokeOp(_RoleMembershipOp):
    """``REVOKE pgque_reader, pgque_writer FROM role``; the reverse grants them."""

    op_name = "pgque_revoke"

    @classmethod
    def pgque_revoke(
        cls, operations: Operations, role: str, reader: bool = True, writer: bool = True
    ) -> None:
        """Revoke ``pgque_reader`` and/or ``pgque_writer`` from ``role``.

        Reverse: ``pgque_grant``.
        """
        operations.invoke(cls(role, reader, writer))

    def reverse(self) -> GrantOp:
        return GrantOp(self.role, self.reader, self.writer)


OPERATIONS: tuple[type[PgqueOperation], ...] = (
    InstallOp,
    UninstallOp,
    CreateQueueOp,
    DropQueueOp,
    SubscribeOp,
    UnsubscribeOp,
    SubscribeSubconsumerOp,
    UnsubscribeSubconsumerOp,
    SetQueueConfigOp,
    GrantOp,
    RevokeOp,
)
"""Every ``op.pgque_*`` operation class."""
