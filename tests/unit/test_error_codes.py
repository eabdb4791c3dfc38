"""The engine's SQLSTATEs, read from its SQL files: every error has one, and the table
at the top of the first file, the README and the Python mapping agree.

Triggering each code against a database is tests/engine/test_engine_errors.py's job.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_helpers import documented_error_codes, engine_files, raise_exception_statements
from psycopg.errors import lookup

from sqlalchemy_pgque import (
    BatchInProgress,
    BatchNotFound,
    ConsumerModeConflict,
    ConsumerNotSubscribed,
    EngineNotInstalled,
    InvalidName,
    MessageNotInBatch,
    PermissionDenied,
    PgqueError,
    QueueNotFound,
    errors,
)

ERRCODE = re.compile(r"\bUSING\b.*\bERRCODE\s*=\s*'([0-9A-Z]{5})'", re.DOTALL)
README = Path(__file__).resolve().parents[2] / "README.md"


def used_codes() -> set[str]:
    return {
        match.group(1)
        for source in engine_files().values()
        for statement in raise_exception_statements(source)
        if (match := ERRCODE.search(statement))
    }


@pytest.mark.parametrize("name", list(engine_files()))
def test_every_raise_exception_sets_a_documented_errcode(name: str) -> None:
    documented = documented_error_codes()
    for statement in raise_exception_statements(engine_files()[name]):
        match = ERRCODE.search(statement)
        assert match is not None, f"{name}: no ERRCODE in {statement!r}"
        assert match.group(1) in documented, f"{name}: undocumented code in {statement!r}"


def test_every_documented_code_is_raised() -> None:
    assert set(documented_error_codes()) == used_codes()


def test_codes_are_of_class_pq_or_postgresqls_own() -> None:
    for code in documented_error_codes():
        if not code.startswith("PQ"):
            assert lookup(code).sqlstate == code


def test_python_mapping_covers_documented_codes_only() -> None:
    documented = documented_error_codes()
    assert set(errors._CODE_MAP) <= set(documented)


def test_readme_lists_every_code_with_its_exception() -> None:
    rows = dict(
        re.findall(r"^\| `([0-9A-Z]{5})` \| .+ \| (`\w+`|—) \|$", README.read_text(), re.MULTILINE)
    )
    # PostgreSQL's own insufficient_privilege is listed for PermissionDenied.
    assert set(rows) - {"42501"} == set(documented_error_codes())
    for code, error_class in errors._CODE_MAP.items():
        assert rows[code] == f"`{error_class.__name__}`", code
    unmapped = set(documented_error_codes()) - set(errors._CODE_MAP)
    assert all(rows[code] == "—" for code in unmapped)


def test_pgque_errors_share_a_base() -> None:
    for error in (QueueNotFound, ConsumerNotSubscribed, BatchNotFound, EngineNotInstalled,
                  PermissionDenied, InvalidName, MessageNotInBatch, ConsumerModeConflict,
                  BatchInProgress):
        assert issubclass(error, PgqueError)
