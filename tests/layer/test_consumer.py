"""Consumer in-process: handlers, the per-batch transaction, wake-up and stop."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import Database
from consumer_support import HANDLED_TABLE, Running, handled_counts, open_batch, start
from engine_helpers import Conn, make_queue, move_retries, send, send_batches, tick, wait_until
from sqlalchemy import Engine, Integer, String, create_engine, event, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_pgque import Message, Queue
from sqlalchemy_pgque.consumer import AsyncConsumer, Consumer, _check_subscription
from sqlalchemy_pgque.errors import MessageNotInBatch


class Base(DeclarativeBase):
    pass


class Shipment(Base):
    __tablename__ = "shipment"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    msg_id: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String)


@pytest.fixture
def queue(conn: Conn, engine: Engine) -> Queue:
    make_queue(conn, "q", "c")
    conn.execute(HANDLED_TABLE)
    Base.metadata.create_all(engine)
    return Queue("q")


def record(msg: Message, session: Session) -> None:
    session.execute(
        text("INSERT INTO handled (msg_id, type, retry_count) VALUES (:id, :type, :retry)"),
        {"id": msg.msg_id, "type": msg.type, "retry": msg.retry_count},
    )


def dead_letters(conn: Conn) -> list[tuple[int, str]]:
    rows = conn.execute("SELECT ev_id, dl_reason FROM pgque.dead_letter ORDER BY ev_id")
    return [(int(ev_id), str(reason)) for ev_id, reason in rows]


def retry_rows(conn: Conn) -> list[int]:
    return [int(r[0]) for r in conn.execute("SELECT ev_id FROM pgque.retry_queue ORDER BY ev_id")]


def test_handlers_take_msg_or_msg_and_session(conn: Conn, engine: Engine, queue: Queue) -> None:
    consumer = Consumer(sessionmaker(engine), queue=queue, name="c")
    seen: list[tuple[int, Any]] = []

    @consumer.on("note")
    def note(msg: Message) -> None:
        seen.append((msg.msg_id, msg.payload))

    @consumer.on("write")
    def write(msg: Message, session: Session) -> None:
        record(msg, session)

    @consumer.on("tagged")
    def tagged(msg: Message, tag: str = "bound") -> None:  # a default is not the session
        seen.append((msg.msg_id, tag))

    noted = send(conn, "q", '{"a": 1}', type="note")
    written = [send(conn, "q", "{}", type="write") for _ in range(3)]
    tagged_id = send(conn, "q", "{}", type="tagged")
    tick(conn, "q")

    assert consumer.process_batch() == 5
    assert seen == [(noted, {"a": 1}), (tagged_id, "bound")]
    assert handled_counts(conn) == dict.fromkeys(written, 1)
    assert open_batch(conn, "q", "c") is None  # acked
    assert consumer.process_batch() == 0


def test_engine_is_accepted_and_catch_all_gets_other_types(
    conn: Conn, engine: Engine, queue: Queue
) -> None:
    consumer = Consumer(engine, queue="q", name="c")
    specific: list[int] = []
    caught: list[str] = []
    consumer.on("a")(lambda msg: specific.append(msg.msg_id))
    consumer.on("*")(lambda msg: caught.append(msg.type))

    a = send(conn, "q", "{}", type="a")
    send(conn, "q", "{}", type="b")
    send(conn, "q", "{}", type="c")
    tick(conn, "q")

    assert consumer.process_batch() == 3
    assert specific == [a]
    assert sorted(caught) == ["b", "c"]
    assert retry_rows(conn) == []


@pytest.mark.parametrize("policy", ["nack", "ack"])
def test_unknown_type_policy(conn: Conn, engine: Engine, queue: Queue, policy: str) -> None:
    consumer = Consumer(engine, queue="q", name="c", unknown_handler_policy=policy)  # type: ignore[arg-type]
    consumer.on("known")(lambda msg: None)
    send(conn, "q", "{}", type="known")
    unknown = send(conn, "q", "{}", type="unknown")
    tick(conn, "q")

    assert consumer.process_batch() == 2
    assert open_batch(conn, "q", "c") is None
    assert retry_rows(conn) == ([unknown] if policy == "nack" else [])


def test_raising_handler_rolls_back_its_writes_retries_then_dead_letters(
    conn: Conn, engine: Engine, queue: Queue
) -> None:
    conn.execute("SELECT pgque.set_queue_config('q', 'max_retries', '1')")
    consumer = Consumer(engine, queue="q", name="c", retry_after=0)
    attempts: list[tuple[int, int]] = []

    @consumer.on("job")
    def job(msg: Message, session: Session) -> None:
        record(msg, session)
        session.add(Shipment(msg_id=msg.msg_id, note="orm write"))
        session.flush()
        session.add(Shipment(msg_id=msg.msg_id, note="pending at raise"))
        attempts.append((msg.msg_id, msg.retry_count))
        if msg.payload["fail"]:
            raise ValueError(f"cannot ship {msg.msg_id}")

    good = send(conn, "q", '{"fail": false}', type="job")
    bad = send(conn, "q", '{"fail": true}', type="job")
    tick(conn, "q")

    assert consumer.process_batch() == 2
    assert handled_counts(conn) == {good: 1}
    shipments = conn.execute("SELECT msg_id, note FROM shipment ORDER BY id").fetchall()
    assert shipments == [(good, "orm write"), (good, "pending at raise")]
    assert retry_rows(conn) == [bad]
    assert open_batch(conn, "q", "c") is None

    assert move_retries(conn) == 1
    tick(conn, "q")
    assert consumer.process_batch() == 1
    assert attempts == [(good, 0), (bad, 0), (bad, 1)]
    assert handled_counts(conn) == {good: 1}
    assert retry_rows(conn) == []
    assert dead_letters(conn) == [(bad, f"ValueError('cannot ship {bad}')")]


class _NackFails(Queue):
    """A queue whose nack names a message outside the batch, so the engine refuses it."""

    def nack(self, bind: Any, msg: Message, **kwargs: Any) -> int:
        stray = Message(msg_id=-1, batch_id=msg.batch_id, type=msg.type, payload=msg.payload,
                        retry_count=msg.retry_count, created_at=msg.created_at)
        return super().nack(bind, stray, **kwargs)


def test_failed_nack_rolls_back_the_whole_batch(conn: Conn, engine: Engine, queue: Queue) -> None:
    consumer = Consumer(engine, queue=_NackFails("q"), name="c")

    @consumer.on("job")
    def job(msg: Message, session: Session) -> None:
        record(msg, session)
        if msg.payload["fail"]:
            raise ValueError("boom")

    ids = [send(conn, "q", '{"fail": false}', type="job"),
           send(conn, "q", '{"fail": true}', type="job")]
    tick(conn, "q")

    with pytest.raises(MessageNotInBatch):
        consumer.process_batch()
    assert handled_counts(conn) == {}
    assert retry_rows(conn) == []

    redelivered: list[int] = []
    replay = Consumer(engine, queue="q", name="c")
    replay.on("job")(lambda msg: redelivered.append(msg.msg_id))
    assert replay.process_batch() == 2
    assert redelivered == ids


def test_handler_kinds_are_checked_at_registration(engine: Engine) -> None:
    consumer = Consumer(engine, queue="q", name="c")

    async def coroutine(msg: Message) -> None:
        pass

    with pytest.raises(TypeError, match="AsyncConsumer"):
        consumer.on("x")(coroutine)
    with pytest.raises(TypeError, match=r"\(msg\)"):
        consumer.on("x")(lambda: None)
    consumer.on("x")(lambda msg: None)
    with pytest.raises(ValueError, match="already has a handler"):
        consumer.on("x")(lambda msg: None)
    with pytest.raises(ValueError, match="unknown_handler_policy"):
        Consumer(engine, queue="q", name="c", unknown_handler_policy="drop")  # type: ignore[arg-type]


def test_as_subconsumer_shares_handlers_and_settings_not_run_state(
    engine: Engine, db: Database
) -> None:
    from sqlalchemy_pgque.errors import InvalidName

    consumer = Consumer(engine, queue="q", name="g", subconsumer="w", dead_interval=30,
                        max_messages=50)
    consumer.on("*")(lambda msg: None)
    consumer.listening.set()
    twin = consumer.as_subconsumer("w-2")
    assert type(twin) is Consumer
    assert (twin.name, twin.subconsumer, twin.label) == ("g", "w-2", "q/g.w-2")
    assert (twin.dead_interval, twin.max_messages, twin.engine) == (30, 50, engine)
    assert consumer.subconsumer == "w"
    assert twin._handler_for("x") is consumer._handler_for("x") is not None
    assert consumer.listening.is_set() and not twin.listening.is_set()
    for name in ("w.2", ""):
        with pytest.raises(InvalidName):
            consumer.as_subconsumer(name)

    async_engine = create_async_engine(db.url)
    try:
        plain = AsyncConsumer(async_engine, queue="q", name="g")
        async_twin = plain.as_subconsumer("a")
        assert type(async_twin) is AsyncConsumer
        assert (plain.subconsumer, async_twin.label) == (None, "q/g.a")
    finally:
        asyncio.run(async_engine.dispose())


@pytest.fixture
def running() -> Iterator[Running]:
    started: Running = []
    yield started
    for consumer, thread in started:
        consumer.stop()
        thread.join(10)
        assert not thread.is_alive()


def test_tick_notification_wakes_the_consumer_long_before_its_poll_interval(
    conn: Conn, engine: Engine, queue: Queue, running: Running
) -> None:
    consumer = Consumer(engine, queue="q", name="c", poll_interval=30)
    consumer.on("*")(record)
    start(running, consumer)

    event_id = send(conn, "q")
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == {event_id: 1}, timeout=5, what="the handler")


def test_backlog_of_batches_drains_without_waiting(
    conn: Conn, engine: Engine, queue: Queue, running: Running
) -> None:
    ids = []
    tick(conn, "q")  # an empty window first: the next ones must still be found
    for _ in range(5):
        ids += [send(conn, "q") for _ in range(3)]
        tick(conn, "q")
    consumer = Consumer(engine, queue="q", name="c", poll_interval=30)
    consumer.on("*")(record)
    start(running, consumer)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=5,
               what="the whole backlog")


def test_stop_from_another_thread_returns_promptly(
    engine: Engine, queue: Queue, running: Running
) -> None:
    consumer = Consumer(engine, queue="q", name="c", poll_interval=60)
    consumer.on("*")(lambda msg: None)
    thread = start(running, consumer)
    stopped_at = time.monotonic()
    consumer.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 5
    assert not consumer.listening.is_set()


def test_stop_waits_for_the_batch_in_progress(
    conn: Conn, engine: Engine, queue: Queue, running: Running
) -> None:
    consumer = Consumer(engine, queue="q", name="c", poll_interval=60)
    entered, release = threading.Event(), threading.Event()

    @consumer.on("*")
    def slow(msg: Message, session: Session) -> None:
        record(msg, session)
        entered.set()
        assert release.wait(10)

    thread = start(running, consumer)
    ids = [send(conn, "q"), send(conn, "q")]
    tick(conn, "q")
    assert entered.wait(10)
    consumer.stop()
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert handled_counts(conn) == dict.fromkeys(ids, 1)
    assert open_batch(conn, "q", "c") is None


def test_run_reconnects_after_its_connections_are_terminated(
    conn: Conn, engine: Engine, queue: Queue, running: Running
) -> None:
    consumer = Consumer(engine, queue="q", name="c", poll_interval=30)
    consumer.on("*")(record)
    start(running, consumer)
    first = send(conn, "q")
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == {first: 1}, what="the first event")

    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    wait_until(lambda: not consumer.listening.is_set() or _listener_gone(conn),
               what="the consumer to notice")
    assert consumer.listening.wait(10)
    second = send(conn, "q")
    tick(conn, "q")
    wait_until(lambda: handled_counts(conn) == {first: 1, second: 1}, what="the second event")


def _listener_gone(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    ).fetchone()
    return row is not None and row[0] == 0


def test_check_reports_configuration_errors(conn: Conn, engine: Engine, queue: Queue) -> None:
    from sqlalchemy_pgque.errors import ConsumerNotSubscribed, QueueNotFound

    Consumer(engine, queue="q", name="c").check()
    with pytest.raises(QueueNotFound, match="nope"):
        Consumer(engine, queue="nope", name="c").check()
    with pytest.raises(ConsumerNotSubscribed, match="stranger"):
        Consumer(engine, queue="q", name="stranger").check()


def test_cooperative_settings_are_checked(conn: Conn, engine: Engine, queue: Queue) -> None:
    from sqlalchemy_pgque.errors import ConsumerModeConflict, ConsumerNotSubscribed, InvalidName

    with pytest.raises(ValueError, match="subconsumer= too"):
        Consumer(engine, queue="q", name="c", dead_interval=30)
    with pytest.raises(ValueError, match="dead_interval must be > 0"):
        Consumer(engine, queue="q", name="g", subconsumer="w", dead_interval=0)
    with pytest.raises(ValueError, match="not a duration"):
        Consumer(engine, queue="q", name="g", subconsumer="w", dead_interval="soon")
    with pytest.raises(ValueError, match="not a duration"):
        Consumer(engine, queue="q", name="c", retry_after="later")
    member = Consumer(engine, queue="q", name="g", subconsumer="w",
                      dead_interval="5 minutes", retry_after="30 s")
    assert (member.dead_interval, member.retry_after) == ("5 minutes", "30 s")
    for name, member in [("g", "w.1"), ("g.x", "w"), ("g", "")]:
        with pytest.raises(InvalidName):
            Consumer(engine, queue="q", name=name, subconsumer=member)
    with pytest.raises(ConsumerNotSubscribed, match="subscribe_subconsumer"):
        Consumer(engine, queue="q", name="g", subconsumer="w").check()
    with pytest.raises(ConsumerModeConflict, match=r"explicit conversion.*convert_normal=True"):
        Consumer(engine, queue="q", name="c", subconsumer="w").check()

    with Session(engine) as session, session.begin():
        queue.subscribe_subconsumer(session, "g", "w")
    member = Consumer(engine, queue="q", name="g", subconsumer="w2")
    member.check()
    # check() tried the registration and undid it.
    assert conn.execute("SELECT count(*) FROM pgque.get_consumer_info('q', 'g.w2')"
                        ).fetchone() == (0,)


def check_within(consumer: Consumer, seconds: float = 10) -> None:
    """``consumer.check()`` in a thread, which must return (without error) in time."""
    errors: list[BaseException] = []

    def run_check() -> None:
        try:
            consumer.check()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_check, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "check() is waiting for the consumer's rows"
    assert errors == []


def test_check_does_not_wait_for_a_consumer_in_use(
    conn: Conn, engine: Engine, queue: Queue, db: Database
) -> None:
    send(conn, "q")
    tick(conn, "q")
    with Session(engine) as session, session.begin():
        queue.subscribe_subconsumer(session, "g", "a")
    with psycopg.connect(db.dsn) as busy:  # batches being handled, not yet committed
        busy.execute("SELECT * FROM pgque.receive('q', 'c', 10)")
        busy.execute("SELECT * FROM pgque.receive_coop('q', 'g', 'a', 10)")
        busy.execute("SELECT pgque.touch_subconsumer('q', 'g', 'a')")
        check_within(Consumer(engine, queue="q", name="c"))
        check_within(Consumer(engine, queue="q", name="g", subconsumer="a"))
        busy.rollback()


def test_check_leaves_the_callers_transaction_and_works_without_one(
    engine: Engine, queue: Queue
) -> None:
    with engine.begin() as connection:
        _check_subscription(connection, "q", "c")
        _check_subscription(connection, "q", "c", None)
        assert connection.execute(text("SHOW lock_timeout")).scalar() == "0"
        assert connection.execute(text("SELECT 1")).scalar() == 1
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    Consumer(autocommit, queue="q", name="c").check()


def test_sigterm_stops_run_in_the_main_thread_and_restores_the_handler(
    conn: Conn, engine: Engine, queue: Queue
) -> None:
    consumer = Consumer(engine, queue="q", name="c", poll_interval=60)
    consumer.on("*")(record)
    event_id = send(conn, "q")
    tick(conn, "q")
    before = signal.getsignal(signal.SIGTERM)

    def terminate_once_handled() -> None:
        wait_until(lambda: handled_counts(conn) == {event_id: 1}, what="the event")
        assert consumer.listening.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_handled, daemon=True)
    killer.start()
    consumer.run()
    killer.join(10)
    assert signal.getsignal(signal.SIGTERM) is before
    assert open_batch(conn, "q", "c") is None


def test_cooperative_members_handle_each_event_once(
    conn: Conn, engine: Engine, queue: Queue, running: Running
) -> None:
    with Session(engine) as session, session.begin():
        queue.unsubscribe(session, "c")
        for member in ("a", "b"):
            queue.subscribe_subconsumer(session, "group", member)
    handled_by: dict[int, list[str]] = {}
    lock = threading.Lock()

    def member_handler(member: str) -> Any:
        def handle(msg: Message, session: Session) -> None:
            record(msg, session)
            with lock:
                handled_by.setdefault(msg.msg_id, []).append(member)
        return handle

    for member in ("a", "b"):
        consumer = Consumer(engine, queue="q", name="group", subconsumer=member,
                            poll_interval=30)
        consumer.on("*")(member_handler(member))
        start(running, consumer)
    ids = send_batches(conn, batches=20, size=5)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="every event once")
    assert all(len(members) == 1 for members in handled_by.values())


def test_listen_connection_from_a_url_of_another_driver(db: Database) -> None:
    from sqlalchemy_pgque._listen import conninfo_from_url

    url = db.url.set(drivername="postgresql+asyncpg").update_query_dict(
        {"prepared_statement_cache_size": "0", "application_name": "from_url"})
    dsn = conninfo_from_url(url)
    assert "prepared_statement_cache_size" not in dsn
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("SELECT current_database(), current_setting('application_name')")
        assert row.fetchone() == (db.name, "from_url")


def test_listen_connection_from_a_multi_host_url_of_another_driver(db: Database) -> None:
    """The first host is down, as an old primary after a failover: the libpq string
    made from SQLAlchemy's multi-host form names both hosts, and libpq moves on."""
    from sqlalchemy_pgque._listen import conninfo_from_url, url_from_conninfo

    params = psycopg.conninfo.conninfo_to_dict(db.dsn)
    port = str(params.get("port") or 5432)
    dead = "/nonexistent-pgque-primary"
    multi_host = psycopg.conninfo.make_conninfo(
        db.dsn, host=f"{dead},{params['host']}", port=f"{port},{port}")
    url = url_from_conninfo(multi_host).set(drivername="postgresql+asyncpg")
    assert url.query["host"][0] == f"{dead}:{port}"
    with psycopg.connect(conninfo_from_url(url), autocommit=True) as connection:
        assert connection.execute("SELECT current_database()").fetchone() == (db.name,)


