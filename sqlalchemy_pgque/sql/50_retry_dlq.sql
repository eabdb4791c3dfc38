-- sqlalchemy-pgque engine: retries, nack and the dead-letter queue.
--
-- A nacked event is parked in retry_queue under its subscription's sub_id. The mover
-- (maint_retry_events) later re-inserts it into the current event table with its
-- original id and time, owned by that sub_id, so only the owning subscription (or
-- cooperative group) sees the copy. An event whose retry budget is spent goes to
-- dead_letter instead, from where an operator can replay it to every subscriber.

-- One event of an open batch, read through the batch query of get_batch_events, or a
-- row of NULLs if the batch does not hold it. ev_owner is left NULL: callers park or
-- bury the event under the batch's own subscription anyway.
CREATE OR REPLACE FUNCTION pgque._batch_event(i_batch_id bigint, i_event_id bigint)
RETURNS pgque.event_template
LANGUAGE plpgsql
STABLE
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    ev pgque.event_template;
BEGIN
    EXECUTE 'SELECT ev_id, ev_time, ev_txid::text::xid8, NULL::integer, ev_retry, ev_type,'
            '       ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4'
            '  FROM (' || pgque.batch_event_sql(i_batch_id) || ') AS e WHERE ev_id = $1'
        INTO ev USING i_event_id;
    RETURN ev;
END
$$;

-- Park a copy of one batch event for its subscription (the group's sub_id for a
-- cooperative member): 1, or 0 if that event is parked already. The copy gets a new
-- ev_txid only when the mover re-inserts it.
CREATE OR REPLACE FUNCTION pgque._park_event(
    i_queue_id integer, i_sub_id integer, i_retry_after timestamptz,
    i_event pgque.event_template)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    parked integer;
BEGIN
    INSERT INTO pgque.retry_queue (ev_retry_after, ev_queue, ev_id, ev_time, ev_txid,
                                   ev_owner, ev_retry, ev_type, ev_data,
                                   ev_extra1, ev_extra2, ev_extra3, ev_extra4)
    VALUES (i_retry_after, i_queue_id, i_event.ev_id, i_event.ev_time, NULL,
            i_sub_id, coalesce(i_event.ev_retry, 0) + 1, i_event.ev_type, i_event.ev_data,
            i_event.ev_extra1, i_event.ev_extra2, i_event.ev_extra3, i_event.ev_extra4)
    ON CONFLICT (ev_owner, ev_id) DO NOTHING;
    GET DIAGNOSTICS parked = ROW_COUNT;
    RETURN parked;
END
$$;

-- Park one event of an open batch for redelivery at x_retry_time.
CREATE OR REPLACE FUNCTION pgque.event_retry(
    x_batch_id bigint, x_event_id bigint, x_retry_time timestamptz)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
    ev pgque.event_template%ROWTYPE;
BEGIN
    SELECT sub_queue, sub_id INTO sub
      FROM pgque.subscription WHERE sub_batch = x_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch not found: %', x_batch_id USING ERRCODE = 'PQ003';
    END IF;
    ev := pgque._batch_event(x_batch_id, x_event_id);
    IF ev.ev_id IS NULL THEN
        RAISE EXCEPTION 'event not found: % in batch %', x_event_id, x_batch_id
            USING ERRCODE = 'PQ004';
    END IF;
    RETURN pgque._park_event(sub.sub_queue, sub.sub_id, x_retry_time, ev);
END
$$;

CREATE OR REPLACE FUNCTION pgque.event_retry(
    x_batch_id bigint, x_event_id bigint, x_retry_seconds integer)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.event_retry(x_batch_id, x_event_id,
                             now() + x_retry_seconds * interval '1 second');
$$;

