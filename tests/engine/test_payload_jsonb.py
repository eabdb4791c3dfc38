"""encode_payload agrees with the server: it accepts a JSON text exactly when ``::jsonb``
does, except texts nested deeper than MAX_PAYLOAD_DEPTH, which it refuses by design."""

from __future__ import annotations

import re

import psycopg
import pytest
from engine_helpers import Conn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlalchemy_pgque import PayloadError
from sqlalchemy_pgque.message import MAX_PAYLOAD_DEPTH, encode_payload

# A zero with this exponent: PostgreSQL 15 refuses it (numeric_in stops at INT_MAX / 2
# inclusive), 18 takes it; we refuse it for every server.
ZERO_AT_EXPONENT_LIMIT = re.compile(r"(?<![0-9.eE+-])-?0(?:\.0+)?[eE]\+?0*1073741823(?![0-9])")

CORPUS = [
    # escapes
    r'"\ud800\udc00"', r'"\uDBFF\uDFFF"', r'"\ud800"', r'"\udc00"', r'"\ud800x"',
    r'"\ud800\u0041"', r'"\ud800\ud800\udc00"', r'"\ud800\\udc00"', r'"\\\ud800\udc00"',
    r'"\\ud800"', r'"\u0000"', r'"\\u0000"', r'"\\\u0000"', r'{"\u0000": 1}',
    r'{"\ud83d\ude00": "\ud83d\ude00"}', r'"\u00e9\uffff\ufffe"', '"\x7f\x85\u2028"',
    r'"\/\b\f\n\r\t"', r'"\x"', r'"\u12"', r'"\U0041"',
    # numbers
    "1e131071", "9.9e131071", "1e131072", "10e131071", "0.1e131072", "0.1e131073",
    "0.01e131074", "1e-16383", "1e-16384", "0.0e-16382", "0.0e-16383", "0e-16383",
    "0e-16384", "0e1073741822", "0e1073741824", "0e1000000", "1E400", "-0", "-0.0",
    "1.5E+3", "1e0005", "0e-1073741822", "0e99999999999999999999",
    "0e-99999999999999999999", "1." + "0" * 16383, "1." + "0" * 16384,
    "0." + "0" * 16383, "0." + "0" * 16384, "1" * 131072, "1" * 131073,
    "1" * 131073 + "e-1", "7" * 5000, "-" + "7" * 5000 + ".5e-3",
    "01", "1.", ".5", "+1", "1e", "-", "NaN", "Infinity", "-Infinity",
    # syntax
    "", " ", "[1,]", '{"a":1,}', "[1 2]", "tru", "TRUE", "null", " [ ] ", "\ufeff1",
    "\x0b1", "\x0c1", "\xa01", '"a\tb"', "[1]x", '{"a" 1}', "{1: 2}", "'a'",
    # nesting
    "[" * 512 + "]" * 512, '{"a":' * 512 + "1" + "}" * 512, '["]"' + ",[" * 20 + "]" * 21,
]


def number_near_limits(mantissa: str, aim: str, offset: int) -> str:
    """``mantissa`` with the exponent that puts it ``offset`` past one of numeric's limits."""
    integer, _, fraction = mantissa.lstrip("-").partition(".")
    leading_zeros = len(integer + fraction) - len((integer + fraction).lstrip("0"))
    if aim == "scale":  # digits after the point: max(0, len(fraction) - exponent)
        exponent = len(fraction) - 16_383 - offset
    elif aim == "integer digits":  # significant digits before the point
        exponent = 131_072 + offset - len(integer) + leading_zeros
    else:
        exponent = 1_073_741_822 + offset
    return f"{mantissa}e{exponent}"


AIMS = ["scale", "integer digits", "exponent"]
BOUNDARIES = [
    number_near_limits(mantissa, aim, offset)
    for mantissa in ["0", "-0.0", "0.000", "1", "9.99", "12345", "0.00012", "-7.5"]
    for aim in AIMS
    for offset in (-1, 0, 1, 2)
]


def server_accepts(conn: Conn, text: str) -> bool:
    try:
        conn.execute("SELECT %s::jsonb", (text,))
    except psycopg.DataError:
        return False
    return True


