"""Every statement the Python layer sends to the engine, and how it sends them.

The stop on a message's way where it turns into SQL: ``Queue.send`` records an event
(``queue.py``), the outbox (``_outbox.py``) emits it on flush or commit with
:data:`SEND` or :data:`SEND_BATCH` below, the engine's ``pgque.send`` stores it
(``sql/20_events.sql``), the ticker (``ticker.py``) ticks the queue with
:data:`TICK_QUEUE`, which closes the batch holding the event, and the consumer
(``consumer.py``) takes that batch with :data:`RECEIVE`, nacks failed messages with
:data:`NACK` and finishes it with :data:`ACK`. The engine's function names and
argument lists are a compatibility contract (PgQue 0.2), so the text here changes only
with the engine API.

Statements run through SQLAlchemy are ``text()`` constructs, built once (SQLAlchemy
caches their compiled form per dialect); those run on a driver connection (the
ticker's, the worker's) are plain strings; the ones composed at run time are small
builder functions. :func:`execute` runs one on a Connection and raises engine errors
as the exceptions of :mod:`sqlalchemy_pgque.errors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias

from psycopg import sql
from sqlalchemy import Connection, CursorResult, TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, scoped_session

from .errors import _translate

# The roles PgQue grants its functions to; an error naming one tells the user which
# role their database user lacks.
READER: Final = "pgque_reader"
WRITER: Final = "pgque_writer"
ADMIN: Final = "pgque_admin"

Bind: TypeAlias = Session | Connection | scoped_session[Any]
"""What :class:`~sqlalchemy_pgque.Queue`'s immediate calls run on: a Session (or
scoped_session), in its current transaction, or a Connection."""

#: NOTIFY channel of commit-woken ticking: every transaction that sends to a queue
#: notifies it with the queue name as payload, delivered when (and only if) it commits.
WAKE_CHANNEL: Final = "sqlalchemy_pgque_wake"

#: NOTIFY channel of delayed sends (``Queue.send(deliver_at=...)``), with the queue
#: name as payload: a ticker waiting for the next due time looks again.
DELAYED_WAKE_CHANNEL: Final = "sqlalchemy_pgque_delayed"


# -- running a statement -------------------------------------------------------------


def bind_connection(bind: Bind) -> Connection:
    """The Connection of ``bind``, in its current transaction."""
    if isinstance(bind, Connection):
        return bind
    if isinstance(bind, Session):
        return bind.connection()
    if isinstance(bind, scoped_session):
        current: Session = bind()
        return current.connection()
    raise TypeError(
        f"expected a Session or Connection, got {type(bind).__name__}; with an AsyncSession "
        f"use `await session.run_sync(lambda s: queue.method(s, ...))`"
    )


def execute(
    conn: Connection, stmt: TextClause, params: Mapping[str, object], role: str
) -> CursorResult[Any]:
    """Run ``stmt``; an engine error is raised as its :mod:`~sqlalchemy_pgque.errors`
    exception (a missing privilege naming ``role``), chained to SQLAlchemy's."""
    try:
        return conn.execute(stmt, params)
    except DBAPIError as exc:
        queue = params.get("queue")
        error = _translate(
            exc, required_role=role, queue=queue if isinstance(queue, str) else None
        )
        if error is None:
            raise
        raise error from exc


def scalar_int(result: CursorResult[Any]) -> int:
    """The one value of ``result`` as an int, NULL as 0."""
    value = result.scalar_one()
    return int(value) if value is not None else 0


# -- sending (queue.py, _outbox.py) --------------------------------------------------
# Payloads are JSON text cast to jsonb in SQL: that picks the jsonb overloads of
# send/send_batch and stores the canonical jsonb text, as pgque-py does. Many payloads
# travel as ONE JSON array text, split by the server: drivers dump a text[] of 1,000
# strings far slower (psycopg: ~15 ms of client CPU) than one string, and every payload
# is valid JSON already. The *_WAKE forms also NOTIFY WAKE_CHANNEL for Queue(wake=True).

