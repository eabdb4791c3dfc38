"""Value types: the received :class:`Message`, and payload encoding.

Payloads travel as JSON text and are stored by the engine as canonical ``jsonb`` text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import PayloadError

__all__ = ["Message", "decode_payload", "encode_payload"]


@dataclass(frozen=True, slots=True)
class Message:
    """One event delivered to a consumer, as returned by ``Queue.receive``.

    ``payload`` is the event data decoded from JSON (the raw text when it is not valid
    JSON, which happens only for events written by other producers);
    ``raw_payload`` is the text as stored. ``retry_count`` is 0 on the first delivery
    and counts the redeliveries after ``nack``. ``batch_id`` is the batch to ``ack``.
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
        raw = row[3]
        return cls(
            msg_id=row[0],
            batch_id=row[1],
            type=row[2],
            payload=decode_payload(raw),
            retry_count=row[4] or 0,
            created_at=row[5],
            extra1=row[6],
            extra2=row[7],
            extra3=row[8],
            extra4=row[9],
            raw_payload=raw,
        )


def decode_payload(raw: str | None) -> Any:
    """JSON-decode stored event data; text that is not JSON is returned unchanged."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


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