def we_accept(text: str) -> bool:
    try:
        encode_payload(text)
    except PayloadError:
        return False
    return True


def nesting(text: str) -> int:
    """Deepest point of arrays and objects outside strings, by the JSON grammar."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def check_agreement(conn: Conn, text: str) -> None:
    ours = we_accept(text)
    if nesting(text) > MAX_PAYLOAD_DEPTH or ZERO_AT_EXPONENT_LIMIT.search(text):
        assert not ours, text[:80]
    else:
        assert ours == server_accepts(conn, text), text[:80]


def test_corpus_agrees_with_the_server(conn: Conn) -> None:
    for text in [*CORPUS, *BOUNDARIES]:
        check_agreement(conn, text)


def test_zero_at_the_exponent_limit_is_refused_as_postgresql_15_does(conn: Conn) -> None:
    for text in ("0e1073741823", "[-0.00E+1073741823]"):
        assert not we_accept(text)
        if conn.info.server_version < 160000:
            assert not server_accepts(conn, text)


@pytest.mark.parametrize("depth", [MAX_PAYLOAD_DEPTH, MAX_PAYLOAD_DEPTH + 1, 600])
def test_the_server_takes_what_we_refuse_for_depth(conn: Conn, depth: int) -> None:
    text = "[" * depth + "]" * depth
    assert server_accepts(conn, text)
    assert we_accept(text) == (depth <= MAX_PAYLOAD_DEPTH)


# -- generated texts -------------------------------------------------------------------

hex4 = st.one_of(
    st.sampled_from(["0000", "d800", "DBFF", "dc00", "DFFF", "d83d", "de00", "0041", "D7FF"]),
    st.text("0123456789abcdefABCDEF", min_size=4, max_size=4),
)
string_parts = st.one_of(
    hex4.map(lambda code: "\\u" + code),
    st.sampled_from(['\\"', "\\\\", "\\/", "\\n", "\\t", "\\x", "[", "]", "{", "}"]),
    st.text(
        st.characters(min_codepoint=0x20, exclude_characters='"\\', exclude_categories=["Cs"]),
        max_size=3,
    ),
)
strings = st.lists(string_parts, max_size=5).map(lambda parts: '"' + "".join(parts) + '"')


@st.composite
def numbers(draw: st.DrawFn) -> str:
    integer = draw(st.sampled_from(["0", "1", "9"]) | st.from_regex(r"\A[1-9][0-9]{1,8}\Z"))
    fraction = draw(st.sampled_from(["", "0", "000"]) | st.from_regex(r"\A[0-9]{1,8}\Z"))
    mantissa = draw(st.sampled_from(["", "-"])) + integer + (f".{fraction}" if fraction else "")
    aim = draw(st.sampled_from(["none", "small", *AIMS]))
    if aim == "none":
        return mantissa
    if aim == "small":
        return f"{mantissa}{draw(st.sampled_from(['e', 'E+', 'e-0']))}{draw(st.integers(0, 30))}"
    return number_near_limits(mantissa, aim, draw(st.integers(-3, 3)))


scalars = st.one_of(strings, numbers(), st.sampled_from(["true", "false", "null"]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
    | st.lists(st.tuples(strings, inner), max_size=3).map(
        lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
    ),
    max_leaves=6,
)
noise = st.sampled_from([" ", "\n", "\t", ",", ":", "[", "]", "}", '"', "\\", "0", "e", "\x0b"])


@st.composite
def json_texts(draw: st.DrawFn) -> str:
    """A value nested a few levels, or around MAX_PAYLOAD_DEPTH; one in ten has a typo."""
    text = draw(values)
    levels = draw(st.one_of(st.integers(0, 3), st.integers(505, 520), st.integers(0, 600)))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"k":', "}"), ("[0,", "]")]))
    text = opener * levels + text + closer * levels
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(noise) + text[at + draw(st.integers(0, 1)) :]
    return text


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=json_texts())
def test_generated_texts_agree_with_the_server(conn: Conn, text: str) -> None:
    check_agreement(conn, text)