_NOTIFY = f"pg_notify('{WAKE_CHANNEL}', :queue)"
_SEND_SQL = "SELECT pgque.send(:queue, :type, CAST(:payload AS jsonb))"
SEND: Final = text(_SEND_SQL)
SEND_WAKE: Final = text(f"{_SEND_SQL}, {_NOTIFY}")
_SEND_BATCH_SQL = (
    "SELECT pgque.send_batch(:queue, :type, ARRAY(SELECT p.value "
    "FROM jsonb_array_elements(CAST(:payloads AS jsonb)) WITH ORDINALITY AS p(value, n) "
    "ORDER BY p.n))"
)
SEND_BATCH: Final = text(_SEND_BATCH_SQL)
SEND_BATCH_WAKE: Final = text(f"{_SEND_BATCH_SQL}, {_NOTIFY}")
_INSERT_EVENT_SQL = (
    "SELECT pgque.insert_event(:queue, :type, CAST(CAST(:payload AS jsonb) AS text), "
    ":extra1, :extra2, :extra3, :extra4)"
)
INSERT_EVENT: Final = text(_INSERT_EVENT_SQL)
INSERT_EVENT_WAKE: Final = text(f"{_INSERT_EVENT_SQL}, {_NOTIFY}")
# Mixed queues, types or extras: one statement inserting every event in recorded order.
# Each element of :events is [queue, type, extra1, extra2, extra3, extra4, payload].
_INSERT_MIXED_SQL = (
    "SELECT pgque.insert_event(e.value ->> 0, e.value ->> 1, CAST(e.value -> 6 AS text), "
    "e.value ->> 2, e.value ->> 3, e.value ->> 4, e.value ->> 5){wake} "
    "FROM jsonb_array_elements(CAST(:events AS jsonb)) WITH ORDINALITY AS e(value, n) "
    "ORDER BY e.n"
)
INSERT_MIXED: Final = text(_INSERT_MIXED_SQL.format(wake=""))
INSERT_MIXED_WAKE: Final = text(
    _INSERT_MIXED_SQL.format(
        wake=f", (SELECT count(pg_notify('{WAKE_CHANNEL}', w)) "
        "FROM unnest(CAST(:wake AS text[])) AS w)"
    )
)


# Delayed and idempotent sends (the engine's PgQue 0.3 functions): one call per event.
# The due time of a ``delay`` is taken on the server, from the sending statement's
# start, so client clocks don't matter; ``due`` tells whether send_at inserted the
# event at once (its id is an event id) or parked it (a holding-row id). A parked one
# notifies DELAYED_WAKE_CHANNEL so a ticker waiting for the next due time sees it.
_DUE_AT = (
    "(SELECT coalesce(CAST(:deliver_at AS timestamptz), statement_timestamp() "
    "+ make_interval(secs => CAST(:delay AS double precision))) AS at) AS d"
)
_SEND_AT_SQL = (
    "SELECT pgque.send_at(:queue, :type, CAST(:payload AS jsonb), d.at{extras}), "
    "d.at <= now() AS due{wake} FROM " + _DUE_AT
)
_EXTRAS_ARGS = (
    ", CAST(:extra1 AS text), CAST(:extra2 AS text), CAST(:extra3 AS text), "
    "CAST(:extra4 AS text)"
)
# Without extras, PgQue 0.3's own send_at, which another 0.3 install has too; with
# them, our 8-argument form.
SEND_AT: Final = text(_SEND_AT_SQL.format(extras="", wake=""))
SEND_AT_EXTRAS: Final = text(_SEND_AT_SQL.format(extras=_EXTRAS_ARGS, wake=""))
_DELAYED_WAKE = (
    f", CASE WHEN d.at <= now() THEN pg_notify('{WAKE_CHANNEL}', :queue) "
    f"ELSE pg_notify('{DELAYED_WAKE_CHANNEL}', :queue) END"
)
SEND_AT_WAKE: Final = text(_SEND_AT_SQL.format(extras="", wake=_DELAYED_WAKE))
SEND_AT_EXTRAS_WAKE: Final = text(_SEND_AT_SQL.format(extras=_EXTRAS_ARGS, wake=_DELAYED_WAKE))
_SEND_IDEM_SQL = (
    "SELECT r.event_id, r.deduped{wake} FROM pgque.send_idem(:queue, :type, "
    "CAST(:payload AS jsonb), CAST(:key AS text), coalesce(make_interval(secs => "
    "CAST(:ttl AS double precision)), interval '1 hour'), CAST(:partition_key AS text)) AS r"
)
SEND_IDEM: Final = text(_SEND_IDEM_SQL.format(wake=""))
SEND_IDEM_WAKE: Final = text(_SEND_IDEM_SQL.format(wake=f", {_NOTIFY}"))


# -- receiving and subscriptions (queue.py, consumer.py) -----------------------------

RECEIVE: Final = text("SELECT * FROM pgque.receive(:queue, :consumer, :max_messages)")
RECEIVE_COOP: Final = text(
    "SELECT * FROM pgque.receive_coop(:queue, :consumer, :subconsumer, :max_messages, "
    "make_interval(secs => CAST(:dead_seconds AS double precision)))"
)
ACK: Final = text("SELECT pgque.ack(:batch_id)")
NACK: Final = text(
    "SELECT pgque.nack(:batch_id, ROW(CAST(:msg_id AS bigint), CAST(:batch_id AS bigint), "
    "CAST(:type AS text), CAST(:payload AS text), CAST(:retry_count AS integer), "
    "CAST(:created_at AS timestamptz), CAST(:extra1 AS text), CAST(:extra2 AS text), "
    "CAST(:extra3 AS text), CAST(:extra4 AS text))::pgque.message, "
    "make_interval(secs => CAST(:retry_seconds AS double precision)), CAST(:reason AS text))"
)
SUBSCRIBE: Final = text("SELECT pgque.subscribe(:queue, :consumer)")
UNSUBSCRIBE: Final = text("SELECT pgque.unsubscribe(:queue, :consumer)")
SUBSCRIBE_SUBCONSUMER: Final = text(
    "SELECT pgque.subscribe_subconsumer(:queue, :consumer, :subconsumer, "
    "CAST(:convert AS boolean))"
)
UNSUBSCRIBE_SUBCONSUMER: Final = text(
    "SELECT pgque.unsubscribe_subconsumer(:queue, :consumer, :subconsumer, "
    "CAST(:batch_handling AS integer))"
)
TOUCH_SUBCONSUMER: Final = text(
    "SELECT pgque.touch_subconsumer(:queue, :consumer, :subconsumer)"
)

