"""The public surface: a sorted ``__all__`` whose every name imports."""

from __future__ import annotations

import importlib

import pytest

import sqlalchemy_pgque

MODULES = [
    "sqlalchemy_pgque",
    "sqlalchemy_pgque.errors",
    "sqlalchemy_pgque.functions",
    "sqlalchemy_pgque.message",
    "sqlalchemy_pgque.metrics",
    "sqlalchemy_pgque.queue",
    "sqlalchemy_pgque.tracing",
]


def isort_style(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


@pytest.mark.parametrize("module_name", MODULES)
def test_all_is_sorted_and_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = module.__all__
    assert names == sorted(names, key=isort_style)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(module, name) is not None


def test_public_classes_live_at_the_package_path() -> None:
    for name in sqlalchemy_pgque.__all__:
        obj = getattr(sqlalchemy_pgque, name)
        if isinstance(obj, type):
            assert obj.__module__ == "sqlalchemy_pgque", name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from sqlalchemy_pgque import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(sqlalchemy_pgque.__all__)


def test_func_pgque_functions_are_registered() -> None:
    from sqlalchemy import BigInteger, func, select

    expr = func.pgque.send("orders", "created", {"id": 1})
    assert isinstance(expr.type, BigInteger)
    assert str(select(expr)).startswith("SELECT pgque.send(")


def test_internal_helpers_stay_out_of_the_public_lists() -> None:
    for module_name in [*MODULES, "sqlalchemy_pgque.consumer", "sqlalchemy_pgque.schema"]:
        exported = set(importlib.import_module(module_name).__all__)
        assert not {name for name in exported if name.startswith("_")}, module_name
        assert not exported & {"first_line", "sqlstate", "translate", "check_subscription",
                               "as_seconds", "require_installed", "is_transient"}, module_name


def test_types_of_public_signatures_are_exported() -> None:
    from datetime import timedelta

    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    assert timedelta in sqlalchemy_pgque.Duration.__args__
    assert {Session, Connection} <= set(sqlalchemy_pgque.Bind.__args__)