@pytest.fixture
def group(engine: Engine, queue: Queue) -> Queue:
    """Queue ``q`` with the cooperative group ``group`` of members ``a`` and ``b``."""
    with Session(engine) as session, session.begin():
        queue.unsubscribe(session, "c")
        for member in ("a", "b"):
            queue.subscribe_subconsumer(session, "group", member)
    return queue


def member_idle_for(conn: Conn, member: str, seconds: float) -> bool:
    """Whether the member row's committed ``sub_active`` is older than ``seconds``."""
    row = conn.execute(
        "SELECT clock_timestamp() - s.sub_active > make_interval(secs => %s) "
        "FROM pgque.subscription s JOIN pgque.consumer c ON c.co_id = s.sub_consumer "
        "WHERE c.co_name = %s",
        (seconds, f"group.{member}"),
    ).fetchone()
    assert row is not None
    return bool(row[0])


def test_cooperative_members_hold_batches_at_the_same_time(
    conn: Conn, engine: Engine, group: Queue, running: Running
) -> None:
    # Each member's first handler call waits for the other's: it returns only if both
    # members hold a batch at once, which the allocation's lock on the group's row
    # prevents unless that allocation commits before the handlers run.
    both_hold_a_batch = threading.Barrier(2)
    waited: dict[str, bool] = {}
    lock = threading.Lock()

    def member_handler(member: str) -> Any:
        def handle(msg: Message, session: Session) -> None:
            with lock:
                first = member not in waited
                waited.setdefault(member, False)
            if first:
                both_hold_a_batch.wait(timeout=10)
                waited[member] = True
            record(msg, session)
        return handle

    ids = send_batches(conn, batches=10, size=3)
    for member in ("a", "b"):
        consumer = Consumer(engine, queue=group, name="group", subconsumer=member,
                            poll_interval=30)
        consumer.on("*")(member_handler(member))
        start(running, consumer)
    wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), what="every event once")
    assert waited == {"a": True, "b": True}
    assert not both_hold_a_batch.broken


