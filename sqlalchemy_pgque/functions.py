"""Typed SQL functions of the engine, for building statements with ``func.pgque``.

Importing :mod:`sqlalchemy_pgque` registers them, so ``func.pgque.send(...)`` renders
``pgque.send(...)`` and is typed by what it returns::

    from sqlalchemy import func, select

    event_id = session.scalar(select(func.pgque.send("orders", "order.created", {"id": 1})))

The payload argument of ``send`` and the elements of ``send_batch`` are Python values
bound as ``jsonb`` (so the ``jsonb`` overloads are chosen); pass SQL expressions to
bind something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Integer, Text, bindparam
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.functions import GenericFunction

__all__ = [
    "PgqueAck",
    "PgqueForceNextTick",
    "PgqueSend",
    "PgqueSendBatch",
    "PgqueSubscribe",
    "PgqueTicker",
    "PgqueUnsubscribe",
    "PgqueVersion",
]

_T = TypeVar("_T")


class _PgqueFunction(GenericFunction[_T]):
    _register = False
    inherit_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packagenames = ("pgque",)


def _as_jsonb(value: Any, type_: Any) -> Any:
    if isinstance(value, ClauseElement):
        return value
    return bindparam(None, value, type_=type_)


class PgqueSend(_PgqueFunction[int]):
    """``pgque.send(queue, [type,] payload)`` -> the new event id."""

    package = "pgque"
    name = "send"
    type = BigInteger()
    inherit_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:
            args = (*args[:-1], _as_jsonb(args[-1], JSONB()))
        super().__init__(*args, **kwargs)


class PgqueSendBatch(_PgqueFunction[Sequence[int]]):
    """``pgque.send_batch(queue, [type,] payloads)`` -> the new event ids, in order."""

    package = "pgque"
    name = "send_batch"
    type = ARRAY(BigInteger())
    inherit_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:
            args = (*args[:-1], _as_jsonb(args[-1], ARRAY(JSONB())))
        super().__init__(*args, **kwargs)


class PgqueAck(_PgqueFunction[int]):
    """``pgque.ack(batch_id)`` -> 1, or 0 for an unknown or finished batch."""

    package = "pgque"
    name = "ack"
    type = Integer()
    inherit_cache = True


class PgqueSubscribe(_PgqueFunction[int]):
    """``pgque.subscribe(queue, consumer)`` -> 1 if new, 0 if already subscribed."""

    package = "pgque"
    name = "subscribe"
    type = Integer()
    inherit_cache = True


class PgqueUnsubscribe(_PgqueFunction[int]):
    """``pgque.unsubscribe(queue, consumer)`` -> subscription rows removed."""

    package = "pgque"
    name = "unsubscribe"
    type = Integer()
    inherit_cache = True


class PgqueTicker(_PgqueFunction[int]):
    """``pgque.ticker(queue)`` -> the new tick id or NULL; ``pgque.ticker()`` -> queues ticked."""

    package = "pgque"
    name = "ticker"
    type = BigInteger()
    inherit_cache = True


class PgqueForceNextTick(_PgqueFunction[int]):
    """``pgque.force_next_tick(queue)`` -> the latest tick id; the next ticker call ticks."""

    package = "pgque"
    name = "force_next_tick"
    type = BigInteger()
    inherit_cache = True


class PgqueVersion(_PgqueFunction[str]):
    """``pgque.version()`` -> the engine's version string."""

    package = "pgque"
    name = "version"
    type = Text()
    inherit_cache = True
