"""The dashboard served for real against a database with real traffic: each page's
figures against the admin API's, the dead-letter actions, their guards, mounting."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from engine_helpers import Conn, receive, send, send_many, tick
from sqlalchemy import Engine
from traffic_helpers import (
    dead_letter,
    make_ticking_queue,
    orders_and_mail,
    rotation_blocked_by_a_stopped_consumer,
)

from sqlalchemy_pgque import Message, admin
from sqlalchemy_pgque.consumer import Consumer
from sqlalchemy_pgque.dashboard import create_app
from sqlalchemy_pgque.dashboard._format import count as shown_count

from .conftest import Element, Reply, Served

Serve = Callable[[Any], Served]


@pytest.fixture
def traffic(conn: Conn) -> Conn:
    """orders: 'fast' drained 40 events, 'slow' has them all to do and holds a batch
    open, 2 dead letters of fast's, 3 events not ticked; mail: idle; r: rotation
    blocked by 'forgotten'."""
    rotation_blocked_by_a_stopped_consumer(conn)
    orders_and_mail(conn)
    receive(conn, "orders", "slow")  # autocommit: the batch stays open
    return conn


@pytest.fixture
def read_only(engine: Engine, serve: Serve) -> Served:
    return serve(create_app(engine))


@pytest.fixture
def writable(engine: Engine, serve: Serve) -> Served:
    return serve(create_app(engine, allow_writes=True))


def ok(reply: Reply) -> Element:
    assert reply.status == 200, reply.body
    return reply.html


def test_the_overview_shows_the_admin_figures_problems_first(
    traffic: Conn, engine: Engine, read_only: Served
) -> None:
    page = ok(read_only.client().get("/"))
    expected = {q.queue: q for q in admin.queues(engine)}
    rows = page.find("table", id="queues").find_all("tr", data_queue=None)
    names = [row.attrs["data-queue"] for row in rows]
    assert sorted(names) == sorted(expected)
    # Queues with problems first, the worst first: r (a blocked rotation), then orders
    # (new dead letters), then the rest by name.
    assert names == ["r", "orders", "mail"]
    for row in rows:
        status = expected[row.attrs["data-queue"]]
        assert row.field("pending_events") == shown_count(status.pending_events)
        assert row.field("dlq_events") == shown_count(status.dlq_events)
        assert re.fullmatch(r"[\d.]+s ago|\d+m\d\ds ago", row.field("ticker_lag_seconds"))
        assert row.find("a").attrs["href"] == f"/queues/{status.queue}"
        assert row.find("polyline", data_field="sparkline").attrs["points"]
    by_name = {row.attrs["data-queue"]: row for row in rows}
    assert by_name["orders"].field("pending_events") == "45"  # slow: 40 + 2 + 3 not ticked
    assert by_name["orders"].field("dlq_events") == "2"
    assert [m.text for m in by_name["r"].find_all("mark", **{"class": "blocking"})] == [
        "forgotten"]
    problems = [(p.attrs["data-queue"], p.attrs["data-problem"], p.text.strip())
                for p in page.find(id="problems").find_all("li")]
    assert problems == [
        ("r", "rotation-blocked",
         "r: rotation blocked by forgotten: the event tables grow until it moves"),
        ("orders", "dlq-growing", "orders: 2 new dead letters in the last 10 minutes")]


def test_the_overview_names_stuck_consumers_and_old_ticks(
    traffic: Conn, engine: Engine, serve: Serve
) -> None:
    # An hour passes for mail: its ticks age, its consumer falls an hour behind.
    traffic.execute("update pgque.tick set tick_time = tick_time - interval '1 hour'"
                    " where tick_queue = (select queue_id from pgque.queue"
                    " where queue_name = 'mail')")
    page = ok(serve(create_app(engine, stale_after="10 minutes")).client().get("/"))
    problems = [(p.attrs["data-queue"], p.attrs["data-problem"], p.text)
                for p in page.find(id="problems").find_all("li")]
    assert ("mail", "old-tick") in {(q, kind) for q, kind, _ in problems}
    stuck = [text for q, kind, text in problems if kind == "stuck-consumer"]
    assert len(stuck) == 1 and "mail/sender is 1h00m behind" in stuck[0]


def test_the_live_endpoint_has_the_figures_and_moves_with_the_traffic(
    traffic: Conn, engine: Engine, read_only: Served
) -> None:
    client = read_only.client()
    before = client.get("/api/overview")
    assert before.status == 200 and before.headers["content-type"] == "application/json"
    assert "no-store" in before.headers["cache-control"]
    figures = json.loads(before.body)["queues"]
    assert figures["orders"]["cells"]["pending_events"] == "45"
    assert figures["r"]["blocked_by"] == ["forgotten"]
    send_many(traffic, "orders", 5)
    after = json.loads(client.get("/api/overview").body)["queues"]
    assert after["orders"]["cells"]["pending_events"] == "50"


def last_point_height(chart: Element, line: str) -> float:
    """How far above the plot's bottom a line's last point lies, in pixels."""
    plot = chart.find("rect", **{"class": "plot"})
    bottom = float(plot.attrs["y"]) + float(plot.attrs["height"]) - 1
    points = chart.find("polyline", **{"class": line}).attrs["points"].split()
    return bottom - float(points[-1].split(",")[1])


def test_the_queue_page_shows_each_consumer_as_the_admin_api_does(
    traffic: Conn, engine: Engine, read_only: Served
) -> None:
    page = ok(read_only.client().get("/queues/orders"))
    expected = {c.label: c for c in admin.consumers(engine, "orders")}
    rows = page.find("table", id="consumers").find_all("tr", data_consumer=None)
    assert {row.attrs["data-consumer"] for row in rows} == set(expected) == {
        "orders/fast", "orders/slow"}
    for row in rows:
        status = expected[row.attrs["data-consumer"]]
        assert row.field("pending_events") == shown_count(status.pending_events)
        assert row.field("batch_id") == ("-" if status.batch_id is None
                                          else str(status.batch_id))
    slow = next(row for row in rows if row.attrs["data-consumer"] == "orders/slow")
    assert slow.field("batch_id") != "-" and slow.field("batch_age_seconds") != "-"
    assert page.find(id="queue-figures").field("pending_events") == "45"
    # The charts: this minute's 40 events and 2 dead letters lift their lines' last
    # points off the bottom; no retries keep that line on it.
    throughput, errors = page.find_all("figure", **{"class": "chart"})
    assert last_point_height(throughput, "line-events") > 0
    assert last_point_height(errors, "line-dead") > 0
    assert last_point_height(errors, "line-retries") == 0
    live = json.loads(read_only.client().get("/api/queues/orders").body)
    assert live["consumers"]["orders/slow"]["pending_events"] == shown_count(
        expected["orders/slow"].pending_events)
    blocked = ok(read_only.client().get("/queues/r"))
    forgotten = blocked.find("tr", data_consumer="r/forgotten")
    assert "blocking" in forgotten.attrs["class"]
    assert read_only.client().get("/queues/nosuch").status == 404
    assert read_only.client().get("/api/queues/nosuch").status == 404


def test_cooperative_members_are_listed_under_their_consumer(
    conn: Conn, engine: Engine, read_only: Served
) -> None:
    make_ticking_queue(conn, "jobs")
    for member in ("a", "b"):
        conn.execute("select pgque.subscribe_subconsumer('jobs', 'workers', %s)", (member,))
    page = ok(read_only.client().get("/queues/jobs"))
    labels = [row.attrs["data-consumer"] for row in page.find_all("tr", data_consumer=None)]
    assert labels == [c.label for c in admin.consumers(engine, "jobs")]
    assert {"jobs/workers.a", "jobs/workers.b"} <= set(labels)


# -- dead letters ----------------------------------------------------------------------

HOSTILE = {"html": "<script>alert('x')</script>", "quote": "\"quoted\" & <b>bold</b>"}


def dead_letter_of(conn: Conn, queue: str, consumer: str, payload: str, type_: str,
                   reason: str) -> None:
    """One event with ``payload``, dead-lettered by ``consumer`` with ``reason``."""
    send(conn, queue, payload, type=type_)
    tick(conn, queue, force=False)
    with conn.transaction():
        (row,) = receive(conn, queue, consumer)
        conn.execute("select pgque.event_dead(%s, %s, %s, now(), NULL, 5, %s, %s)",
                     (row[1], row[0], reason, row[2], row[3]))
        conn.execute("select pgque.ack(%s)", (row[1],))


@pytest.fixture
def dead_letters(conn: Conn) -> Conn:
    """orders/billing: 3 order.created ('boom'), 2 order.paid ('Timeout <smtp>');
    mail/sender: 1 with a hostile payload and reason."""
    make_ticking_queue(conn, "orders", "billing")
    make_ticking_queue(conn, "mail", "sender")
    dead_letter(conn, "orders", "billing", 3, "order.created", reason="boom")
    dead_letter(conn, "orders", "billing", 2, "order.paid", reason="Timeout talking to <smtp>")
    dead_letter_of(conn, "mail", "sender", json.dumps(HOSTILE), "mail.send",
                   reason="<img src=x onerror=alert(1)> & \"more\"")
    return conn


def listed(page: Element) -> list[int]:
    return [int(row.attrs["data-dead-letter"])
            for row in page.find_all("tr", data_dead_letter=None)]


def test_the_dlq_page_filters_and_pages_as_the_admin_api(
    dead_letters: Conn, engine: Engine, read_only: Served
) -> None:
    client = read_only.client()
    everything = [e.id for e in admin.dlq_list(engine)]
    assert listed(ok(client.get("/dlq"))) == everything and len(everything) == 6
    for query, expected in [
        ("queue=orders", admin.dlq_list(engine, "orders")),
        ("queue=orders&type=order.paid", admin.dlq_list(engine, "orders", type="order.paid")),
        ("reason=TIMEOUT", admin.dlq_list(engine, reason="timeout")),
        ("consumer=sender", admin.dlq_list(engine, consumer="sender")),
        ("since=1+hour", everything),
        ("before=1+hour", []),
    ]:
        page = ok(client.get(f"/dlq?{query}"))
        ids = [e if isinstance(e, int) else e.id for e in expected]
        assert listed(page) == ids, query
        assert page.field("matching") == str(len(ids))
    for row in ok(client.get("/dlq")).find_all("tr", data_dead_letter=None):
        assert row.find("a").attrs["href"] == f"/dlq/{row.attrs['data-dead-letter']}"
    assert client.get("/dlq?since=yesterday-ish").status == 400
    # Read-only: neither the actions nor the checkboxes.
    assert not ok(client.get("/dlq")).find_all("form", id="dlq-actions")
    assert not ok(client.get("/dlq")).find_all("input", type="checkbox")


def test_the_dlq_pages_through_long_lists(conn: Conn, engine: Engine, read_only: Served) -> None:
    make_ticking_queue(conn, "bulk", "c")
    dead_letter(conn, "bulk", "c", 120, "t")
    client = read_only.client()
    seen: list[int] = []
    path: str | None = "/dlq?queue=bulk"
    while path is not None:
        page = ok(client.get(path))
        seen += listed(page)
        following = page.find_all("a", rel="next")
        path = following[0].attrs["href"] if following else None
    assert seen == [e.id for e in admin.dlq_list(engine, limit=None)]


def test_an_entry_shows_its_payload_pretty_printed_and_escaped(
    dead_letters: Conn, engine: Engine, read_only: Served
) -> None:
    (entry,) = admin.dlq_list(engine, "mail")
    reply = read_only.client().get(f"/dlq/{entry.id}")
    page = ok(reply)
    assert page.find("pre", id="payload").text == json.dumps(HOSTILE, indent=2)
    assert json.loads(page.find("pre", id="payload").text) == HOSTILE
    # Nothing of the payload or the reason is markup: no script, no img, no bold.
    assert [s.attrs.get("src", "") for s in page.find_all("script")] == [
        "/static/dashboard.js"]
    assert not page.find_all("img") and not page.find_all("b")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in reply.body
    assert "\\&#34;quoted\\&#34; &amp; &lt;b&gt;bold&lt;/b&gt;" in reply.body
    assert "&lt;img src=x onerror=alert(1)&gt;" in reply.body
    listing = read_only.client().get("/dlq?queue=mail")
    assert "<script>alert" not in listing.body and "<img" not in listing.body
    assert read_only.client().get("/dlq/999999").status == 404


# -- dead-letter actions ---------------------------------------------------------------


def form_fields(form: Element) -> list[tuple[str, str]]:
    """What a browser submits for ``form`` with its checkboxes left as they are."""
    return [(field.attrs["name"], field.attrs.get("value", ""))
            for field in form.find_all("input", name=None)
            if field.attrs.get("type") != "checkbox" or "checked" in field.attrs]


def test_a_replay_through_the_page_delivers_the_event_again_exactly_once(
    dead_letters: Conn, engine: Engine, writable: Served
) -> None:
    client = writable.client()
    target = admin.dlq_list(engine, "orders", type="order.paid")[0]
    listing = ok(client.get("/dlq?queue=orders"))
    actions = listing.find("form", id="dlq-actions")
    assert actions.attrs["action"] == "/dlq/replay"
    assert listing.find("button", formaction="/dlq/purge")
    # Tick the box of the target and submit: a confirmation page, nothing done yet.
    confirm_page = ok(client.post("/dlq/replay", [*form_fields(actions), ("id", str(target.id))]))
    assert len(admin.dlq_list(engine, "orders")) == 5
    confirm = confirm_page.find("form", id="confirm")
    assert confirm.find("button", name="confirm").attrs["value"] == "yes"
    fields = [*form_fields(confirm), ("confirm", "yes")]
    assert ("id", str(target.id)) in fields and ("queue", "orders") in fields
    done = client.post(confirm.attrs["action"], fields)
    assert done.status == 303 and done.headers["location"] == "/dlq?queue=orders"
    flash = ok(client.get("/dlq?queue=orders")).find(id="flash").text
    assert flash.startswith(f"Replayed 1 dead letter: {target.id} as event ")
    assert target.id not in [e.id for e in admin.dlq_list(engine)]
    # The flash shows once.
    assert not ok(client.get("/dlq?queue=orders")).find_all(id="flash")

    # Submitting the confirmation again replays nothing.
    again = client.post(confirm.attrs["action"], fields)
    assert again.status == 303
    assert "Nothing done" in ok(client.get("/dlq?queue=orders")).find(id="flash").text

    delivered: list[Message] = []
    consumer = Consumer(engine, queue="orders", name="billing", listen=False)
    consumer.on("*")(delivered.append)
    tick(dead_letters, "orders", force=False)
    while consumer.process_batch():
        pass
    assert [(m.type, m.payload) for m in delivered] == [(target.type, target.payload)]
    send_many(dead_letters, "orders", 1, type="later")
    tick(dead_letters, "orders", force=False)
    while consumer.process_batch():
        pass
    assert [m.type for m in delivered] == [target.type, "later"]


def test_everything_matching_a_filter_is_purged_after_confirmation(
    dead_letters: Conn, engine: Engine, writable: Served
) -> None:
    client = writable.client()
    listing = ok(client.get("/dlq?queue=orders&reason=boom"))
    actions = listing.find("form", id="dlq-actions")
    purge_all = next(b for b in actions.find_all("button", name="scope")
                     if b.attrs.get("formaction") == "/dlq/purge")
    confirm_page = ok(client.post(purge_all.attrs["formaction"],
                                  [*form_fields(actions), ("scope", "matching")]))
    assert confirm_page.find("h1").text.startswith("Purge 3 dead letters")
    confirm = confirm_page.find("form", id="confirm")
    assert client.post(confirm.attrs["action"],
                       [*form_fields(confirm), ("confirm", "yes")]).status == 303
    assert ok(client.get("/dlq")).find(id="flash").text == "Purged 3 dead letters for good."
    assert {e.reason for e in admin.dlq_list(engine)} == {
        "Timeout talking to <smtp>", "<img src=x onerror=alert(1)> & \"more\""}
    # Without a filter there is no "everything" button, and the POST is refused.
    assert not ok(client.get("/dlq")).find_all("button", name="scope")
    token = client.cookie("pgque_csrf") or ""
    client.post("/dlq/purge", {"csrf_token": token, "scope": "matching", "confirm": "yes"})
    assert "Set a filter first" in ok(client.get("/dlq")).find(id="flash").text
    assert len(admin.dlq_list(engine)) == 3


def test_writes_are_refused_when_not_allowed_or_without_the_csrf_token(
    dead_letters: Conn, engine: Engine, read_only: Served, writable: Served
) -> None:
    target = str(admin.dlq_list(engine)[0].id)
    reader = read_only.client()
    reader.get("/dlq")
    token = reader.cookie("pgque_csrf")
    assert token
    refused = reader.post("/dlq/replay", {"csrf_token": token, "id": target, "confirm": "yes"})
    assert refused.status == 403 and "read-only" in refused.html.find(id="error").text
    assert reader.post("/dlq/purge", {"csrf_token": token, "id": target,
                                      "confirm": "yes"}).status == 403

    writer = writable.client()
    writer.get("/dlq")
    token = writer.cookie("pgque_csrf")
    assert token
    for fields in ({"id": target, "confirm": "yes"},
                   {"csrf_token": "", "id": target, "confirm": "yes"},
                   {"csrf_token": token[:-1] + ("A" if token[-1] != "A" else "B"),
                    "id": target, "confirm": "yes"}):
        reply = writer.post("/dlq/replay", fields)
        assert reply.status == 403 and "CSRF" in reply.html.find(id="error").text
    # A token without its cookie (another site's form) is refused too.
    stranger = writable.client()
    reply = stranger.post("/dlq/purge", {"csrf_token": token, "id": target, "confirm": "yes"})
    assert reply.status == 403
    # GET does nothing.
    assert writer.get("/dlq/replay").status == 405
    assert len(admin.dlq_list(engine)) == 6


def test_any_queue_name_links_to_its_page(conn: Conn, engine: Engine, read_only: Served) -> None:
    name = "ops/mail %41 <é>&"
    make_ticking_queue(conn, name, "c")
    dead_letter(conn, name, "c", 1, "t")
    client = read_only.client()
    row = ok(client.get("/")).find("tr", data_queue=name)
    page = ok(client.get(row.find("a").attrs["href"]))
    assert page.find("h1").text == name
    assert page.find("tr", data_consumer=f"{name}/c")
    live = page.find("body").attrs["data-live-url"]
    assert json.loads(client.get(live).body)["queue"]["dlq_events"] == "1"
    dlq = ok(client.get(row.find(data_field="dlq_events").find("a").attrs["href"]))
    assert len(listed(dlq)) == 1