def held_member(
    engine: Engine, group: Queue
) -> tuple[Consumer, threading.Event, threading.Event]:
    """Member ``a``, whose handler sets ``entered`` then waits for ``release``."""
    entered, release = threading.Event(), threading.Event()
    member = Consumer(engine, queue=group, name="group", subconsumer="a")

    @member.on("*")
    def slow(msg: Message, session: Session) -> None:
        entered.set()
        assert release.wait(10)
        record(msg, session)

    return member, entered, release


def test_cooperative_member_keeps_its_batch_while_handlers_run(
    conn: Conn, engine: Engine, group: Queue
) -> None:
    ids = send_batches(conn, batches=1, size=3)
    member_a, entered, release = held_member(engine, group)
    outcome: list[int] = []
    worker = threading.Thread(target=lambda: outcome.append(member_a.process_batch()))
    worker.start()
    try:
        assert entered.wait(10)
        # Past b's dead_interval a's batch looks stalled, yet a is still working on it.
        wait_until(lambda: member_idle_for(conn, "a", 0.2), what="a's row to age")
        with Session(engine) as session, session.begin():
            assert group.receive_coop(session, "group", "b", dead_interval=0.2) == []
    finally:
        release.set()
        worker.join(10)
    assert outcome == [3]
    assert handled_counts(conn) == dict.fromkeys(ids, 1)
    with Session(engine) as session, session.begin():
        assert group.receive_coop(session, "group", "b", dead_interval=0.2) == []


