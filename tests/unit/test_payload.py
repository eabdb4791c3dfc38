"""encode_payload refuses what PostgreSQL's jsonb input refuses, without a database.

The same rules are checked against a real server in tests/engine/test_payload_jsonb.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlalchemy_pgque import PayloadError
from sqlalchemy_pgque.message import MAX_PAYLOAD_DEPTH, encode_payload


def refusal(payload: object) -> str:
    with pytest.raises(PayloadError) as raised:
        encode_payload(payload)
    return str(raised.value)


# -- escapes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        r'"\ud800\udc00"',
        r'"\uDBFF\uDFFF"',
        r'"\uD834\uDD1E"',
        r'"\\u0000"',
        r'"\\ud800"',
        r'"\\\ud800\udc00"',
        r'"\u0041\u00e9\uffff"',
        r'{"\ud83d\ude00": ["\ud83d\ude00"]}',
        '"\x7f\x85\u2028"',
    ],
)
def test_escapes_jsonb_accepts(text: str) -> None:
    assert encode_payload(text) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (r'"\u0000"', r"the escape \u0000 at character 1: NUL"),
        (r'{"a\u0000": 1}', r"the escape \u0000 at character 3: NUL"),
        (r'"\\\u0000"', r"the escape \u0000 at character 3: NUL"),
        (r'"\ud800"', r"the escape \ud800 at character 1: a high surrogate not directly"),
        (r'"\ud800x"', r"the escape \ud800 at character 1: a high surrogate"),
        (r'"\ud800\u0041"', r"the escape \ud800 at character 1: a high surrogate"),
        (r'"\ud800\\udc00"', r"the escape \ud800 at character 1: a high surrogate"),
        (r'"\ud800\ud800\udc00"', r"the escape \ud800 at character 1: a high surrogate"),
        (r'"\udc00"', r"the escape \udc00 at character 1: a low surrogate without"),
        (r'["ok", "\uDFFF"]', r"the escape \uDFFF at character 8: a low surrogate"),
        (r'["\\ud800\udc00"]', r"the escape \udc00 at character 9: a low surrogate"),
    ],
)
def test_escapes_jsonb_refuses_are_named_with_their_offset(text: str, message: str) -> None:
    assert message in refusal(text)


def test_lone_surrogate_escape_message_reads_whole() -> None:
    assert refusal('"\\ud800"') == (
        "payload JSON text has the escape \\ud800 at character 1: a high surrogate not "
        "directly followed by a low surrogate escape"
    )


def test_unescaped_lone_surrogate_and_control_characters_are_refused() -> None:
    assert "lone surrogate '\\ud800' at character 2" in refusal('["\ud800"]')
    assert "lone surrogate '\\udfff' at character 6" in refusal({"x": "\udfff"})
    assert "Invalid control character" in refusal('"a\nb"')
    assert "Invalid control character" in refusal('"\x00"')


def test_nul_in_an_encoded_object_is_refused() -> None:
    assert r"the escape \u0000 at character 7: NUL" in refusal({"x": ["\x00"]})


# -- numbers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1e131071",
        "9.9e131071",
        "-9.9E+131071",
        "0.1e131072",
        "1e-16383",
        "0.0e-16382",
        "0e-16383",
        "0e1000000",
        "0e1073741822",
        "-0",
        "1E400",
        "1." + "0" * 16383,
        "1" * 131072,
        "1" * 131073 + "e-1",
        "0." + "0" * 16382 + "1",
        "1e0000000000000000000000000000000000000000000005",
    ],
)
def test_numbers_numeric_accepts(text: str) -> None:
    assert encode_payload(text) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1e131072", "it has more than 131072 digits before the decimal point"),
        ("10e131071", "it has more than 131072 digits before the decimal point"),
        ("0.01e131074", "it has more than 131072 digits before the decimal point"),
        ("1" * 131073, "it has more than 131072 digits before the decimal point"),
        ("1e-16384", "it has more than 16383 digits after the decimal point"),
        ("0.0e-16383", "it has more than 16383 digits after the decimal point"),
        ("0e-16384", "it has more than 16383 digits after the decimal point"),
        ("1." + "0" * 16384, "it has more than 16383 digits after the decimal point"),
        ("0e1073741823", "its exponent is beyond ±1073741822"),
        ("0e1073741824", "its exponent is beyond ±1073741822"),
        ("0e-99999999999999999999", "its exponent is beyond ±1073741822"),
        ("0e" + "9" * 5000, "its exponent is beyond ±1073741822"),
    ],
)
def test_numbers_numeric_refuses(text: str, problem: str) -> None:
    reason = refusal(text)
    assert reason.startswith("payload JSON text has the number ")
    assert reason.endswith(f"at character 0, which jsonb cannot store: {problem}")


def test_refused_number_is_located_past_lookalikes_in_strings() -> None:
    text = '{"1e999999": "1e999999", "n": [1, 2.5, 1e999999]}'
    assert refusal(text) == (
        "payload JSON text has the number 1e999999 at character 39, which jsonb cannot "
        "store: it has more than 131072 digits before the decimal point"
    )


def test_long_numbers_are_shortened_in_the_message() -> None:
    assert "11111111111111111111...1111111111 at character 1" in refusal(
        "[" + "1" * 131073 + "]"
    )


def test_integers_past_pythons_digit_limit_are_accepted() -> None:
    big = "7" * 5000
    assert len(big) > sys.get_int_max_str_digits()
    for text in (big, f'{{"big": [{big}, -{big}]}}', f"{big}.5e-3"):
        assert encode_payload(text) == text


def test_nan_and_infinities_are_refused() -> None:
    assert refusal("NaN") == "payload JSON text contains NaN, which jsonb cannot store"
    assert "-Infinity" in refusal("[1, -Infinity]")
    assert "not a finite number" in refusal(float("inf"))


# -- nesting --------------------------------------------------------------------------


def nested_list(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_dict(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


@dataclasses.dataclass
class Node:
    child: Node | None = None
    items: list[object] = dataclasses.field(default_factory=list)


class Branch(pydantic.BaseModel):
    child: Branch | None = None
    items: list[object] = []


def dataclass_holding_list(depth: int) -> Node:
    return Node(items=nested_list(depth - 1))


TOO_DEEP = f"the limit is MAX_PAYLOAD_DEPTH = {MAX_PAYLOAD_DEPTH}"


@pytest.mark.parametrize("build", [nested_list, nested_dict, dataclass_holding_list])
def test_objects_nested_to_the_limit_encode_one_deeper_do_not(
    build: Callable[[int], object],
) -> None:
    assert MAX_PAYLOAD_DEPTH == 512
    encode_payload(build(512))
    assert refusal(build(513)) == (
        f"payload nests arrays and objects 513 levels deep; {TOO_DEEP}"
    )


def test_deep_dataclasses_and_models_meet_python_limits_as_payload_errors() -> None:
    """Python's encoder spends two levels of recursion on each dataclass, and pydantic
    stops serializing at its own limit (256 levels), below ours: both are PayloadError."""
    node, branch = Node(), Branch(items=nested_list(50))
    for _ in range(200):
        node, branch = Node(child=node), Branch(child=branch)
    encode_payload(node)
    encode_payload(branch)
    for _ in range(400):
        node, branch = Node(child=node), Branch(child=branch)
    assert TOO_DEEP in refusal(node)
    assert "Maximum serialization depth exceeded" in refusal(branch)


@pytest.mark.parametrize("build", [nested_list, nested_dict])
def test_texts_nested_to_the_limit_pass_one_deeper_do_not(
    build: Callable[[int], object],
) -> None:
    text = json.dumps(build(512))
    assert encode_payload(text) == text
    assert refusal(json.dumps(build(513))) == (
        f"payload nests arrays and objects 513 levels deep; {TOO_DEEP}"
    )


def test_far_too_deep_payloads_raise_payload_error_not_recursion_error() -> None:
    assert TOO_DEEP in refusal("[" * 1000 + "]" * 1000)
    assert TOO_DEEP in refusal('{"a":' * 100_000 + "1" + "}" * 100_000)
    assert TOO_DEEP in refusal(nested_list(100_000))
    assert TOO_DEEP in refusal("[" * 5000)


def test_brackets_in_strings_and_escaped_quotes_do_not_nest() -> None:
    inside = '"[[[{{{\\"[\\\\"'
    text = "[" * 511 + f"[{inside}, 1, {inside}]" + "]" * 511
    assert encode_payload(text) == text
    assert TOO_DEEP in refusal("[" + text + "]")
    closing = '"]]]]]]]]]]\\"]]\\\\"'
    deep = "[" * 513 + closing + "]" * 513
    assert TOO_DEEP in refusal(deep)


@contextmanager
def recursion_budget(frames: int) -> Iterator[None]:
    depth = 0
    frame = sys._getframe()
    while frame.f_back is not None:
        frame, depth = frame.f_back, depth + 1
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="from Python 3.12 on, json's C recursion ignores sys.setrecursionlimit",
)
def test_recursion_error_inside_json_becomes_payload_error() -> None:
    text = json.dumps(nested_list(300))
    with recursion_budget(150):
        assert "recursion" in refusal(text)
        assert TOO_DEEP in refusal(nested_list(300))


def json_values() -> st.SearchStrategy[object]:
    tricky_text = st.text(alphabet='[]{}"\\ u\x7f\u00e9\U0001f422', max_size=8)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), tricky_text)
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=3)
        | st.dictionaries(tricky_text, children, max_size=3),
        max_leaves=12,
    )


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=150, deadline=None)
@given(
    value=json_values(),
    extra=st.integers(-1, 1),
    ensure_ascii=st.booleans(),
    as_text=st.booleans(),
)
def test_depth_is_counted_outside_strings(
    value: object, extra: int, ensure_ascii: bool, as_text: bool
) -> None:
    """Wrapped to just under, at or just over the limit, whatever the strings hold."""
    depth = MAX_PAYLOAD_DEPTH + extra
    for _ in range(depth - depth_of(value)):
        value = [value]
    payload = json.dumps(value, ensure_ascii=ensure_ascii) if as_text else value
    if depth <= MAX_PAYLOAD_DEPTH:
        encode_payload(payload)
    else:
        assert f"{depth} levels deep" in refusal(payload)


# -- the common path ------------------------------------------------------------------


def test_encoding_is_compact_and_str_payloads_are_kept_as_given() -> None:
    assert encode_payload({"order_id": 123, "items": [1, 2, 3], "note": "żółw"}) == (
        '{"order_id":123,"items":[1,2,3],"note":"żółw"}'
    )
    text = '{ "order_id" : 123 }'
    assert encode_payload(text) is text


def test_str_payload_must_be_json_text() -> None:
    assert refusal("not json").startswith(
        "a str payload must be JSON text (Expecting value: line 1 column 1 (char 0))"
    )