QUEUE_EXISTS: Final = text("SELECT 1 FROM pgque.queue WHERE queue_name = :queue")
# One row while ``consumer`` (for a subconsumer, ``<consumer>.<subconsumer>``) is
# subscribed, else none.
CONSUMER_INFO: Final = text(
    "SELECT pending_events, current_batch FROM pgque.get_consumer_info(:queue, :consumer) "
    "WHERE consumer_name = :consumer"
)
NEXT_BATCH: Final = text("SELECT pgque.next_batch(:queue, :consumer)")
# nack's rule for dead-lettering (ENGINE.md §4.9): retries reached this.
MAX_RETRIES: Final = text(
    "SELECT coalesce(queue_max_retries, 5) FROM pgque.queue WHERE queue_name = :queue"
)
# Undone with the trial's SAVEPOINT, like everything else it does.
TRIAL_LOCK_TIMEOUT: Final = text("SELECT set_config('lock_timeout', '100ms', true)")
# Runs the checks of deferred constraints now, inside a handler's SAVEPOINT.
CHECK_DEFERRED_CONSTRAINTS: Final = text("SET CONSTRAINTS ALL IMMEDIATE")


# -- ticking and maintenance (queue.py, ticker.py) -----------------------------------
# Two forms of the tick calls: Queue.force_next_tick/ticker run on a Session or
# Connection and use text() with named parameters; the Ticker drives a raw autocommit
# psycopg connection (each call its own transaction, LISTEN on the same connection),
# so its statements are plain strings with psycopg's %s placeholders.

FORCE_NEXT_TICK: Final = text("SELECT pgque.force_next_tick(:queue)")
TICKER: Final = text("SELECT pgque.ticker(:queue)")
TICKER_ALL: Final = text("SELECT pgque.ticker()")

FORCE_TICK_QUEUE: Final = "SELECT pgque.force_next_tick(%s)"
TICK_QUEUE: Final = "SELECT pgque.ticker(%s)"
# Ours, not PgQue's: force_next_tick and ticker(queue) in one call and one transaction.
TICK_NOW: Final = "SELECT pgque.tick_now(%s)"
TICK_ALL: Final = "SELECT pgque.ticker()"
MAINT: Final = "SELECT pgque.maint()"
MAINT_RETRY_EVENTS: Final = "SELECT pgque.maint_retry_events()"
MAINT_ROTATE_STEP2: Final = "SELECT pgque.maint_rotate_tables_step2()"
# A page of queues (by id, after the given one) that tick themselves, each with whether
# its event sequence moved past its latest tick. Read straight from the PgQue 0.2 tables
# and sequences (all readable by PUBLIC): get_queue_info() computes a dozen figures per
# queue and holds a lock on every sequence at once (1.5 s over 10,000 queues, where a
# page of this costs about what a ticker step does).
QUEUES_WITH_NEW_EVENTS: Final = (
    "SELECT q.queue_id, q.queue_name,"
    " NOT q.queue_ticker_paused AND NOT q.queue_external_ticker AND coalesce("
    "  pg_sequence_last_value(to_regclass(q.queue_event_seq)) > latest.tick_event_seq, false)"
    " FROM (SELECT * FROM pgque.queue WHERE queue_id > %s ORDER BY queue_id LIMIT %s) q"
    " LEFT JOIN LATERAL (SELECT t.tick_event_seq FROM pgque.tick t"
    "  WHERE t.tick_queue = q.queue_id ORDER BY t.tick_id DESC LIMIT 1) latest ON true"
    " ORDER BY q.queue_id"
)
TICK_PERIOD_MS: Final = "SELECT tick_period_ms FROM pgque.config"
MAINT_DELIVER_DELAYED: Final = "SELECT pgque.maint_deliver_delayed()"
_SECONDS_TO_NEXT_DELAYED = "extract(epoch FROM pgque.next_delayed_due() - clock_timestamp())"
SECONDS_TO_NEXT_DELAYED: Final = f"SELECT {_SECONDS_TO_NEXT_DELAYED}"
TICK_ALL_AND_NEXT_DELAYED: Final = f"SELECT pgque.ticker(), {_SECONDS_TO_NEXT_DELAYED}"
# Ours: one step of a pass (queues after an id, a bounded number), each step its own
# transaction, so a pass over thousands of queues holds a bounded number of locks.
TICK_STEP: Final = "SELECT ticked, next_queue_id FROM pgque.ticker_step(%s, %s)"
TICK_STEP_AND_NEXT_DELAYED: Final = (
    f"SELECT s.ticked, s.next_queue_id, {_SECONDS_TO_NEXT_DELAYED} "
    "FROM pgque.ticker_step(%s, %s) s"
)
# Whether this user may call every function of a list of regprocedure signatures (our
# engine's, which another PgQue install lacks: false then).
MAY_EXECUTE_ALL: Final = (
    "SELECT coalesce(bool_and(coalesce(has_function_privilege(to_regprocedure(f), "
    "'EXECUTE'), false)), false) FROM unnest(CAST(%s AS text[])) AS f"
)
TRY_ADVISORY_LOCK: Final = "SELECT pg_try_advisory_lock(%s, %s)"
SET_APPLICATION_NAME: Final = "SELECT set_config('application_name', %s, false)"
SYNCHRONOUS_COMMIT_OFF: Final = "SELECT set_config('synchronous_commit', 'off', false)"
# Run with exec_driver_sql, hence psycopg's named placeholder.
HAS_EXECUTE_PRIVILEGE: Final = "SELECT has_function_privilege(%(function)s, 'EXECUTE')"


