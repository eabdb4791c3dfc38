"""The running dashboard driven in headless Chromium (tests/webdriver.py): the overview
renders its figures, a figure changes by itself after events are sent, a dead letter is
replayed through the page and delivered again exactly once; mounted under a prefix the
script and links stay there; a hostile payload is text and runs nothing. Screenshots of
the three pages go to the test's tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import Conn, tick
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.routing import Mount
from traffic_helpers import make_ticking_queue
from webdriver import Browser, missing_binaries

from sqlalchemy_pgque import Message, Queue, admin
from sqlalchemy_pgque.consumer import Consumer
from sqlalchemy_pgque.dashboard import create_app
from sqlalchemy_pgque.dashboard._format import count as shown_count

from .conftest import Served

pytestmark = pytest.mark.skipif(missing_binaries() is not None,
                                reason=str(missing_binaries()))

Serve = Callable[[Any], Served]

ORDERS = Queue("orders")
PAID = [{"order_id": 1041, "amount": "99.90", "currency": "EUR"},
        {"order_id": 1042, "amount": "12.00", "currency": "EUR"}]


class CardDeclined(Exception):
    pass


def consume(engine: Engine, conn: Conn, queue: str, name: str,
            handle: Callable[[Message], None]) -> None:
    """Tick ``queue`` (forced: a tick even when nothing was sent) and let the library's
    Consumer ``name`` take every batch there is."""
    tick(conn, queue)
    consumer = Consumer(engine, queue=queue, name=name, listen=False)
    consumer.on("*")(handle)
    while consumer.process_batch():
        pass


@pytest.fixture
def traffic(conn: Conn, engine: Engine) -> Conn:
    """orders: 'billing' took 3 order.created and dead-lettered 2 order.paid (its
    handler raised, max_retries 0), 'audit' has not read anything; mail: idle."""
    make_ticking_queue(conn, "orders", "billing", "audit")
    make_ticking_queue(conn, "mail", "sender")
    conn.execute("select pgque.set_queue_config('orders', 'max_retries', '0')")
    with engine.begin() as connection:
        for order_id in (1038, 1039, 1040):
            ORDERS.send_now(connection, {"order_id": order_id}, type="order.created")
        for payload in PAID:
            ORDERS.send_now(connection, payload, type="order.paid")

    def bill(message: Message) -> None:
        if message.type == "order.paid":
            raise CardDeclined(f"card declined for order {message.payload['order_id']}")

    consume(engine, conn, "orders", "billing", bill)
    assert len(admin.dlq_list(engine, "orders")) == 2
    return conn


@pytest.fixture(scope="module")
def module_browser() -> Iterator[Browser]:
    with Browser() as opened:
        yield opened


@pytest.fixture
def browser(module_browser: Browser) -> Browser:
    """The module's browser without the cookies of earlier tests' servers (cookies
    ignore the port, and each test serves on a new one)."""
    module_browser.delete_cookies()
    return module_browser


@pytest.fixture
def dashboard(engine: Engine, serve: Serve) -> Served:
    # A short refresh so the live figure moves soon after the events are sent.
    return serve(create_app(engine, allow_writes=True, refresh_seconds=0.3))


def cell(browser: Browser, queue: str, field: str) -> str:
    return browser.find(f'#queues tr[data-queue="{queue}"] [data-field="{field}"]').text


def test_the_overview_renders_a_row_per_queue_with_the_admin_figures(
    traffic: Conn, engine: Engine, dashboard: Served, browser: Browser, tmp_path: Path
) -> None:
    browser.get(dashboard.base + "/")
    expected = {status.queue: status for status in admin.queues(engine)}
    rows = browser.find_all("#queues tr[data-queue]")
    assert sorted(row.attribute("data-queue") or "" for row in rows) == sorted(expected)
    for name, status in expected.items():
        assert cell(browser, name, "pending_events") == shown_count(status.pending_events)
        assert cell(browser, name, "dlq_events") == shown_count(status.dlq_events)
    assert cell(browser, "orders", "dlq_events") == "2"
    browser.save_screenshot(tmp_path / "overview.png")

    # The queue's link leads to its page, with a row per consumer.
    browser.find('#queues tr[data-queue="orders"] a').click()
    browser.wait_until(lambda: browser.find_all("#consumers"), message="the queue page")
    assert browser.url == dashboard.base + "/queues/orders"
    labels = {row.attribute("data-consumer")
              for row in browser.find_all("#consumers tr[data-consumer]")}
    assert labels == {c.label for c in admin.consumers(engine, "orders")} == {
        "orders/billing", "orders/audit"}
    browser.save_screenshot(tmp_path / "queue.png")
    assert (tmp_path / "overview.png").stat().st_size > 0


def test_a_live_figure_changes_after_events_are_sent_without_a_reload(
    traffic: Conn, engine: Engine, dashboard: Served, browser: Browser
) -> None:
    browser.get(dashboard.base + "/")
    before = cell(browser, "orders", "pending_events")
    assert before == shown_count(
        next(q for q in admin.queues(engine) if q.queue == "orders").pending_events)
    # A mark in the page's window: a reload would lose it.
    browser.execute("window.pgqueTestMark = 'still the same page';")

    with engine.begin() as connection:
        for order_id in range(2000, 2007):
            ORDERS.send_now(connection, {"order_id": order_id}, type="order.created")
    expected = shown_count(
        next(q for q in admin.queues(engine) if q.queue == "orders").pending_events)
    assert expected != before

    browser.wait_until(lambda: cell(browser, "orders", "pending_events") == expected,
                       timeout=20, message=f"orders' pending events to read {expected}")
    assert browser.execute("return window.pgqueTestMark;") == "still the same page"
    assert int(browser.find("body").attribute("data-refreshed") or 0) >= 1


@pytest.mark.parametrize("javascript", [True, False], ids=["scripts", "no-scripts"])
def test_a_dead_letter_replayed_through_the_page_is_delivered_again_exactly_once(
    traffic: Conn, engine: Engine, dashboard: Served, browser: Browser, tmp_path: Path,
    javascript: bool,
) -> None:
    target = next(entry for entry in admin.dlq_list(engine, "orders")
                  if entry.payload == PAID[1])
    other = next(entry.id for entry in admin.dlq_list(engine, "orders")
                 if entry.id != target.id)
    # Without scripts: a browser of its own; with them: the module's, left open.
    with Browser(javascript=False) if not javascript else nullcontext(browser) as page:
        page.get(dashboard.base + "/dlq?queue=orders")
        listed = {row.attribute("data-dead-letter")
                  for row in page.find_all("#dead-letters tr[data-dead-letter]")}
        assert listed == {str(target.id), str(other)}
        page.save_screenshot(tmp_path / "dlq.png")

        box = page.find(f'#dead-letters input[type="checkbox"][value="{target.id}"]')
        box.click()
        assert box.is_selected()
        page.find('#dlq-actions button[type="submit"]:not([formaction]):not([name])').click()
        confirm = page.wait_until(lambda: page.find_all("form#confirm"),
                                  message="the confirmation page")[0]
        assert page.find("h1").text.startswith("Replay 1 dead letter")
        # Nothing is done before the confirmation.
        assert len(admin.dlq_list(engine, "orders")) == 2
        confirm.find('button[name="confirm"][value="yes"]').click()
        flash = page.wait_until(lambda: page.find_all("#flash"), message="the flash")[0]
        assert flash.text.startswith(f"Replayed 1 dead letter: {target.id}")
        remaining = [row.attribute("data-dead-letter")
                     for row in page.find_all("#dead-letters tr[data-dead-letter]")]
        assert remaining == [str(other)]

    assert [entry.id for entry in admin.dlq_list(engine, "orders")] == [other]
    delivered: list[Message] = []
    consume(engine, traffic, "orders", "billing", delivered.append)
    assert [(m.type, m.payload) for m in delivered] == [("order.paid", PAID[1])]
    # Nothing more comes: the replay was one event, delivered once.
    consume(engine, traffic, "orders", "billing", delivered.append)
    assert len(delivered) == 1



def test_mounted_under_a_prefix_the_script_and_links_work_there(
    traffic: Conn, engine: Engine, serve: Serve, browser: Browser
) -> None:
    prefix = "/ops/pgque"
    host = serve(Starlette(routes=[
        Mount(prefix, app=create_app(engine, allow_writes=True, refresh_seconds=0.3))]))
    browser.get(host.base + prefix + "/")
    # The stylesheet and the script came from under the prefix, and so does the live
    # refresh, which answers.
    browser.wait_until(lambda: browser.find("body").attribute("data-refreshed"),
                       message="a live refresh")
    loaded = browser.execute(
        "return performance.getEntriesByType('resource')"
        ".filter(function (r) { return r.initiatorType !== 'other'; })"  # the favicon
        ".map(function (r) { return [r.initiatorType, r.name, r.responseStatus]; });")
    assert {tuple(entry) for entry in loaded} == {
        ("link", host.base + prefix + "/static/dashboard.css", 200),
        ("script", host.base + prefix + "/static/dashboard.js", 200),
        ("fetch", host.base + prefix + "/api/overview", 200)}

    browser.find('#queues tr[data-queue="orders"] a').click()
    browser.wait_until(lambda: browser.find_all("#consumers"), message="the queue page")
    assert browser.url == host.base + prefix + "/queues/orders"
    # The queue page's own refresh, through the mount: audit's pending events move.
    audit = '#consumers tr[data-consumer="orders/audit"] [data-field="pending_events"]'
    before = browser.find(audit).text
    with engine.begin() as connection:
        for order_id in range(3000, 3004):
            ORDERS.send_now(connection, {"order_id": order_id}, type="order.created")
    tick(traffic, "orders")  # a consumer's pending events are the ticked ones
    expected = shown_count(next(c for c in admin.consumers(engine, "orders")
                                if c.label == "orders/audit").pending_events)
    assert expected != before
    browser.wait_until(lambda: browser.find(audit).text == expected, timeout=20,
                       message=f"audit's pending events to read {expected}")

    browser.find('header a[href$="/dlq"]').click()
    browser.wait_until(lambda: browser.find_all("#dead-letters"), message="the DLQ page")
    assert browser.url == host.base + prefix + "/dlq"


HOSTILE = {"order_id": 666,
           "note": '<img src=x onerror="window.pgqueInjected = 1">',
           "gift": "</pre><script>window.pgqueInjected = 2</script>"}


def test_a_hostile_payload_and_reason_are_shown_as_text_and_run_nothing(
    traffic: Conn, engine: Engine, dashboard: Served, browser: Browser
) -> None:
    with engine.begin() as connection:
        ORDERS.send_now(connection, HOSTILE, type="order.paid")

    def refuse(message: Message) -> None:
        raise CardDeclined("<img src=y onerror='window.pgqueInjected = 3'> declined")

    consume(engine, traffic, "orders", "billing", refuse)
    (entry,) = [e for e in admin.dlq_list(engine, "orders") if e.payload == HOSTILE]

    browser.get(dashboard.base + "/dlq?queue=orders")
    row = browser.find(f'#dead-letters tr[data-dead-letter="{entry.id}"]')
    assert "<img src=y onerror='window.pgqueInjected = 3'> declined" in row.text
    assert browser.find_all("main img") == [] and len(browser.find_all("script")) == 1
    row.find(f'a[href="/dlq/{entry.id}"]').click()
    payload = browser.wait_until(lambda: browser.find_all("#payload"),
                                 message="the entry page")[0]
    assert json.loads(payload.text) == HOSTILE
    # Pretty-printed, as stored (jsonb orders the keys).
    assert payload.text == json.dumps(json.loads(payload.text), indent=2)
    assert browser.find_all("main img") == [] and len(browser.find_all("script")) == 1
    assert browser.execute("return window.pgqueInjected === undefined;") is True
