"""Value types: the received :class:`Message`, and payload encoding.

Payloads travel as JSON text and are stored by the engine as canonical ``jsonb`` text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from types import MemberDescriptorType
from typing import Any, Final

from .errors import PayloadError

__all__ = [
    "MAX_PAYLOAD_DEPTH",
    "Message",
    "decode_payload",
    "encode_payload",
    "messages_from_rows",
]


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


#: The deepest nesting of arrays and objects a payload may have. PostgreSQL's ``jsonb``
#: input goes much deeper (its recursive parser stops at ``max_stack_depth``, some 13,000
#: levels with the default 2 MB), but Python's ``json`` module, here and in every consumer
#: that decodes the payload, runs out of recursion near 1,000 levels minus its caller's.
MAX_PAYLOAD_DEPTH: Final = 512

# Limits of PostgreSQL's numeric type, which jsonb stores every number as: the weight is
# an int16 count of base-10000 digits, the display scale a 14-bit field.
_NUMERIC_MAX_INTEGER_DIGITS: Final = 131_072
_NUMERIC_MAX_SCALE: Final = 16_383
# numeric_in refuses exponents beyond INT_MAX / 2 before looking at the digits;
# PostgreSQL 15 and older refuse INT_MAX / 2 itself too (18 takes 0e1073741823).
_NUMERIC_MAX_EXPONENT: Final = 1_073_741_822

# The shortest text nested deeper than the limit: that many brackets opened and closed.
_SHALLOW_TEXT_LENGTH: Final = 2 * MAX_PAYLOAD_DEPTH + 1
_STRUCTURE: Final = b'[]{}"'
_NOT_STRUCTURE: Final = bytes(c for c in range(256) if c not in _STRUCTURE)
# With escapes in the text, backslashes stay and each escape letter becomes a dot, so that
# an escape's backslash stays next to what it escapes once everything else is gone.
_ESCAPE_LETTERS: Final = bytes.maketrans(b"/bfnrtu", b".......")
_NOT_STRUCTURE_OR_ESCAPE: Final = bytes(
    c for c in range(256) if c not in _STRUCTURE + b"\\/bfnrtu"
)
_SQUARE: Final = bytes.maketrans(b"{}", b"[]")
_QUOTED: Final = re.compile(rb'"[^"]*"')
_BRACKET_RUN: Final = re.compile(rb"\[+|\]+")
# Passes of removing empty pairs that take a typical document apart; what is still nested
# after them is measured by runs, whose cost does not grow with the depth.
_QUICK_PASSES: Final = 8

# Searches by regexes that start with a literal run faster than str.find and str.replace.
_ESCAPED_BACKSLASH: Final = re.compile(r"\\\\")
_SUSPECT_ESCAPE: Final = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
# In JSON text whose escaped backslashes are masked, every backslash starts an escape.
# jsonb refuses \u0000 and any surrogate escape but a high one directly followed by a low
# one: matched left to right, all is well when every match is such a 12-character pair.
_SURROGATE_OR_NUL_ESCAPE: Final = re.compile(
    r"\\u(?:0000|[dD](?:[89abAB][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
    r"|[c-fC-F][0-9a-fA-F]{2}))"
)
_SURROGATE_PAIR_LENGTH: Final = 12
_TOKEN: Final = re.compile(
    r'"[^"\\]*(?:\\.[^"\\]*)*"|(?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)'
)


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"payload JSON text contains {name}, which jsonb cannot store")


class _NumberOutOfRange(Exception):
    """Raised by the decoder's number hook; the check then finds which number and where."""


