"""``sqlalchemy-pgque dashboard``, run as a process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Database
from engine_helpers import Conn, drain, send_many, tick, wait_until
from pgcluster import _free_port as free_port
from sqlalchemy import Engine
from traffic_helpers import dead_letter, make_ticking_queue

from sqlalchemy_pgque.dashboard import create_app

from .conftest import Client, Served

Serve = Callable[[Any], Served]


def url_of(db: Database) -> str:
    return db.url.render_as_string(hide_password=False)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=20)  # waits, and closes the pipes


def answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/api/overview", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def test_the_command_serves_the_dashboard_until_terminated(
    db: Database, conn: Conn, started: list[subprocess.Popen[str]]
) -> None:
    make_ticking_queue(conn, "orders", "billing")
    send_many(conn, "orders", 7)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_pgque", "dashboard", "--url", url_of(db),
         "--port", str(port), "--refresh", "5", "--root-path", "/ops"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(process)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(base) or process.poll() is not None, timeout=30,
               what="the dashboard to answer")
    assert process.poll() is None, process.communicate()
    page = Client(base).get("/")
    assert page.status == 200
    row = page.html.find("tr", data_queue="orders")
    assert row.field("pending_events") == "7"
    # Behind a proxy that strips /ops, the links keep it.
    assert row.find("a").attrs["href"] == "/ops/queues/orders"
    assert page.html.find("body").attrs["data-refresh-ms"] == "5000"
    # Only this machine's names: a page whose DNS name was rebound to 127.0.0.1 gets
    # nothing.
    assert Client(base).get("/", headers={"Host": "attacker.example"}).status == 400
    assert Client(base).get("/", headers={"Host": f"localhost:{port}"}).status == 200
    # Read-only unless told otherwise.
    assert Client(base).post("/dlq/replay", {"id": "1"}).status == 403
    live = json.loads(Client(base).get("/api/overview").body)
    assert live["queues"]["orders"]["cells"]["pending_events"] == "7"
    process.terminate()
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert (f"serving the dashboard on http://127.0.0.1:{port}/ (read-only, links under /ops)"
            in stderr)


def test_the_command_takes_its_token_from_the_environment(
    db: Database, started: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_pgque", "dashboard", "--url", url_of(db),
         "--port", str(port), "--allow-writes"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PGQUE_DASHBOARD_TOKEN": "from-the-env"})
    started.append(process)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: Client(base).get("/").status == 401 if port_open(port) else False,
               timeout=30, what="the dashboard to answer")
    assert Client(base, headers={"Authorization": "Bearer from-the-env"}).get(
        "/").status == 200
    assert Client(base).get("/?token=from-the-env").status == 303


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_the_command_requires_a_login_for_writes_beyond_this_machine(db: Database) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pgque", "dashboard", "--url", url_of(db),
         "--host", "0.0.0.0", "--allow-writes"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing --allow-writes on 0.0.0.0 without --token or --basic-auth" in done.stderr


def test_the_command_says_what_to_install_without_the_extra(db: Database) -> None:
    # The process cannot import Starlette, as where the extra is not installed.
    program = ("import sys; sys.modules['starlette'] = None; "
               "from sqlalchemy_pgque.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run(
        [sys.executable, "-c", program, "dashboard", "--url", url_of(db)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install 'sqlalchemy-pgque[dashboard]'" in done.stderr
    assert done.stderr.count("\n") == 1


def test_the_command_fails_in_one_line_on_a_database_without_the_engine(
    empty_db: Database
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pgque", "dashboard", "--url", url_of(empty_db),
         "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert done.stderr.count("\n") == 1


def test_create_app_says_what_to_install_without_the_extra() -> None:
    program = (
        "import sys; sys.modules['jinja2'] = None\n"
        "import sqlalchemy_pgque.dashboard as dashboard\n"
        "try:\n"
        "    dashboard.create_app('postgresql://nobody@127.0.0.1:1/none')\n"
        "except dashboard.MissingExtra as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("the dashboard needs jinja2: "
                           "pip install 'sqlalchemy-pgque[dashboard]'\n")


def test_the_command_line_and_the_page_show_the_same_figures(
    db: Database, conn: Conn, engine: Engine, serve: Serve
) -> None:
    make_ticking_queue(conn, "orders", "fast", "slow")
    send_many(conn, "orders", 12)
    tick(conn, "orders", force=False)
    drain(conn, "orders", "fast")
    dead_letter(conn, "orders", "fast", 2, "order.created", reason="Timeout in billing")
    dead_letter(conn, "orders", "fast", 1, "order.paid", reason="boom")
    client = serve(create_app(engine)).client()
    status = json.loads(cli(db, "status", "--json").stdout)
    row = client.get("/").html.find("tr", data_queue="orders")
    (orders,) = status["queues"]
    assert row.field("pending_events") == str(orders["pending_events"]) == "15"
    assert row.field("dlq_events") == str(orders["dlq_events"]) == "3"
    consumers = client.get("/queues/orders").html
    for consumer in status["consumers"]:
        label = f"{consumer['queue']}/{consumer['consumer']}"
        assert consumers.find("tr", data_consumer=label).field("pending_events") == str(
            consumer["pending_events"])
    listed = json.loads(cli(db, "dlq", "list", "--reason", "TIMEOUT", "--json").stdout)
    page = client.get("/dlq?reason=TIMEOUT").html
    shown = [int(row.attrs["data-dead-letter"])
             for row in page.find_all("tr", data_dead_letter=None)]
    assert shown == [entry["id"] for entry in listed] and len(shown) == 2


def cli(db: Database, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "sqlalchemy_pgque", *args, "--url", url_of(db)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done
