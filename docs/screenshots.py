"""The README's dashboard screenshots: docs/dashboard-overview.png, dashboard-queue.png
and dashboard-dlq.png, taken in headless Chromium from a demo database.

    .venv/bin/python docs/screenshots.py [--out docs]

Needs the ``dashboard`` and ``embedded`` extras and Debian's ``chromium`` and
``chromium-driver`` packages (the browser is driven by tests/webdriver.py).

The demo runs on a throwaway embedded PostgreSQL: four queues, sent to with
``Queue.send_now`` and read by the library's ``Consumer``. ``orders`` has three
consumers: ``billing`` fails once on a payment gateway timeout (retried) and for good
on declined cards (dead-lettered after ``max_retries``), ``analytics`` stops reading
forty minutes before the end (it falls behind and blocks the queue's rotation);
``webhooks``' handler fails once on a flaky endpoint and for good on one that is down
for a quarter of an hour.

An hour in about a minute: the traffic runs in 120 slices, and after each one every
time the engine recorded so far (ticks, rotation, retry and dead-letter times, event
times) is moved 30 seconds into the past, so the charts show an hour of history the
script did not wait for; the last 8 seconds run in real time. Everything else is what
the library and the engine did.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from asgi_server import served  # noqa: E402
from webdriver import Browser, missing_binaries  # noqa: E402

from sqlalchemy_pgque import Message, Queue, schema  # noqa: E402
from sqlalchemy_pgque.consumer import Consumer  # noqa: E402
from sqlalchemy_pgque.dashboard import create_app  # noqa: E402
from sqlalchemy_pgque.embedded import EmbeddedPostgres  # noqa: E402

SLICES = 120
SLICE_SECONDS = 30
ROUNDS_PER_SLICE = 2
ANALYTICS_STOPS_AT = SLICES - 80  # it is forty minutes behind at the end
PRESENT_SECONDS = 8  # the last seconds, sent in real time
LEGACY_DOWN = range(70, 100)  # slices in which legacy.example.com answers 503

QUEUES: dict[str, tuple[str, ...]] = {
    "orders": ("billing", "shipping", "analytics"),
    "emails": ("sender",),
    "webhooks": ("deliverer",),
    "invoices": ("pdf-renderer",),
}
# Queue settings: orders rotates every 25 minutes and gives up on an event after three
# retries, webhooks after two. The rotation 25 minutes in goes through; the one due 50
# minutes in is blocked by analytics, whose cursor stopped before the first one. (A
# rotation drops the ticks from before the previous one: with one rotation done the
# charts still have the whole hour.)
SETTINGS = {
    "orders": {"rotation_period": "25 minutes", "max_retries": "3"},
    "webhooks": {"max_retries": "2"},
}

ENDPOINTS = [
    ("https://hooks.acme-shop.example/pgque", "up"),
    ("https://crm.example.net/api/events", "up"),
    ("https://erp.example.org/inbound/orders", "flaky"),
    ("https://legacy.example.com/notify", "legacy"),
]
current_slice = 0  # read by the handlers: which endpoints are down depends on it


class DeliveryFailed(Exception):
    pass


class GatewayTimeout(Exception):
    pass


class CardDeclined(Exception):
    pass


def slice_volume(slice_index: int) -> dict[str, int]:
    """Events per queue in a slice: orders in waves, with a sale at the end of the hour."""
    wave = 1 + 0.5 * math.sin(slice_index / 7.0) + 0.2 * math.sin(slice_index / 1.7)
    sale = 0.8 if slice_index >= SLICES - 30 else 0.0
    orders = round(80 * (wave + sale))
    return {"orders": orders, "emails": round(orders * 0.7), "webhooks": 16,
            "invoices": 6 + slice_index % 4}


def send_round(engine: Engine, serial: Iterator[int], volume: dict[str, int]) -> None:
    with engine.begin() as connection:
        for _ in range(volume["orders"]):
            number = next(serial)
            Queue("orders").send_now(
                connection, {"order_id": number, "customer_id": 7000 + number * 31 % 500,
                             "total": f"{19.9 + number % 13 * 7.5:.2f}", "currency": "EUR"},
                type="order.created")
        for _ in range(volume["emails"]):
            number = next(serial)
            Queue("emails").send_now(
                connection, {"to": f"customer{number % 97}@example.com",
                             "template": "order-confirmation", "order_id": number},
                type="email.send")
        for _ in range(volume["webhooks"]):
            number = next(serial)
            url, _state = ENDPOINTS[number % len(ENDPOINTS)]
            Queue("webhooks").send_now(
                connection, {"url": url, "event": "order.created",
                             "body": {"order_id": number, "status": "paid"}},
                type="webhook.deliver")
        for _ in range(volume["invoices"]):
            number = next(serial)
            Queue("invoices").send_now(
                connection, {"invoice": f"INV-2026-{number:05d}", "order_id": number,
                             "lines": [{"sku": "TEA-OOLONG-250", "qty": 2},
                                       {"sku": "CUP-STONE", "qty": 1}]},
                type="invoice.render")


def deliver_webhook(message: Message) -> None:
    url = message.payload["url"]
    state = dict(ENDPOINTS)[url]
    if state == "legacy" and current_slice in LEGACY_DOWN:
        raise DeliveryFailed(f"POST {url}: 503 Service Unavailable")
    if state == "flaky" and message.retry_count == 0 and message.msg_id % 3 == 0:
        raise DeliveryFailed(f"POST {url}: timed out after 10 s")


def bill(message: Message) -> None:
    order_id = message.payload["order_id"]
    if order_id % 97 == 0:
        raise CardDeclined(f"order {order_id}: card declined (insufficient funds)")
    if order_id % 23 == 0 and message.retry_count == 0:
        raise GatewayTimeout(f"order {order_id}: payment gateway did not answer in 5 s")


def accept(message: Message) -> None:
    """A handler with nothing to do here: the demo only needs the acknowledgement."""


def consumers_of(engine: Engine) -> dict[str, Consumer]:
    made = {}
    for queue, names in QUEUES.items():
        for name in names:
            consumer = Consumer(engine, queue=queue, name=name, listen=False,
                                retry_after=SLICE_SECONDS)
            handler = {"webhooks/deliverer": deliver_webhook, "orders/billing": bill}.get(
                f"{queue}/{name}", accept)
            consumer.on("*")(handler)
            made[f"{queue}/{name}"] = consumer
    return made


def tick_and_consume(connection: Connection, consumers: dict[str, Consumer],
                     skip: set[str]) -> None:
    for queue in QUEUES:
        connection.execute(text("select pgque.force_next_tick(:q)"), {"q": queue})
        connection.execute(text("select pgque.ticker(:q)"), {"q": queue})
    for label, consumer in consumers.items():
        if label not in skip:
            while consumer.process_batch():
                pass


def maintain(connection: Connection) -> None:
    """What the library's Ticker does every 30 s: move due retries, maint(), step 2."""
    while connection.execute(text("select pgque.maint_retry_events()")).scalar():
        pass
    connection.execute(text("select pgque.maint()"))
    connection.execute(text("select pgque.maint_rotate_tables_step2()"))