def _number_problem(token: str) -> str | None:
    """Why PostgreSQL's numeric refuses the JSON number ``token``, or None."""
    mantissa, _, exponent_text = token.lower().partition("e")
    integer, _, fraction = mantissa.lstrip("-").partition(".")
    exponent_digits = exponent_text.lstrip("+-").lstrip("0")
    # Compared as text first: int() refuses digit strings past sys.get_int_max_str_digits.
    if len(exponent_digits) > len(str(_NUMERIC_MAX_EXPONENT)):
        return f"its exponent is beyond ±{_NUMERIC_MAX_EXPONENT}"
    exponent = int(exponent_digits or "0")
    if exponent_text.startswith("-"):
        exponent = -exponent
    if abs(exponent) > _NUMERIC_MAX_EXPONENT:
        return f"its exponent is beyond ±{_NUMERIC_MAX_EXPONENT}"
    if len(fraction) - exponent > _NUMERIC_MAX_SCALE:
        return f"it has more than {_NUMERIC_MAX_SCALE} digits after the decimal point"
    digits = integer + fraction
    significant = digits.lstrip("0")
    if significant and (
        len(integer) - (len(digits) - len(significant)) + exponent > _NUMERIC_MAX_INTEGER_DIGITS
    ):
        return f"it has more than {_NUMERIC_MAX_INTEGER_DIGITS} digits before the decimal point"
    return None


# The decoder hands every number to these hooks instead of converting it (the value is not
# needed), so Python's int() limit of 4,300 digits does not refuse what numeric takes.
def _check_integer(token: str) -> None:
    if len(token) > _NUMERIC_MAX_INTEGER_DIGITS and _number_problem(token):
        raise _NumberOutOfRange


def _check_real(token: str) -> None:
    # Without an exponent, a number no longer than the scale limit is within every limit.
    if len(token) <= _NUMERIC_MAX_SCALE and "e" not in token and "E" not in token:
        return
    if _number_problem(token):
        raise _NumberOutOfRange


_decoder = json.JSONDecoder(
    parse_int=_check_integer, parse_float=_check_real, parse_constant=_reject_constant
)


def _number_error(text: str) -> PayloadError:
    # The decoder stopped at the first refused number; every token before it was valid
    # JSON, so this scan sees the same tokens.
    for token in _TOKEN.finditer(text):
        number = token["number"]
        problem = number and _number_problem(number)
        if problem:
            shown = number if len(number) <= 40 else f"{number[:20]}...{number[-10:]}"
            return PayloadError(
                f"payload JSON text has the number {shown} at character {token.start()}, "
                f"which jsonb cannot store: {problem}"
            )
    raise AssertionError("the decoder refused a number that the scan accepts")


def _depth_beyond_limit(data: bytes) -> int:
    """How deeply arrays and objects nest in the UTF-8 JSON text ``data`` if that is
    deeper than MAX_PAYLOAD_DEPTH, else 0."""
    structure = data.translate(None, _NOT_STRUCTURE)
    # Brackets in strings count here too, so this bounds the number of nested containers.
    if structure.count(b"[") + structure.count(b"{") <= MAX_PAYLOAD_DEPTH:
        return 0
    if b"\\" in data:
        structure = data.translate(_ESCAPE_LETTERS, _NOT_STRUCTURE_OR_ESCAPE)
        # Escaped backslashes and quotes do not delimit strings.
        structure = structure.replace(b"\\\\", b"").replace(b'\\"', b"")
        structure = structure.translate(None, b"\\.")
    # Quotes all come in adjacent pairs exactly when no string holds a bracket.
    if structure.count(b'""') * 2 != structure.count(b'"'):
        # Dropping adjacent pairs keeps every bracket inside or outside a string; the
        # quotes left delimit the few strings that hold brackets.
        structure = _QUOTED.sub(b"", structure.replace(b'""', b""))
    brackets = structure.translate(_SQUARE, b'"')
    # Each pass removes the containers with nothing nested left in them: one level.
    passes = 0
    while brackets and passes < _QUICK_PASSES:
        emptied = brackets.replace(b"[]", b"")
        if len(emptied) == len(brackets):
            break  # unbalanced, not JSON: the runs below count its unclosed brackets
        brackets = emptied
        passes += 1
    runs = _BRACKET_RUN.findall(brackets)
    if runs and runs[0].startswith(b"]"):
        runs.insert(0, b"")
    opened = accumulate(map(len, runs[0::2]))
    closed = accumulate(map(len, runs[1::2]), initial=0)
    depth = passes + max(map(operator.sub, opened, closed), default=0)
    return depth if depth > MAX_PAYLOAD_DEPTH else 0