def test_members_wait_out_an_exhausted_pool(
    conn: Conn, db: Database, group: Queue, running: Running
) -> None:
    # One connection for two members: each waits for the other's batch, and a wait
    # past the pool's timeout is retried like a database error, not fatal.
    engine = create_engine(db.url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    try:
        threads = []
        for name in ("a", "b"):
            member = Consumer(engine, queue=group, name="group", subconsumer=name,
                              poll_interval=0.05)

            @member.on("*")
            def slow(msg: Message, session: Session) -> None:
                time.sleep(0.15)  # holds the only connection past the other's timeout
                record(msg, session)

            threads.append(start(running, member))
        ids = send_batches(conn, batches=6, size=2)
        wait_until(lambda: handled_counts(conn) == dict.fromkeys(ids, 1), timeout=20,
                   what="every event once")
        assert all(thread.is_alive() for thread in threads)
    finally:
        for consumer, thread in running:
            consumer.stop()
            thread.join(10)
        engine.dispose()


def test_two_consumers_with_one_member_name_take_turns(
    conn: Conn, engine: Engine, group: Queue
) -> None:
    ids = send_batches(conn, batches=1, size=3)
    first, entered, release = held_member(engine, group)
    second = Consumer(engine, queue=group, name="group", subconsumer="a")
    second.on("*")(record)
    outcomes: list[int] = []
    threads = [threading.Thread(target=lambda c=c: outcomes.append(c.process_batch()))
               for c in (first, second)]
    threads[0].start()
    try:
        assert entered.wait(10)
        # The second consumer's allocation waits for the member row, locked by the
        # first one's handling transaction (and meanwhile holds the group's row).
        threads[1].start()
        wait_until(lambda: waiting_for_a_lock(conn), what="the second consumer to wait")
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    assert sorted(outcomes) == [0, 3]
    assert handled_counts(conn) == dict.fromkeys(ids, 1)
    with Session(engine) as session, session.begin():
        assert group.receive_coop(session, "group", "a") == []


def paused_after_first_commit(
    engine: Engine,
) -> tuple[sessionmaker[Session], threading.Event, threading.Event]:
    """A session factory whose first commit (a member's allocation) sets ``committed``
    and then waits for ``resume``: the gap before the member locks its row."""
    factory = sessionmaker(engine)
    committed, resume = threading.Event(), threading.Event()

    @event.listens_for(factory, "after_commit")
    def pause_once(session: Session) -> None:
        if not committed.is_set():
            committed.set()
            assert resume.wait(10)

    return factory, committed, resume


def test_member_runs_no_handler_for_a_batch_taken_over_before_its_lock(
    conn: Conn, engine: Engine, group: Queue
) -> None:
    ids = send_batches(conn, batches=1, size=3)
    side_effects: list[tuple[str, int]] = []
    factory, allocated, resume = paused_after_first_commit(engine)
    member_a = Consumer(factory, queue=group, name="group", subconsumer="a")
    member_b = Consumer(engine, queue=group, name="group", subconsumer="b", dead_interval=0.2)

    @member_a.on("*")
    def a_handles(msg: Message) -> None:
        side_effects.append(("a", msg.msg_id))

    @member_b.on("*")
    def b_handles(msg: Message, session: Session) -> None:
        side_effects.append(("b", msg.msg_id))
        record(msg, session)

    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(member_a.process_batch()))
    thread.start()
    try:
        assert allocated.wait(10)
        wait_until(lambda: member_idle_for(conn, "a", 0.2), what="a's batch to look stalled")
        assert member_b.process_batch() == 3
    finally:
        resume.set()
        thread.join(10)
    assert outcome == [3]  # a received the batch, found it gone under its lock ...
    assert side_effects == [("b", i) for i in ids]  # ... and ran no handler for it
    assert handled_counts(conn) == dict.fromkeys(ids, 1)


