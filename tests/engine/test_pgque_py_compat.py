"""The published pgque-py client (import name ``pgque``) as a real client of our engine.

Spec §6.1 lists the SQL that pgque-py issues; these tests drive that SQL through the
unmodified client, so a signature, column order, overload or error text that drifts
from the PgQue 0.2 contract shows up here as the client would see it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pgque
import psycopg
import pytest
from conftest import Database
from engine_helpers import Conn, wait_until
from pgque import (
    Consumer,
    Event,
    Message,
    PgqueBatchNotFound,
    PgqueClient,
    PgqueConsumerNotFound,
    PgqueError,
    PgqueQueueNotFound,
)

QUEUE = "compat_q"
CONSUMER = "compat_c"


@pytest.fixture
def client(db: Database) -> Iterator[PgqueClient]:
    """A pgque-py client on an autocommit connection: every call is its own transaction."""
    with pgque.connect(db.dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def queue(conn: Conn) -> str:
    """A queue whose ticker only ticks when forced, so batch boundaries are exact."""
    conn.execute("select pgque.create_queue(%s)", (QUEUE,))
    conn.execute("select pgque.set_queue_config(%s, 'ticker_max_lag', '1 hour')", (QUEUE,))
    conn.execute("select pgque.set_queue_config(%s, 'ticker_idle_period', '1 hour')", (QUEUE,))
    conn.execute("select pgque.set_queue_config(%s, 'ticker_max_count', '1000000')", (QUEUE,))
    return QUEUE


def client_tick(client: PgqueClient, queue: str) -> int:
    """Close the current batch window the way a pgque-py user does: force, then tick."""
    client.force_next_tick(queue)
    tick_id = client.ticker(queue)
    assert tick_id is not None, "ticker() after force_next_tick() must insert a tick"
    return int(tick_id)


def test_send_dict_str_none_list_and_event_payloads(client: PgqueClient, queue: str) -> None:
    assert client.subscribe(queue, CONSUMER) == 1
    sent = [
        (client.send(queue, {"order_id": 7, "note": "ä"}), "default", {"order_id": 7, "note": "ä"}),
        (client.send(queue, '"hello"'), "default", "hello"),
        (client.send(queue, '{"k": [1, 2]}'), "default", {"k": [1, 2]}),
        (client.send(queue, None), "default", None),
        (client.send(queue, [1, "two"]), "default", [1, "two"]),
        (client.send(queue, {"n": 1}, type="order.created"), "order.created", {"n": 1}),
        (client.send(queue, '42', type="answer"), "answer", 42),
        (client.send(queue, Event(payload={"e": True}, type="from.event")), "from.event",
         {"e": True}),
    ]
    ids = [event_id for event_id, _, _ in sent]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    client_tick(client, queue)
    messages = client.receive(queue, CONSUMER, 100)

    assert [m.msg_id for m in messages] == ids
    assert len({m.batch_id for m in messages}) == 1
    for message, (_, event_type, payload) in zip(messages, sent, strict=True):
        assert isinstance(message, Message)
        assert message.type == event_type
        assert isinstance(message.payload, str), "pgque.message.payload is text"
        assert json.loads(message.payload) == payload
        assert message.retry_count is None
        assert isinstance(message.created_at, datetime)
        assert message.created_at.tzinfo is not None
        assert (message.extra1, message.extra2, message.extra3, message.extra4) == (None,) * 4
    # Canonical jsonb text, as the spec's send(text, jsonb) stores payload::text.
    assert messages[0].payload == '{"note": "ä", "order_id": 7}'
    assert messages[3].payload == "null"
    assert client.ack(messages[0].batch_id) == 1


def test_send_in_an_open_transaction_is_delivered_only_after_commit(db: Database) -> None:
    with pgque.connect(db.dsn) as producer, pgque.connect(db.dsn, autocommit=True) as other:
        other.conn.execute("select pgque.create_queue(%s)", (QUEUE,))
        other.subscribe(QUEUE, CONSUMER)
        event_id = producer.send(QUEUE, {"x": 1})
        client_tick(other, QUEUE)
        assert other.receive(QUEUE, CONSUMER) == []
        producer.conn.commit()
        client_tick(other, QUEUE)
        assert [m.msg_id for m in other.receive(QUEUE, CONSUMER)] == [event_id]


def test_send_batch_returns_ids_in_input_order(client: PgqueClient, queue: str) -> None:
    client.subscribe(queue, CONSUMER)
    payloads: list[Any] = [{"i": i} for i in range(20)]
    payloads[5] = None
    payloads[6] = '"text"'
    payloads[7] = [1, 2]
    ids = client.send_batch(queue, "bulk.item", payloads)

    assert len(ids) == len(payloads)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    client_tick(client, queue)
    by_id = {m.msg_id: m for m in client.receive(queue, CONSUMER, 1000)}
    assert set(by_id) == set(ids)
    for event_id, payload in zip(ids, payloads, strict=True):
        message = by_id[event_id]
        assert message.type == "bulk.item"
        expected = json.loads(payload) if isinstance(payload, str) else payload
        assert json.loads(message.payload) == expected
    assert by_id[ids[5]].payload == "null", "pgque-py sends None as JSON null"


def test_send_batch_of_nothing_returns_no_ids(client: PgqueClient, queue: str) -> None:
    assert client.send_batch(queue, "t", []) == []


def test_subscribe_and_unsubscribe_report_whether_anything_changed(
    client: PgqueClient, queue: str
) -> None:
    before = client.send(queue, {"before": True})
    client_tick(client, queue)  # a subscription starts at the latest tick: `before` is behind it
    assert client.subscribe(queue, CONSUMER) == 1
    assert client.subscribe(queue, CONSUMER) == 0
    after = client.send(queue, {"after": True})
    client_tick(client, queue)
    received = [m.msg_id for m in client.receive(queue, CONSUMER)]
    assert received == [after], f"a new subscriber must not see event {before} sent earlier"

    assert client.unsubscribe(queue, CONSUMER) == 1
    assert client.unsubscribe(queue, CONSUMER) == 0
    with pytest.raises(PgqueConsumerNotFound, match="Not subscriber to queue"):
        client.receive(queue, CONSUMER)


def test_receive_and_ack_advance_the_cursor(client: PgqueClient, queue: str) -> None:
    client.subscribe(queue, CONSUMER)
    first = client.send(queue, {"n": 1})
    client_tick(client, queue)
    batch = client.receive(queue, CONSUMER)
    assert [m.msg_id for m in batch] == [first]

    second = client.send(queue, {"n": 2})
    client_tick(client, queue)
    assert client.ack(batch[0].batch_id) == 1
    assert client.ack(batch[0].batch_id) == 0, "a finished batch acks as 0, never raises"
    next_batch = client.receive(queue, CONSUMER)
    assert [m.msg_id for m in next_batch] == [second]
    assert next_batch[0].batch_id != batch[0].batch_id
    assert client.ack(next_batch[0].batch_id) == 1
    assert client.receive(queue, CONSUMER) == []


def test_unacked_batch_is_redelivered_whole(client: PgqueClient, queue: str) -> None:
    client.subscribe(queue, CONSUMER)
    ids = client.send_batch(queue, "t", [{"i": i} for i in range(5)])
    client_tick(client, queue)
    first = client.receive(queue, CONSUMER, 2)
    assert [m.msg_id for m in first] == ids[:2]
    again = client.receive(queue, CONSUMER, 100)
    assert [m.msg_id for m in again] == ids
    assert {m.batch_id for m in again} == {first[0].batch_id}


def test_ack_of_unknown_batch_is_tolerated_with_a_warning(client: PgqueClient) -> None:
    notices: list[str] = []
    client.conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
    assert client.ack(0) == 0
    assert client.ack(987654321) == 0
    assert notices == [
        "finish_batch: batch 0 not found",
        "finish_batch: batch 987654321 not found",
    ]


def test_nack_parks_the_message_for_retry_with_the_clients_interval(
    client: PgqueClient, queue: str
) -> None:
    client.subscribe(queue, CONSUMER)
    later_id, soon_id, other_id = client.send_batch(
        queue, "job", [{"name": "later"}, {"name": "soon"}, {"name": "ok"}])
    client_tick(client, queue)
    batch = client.receive(queue, CONSUMER)
    by_id = {m.msg_id: m for m in batch}
    batch_id = batch[0].batch_id

    client.nack(batch_id, by_id[later_id], retry_after=120)
    client.nack(batch_id, by_id[soon_id], retry_after=0.25, reason="flaky")
    assert client.ack(batch_id) == 1

    parked = client.conn.execute(
        "select ev_id, ev_retry, ev_type, ev_data, "
        "       extract(epoch from ev_retry_after - now()) "
        "from pgque.retry_queue order by ev_id").fetchall()
    assert [(r[0], r[1], r[2]) for r in parked] == [(later_id, 1, "job"), (soon_id, 1, "job")]
    assert json.loads(parked[0][3]) == {"name": "later"}
    assert 110 < float(parked[0][4]) <= 120
    assert float(parked[1][4]) <= 1

    moved = wait_until(
        lambda: client.conn.execute("select pgque.maint_retry_events()").fetchone()[0],
        timeout=10, what="the 0.25 s retry to fall due")
    assert moved == 1
    client_tick(client, queue)
    redelivered = client.receive(queue, CONSUMER)
    assert [(m.msg_id, m.retry_count) for m in redelivered] == [(soon_id, 1)]
    assert json.loads(redelivered[0].payload) == {"name": "soon"}
    assert other_id not in {m.msg_id for m in redelivered}
    assert client.ack(redelivered[0].batch_id) == 1


def test_nack_past_max_retries_dead_letters_with_the_reason(
    client: PgqueClient, queue: str
) -> None:
    # pgque-py's own tests set the retry budget this way.
    client.conn.execute("update pgque.queue set queue_max_retries = 0 where queue_name = %s",
                        (queue,))
    client.subscribe(queue, CONSUMER)
    event_id = client.send(queue, {"poison": True}, type="bad")
    client_tick(client, queue)
    (message,) = client.receive(queue, CONSUMER)
    client.nack(message.batch_id, message, retry_after=1.5, reason="cannot parse")
    assert client.ack(message.batch_id) == 1

    dead = client.conn.execute(
        "select ev_id, dl_reason, ev_type, ev_data from pgque.dead_letter").fetchall()
    assert dead == [(event_id, "cannot parse", "bad", message.payload)]
    assert client.conn.execute("select count(*) from pgque.retry_queue").fetchone() == (0,)


def test_nack_ignores_every_field_but_msg_id(client: PgqueClient, queue: str) -> None:
    client.subscribe(queue, CONSUMER)
    event_id = client.send(queue, {"real": 1}, type="real.type")
    client_tick(client, queue)
    (message,) = client.receive(queue, CONSUMER)
    forged = Message(msg_id=message.msg_id, batch_id=-1, type="forged", payload={"fake": 2},
                     retry_count=99, created_at=datetime(2000, 1, 1).astimezone(),
                     extra1="x")
    client.nack(message.batch_id, forged, retry_after=60)
    assert client.conn.execute(
        "select ev_id, ev_retry, ev_type, ev_data, ev_extra1 from pgque.retry_queue"
    ).fetchall() == [(event_id, 1, "real.type", message.payload, None)]


def test_error_mapping_of_the_client(client: PgqueClient, queue: str) -> None:
    with pytest.raises(PgqueQueueNotFound, match="queue not found: no_such_q"):
        client.send("no_such_q", {"a": 1})
    with pytest.raises(PgqueQueueNotFound, match="queue not found: no_such_q"):
        client.send("no_such_q", {"a": 1}, type="t")
    with pytest.raises(PgqueQueueNotFound, match="queue not found: no_such_q"):
        client.send_batch("no_such_q", "t", [{"a": 1}])
    with pytest.raises(PgqueQueueNotFound, match="queue not found: no_such_q"):
        client.force_next_tick("no_such_q")
    with pytest.raises(PgqueConsumerNotFound, match=f"Not subscriber to queue: {queue}/ghost"):
        client.receive(queue, "ghost")
    with pytest.raises(PgqueBatchNotFound, match="batch not found: 424242"):
        client.nack(424242, Message(1, 424242, "t", "{}", None, datetime.now().astimezone()))

    client.subscribe(queue, CONSUMER)
    client.send(queue, {"a": 1})
    client_tick(client, queue)
    (message,) = client.receive(queue, CONSUMER)
    stranger = Message(message.msg_id + 1000, message.batch_id, "t", "{}", None,
                       message.created_at)
    with pytest.raises(PgqueError) as excinfo:
        client.nack(message.batch_id, stranger)
    assert type(excinfo.value) is PgqueError
    assert f"msg_id {stranger.msg_id} not found in batch {message.batch_id}" in str(excinfo.value)


def test_force_next_tick_and_ticker(client: PgqueClient, queue: str) -> None:
    # create_queue inserted the first tick; the fresh queue ticks again on the next call.
    last = client.force_next_tick(queue)
    assert last == 1
    assert client.force_tick(queue) == 1, "force_tick is an alias of force_next_tick"
    assert client.ticker(queue) == 2
    assert client.ticker(queue) is None, "nothing pending: no tick within ticker_max_lag"
    assert client.force_next_tick(queue) == 2
    assert client.ticker(queue) == 3


def test_ticker_all_counts_the_queues_that_ticked(client: PgqueClient, conn: Conn) -> None:
    for name in ("all_a", "all_b"):
        conn.execute("select pgque.create_queue(%s)", (name,))
    assert client.ticker_all() == 2, "fresh queues tick on the first call"
    for name in ("all_a", "all_b"):
        conn.execute("select pgque.set_queue_config(%s, 'ticker_max_lag', '1 hour')", (name,))
        conn.execute("select pgque.set_queue_config(%s, 'ticker_idle_period', '1 hour')",
                     (name,))
    assert client.ticker_all() == 0
    client.force_next_tick("all_b")
    assert client.ticker_all() == 1


def test_consumer_processes_every_event_once_end_to_end(db: Database, conn: Conn) -> None:
    # Mixed case: the notify channel "pgque_<queue>" keeps the name verbatim.
    queue = "Compat_Orders"
    conn.execute("select pgque.create_queue(%s)", (queue,))
    conn.execute("select pgque.set_queue_config(%s, 'ticker_max_lag', '100 milliseconds')",
                 (queue,))
    conn.execute("select pgque.subscribe(%s, %s)", (queue, CONSUMER))

    handled: dict[str, list[int]] = {"order.created": [], "*": []}
    retries: list[tuple[int, int | None]] = []
    flaky_first_seen: set[int] = set()
    lock = threading.Lock()
    flaky_id: list[int] = []

    app_name = "pgque_py_compat_consumer"
    # A poll interval far beyond the test deadline: the consumer only wakes in time
    # if the tick's NOTIFY on "pgque_<queue>" reaches its LISTEN.
    consumer = Consumer(f"{db.dsn} application_name={app_name}", queue=queue, name=CONSUMER,
                        poll_interval=3600, retry_after=0)

    @consumer.on("order.created")
    def on_created(msg: Message) -> None:
        with lock:
            handled["order.created"].append(msg.msg_id)

    @consumer.on("*")
    def on_anything(msg: Message) -> None:
        with lock:
            if flaky_id and msg.msg_id == flaky_id[0] and msg.msg_id not in flaky_first_seen:
                flaky_first_seen.add(msg.msg_id)
                raise RuntimeError("transient failure, retry me")
            if msg.retry_count is not None:
                retries.append((msg.msg_id, msg.retry_count))
            handled["*"].append(msg.msg_id)

    failures: list[BaseException] = []

    def run_consumer() -> None:
        try:
            consumer.start()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run_consumer, name="pgque-py-consumer", daemon=True)
    thread.start()

    def consumer_is_waiting() -> bool:
        # After LISTEN and the first (empty) receive transaction the consumer waits.
        row = conn.execute(
            "select state, query from pg_stat_activity where application_name = %s",
            (app_name,)).fetchone()
        return row is not None and row[0] == "idle" and row[1].strip().upper() == "COMMIT"

    ticker_stop = threading.Event()

    def run_ticker() -> None:
        try:
            with psycopg.connect(db.dsn, autocommit=True) as tconn:
                while not ticker_stop.wait(0.05):
                    tconn.execute("select pgque.maint_retry_events()")
                    tconn.execute("select pgque.ticker()")
        except BaseException as exc:
            failures.append(exc)

    ticker = threading.Thread(target=run_ticker, name="pgque-ticker", daemon=True)
    try:
        wait_until(consumer_is_waiting, timeout=20, what="the consumer to LISTEN and poll once")
        assert not failures
        created: list[int] = []
        others: list[int] = []
        with pgque.connect(db.dsn) as producer:
            for round_no in range(10):
                created += producer.send_batch(
                    queue, "order.created", [{"round": round_no, "i": i} for i in range(20)])
                for i in range(10):
                    others.append(producer.send(queue, {"round": round_no, "i": i},
                                                type=f"other.{i % 3}"))
                producer.conn.commit()
        flaky_id.append(others[3])
        ticker.start()

        def all_handled() -> bool:
            with lock:
                return (len(handled["order.created"]) >= len(created)
                        and len(handled["*"]) >= len(others))

        wait_until(all_handled, timeout=30, what="the consumer to handle every event")
        assert not failures
    finally:
        consumer.stop()
        ticker_stop.set()
        thread.join(timeout=10)
        if ticker.ident is not None:
            ticker.join(timeout=10)
    assert not thread.is_alive(), "Consumer.stop() must end start() within a few seconds"
    assert not failures, failures

    assert sorted(handled["order.created"]) == created
    assert sorted(handled["*"]) == sorted(others), "every other-typed event handled once"
    assert retries == [(others[3], 1)]
    assert conn.execute(
        "select sub_batch from pgque.subscription").fetchall() == [(None,)], \
        "the consumer acked its last batch before stopping"