def listen(channel: str) -> sql.Composed:
    """``LISTEN "<channel>"`` with the channel quoted (queue names keep their case), for
    the LISTEN connections of the consumers and the ticker (``_listen.py``)."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel))


# -- operating (admin.py) ------------------------------------------------------------
# Only PgQue 0.2 functions and tables (ENGINE.md §2.1, §3.7), so that the status and
# dead-letter tools read any PgQue install. Every NULL filter is "no filter".

# A queue's rotation waits while the oldest cursor's tick may still see the table that
# would be truncated (the step1 rule of ENGINE.md §4.10): those consumers block it.
# The slowest consumer's pending events come from get_consumer_info() in the same
# statement. With :queue given, both functions are called for that queue alone (their
# one-argument forms): without it they compute every queue, 0.05-0.1 ms a queue.
_QUEUE_STATUS = """
SELECT q.queue_name, i.ev_new, i.ev_per_sec,
       extract(epoch FROM i.ticker_lag)::float8 AS ticker_lag,
       q.queue_cur_table, q.queue_ntables,
       extract(epoch FROM now() - q.queue_switch_time)::float8 AS since_rotation,
       extract(epoch FROM q.queue_rotation_period)::float8 AS rotation_period,
       q.queue_switch_step2 IS NULL AS mid_rotation,
       q.queue_ticker_paused, q.queue_external_ticker,
       (SELECT count(*) FROM pgque.dead_letter d WHERE d.dl_queue_id = q.queue_id) AS dlq,
       ARRAY(SELECT c.co_name
               FROM pgque.subscription s
               JOIN pgque.consumer c ON c.co_id = s.sub_consumer
               JOIN pgque.tick t ON t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
              WHERE s.sub_queue = q.queue_id AND s.sub_role <> 'coop_member'
                AND q.queue_switch_step2 IS NOT NULL
                AND q.queue_switch_time + q.queue_rotation_period < now()
                AND pg_snapshot_xmin(t.tick_snapshot)::text::bigint <= q.queue_switch_step2
              ORDER BY c.co_name) AS blocked_by,
       coalesce(slowest.pending_events, 0) AS slowest_pending
  FROM pgque.queue q
  JOIN pgque.get_queue_info({queue}) i ON i.queue_name = q.queue_name
  LEFT JOIN (SELECT ci.queue_name, max(greatest(ci.pending_events, 0)) AS pending_events
               FROM pgque.get_consumer_info({queue}) ci
              GROUP BY ci.queue_name) slowest ON slowest.queue_name = q.queue_name
 WHERE CAST(:queue AS text) IS NULL OR q.queue_name = :queue
 ORDER BY q.queue_name