def test_a_batch_allocated_after_waiting_for_the_group_row_is_fresh(
    conn: Conn, engine: Engine, group: Queue, db: Database
) -> None:
    send_batches(conn, batches=1, size=3)
    factory, allocated, resume = paused_after_first_commit(engine)
    member_a = Consumer(factory, queue=group, name="group", subconsumer="a")
    member_a.on("*")(record)
    with psycopg.connect(db.dsn) as holder:  # stands in for a busy group row
        holder.execute(
            "SELECT 1 FROM pgque.subscription s JOIN pgque.consumer c "
            "ON c.co_id = s.sub_consumer WHERE c.co_name = 'group' FOR UPDATE")
        thread = threading.Thread(target=member_a.process_batch)
        thread.start()
        wait_until(lambda: waiting_for_a_lock(conn), what="a to wait for the group row")
        time.sleep(0.5)  # the wait itself is under test: a's transaction grows old
    try:
        assert allocated.wait(10)
        with Session(engine) as session, session.begin():
            # a got its batch just now, however long it queued for the group's row.
            assert group.receive_coop(session, "group", "b", dead_interval=0.3) == []
    finally:
        resume.set()
        thread.join(10)


def waiting_for_a_lock(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    ).fetchone()
    return bool(row and row[0])


class _Crash(BaseException):
    """Stands in for the process dying in the middle of a batch."""


