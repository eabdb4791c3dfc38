"""The dashboard mounted under a prefix of a host application, and what a page costs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine_helpers import Conn, drain, make_queue, send_many, tick
from queue_helpers import captured_statements
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from traffic_helpers import dead_letter, make_ticking_queue

from sqlalchemy_pgque import admin
from sqlalchemy_pgque.dashboard import create_app

from .conftest import Element, Served

Serve = Callable[[Any], Served]
PREFIX = "/ops/pgque"
LINKING = {"a": "href", "link": "href", "script": "src", "form": "action",
           "button": "formaction"}


def links(page: Element) -> list[str]:
    return [element.attrs[attribute] for tag, attribute in LINKING.items()
            for element in page.find_all(tag) if attribute in element.attrs]


def test_mounted_under_a_prefix_every_link_and_form_stays_under_it(
    conn: Conn, engine: Engine, serve: Serve
) -> None:
    make_ticking_queue(conn, "orders", "billing")
    dead_letter(conn, "orders", "billing", 2, "order.created")
    host = Starlette(routes=[
        Route("/", lambda request: PlainTextResponse("the host application")),
        Mount(PREFIX, app=create_app(engine, allow_writes=True)),
    ])
    client = serve(host).client()
    entry = admin.dlq_list(engine)[0].id
    seen: set[str] = set()
    for path in ("/", "/queues/orders", "/dlq", "/dlq?queue=orders", f"/dlq/{entry}"):
        reply = client.get(PREFIX + path)
        assert reply.status == 200, (path, reply.body)
        found = links(reply.html)
        assert found and all(link.startswith(PREFIX + "/") for link in found), (path, found)
        seen.update(found)
    # Every link the pages hold answers under the prefix (and the static files are there).
    for link in sorted(seen):
        if link.endswith(("/replay", "/purge")):
            continue  # POST only
        assert client.get(link).status == 200, link
    assert client.get("/").body == "the host application"
    # The CSRF cookie is scoped to the prefix, and a replay goes through the mount.
    csrf = next(c for c in client.cookies if c.name == "pgque_csrf")
    assert csrf.path == PREFIX + "/"
    confirm = client.post(f"{PREFIX}/dlq/replay", {"csrf_token": csrf.value, "id": str(entry)})
    form = confirm.html.find("form", id="confirm")
    assert form.attrs["action"] == f"{PREFIX}/dlq/replay"
    done = client.post(form.attrs["action"], {"csrf_token": csrf.value, "id": str(entry),
                                              "confirm": "yes"})
    assert done.status == 303 and done.headers["location"] == f"{PREFIX}/dlq"
    assert [e.id for e in admin.dlq_list(engine)] != [] and entry not in [
        e.id for e in admin.dlq_list(engine)]
    live = client.get(f"{PREFIX}/api/overview")
    assert live.status == 200 and "orders" in live.body


def statements_per_page(engine: Engine, served: Served, paths: list[str]) -> dict[str, int]:
    client = served.client()
    costs = {}
    for path in paths:
        with captured_statements(engine) as statements:
            assert client.get(path).status == 200, path
        costs[path] = len(statements)
    return costs


PAGES = ["/", "/api/overview", "/queues/q0", "/api/queues/q0", "/dlq", "/dlq?queue=q0"]


def add_queues(conn: Conn, first: int, count: int) -> None:
    """Queues with two consumers each, one of them behind."""
    for n in range(first, first + count):
        make_queue(conn, f"q{n}", "c1", "c2")
        send_many(conn, f"q{n}", 2)
        tick(conn, f"q{n}")
        drain(conn, f"q{n}", "c1")


def test_a_page_costs_the_same_statements_for_few_and_many_queues(
    conn: Conn, engine: Engine, serve: Serve
) -> None:
    make_ticking_queue(conn, "dead", "c")
    dead_letter(conn, "dead", "c", 3, "t")
    add_queues(conn, 0, 3)
    served = serve(create_app(engine))
    few = statements_per_page(engine, served, PAGES)
    add_queues(conn, 3, 60)
    dead_letter(conn, "dead", "c", 3, "t")
    assert len(admin.queues(engine)) == 64
    many = statements_per_page(engine, served, PAGES)
    assert few == many
    # The live endpoints read less than their pages.
    assert many["/api/overview"] < many["/"]
    assert many["/api/queues/q0"] < many["/queues/q0"]