"""
QUEUE_STATUS: Final = text(_QUEUE_STATUS.format(queue=""))
QUEUE_STATUS_ONE: Final = text(_QUEUE_STATUS.format(queue="CAST(:queue AS text)"))
# A cooperative consumer's subconsumers share its sub_id and are named
# "<consumer>.<subconsumer>"; the cooperative consumer's own row is the coop_main.
_CONSUMER_STATUS = """
SELECT i.queue_name, i.consumer_name, s.sub_role,
       (SELECT m.co_name FROM pgque.subscription ms
          JOIN pgque.consumer m ON m.co_id = ms.sub_consumer
         WHERE ms.sub_queue = s.sub_queue AND ms.sub_id = s.sub_id
           AND ms.sub_role = 'coop_main') AS main_name,
       extract(epoch FROM i.lag)::float8 AS lag,
       extract(epoch FROM i.last_seen)::float8 AS last_seen,
       i.pending_events, i.current_batch
  FROM pgque.get_consumer_info({queue}) i
  JOIN pgque.queue q ON q.queue_name = i.queue_name
  JOIN pgque.consumer c ON c.co_name = i.consumer_name
  JOIN pgque.subscription s ON s.sub_queue = q.queue_id AND s.sub_consumer = c.co_id
 WHERE CAST(:queue AS text) IS NULL OR i.queue_name = :queue
 ORDER BY i.queue_name, i.consumer_name
"""
CONSUMER_STATUS: Final = text(_CONSUMER_STATUS.format(queue=""))
CONSUMER_STATUS_ONE: Final = text(_CONSUMER_STATUS.format(queue="CAST(:queue AS text)"))
_DEAD_LETTER_FROM = """
  FROM pgque.dead_letter d
  JOIN pgque.queue q ON q.queue_id = d.dl_queue_id
  JOIN pgque.consumer c ON c.co_id = d.dl_consumer_id
"""
_DEAD_LETTER_COLUMNS = """
SELECT d.dl_id, q.queue_name, c.co_name, d.dl_time, d.dl_reason, d.ev_id, d.ev_time,
       d.ev_retry, d.ev_type, d.ev_data, d.ev_extra1, d.ev_extra2, d.ev_extra3, d.ev_extra4
""" + _DEAD_LETTER_FROM
# The dead-letter filters; :reason is a case-insensitive substring of dl_reason (strpos,
# not LIKE, so that % and _ in what an operator types match themselves).
_DEAD_LETTER_FILTERS = """
       (CAST(:queue AS text) IS NULL OR q.queue_name = :queue)
   AND (CAST(:consumer AS text) IS NULL OR c.co_name = :consumer)
   AND (CAST(:type AS text) IS NULL OR d.ev_type = :type)
   AND (CAST(:reason AS text) IS NULL
        OR strpos(lower(d.dl_reason), lower(CAST(:reason AS text))) > 0)
   AND (CAST(:since AS timestamptz) IS NULL OR d.dl_time >= :since)
   AND (CAST(:before AS timestamptz) IS NULL OR d.dl_time < :before)
   AND (CAST(:older_than AS interval) IS NULL
        OR d.dl_time < now() - CAST(:older_than AS interval))
   AND (CAST(:after_id AS bigint) IS NULL OR d.dl_id > :after_id)
   AND (CAST(:ids AS bigint[]) IS NULL OR d.dl_id = ANY(:ids))
"""
DEAD_LETTERS: Final = text(_DEAD_LETTER_COLUMNS + " WHERE" + _DEAD_LETTER_FILTERS + """
 ORDER BY d.dl_id
 LIMIT :limit