def test_cooperative_batch_survives_a_crash_for_its_member_or_a_peer(
    conn: Conn, engine: Engine, group: Queue
) -> None:
    first_ids = send_batches(conn, batches=1, size=3)
    crashes = iter([True])
    seen_by: dict[str, list[int]] = {"a": [], "b": []}

    def member(name: str) -> Consumer:
        consumer = Consumer(engine, queue=group, name="group", subconsumer=name,
                            dead_interval=0.2)

        @consumer.on("*")
        def handle(msg: Message, session: Session) -> None:
            record(msg, session)
            if next(crashes, False):
                raise _Crash
            seen_by[name].append(msg.msg_id)
        return consumer

    member_a, member_b = member("a"), member("b")
    with pytest.raises(_Crash):
        member_a.process_batch()
    assert handled_counts(conn) == {}
    # The allocation was committed: the window stays with a, which gets it again.
    assert member_a.process_batch() == 3
    assert seen_by["a"] == first_ids
    assert handled_counts(conn) == dict.fromkeys(first_ids, 1)

    second_ids = send_batches(conn, batches=1, size=2)
    crashes = iter([True])
    with pytest.raises(_Crash):
        member_a.process_batch()
    # a stays down; once its row is older than dead_interval b takes the window over.
    wait_until(lambda: member_idle_for(conn, "a", 0.2), what="a's row to age")
    assert member_b.process_batch() == 2
    assert seen_by["b"] == second_ids
    assert member_a.process_batch() == 0
    assert handled_counts(conn) == dict.fromkeys(first_ids + second_ids, 1)


