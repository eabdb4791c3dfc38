"""Value types: the received :class:`Message`, and payload encoding.

Payloads travel as JSON text and are stored by the engine as canonical ``jsonb`` text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MemberDescriptorType
from typing import Any, Final

from .errors import PayloadError

__all__ = ["Message", "decode_payload", "encode_payload", "messages_from_rows"]


@dataclass(frozen=True, slots=True)
class Message:
    """One event delivered to a consumer, as returned by ``Queue.receive``.

    ``payload`` is the event data decoded from JSON (the raw text when it is not valid
    JSON, which happens only for events written by other producers);
    ``raw_payload`` is the text as stored. A received message decodes its payload on
    first access, so a consumer that routes on ``type`` alone never pays for JSON
    parsing. ``retry_count`` is 0 on the first delivery and counts the redeliveries
    after ``nack``. ``batch_id`` is the batch to ``ack``.
    """

    msg_id: int
    batch_id: int
    type: str
    payload: Any
    retry_count: int
    created_at: datetime
    extra1: str | None = None
    extra2: str | None = None
    extra3: str | None = None
    extra4: str | None = None
    raw_payload: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Message:
        """Build from a ``pgque.message`` row (its 10 fields in order)."""
        return _message_from_row(row)


def decode_payload(raw: str | None) -> Any:
    """JSON-decode stored event data; text that is not JSON is returned unchanged."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


# Marks a payload slot whose value is still only in raw_payload.
_UNDECODED: Final = object()


class _LazyPayload:
    """``Message.payload``: the slot, decoded from ``raw_payload`` on first read."""

    __slots__ = ("_slot",)

    def __init__(self, slot: MemberDescriptorType) -> None:
        self._slot = slot

    def __get__(self, message: Message | None, owner: type | None = None) -> Any:
        if message is None:
            return self
        value = self._slot.__get__(message, owner)
        if value is _UNDECODED:
            value = decode_payload(message.raw_payload)
            self._slot.__set__(message, value)
        return value

    def __set__(self, message: Message, value: Any) -> None:
        self._slot.__set__(message, value)


_SLOTS: Final[dict[str, MemberDescriptorType]] = {
    field.name: Message.__dict__[field.name] for field in dataclasses.fields(Message)
}
# The dataclass keeps ``payload`` as a field (init, repr, eq, replace, pickling all read
# it through this descriptor); only reading an undecoded slot does any work.
type.__setattr__(Message, "payload", _LazyPayload(_SLOTS["payload"]))


def _row_builder() -> Callable[[Sequence[Any]], Message]:
    # Received batches run to thousands of rows: fill the slots directly instead of
    # going through the frozen dataclass __init__ (half the cost per message).
    new = object.__new__
    set_msg_id, set_batch_id, set_type, set_payload, set_retry_count, set_created_at = (
        _SLOTS[name].__set__
        for name in ("msg_id", "batch_id", "type", "payload", "retry_count", "created_at")
    )
    set_extra1, set_extra2, set_extra3, set_extra4, set_raw_payload = (
        _SLOTS[name].__set__
        for name in ("extra1", "extra2", "extra3", "extra4", "raw_payload")
    )

    def from_row(row: Sequence[Any]) -> Message:
        message: Message = new(Message)
        set_msg_id(message, row[0])
        set_batch_id(message, row[1])
        set_type(message, row[2])
        set_payload(message, _UNDECODED)
        set_retry_count(message, row[4] or 0)
        set_created_at(message, row[5])
        set_extra1(message, row[6])
        set_extra2(message, row[7])
        set_extra3(message, row[8])
        set_extra4(message, row[9])
        set_raw_payload(message, row[3])
        return message

    return from_row


_message_from_row: Final = _row_builder()


def messages_from_rows(rows: Iterable[Sequence[Any]]) -> list[Message]:
    """Messages of ``pgque.message`` rows, payloads decoded on first access."""
    build = _message_from_row
    return [build(row) for row in rows]


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"payload JSON text contains {name}, which jsonb cannot store")


# jsonb refuses the escape \u0000 (not an escaped backslash followed by "u0000").
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    # Only a program that imported pydantic can hand us a model, so never import it here.
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(obj, pydantic.BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
)


def _check_storable(text: str) -> str:
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise PayloadError("payload contains a NUL character (\\u0000), which jsonb cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError(f"payload is not valid Unicode: {exc}") from exc
    return text


def encode_payload(obj: Any) -> str:
    """Encode a payload as compact JSON text for ``jsonb``.

    Accepts what JSON can express (dict, list, str, int, float, bool, None) plus
    dataclass instances and pydantic models, also nested. A ``str`` is taken as JSON
    text already and validated, not encoded again. Raises :class:`PayloadError` for
    anything else, for NaN and infinities, and for text jsonb refuses.
    """
    if isinstance(obj, str):
        try:
            json.loads(obj, parse_constant=_reject_constant)
        except ValueError as exc:
            if isinstance(exc, PayloadError):
                raise
            raise PayloadError(
                f"a str payload must be JSON text ({exc}); to send a string value pass "
                f"json.dumps(value)"
            ) from exc
        return _check_storable(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        raise PayloadError(f"payload {obj!r} is not a finite number; JSON cannot express it")
    try:
        text = _encoder.encode(obj)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from exc
    return _check_storable(text)