-- Park every event of the batch not parked yet; the batch itself stays open.
CREATE OR REPLACE FUNCTION pgque.batch_retry(i_batch_id bigint, i_retry_seconds integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
    parked integer;
BEGIN
    SELECT sub_queue, sub_id INTO sub
      FROM pgque.subscription WHERE sub_batch = i_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch_retry: batch % not found', i_batch_id USING ERRCODE = 'PQ003';
    END IF;
    INSERT INTO pgque.retry_queue (ev_retry_after, ev_queue, ev_id, ev_time, ev_txid,
                                   ev_owner, ev_retry, ev_type, ev_data,
                                   ev_extra1, ev_extra2, ev_extra3, ev_extra4)
    SELECT now() + i_retry_seconds * interval '1 second', sub.sub_queue, b.ev_id, b.ev_time,
           NULL, sub.sub_id, coalesce(b.ev_retry, 0) + 1, b.ev_type, b.ev_data,
           b.ev_extra1, b.ev_extra2, b.ev_extra3, b.ev_extra4
      FROM pgque.get_batch_events(i_batch_id) AS b
    ON CONFLICT (ev_owner, ev_id) DO NOTHING;
    GET DIAGNOSTICS parked = ROW_COUNT;
    RETURN parked;
END
$$;

-- An arbitrary retry row for a subscribed consumer (tooling, migrations).
CREATE OR REPLACE FUNCTION pgque.event_retry_raw(
    x_queue text, x_consumer text, x_retry_after timestamptz, x_ev_id bigint,
    x_ev_time timestamptz, x_ev_retry integer, x_ev_type text, x_ev_data text,
    x_ev_extra1 text, x_ev_extra2 text, x_ev_extra3 text, x_ev_extra4 text)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
    new_id bigint;
BEGIN
    SELECT s.sub_queue, s.sub_id, q.queue_event_seq INTO sub
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
      JOIN pgque.consumer c ON c.co_id = s.sub_consumer
     WHERE q.queue_name = x_queue AND c.co_name = x_consumer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer not registered: %/%', x_queue, x_consumer USING ERRCODE = 'PQ002';
    END IF;
    new_id := coalesce(x_ev_id, nextval(pgque.quote_fqname(sub.queue_event_seq)::regclass));
    INSERT INTO pgque.retry_queue (ev_retry_after, ev_queue, ev_id, ev_time, ev_txid,
                                   ev_owner, ev_retry, ev_type, ev_data,
                                   ev_extra1, ev_extra2, ev_extra3, ev_extra4)
    VALUES (x_retry_after, sub.sub_queue, new_id, coalesce(x_ev_time, now()), NULL,
            sub.sub_id, x_ev_retry, x_ev_type, x_ev_data,
            x_ev_extra1, x_ev_extra2, x_ev_extra3, x_ev_extra4);
    RETURN new_id;
END
$$;

-- The retry mover. The SHARE UPDATE EXCLUSIVE lock conflicts with itself only, so two
-- movers take turns while nack keeps inserting. At most 10 rows per call, due first.
CREATE OR REPLACE FUNCTION pgque.maint_retry_events()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    r record;
    moved integer := 0;
BEGIN
    LOCK TABLE pgque.retry_queue IN SHARE UPDATE EXCLUSIVE MODE;
    FOR r IN
        SELECT rq.*, q.queue_name
          FROM pgque.retry_queue rq
          JOIN pgque.queue q ON q.queue_id = rq.ev_queue
         WHERE rq.ev_retry_after <= current_timestamp
         ORDER BY rq.ev_retry_after, rq.ev_owner, rq.ev_id
         LIMIT 10
    LOOP
        PERFORM pgque.insert_event_raw(r.queue_name, r.ev_id, r.ev_time, r.ev_owner,
                                       r.ev_retry, r.ev_type, r.ev_data,
                                       r.ev_extra1, r.ev_extra2, r.ev_extra3, r.ev_extra4);
        DELETE FROM pgque.retry_queue WHERE ev_owner = r.ev_owner AND ev_id = r.ev_id;
        moved := moved + 1;
    END LOOP;
    RETURN moved;
END
$$;

-- Record a dead event for the batch's queue and consumer. Members of a cooperative
-- group die under the group's main consumer, so the DLQ has one row per group.
CREATE OR REPLACE FUNCTION pgque.event_dead(
    i_batch_id bigint, i_event_id bigint, i_reason text, i_ev_time timestamptz,
    i_ev_txid xid8, i_ev_retry integer, i_ev_type text, i_ev_data text,
    i_ev_extra1 text DEFAULT NULL, i_ev_extra2 text DEFAULT NULL,
    i_ev_extra3 text DEFAULT NULL, i_ev_extra4 text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
    consumer_id integer;
BEGIN
    SELECT sub_queue, sub_consumer, sub_id, sub_role INTO sub
      FROM pgque.subscription WHERE sub_batch = i_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch not found: %', i_batch_id USING ERRCODE = 'PQ003';
    END IF;
    consumer_id := sub.sub_consumer;
    IF sub.sub_role = 'coop_member' THEN
        SELECT sub_consumer INTO consumer_id
          FROM pgque.subscription
         WHERE sub_queue = sub.sub_queue AND sub_id = sub.sub_id AND sub_role = 'coop_main';
        IF NOT FOUND THEN
            consumer_id := sub.sub_consumer;
        END IF;
    END IF;
    INSERT INTO pgque.dead_letter (dl_queue_id, dl_consumer_id, dl_reason, ev_id, ev_time,
                                   ev_txid, ev_retry, ev_type, ev_data,
                                   ev_extra1, ev_extra2, ev_extra3, ev_extra4)
    VALUES (sub.sub_queue, consumer_id, i_reason, i_event_id, i_ev_time,
            i_ev_txid, i_ev_retry, i_ev_type, i_ev_data,
            i_ev_extra1, i_ev_extra2, i_ev_extra3, i_ev_extra4)
    ON CONFLICT (dl_queue_id, dl_consumer_id, ev_id) DO NOTHING;
    RETURN 1;
END
$$;

-- Negative acknowledgement of one message of an open batch. Only msg_id is taken from
-- the caller's message: the event is re-read from the batch, so a client cannot forge
-- payload or retry count. The batch stays open; the caller still acks it.
CREATE OR REPLACE FUNCTION pgque.nack(
    i_batch_id bigint, i_msg pgque.message,
    i_retry_after interval DEFAULT '60 seconds', i_reason text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
    ev pgque.event_template%ROWTYPE;
    msg_id bigint := (i_msg).msg_id;
BEGIN
    SELECT s.sub_queue, s.sub_id, coalesce(q.queue_max_retries, 5) AS retry_budget
      INTO sub
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
     WHERE s.sub_batch = i_batch_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'batch not found: %', i_batch_id USING ERRCODE = 'PQ003';
    END IF;
    IF msg_id IS NOT NULL THEN
        ev := pgque._batch_event(i_batch_id, msg_id);
    END IF;
    IF ev.ev_id IS NULL THEN
        RAISE EXCEPTION 'msg_id % not found in batch %', msg_id, i_batch_id USING ERRCODE = 'PQ004';
    END IF;
    IF coalesce(ev.ev_retry, 0) >= sub.retry_budget THEN
        PERFORM pgque.event_dead(i_batch_id, ev.ev_id,
                                 coalesce(i_reason, 'max retries exceeded'),
                                 ev.ev_time, ev.ev_txid, ev.ev_retry, ev.ev_type, ev.ev_data,
                                 ev.ev_extra1, ev.ev_extra2, ev.ev_extra3, ev.ev_extra4);
    ELSE
        -- The event is in hand: parking it directly spares event_retry's second read of
        -- the batch. A NULL delay means the default one, not "never".
        PERFORM pgque._park_event(
            sub.sub_queue, sub.sub_id,
            now() + round(extract(epoch FROM coalesce(i_retry_after, interval '60 seconds')))::integer
                    * interval '1 second',
            ev);
    END IF;
    RETURN 1;
END
$$;

CREATE OR REPLACE FUNCTION pgque.dlq_inspect(i_queue_name text, i_limit_count integer DEFAULT 100)
RETURNS SETOF pgque.dead_letter
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT d.*
      FROM pgque.dead_letter d
      JOIN pgque.queue q ON q.queue_id = d.dl_queue_id
     WHERE q.queue_name = i_queue_name
     ORDER BY d.dl_time DESC, d.dl_id DESC
     LIMIT i_limit_count;
$$;

-- Send a dead event again as a brand-new event (new id and time, no owner, retry count
-- reset), so every subscriber of the queue receives it. The row lock makes concurrent
-- replays of one entry replay it once: the loser finds the row gone.
CREATE OR REPLACE FUNCTION pgque.dlq_replay(i_dead_letter_id bigint)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    dl record;
    new_id bigint;
BEGIN
    SELECT d.ev_type, d.ev_data, d.ev_extra1, d.ev_extra2, d.ev_extra3, d.ev_extra4,
           q.queue_name
      INTO dl
      FROM pgque.dead_letter d
      JOIN pgque.queue q ON q.queue_id = d.dl_queue_id
     WHERE d.dl_id = i_dead_letter_id
       FOR UPDATE OF d;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dead letter entry not found: %', i_dead_letter_id USING ERRCODE = 'PQ006';
    END IF;
    new_id := pgque.insert_event(dl.queue_name, dl.ev_type, dl.ev_data,
                                 dl.ev_extra1, dl.ev_extra2, dl.ev_extra3, dl.ev_extra4);
    DELETE FROM pgque.dead_letter WHERE dl_id = i_dead_letter_id;
    RETURN new_id;
END
$$;

-- Replay every entry of a queue, each in its own subtransaction so one failure does not
-- undo the others. Entries locked by a concurrent replay are skipped, not waited for.
CREATE OR REPLACE FUNCTION pgque.dlq_replay_all(
    i_queue_name text, OUT replayed bigint, OUT failed bigint, OUT first_error text)
RETURNS record
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    entry_id bigint;
    dl record;
    message text;
BEGIN
    replayed := 0;
    failed := 0;
    FOR entry_id IN
        SELECT d.dl_id
          FROM pgque.dead_letter d
          JOIN pgque.queue q ON q.queue_id = d.dl_queue_id
         WHERE q.queue_name = i_queue_name
         ORDER BY d.dl_id
    LOOP
        BEGIN
            SELECT ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4 INTO dl
              FROM pgque.dead_letter
             WHERE dl_id = entry_id
               FOR UPDATE SKIP LOCKED;
            IF FOUND THEN
                PERFORM pgque.insert_event(i_queue_name, dl.ev_type, dl.ev_data,
                                           dl.ev_extra1, dl.ev_extra2, dl.ev_extra3,
                                           dl.ev_extra4);
                DELETE FROM pgque.dead_letter WHERE dl_id = entry_id;
                replayed := replayed + 1;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS message = MESSAGE_TEXT;
            failed := failed + 1;
            RAISE WARNING 'dlq_replay_all: dl_id=% failed: %', entry_id, message;
            IF first_error IS NULL THEN
                first_error := format('dl_id=%s: %s', entry_id, message);
            END IF;
        END;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgque.dlq_purge(
    i_queue_name text, i_older_than interval DEFAULT '30 days')
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    purged integer;
BEGIN
    DELETE FROM pgque.dead_letter d
     USING pgque.queue q
     WHERE q.queue_id = d.dl_queue_id
       AND q.queue_name = i_queue_name
       AND d.dl_time < now() - i_older_than;
    GET DIAGNOSTICS purged = ROW_COUNT;
    RETURN purged;
END
$$;

GRANT EXECUTE ON FUNCTION
    pgque.event_retry(bigint, bigint, timestamptz),
    pgque.event_retry(bigint, bigint, integer),
    pgque.nack(bigint, pgque.message, interval, text),
    pgque.dlq_inspect(text, integer)
TO pgque_reader;

GRANT EXECUTE ON FUNCTION
    pgque.dlq_replay(bigint),
    pgque.dlq_replay_all(text)
TO pgque_writer;