def test_async_cooperative_members_hold_batches_at_the_same_time(
    conn: Conn, db: Database, group: Queue
) -> None:
    ids = send_batches(conn, batches=2, size=3)

    async def scenario() -> None:
        engine = create_async_engine(db.url)
        # asyncio.Barrier is Python 3.11+.
        holding: set[str] = set()
        both_hold_a_batch = asyncio.Event()
        try:
            def member(name: str) -> AsyncConsumer:
                consumer = AsyncConsumer(engine, queue=group, name="group", subconsumer=name)

                @consumer.on("*")
                async def handle(msg: Message, session: AsyncSession) -> None:
                    if name not in holding:
                        holding.add(name)
                        if len(holding) == 2:
                            both_hold_a_batch.set()
                        await asyncio.wait_for(both_hold_a_batch.wait(), 10)
                    await session.execute(
                        text("INSERT INTO handled (msg_id, type, retry_count) "
                             "VALUES (:id, :type, :retry)"),
                        {"id": msg.msg_id, "type": msg.type, "retry": msg.retry_count},
                    )
                return consumer

            handled = await asyncio.gather(member("a").process_batch(),
                                           member("b").process_batch())
            assert handled == [3, 3]
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    assert handled_counts(conn) == dict.fromkeys(ids, 1)