# Every time the engine recorded, moved into the past (see the module's docstring).
AGE_STATEMENTS = [
    "update pgque.tick set tick_time = tick_time - cast(:shift as interval)",
    "update pgque.queue set queue_switch_time = queue_switch_time - cast(:shift as interval)",
    "update pgque.subscription set sub_active = sub_active - cast(:shift as interval)",
    "update pgque.retry_queue set ev_retry_after = ev_retry_after - cast(:shift as interval),"
    " ev_time = ev_time - cast(:shift as interval)",
    "update pgque.dead_letter set dl_time = dl_time - cast(:shift as interval),"
    " ev_time = ev_time - cast(:shift as interval)",
    "update pgque.event_template set ev_time = ev_time - cast(:shift as interval)",
]


def sleep_until_second_of_bucket(second: float) -> None:
    time.sleep((second - time.time()) % SLICE_SECONDS)


def age(connection: Connection, seconds: float) -> None:
    for statement in AGE_STATEMENTS:
        connection.execute(text(statement), {"shift": f"{seconds:.3f} seconds"})


def make_demo(engine: Engine) -> None:
    global current_slice
    with engine.begin() as connection:
        schema.install(connection)
        for queue, names in QUEUES.items():
            connection.execute(text("select pgque.create_queue(:q)"), {"q": queue})
            for setting, value in SETTINGS.get(queue, {}).items():
                connection.execute(text("select pgque.set_queue_config(:q, :s, :v)"),
                                   {"q": queue, "s": setting, "v": value})
            for name in names:
                Queue(queue).subscribe(connection, name)
    consumers = consumers_of(engine)
    serial = iter(range(10001, 10**6))
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as connection:
        for slice_index in range(SLICES):
            current_slice = slice_index
            began = time.monotonic()
            stopped = {"orders/analytics"} if slice_index >= ANALYTICS_STOPS_AT else set()
            volume = slice_volume(slice_index)
            for _ in range(ROUNDS_PER_SLICE):
                send_round(engine, serial,
                           {q: n // ROUNDS_PER_SLICE for q, n in volume.items()})
                tick_and_consume(connection, consumers, stopped)
            maintain(connection)
            # Chart buckets start at multiples of 30 s since the epoch. Each slice goes
            # 5 s into a bucket (its ticks all fall in it), and the present (below)
            # begins with a bucket of its own.
            lead = 0.0
            if slice_index == SLICES - 2:
                sleep_until_second_of_bucket(5)
            if slice_index == SLICES - 1:
                sleep_until_second_of_bucket(0)
                lead = 5.0
            # A slice took some real time too: it is aged that much less, so the slices
            # lie exactly 30 s apart.
            age(connection, max(0.0, SLICE_SECONDS - (time.monotonic() - began) - lead))
        # The present, in real time and not aged: the current rates are true ones.
        current_slice = SLICES
        volume = slice_volume(SLICES)
        for second in range(PRESENT_SECONDS):
            second_ends = time.monotonic() + 1
            send_round(engine, serial, {  # a slice's volume spread over its 30 seconds
                q: n * (second + 1) // SLICE_SECONDS - n * second // SLICE_SECONDS
                for q, n in volume.items()})
            tick_and_consume(connection, consumers, {"orders/analytics"})
            time.sleep(max(0.0, second_ends - time.monotonic()))
        maintain(connection)


def shoot(browser: Browser, url: str, ready: str, target: Path, max_height: int = 1400,
          prepare: Callable[[Browser], None] | None = None) -> None:
    """Open ``url``, wait for the CSS selector ``ready``, size the window to the page
    (at most ``max_height``) and save the viewport as ``target``."""
    browser.get(url)
    browser.wait_until(lambda: browser.find_all(ready), message=ready)
    if prepare is not None:
        prepare(browser)
    chrome = browser.execute("return window.outerHeight - window.innerHeight;")
    height = browser.execute("return document.documentElement.scrollHeight;")
    browser.set_window_size(1280, min(int(height) + int(chrome), max_height))
    browser.save_screenshot(target)
    print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="directory for the PNG files (default: docs/)")
    args = parser.parse_args(argv)
    reason = missing_binaries()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    # The webhook handler fails on purpose; its tracebacks are not news here.
    logging.getLogger("sqlalchemy_pgque").setLevel(logging.CRITICAL)
    args.out.mkdir(parents=True, exist_ok=True)
    with EmbeddedPostgres() as server:
        engine = create_engine(server.url)
        try:
            make_demo(engine)
            # No live refresh: a figure caught mid-highlight would smear the picture.
            app = create_app(engine, allow_writes=True, refresh_seconds=0)
            with served(app, lifespan="off") as base, Browser() as browser:
                shoot(browser, base + "/", "#queues tr[data-queue]",
                      args.out / "dashboard-overview.png")
                shoot(browser, base + "/queues/orders", "#consumers tr[data-consumer]",
                      args.out / "dashboard-queue.png")
                shoot(browser, base + "/dlq?since=25+minutes", "#dead-letters tr",
                      args.out / "dashboard-dlq.png", max_height=1000,
                      prepare=lambda page: page.find_all(
                          "#dead-letters input[type=checkbox]")[0].click())
        finally:
            engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