""")
DEAD_LETTER_COUNT: Final = text(
    "SELECT count(*)" + _DEAD_LETTER_FROM + " WHERE" + _DEAD_LETTER_FILTERS)
DEAD_LETTER: Final = text(_DEAD_LETTER_COLUMNS + " WHERE d.dl_id = :id")
DLQ_REPLAY: Final = text("SELECT pgque.dlq_replay(:id)")
DLQ_PURGE_QUEUE: Final = text("SELECT pgque.dlq_purge(:queue, CAST(:older_than AS interval))")
DLQ_DELETE: Final = text("DELETE FROM pgque.dead_letter WHERE dl_id = ANY(:ids)")
DLQ_DELETE_MATCHING: Final = text(
    "DELETE FROM pgque.dead_letter d USING pgque.queue q, pgque.consumer c"
    " WHERE q.queue_id = d.dl_queue_id AND c.co_id = d.dl_consumer_id AND"
    + _DEAD_LETTER_FILTERS)
QUEUE_NAMES: Final = text("SELECT queue_name FROM pgque.queue ORDER BY queue_name")

# Events per time bucket of every queue (or :queue), for the dashboard's sparklines: one
# statement whatever the number of queues. Each queue's ticks are read through the tick
# table's primary key (queue, tick id), in a LATERAL per queue: the plan stays linear in
# the ticks whether the :queue filter is known or not (the generic plan of a prepared
# statement, which psycopg makes of a statement run five times on one connection, joined
# every queue with every tick otherwise: two seconds with 1,000 queues). A tick closes in
# the events between the previous tick's event_seq and its own; the first tick of the
# window takes that previous tick from before the window, so the first bucket is as full
# as the others. Buckets are epoch-aligned (floor(epoch / size) * size) like PgQue's
# throughput(), so two calls agree.
#
# Unlike throughput(), the count leaves out the sequence values force_next_tick skips
# (2 * ticker_max_count + 1001 a forced tick, see 30_ticker.sql): they are the growth of
# tick_seq_skipped, subtracted, so a queue ticked at every commit shows its events, not
# thousands a commit. Where pgque._seq_events keeps a PgQue 0.2 quirk (a queue's very
# first event counts in no distance: the ticks before it record the unused sequence's
# start value as one skipped value), the plain difference here counts it.
# tick_seq_skipped exists in this project's engine only: on another PgQue 0.2 install
# the NATURAL LEFT JOIN finds no column in common and supplies 0 (that install's forced
# ticks then count as upstream counts them); here it joins on the column and, being
# LEFT, keeps every tick.
THROUGHPUT_HISTORY: Final = text("""
WITH ticks AS NOT MATERIALIZED (
    SELECT t.tick_queue, t.tick_id, t.tick_time, t.tick_event_seq, tick_seq_skipped
      FROM pgque.tick t
      NATURAL LEFT JOIN (SELECT CAST(0 AS bigint) AS tick_seq_skipped) AS fallback
), bounds AS MATERIALIZED (
    SELECT CAST(floor(extract(epoch FROM now()) / :bucket_seconds) AS bigint)
           * :bucket_seconds AS last_bucket,
           CAST(extract(epoch FROM now()) AS float8) AS now_epoch
)
SELECT q.queue_name, b.last_bucket, b.now_epoch, h.buckets, h.events
  FROM pgque.queue q
 CROSS JOIN bounds b
  LEFT JOIN LATERAL (
       SELECT array_agg(per_bucket.bucket ORDER BY per_bucket.bucket) AS buckets,
              array_agg(per_bucket.events ORDER BY per_bucket.bucket) AS events
         FROM (
              SELECT CAST(floor(extract(epoch FROM d.tick_time) / :bucket_seconds) AS bigint)
                     * :bucket_seconds AS bucket,
                     sum(greatest(d.distance - d.skipped, 0)) AS events
                FROM (
                     SELECT w.tick_time,
                            w.tick_event_seq - coalesce(w.prev_seq, p.tick_event_seq)
                                AS distance,
                            w.tick_seq_skipped - coalesce(w.prev_skipped, p.tick_seq_skipped)
                                AS skipped
                       FROM (
                            SELECT k.tick_id, k.tick_time, k.tick_event_seq,
                                   k.tick_seq_skipped,
                                   lag(k.tick_event_seq) OVER w AS prev_seq,
                                   lag(k.tick_seq_skipped) OVER w AS prev_skipped
                              FROM ticks k
                             WHERE k.tick_queue = q.queue_id
                               AND k.tick_time >= to_timestamp(
                                       b.last_bucket - (:buckets - 1) * :bucket_seconds)
                            WINDOW w AS (ORDER BY k.tick_id)) w
                       LEFT JOIN LATERAL (
                            SELECT k.tick_event_seq, k.tick_seq_skipped FROM ticks k
                             WHERE w.prev_seq IS NULL AND k.tick_queue = q.queue_id
                               AND k.tick_id < w.tick_id
                             ORDER BY k.tick_id DESC LIMIT 1) p ON true) d
               GROUP BY bucket) per_bucket) h ON true
 WHERE CAST(:queue AS text) IS NULL OR q.queue_name = :queue
 ORDER BY q.queue_name
""")
# Dead letters per queue since a moment (admin.dlq_growth): a range of the (queue, time)
# index per queue, so a DLQ of millions of old entries costs no more than an empty one.
DLQ_GROWTH: Final = text("""
SELECT q.queue_name, recent.dead_letters
  FROM pgque.queue q
 CROSS JOIN LATERAL (
       SELECT count(*) AS dead_letters FROM pgque.dead_letter d
        WHERE d.dl_queue_id = q.queue_id
          AND d.dl_time >= now() - CAST(:period AS interval)) recent
 WHERE recent.dead_letters > 0
""")
# The queue error_history() reads: its id, its event tables' parent, the clock, and the
# xmin of the last tick before the window (:buckets buckets ending with the current
# one): an event a tick of the window closed in was not visible to that tick, so its
# transaction id is at least that xmin. Found walking back from the newest tick: as many
# index entries as the window has ticks.
QUEUE_EVENT_TABLE: Final = text("""
WITH bounds AS MATERIALIZED (
    SELECT CAST(floor(extract(epoch FROM now()) / :bucket_seconds) AS bigint)
           * :bucket_seconds AS last_bucket
)
SELECT q.queue_id, q.queue_data_pfx, b.last_bucket,
       (SELECT CAST(pg_snapshot_xmin(t.tick_snapshot) AS text) FROM pgque.tick t
         WHERE t.tick_queue = q.queue_id
           AND t.tick_time < to_timestamp(b.last_bucket - (:buckets - 1) * :bucket_seconds)
         ORDER BY t.tick_id DESC LIMIT 1) AS since_xid
  FROM pgque.queue q CROSS JOIN bounds b
 WHERE q.queue_name = :queue