def _check_escapes(text: str) -> None:
    """Refuse the escapes jsonb refuses in the valid JSON ``text``."""
    if "\\" not in text or not _SUSPECT_ESCAPE.search(text):
        return
    # Same length, so offsets hold; valid JSON has backslashes only in escapes.
    masked = _ESCAPED_BACKSLASH.sub("//", text)
    found = _SURROGATE_OR_NUL_ESCAPE.findall(masked)
    if min(map(len, found), default=_SURROGATE_PAIR_LENGTH) == _SURROGATE_PAIR_LENGTH:
        return
    bad = next(
        match
        for match in _SURROGATE_OR_NUL_ESCAPE.finditer(masked)
        if len(match[0]) != _SURROGATE_PAIR_LENGTH
    )
    escape = bad[0]
    if escape == "\\u0000":
        problem = "NUL, which jsonb cannot store"
    elif escape[3] in "89abAB":
        problem = "a high surrogate not directly followed by a low surrogate escape"
    else:
        problem = "a low surrogate without a high surrogate escape directly before it"
    raise PayloadError(
        f"payload JSON text has the escape {escape} at character {bad.start()}: {problem}"
    )


def _recursion_error(exc: RecursionError) -> PayloadError:
    # Python's limit counts the caller's frames too, and two levels for each dataclass.
    return PayloadError(
        f"payload is nested too deeply for Python's json module here ({exc}); the limit "
        f"is MAX_PAYLOAD_DEPTH = {MAX_PAYLOAD_DEPTH} levels, fewer for nested dataclasses, "
        f"which cost two levels of recursion each"
    )


def _check_text(text: str, *, decode: bool) -> None:
    data = None
    if not text.isascii():
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError(
                f"payload is not valid Unicode: lone surrogate {text[exc.start]!r} at "
                f"character {exc.start}"
            ) from exc
    if len(text) > _SHALLOW_TEXT_LENGTH:
        depth = _depth_beyond_limit(data if data is not None else text.encode("ascii"))
        if depth:
            raise PayloadError(
                f"payload nests arrays and objects {depth} levels deep; the limit is "
                f"MAX_PAYLOAD_DEPTH = {MAX_PAYLOAD_DEPTH}"
            )
    if decode:
        try:
            _decoder.decode(text)
        except _NumberOutOfRange:
            raise _number_error(text) from None
        except PayloadError:
            raise
        except RecursionError as exc:
            raise _recursion_error(exc) from exc
        except ValueError as exc:
            raise PayloadError(
                f"a str payload must be JSON text ({exc}); to send a string value pass "
                f"json.dumps(value)"
            ) from exc
    _check_escapes(text)


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


def encode_payload(obj: Any) -> str:
    """Encode a payload as compact JSON text for ``jsonb``.

    Accepts what JSON can express (dict, list, str, int, float, bool, None) plus
    dataclass instances and pydantic models, also nested. A ``str`` is taken as JSON
    text already and validated, not encoded again. Raises :class:`PayloadError` for
    anything else, for NaN and infinities, for text jsonb refuses (``\\u0000``, unpaired
    surrogate escapes, numbers out of the range of PostgreSQL's ``numeric``), and for
    arrays and objects nested deeper than :data:`MAX_PAYLOAD_DEPTH`.
    """
    if isinstance(obj, str):
        _check_text(obj, decode=True)
        return obj
    if isinstance(obj, float) and not math.isfinite(obj):
        raise PayloadError(f"payload {obj!r} is not a finite number; JSON cannot express it")
    try:
        text = _encoder.encode(obj)
    except RecursionError as exc:
        raise _recursion_error(exc) from exc
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from exc
    _check_text(text, decode=False)
    return text
