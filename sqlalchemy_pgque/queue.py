"""Queue: a declaration of a PgQue queue and the calls made on it.

``Queue("orders")`` does no I/O. Declared consumers and queue settings are what the
Alembic autogenerate comparator (``alembic_ops``) compares with the database when the
queue is collected in a :class:`QueueRegistry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from .errors import PgqueError

__all__ = ["InvalidName", "Queue", "QueueRegistry"]

# The notify channel is 'pgque_' || name and channel names are identifiers of at most
# 63 bytes, hence PgQue's 57-byte limit on queue names.
MAX_QUEUE_NAME_BYTES = 57


class InvalidName(PgqueError, ValueError):
    """A queue or consumer name that PgQue cannot accept."""


def _check_name(kind: str, name: object, max_bytes: int | None = None) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{kind} name must be a non-empty string, got {name!r}")
    if max_bytes is not None and len(name.encode()) > max_bytes:
        raise InvalidName(
            f"{kind} name too long: {len(name.encode())} bytes (max {max_bytes}): {name!r}"
        )
    return name


class Queue:
    """A PgQue queue, declared by name.

    :param name: the queue name (at most 57 bytes).
    :param consumers: consumer names that should be subscribed; used by Alembic
        autogenerate, never subscribed implicitly at run time.
    :param config: queue settings for ``pgque.set_queue_config`` (for example
        ``{"ticker_max_lag": "500 milliseconds", "max_retries": 3}``); used by
        autogenerate.
    :param registry: a :class:`QueueRegistry` to collect this declaration in.
    """

    def __init__(
        self,
        name: str,
        *,
        consumers: Iterable[str] = (),
        config: Mapping[str, object] | None = None,
        registry: QueueRegistry | None = None,
    ) -> None:
        self.name = _check_name("queue", name, MAX_QUEUE_NAME_BYTES)
        self.consumers: tuple[str, ...] = tuple(_check_name("consumer", c) for c in consumers)
        self.config: dict[str, str] = {
            k.removeprefix("queue_"): str(v) for k, v in (config or {}).items()
        }
        if registry is not None:
            registry.add(self)

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"


class QueueRegistry:
    """The queues an application declares, for Alembic autogenerate.

    ::

        registry = QueueRegistry()
        orders_q = Queue("orders", consumers=["order_worker"], registry=registry)
    """

    def __init__(self, queues: Iterable[Queue] = ()) -> None:
        self._queues: dict[str, Queue] = {}
        for q in queues:
            self.add(q)

    def add(self, queue: Queue) -> Queue:
        """Collect ``queue``; a second queue with the same name is an error."""
        existing = self._queues.get(queue.name)
        if existing is not None and existing is not queue:
            raise InvalidName(f"queue {queue.name!r} is declared twice in this registry")
        self._queues[queue.name] = queue
        return queue

    def __iter__(self) -> Iterator[Queue]:
        return iter(sorted(self._queues.values(), key=lambda q: q.name))

    def __len__(self) -> int:
        return len(self._queues)

    def __contains__(self, name: object) -> bool:
        return name in self._queues

    def __getitem__(self, name: str) -> Queue:
        return self._queues[name]
