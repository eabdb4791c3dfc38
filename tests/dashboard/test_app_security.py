"""The dashboard's guards: login, security headers, cookies."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from conftest import Database
from engine_helpers import Conn, scalar, send_many, wait_until
from sqlalchemy import Engine, create_engine, event
from traffic_helpers import dead_letter, make_ticking_queue

from sqlalchemy_pgque import admin
from sqlalchemy_pgque.dashboard import _figures, create_app

from .conftest import Served

Serve = Callable[[Any], Served]


def test_a_token_guards_every_path(engine: Engine, serve: Serve) -> None:
    served = serve(create_app(engine, auth="s3cret-token"))
    for path in ("/", "/api/overview", "/dlq", "/static/dashboard.js", "/nothing-here"):
        reply = served.client().get(path)
        assert reply.status == 401, path
        assert "?token=" in reply.body
    assert served.client().get("/", headers={"Authorization": "Bearer wrong"}).status == 401
    assert served.client().get(
        "/", headers={"Authorization": "Bearer s3cret-token"}).status == 200
    # Once in the URL: answered with the cookie and a redirect that drops the token.
    browser = served.client()
    opened = browser.get("/dlq?queue=orders&token=s3cret-token")
    assert opened.status == 303 and opened.headers["location"] == "/dlq?queue=orders"
    assert browser.get("/dlq?queue=orders").status == 200
    assert "httponly" in opened.headers["set-cookie"].lower()
    assert served.client().get("/?token=guess").status == 401


def test_basic_auth_guards_every_path(engine: Engine, serve: Serve) -> None:
    served = serve(create_app(engine, auth=("ops", "pa:ss")))
    refused = served.client().get("/")
    assert refused.status == 401 and refused.headers["www-authenticate"].startswith("Basic")

    def login(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode()}

    assert served.client(headers=login("ops", "pa:ss")).get("/").status == 200
    assert served.client(headers=login("ops", "wrong")).get("/").status == 401
    assert served.client(headers={"Authorization": "Basic !!!"}).get("/").status == 401


def test_every_response_carries_the_security_headers(engine: Engine, serve: Serve) -> None:
    served = serve(create_app(engine))
    client = served.client()
    for path in ("/", "/api/overview", "/dlq", "/nothing-here"):
        headers = client.get(path).headers
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
    assert client.get("/api/overview").headers["cache-control"] == "no-store"
    page = served.client().get("/")
    cookie = page.headers["set-cookie"].lower()
    assert "pgque_csrf=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    # The script and stylesheet are the app's own.
    script = client.get("/static/dashboard.js")
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "data-refresh-ms" in script.body
    assert client.get("/static/dashboard.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/../__init__.py").status == 404


def test_an_unreachable_database_is_a_page_that_says_so(serve: Serve) -> None:
    app = create_app("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    client = serve(app).client()
    reply = client.get("/")
    assert reply.status == 503 and reply.html.find(id="error").text
    assert client.get("/api/overview").status == 503


def test_bad_arguments_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="refresh_seconds"):
        create_app(engine, refresh_seconds=-1)
    with pytest.raises(ValueError, match="token"):
        create_app(engine, auth="")


def test_the_pgque_reader_role_reads_every_page_and_writes_need_more(
    db: Database, conn: Conn, app_role: str, serve: Serve
) -> None:
    make_ticking_queue(conn, "orders", "billing")
    dead_letter(conn, "orders", "billing", 1, "order.created")
    send_many(conn, "orders", 3)
    conn.execute(f'grant pgque_reader to "{app_role}"')
    reader = create_engine(db.url)

    @event.listens_for(reader, "connect")
    def act_as_the_role(dbapi_connection: Any, record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f'set role "{app_role}"')
        dbapi_connection.commit()

    try:
        entry = admin.dlq_list(reader)[0].id
        client = serve(create_app(reader, allow_writes=True)).client()
        for path in ("/", "/api/overview", "/queues/orders", "/api/queues/orders", "/dlq",
                     f"/dlq/{entry}"):
            assert client.get(path).status == 200, path
        token = client.cookie("pgque_csrf") or ""
        refused = client.post("/dlq/replay", {"csrf_token": token, "id": str(entry),
                                              "confirm": "yes"})
        assert refused.status == 403
        assert "pgque_writer" in refused.html.find(id="error").text
        assert [e.id for e in admin.dlq_list(reader)] == [entry]
    finally:
        reader.dispose()


def test_a_read_that_waits_too_long_is_a_page_that_says_so(
    db: Database, engine: Engine, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_figures, "READ_TIMEOUT", "300ms")
    client = serve(create_app(engine)).client()
    with psycopg.connect(db.dsn) as locker:
        locker.execute("lock table pgque.queue in access exclusive mode")
        reply = client.get("/")
        assert reply.status == 503
        assert "statement timeout" in reply.html.find(id="error").text
        assert client.get("/api/overview").status == 503
    assert client.get("/").status == 200


def test_an_engine_made_from_a_url_is_closed_when_the_server_stops(
    db: Database, conn: Conn
) -> None:
    url = db.url.update_query_dict({"application_name": "dashboard-under-test"})
    served = Served(create_app(url.render_as_string(hide_password=False))).start()

    def connections() -> int:
        return int(scalar(conn, "select count(*) from pg_stat_activity"
                                " where application_name = 'dashboard-under-test'"))

    try:
        assert served.client().get("/").status == 200
        assert connections() == 1  # pooled
    finally:
        served.stop()
    wait_until(lambda: connections() == 0, what="the dashboard's pool to close")