""")


def error_history(event_table: str) -> TextClause:
    """Dead letters and retries of one queue per time bucket (admin.error_history);
    ``event_table`` is the queue's event table parent (``queue_data_pfx``), quoted.

    Dead letters by ``dl_time`` (indexed with the queue id). A retry is counted when it
    comes back: the retry mover (maint_retry_events) re-inserts a nacked event into the
    queue's event tables with its retry count (ev_retry >= 1) and the mover's own
    transaction id, and the event is counted at the first tick whose snapshot xmax lies
    past that id, i.e. the tick that closed it into a batch (within a tick: a mover still
    running at that tick shows one tick early). :since_xid (QUEUE_EVENT_TABLE) bounds
    the event tables' ev_txid from below, so that where the window is a small part of
    what they hold, their ev_txid index reads only the window's events (without it: a
    scan of every event the queue retains, 70 ns an event).
    """
    return text(f"""
WITH ticks AS (
    SELECT tick_time, pg_snapshot_xmax(tick_snapshot) AS upto,
           lag(pg_snapshot_xmax(tick_snapshot)) OVER (ORDER BY tick_id) AS since
      FROM pgque.tick
     WHERE tick_queue = :queue_id
)
SELECT 'dead_letters' AS kind,
       CAST(floor(extract(epoch FROM d.dl_time) / :bucket_seconds) AS bigint)
       * :bucket_seconds AS bucket,
       count(*) AS events
  FROM pgque.dead_letter d
 WHERE d.dl_queue_id = :queue_id AND d.dl_time >= to_timestamp(:first_bucket)
 GROUP BY bucket
UNION ALL
SELECT 'retries',
       CAST(floor(extract(epoch FROM t.tick_time) / :bucket_seconds) AS bigint)
       * :bucket_seconds,
       count(*)
  FROM ticks t
  JOIN {event_table} e ON e.ev_txid >= t.since AND e.ev_txid < t.upto
 WHERE t.tick_time >= to_timestamp(:first_bucket) AND e.ev_retry >= 1
   AND e.ev_txid >= coalesce(CAST(:since_xid AS xid8), CAST('0' AS xid8))
 GROUP BY 2
""")


# -- worker connections (worker.py, _pooler.py) --------------------------------------
# The server process running the statement: through a connection pooler, not the one
# the connection announced at login (_pooler.py).
BACKEND_PID: Final = "SELECT pg_backend_pid()"
# Run on the DB-API cursor of each new pooled connection (_set_server_keepalives).
SERVER_KEEPALIVES: Final = (
    "SELECT set_config('tcp_keepalives_idle', '10', false), "
    "set_config('tcp_keepalives_interval', '5', false), "
    "set_config('tcp_keepalives_count', '3', false), "
    "set_config('tcp_user_timeout', '30000', false)"
)


# -- metrics (metrics.py) ------------------------------------------------------------
# The figures read at scrape time give up on a database slow to answer instead of
# holding a connection and a snapshot; local to the reading transaction.
FIGURES_STATEMENT_TIMEOUT: Final = text(
    "SELECT set_config('statement_timeout', :timeout, true)"
)

# -- the testing toolkit (testing.py) ------------------------------------------------
# Reads and shortcuts for tests only, never for a running application. They use PgQue
# 0.2's tables (ENGINE.md §2.1), so they work on any install.

# Every event a queue's tables hold, whatever the ticks and batches: a queue's event
# tables are its data prefix table and the tables inheriting it, all children of
# pgque.event_template. Retry copies (ev_owner set) are the
# same events again, not new sends. The columns are those of a pgque.message row, with
# batch id 0: the events are in no batch.
SENT_EVENTS: Final = text("""
WITH parent AS (
    SELECT to_regclass(q.queue_data_pfx) AS oid FROM pgque.queue q WHERE q.queue_name = :queue
)
SELECT e.ev_id, CAST(0 AS bigint), e.ev_type, e.ev_data, coalesce(e.ev_retry, 0), e.ev_time,
       e.ev_extra1, e.ev_extra2, e.ev_extra3, e.ev_extra4
  FROM pgque.event_template e
 WHERE e.ev_owner IS NULL
   AND (e.tableoid IN (SELECT oid FROM parent)
        OR e.tableoid IN (SELECT i.inhrelid FROM pg_catalog.pg_inherits i
                            JOIN parent p ON i.inhparent = p.oid))
 ORDER BY e.ev_id
