"""URLs and libpq strings, both ways, multi-host ones included (no database: the
strings only; tests/layer/test_consumer.py connects with them)."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import make_url

from sqlalchemy_pgque._listen import conninfo_from_url, url_from_conninfo

PRIMARY_STANDBY = {"host": "db1,db2", "port": "5432,5433", "user": "app", "dbname": "app",
                   "target_session_attrs": "read-write"}


@pytest.mark.parametrize("url", [
    # SQLAlchemy's two multi-host forms, on any driver.
    "postgresql+psycopg://app@/app?host=db1:5432&host=db2:5433&target_session_attrs=read-write",
    "postgresql+asyncpg://app@/app?host=db1,db2&port=5432,5433&target_session_attrs=read-write",
])
def test_multi_host_url_becomes_libpq_host_and_port_lists(url: str) -> None:
    assert conninfo_to_dict(conninfo_from_url(make_url(url))) == PRIMARY_STANDBY


def test_options_of_another_driver_are_left_out() -> None:
    url = make_url("postgresql+asyncpg://app:secret@db:6432/app"
                   "?prepared_statement_cache_size=0&application_name=w")
    assert conninfo_to_dict(conninfo_from_url(url)) == {
        "host": "db", "port": "6432", "user": "app", "password": "secret", "dbname": "app",
        "application_name": "w"}


def test_multi_host_conninfo_becomes_the_url_psycopg_reads_back() -> None:
    url = url_from_conninfo(
        "host=db1,db2 port=5432,5433 user=app dbname=app target_session_attrs=read-write")
    assert url.query["host"] == ("db1:5432", "db2:5433")
    assert (url.host, url.port) == (None, None)
    assert conninfo_to_dict(conninfo_from_url(url)) == PRIMARY_STANDBY


def test_one_port_serves_every_host() -> None:
    url = url_from_conninfo("host=db1,/run/postgresql port=5433 dbname=app")
    assert url.query["host"] == ("db1:5433", "/run/postgresql:5433")
    assert conninfo_to_dict(conninfo_from_url(url)) == {
        "host": "db1,/run/postgresql", "port": "5433,5433", "dbname": "app"}


def test_hosts_without_ports() -> None:
    url = url_from_conninfo("host=db1,db2 dbname=app")
    assert url.query["host"] == ("db1", "db2")
    # Empty entries of the port list are the default port, to libpq; the psycopg
    # dialect passes the same to its connections.
    assert conninfo_to_dict(conninfo_from_url(url)) == {
        "host": "db1,db2", "port": ",", "dbname": "app"}


def test_as_many_ports_as_hosts_or_one() -> None:
    with pytest.raises(ValueError, match="3 hosts but 2 ports"):
        url_from_conninfo("host=a,b,c port=1,2")


def test_single_host_urls_are_unchanged() -> None:
    assert url_from_conninfo("host=/tmp/s port=5 user=u dbname=d").render_as_string() == \
        "postgresql+psycopg://u@:5/d?host=%2Ftmp%2Fs"
    assert conninfo_to_dict(conninfo_from_url(make_url("postgresql://u@h:5/d"))) == {
        "host": "h", "port": "5", "user": "u", "dbname": "d"}