""")
# What tells one queue of one database from another: a recreated database or queue
# gets a new oid or id, so events it reuses ids for are not taken for ones seen before.
SENT_EVENTS_KEY: Final = text(
    "SELECT d.oid AS datoid, q.queue_id FROM pgque.queue q, pg_catalog.pg_database d "
    "WHERE q.queue_name = :queue AND d.datname = current_database()"
)
# The retries a consumer's nacks parked, made due now rather than after retry_after.
RETRIES_DUE_NOW: Final = text("""
UPDATE pgque.retry_queue r SET ev_retry_after = now()
  FROM pgque.subscription s
  JOIN pgque.queue q ON q.queue_id = s.sub_queue
  JOIN pgque.consumer c ON c.co_id = s.sub_consumer
 WHERE q.queue_name = :queue AND c.co_name = :consumer
   AND r.ev_owner = s.sub_id AND r.ev_queue = s.sub_queue AND r.ev_retry_after > now()
""")
MOVE_RETRIES: Final = text("SELECT pgque.maint_retry_events()")
CAN_MOVE_DELAYED: Final = text(
    "SELECT to_regprocedure('pgque.maint_deliver_delayed()') IS NOT NULL, "
    "coalesce(has_function_privilege(to_regprocedure('pgque.maint_deliver_delayed()'), "
    "'EXECUTE'), false)"
)
# Through the view, whose UPDATE holds each event anew (sql/84_delayed.sql).
DELAYED_DUE_NOW: Final = text(
    "UPDATE pgque.delayed_events SET de_deliver_at = now() "
    "WHERE de_queue_name = :queue AND de_deliver_at > now()"
)
MOVE_DELAYED: Final = text("SELECT pgque.maint_deliver_delayed()")


# -- installing the engine (schema.py) -----------------------------------------------

TAKE_OVER: Final = text("SET LOCAL pgque.take_over = 'on'")
UNINSTALL: Final = text("SELECT pgque.uninstall()")
HAS_VERSION_FUNCTION: Final = text(
    "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE n.nspname = 'pgque' AND p.proname = 'version'"
)
VERSION: Final = text("SELECT pgque.version()")
ENGINE_SCHEMA_COMMENT: Final = text(
    "SELECT obj_description(oid, 'pg_namespace') "
    "FROM pg_namespace WHERE nspname = 'pgque'"
)


# -- migrations (alembic_ops) --------------------------------------------------------
# A migration's statements are finished SQL text with the values quoted in, so that
# `alembic upgrade --sql` prints what the online path runs.


def quote_literal(value: str | int | bool | None) -> str:
    """``value`` as a PostgreSQL literal, whatever ``standard_conforming_strings`` says."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    quoted = value.replace("'", "''")
    if "\\" in quoted:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted PostgreSQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal_call(function: str, *args: str | int | bool | None) -> str:
    """``SELECT pgque.<function>(<args as literals>)``, positional arguments only."""
    return f"SELECT pgque.{function}({', '.join(quote_literal(a) for a in args)})"


def unsubscribe_if_normal(queue: str, consumer: str) -> str:
    """Unsubscribe ``consumer`` only if it is a normal consumer now: PgQue turns a
    cooperative consumer back into one when its last subconsumer goes."""
    return (
        "SELECT pgque.unsubscribe(q.queue_name, c.co_name)"
        " FROM pgque.subscription s"
        " JOIN pgque.queue q ON q.queue_id = s.sub_queue"
        " JOIN pgque.consumer c ON c.co_id = s.sub_consumer"
        f" WHERE q.queue_name = {quote_literal(queue)}"
        f" AND c.co_name = {quote_literal(consumer)}"
        " AND s.sub_role = 'normal'"
    )


def grant_roles(pgque_roles: Iterable[str], role: str) -> str:
    return f"GRANT {', '.join(pgque_roles)} TO {quote_identifier(role)}"


def revoke_roles(pgque_roles: Iterable[str], role: str) -> str:
    return f"REVOKE {', '.join(pgque_roles)} FROM {quote_identifier(role)}"


def queue_settings(parameters: Mapping[str, tuple[str, str | None]]) -> TextClause:
    """Each queue's name, then for each parameter (name: (column type, default)) its
    value as text and whether it differs from the default."""
    columns = ", ".join(
        f"queue_{param}::text, queue_{param} IS DISTINCT FROM "
        f"CAST({quote_literal(default)} AS {type_})"
        for param, (type_, default) in parameters.items()
    )
    return text(f"SELECT queue_name, {columns} FROM pgque.queue")


def same_queue_setting(param: str, type_: str) -> TextClause:
    """Whether queue ``:queue``'s ``param`` equals ``:value`` read as ``type_``."""
    return text(
        f"SELECT queue_{param} IS NOT DISTINCT FROM CAST(:value AS {type_})"
        " FROM pgque.queue WHERE queue_name = :queue"
    )


SUBSCRIPTIONS: Final = text(
    "SELECT q.queue_name, c.co_name, s.sub_role, s.sub_id"
    " FROM pgque.subscription s"
    " JOIN pgque.queue q ON q.queue_id = s.sub_queue"
    " JOIN pgque.consumer c ON c.co_id = s.sub_consumer"
    " ORDER BY q.queue_name, c.co_name"
)
