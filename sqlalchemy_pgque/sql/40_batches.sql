-- sqlalchemy-pgque engine: batches.
--
-- A batch of a subscription is the set of events whose inserting transaction is
-- visible in the end tick's snapshot but not in the cursor tick's snapshot.

-- Choose the end tick of a window starting at a given tick. Without thresholds it is
-- simply the next tick. With min_count / min_interval the newest tick must satisfy one
-- of them; if the backlog is more than twice a threshold, the oldest satisfying tick
-- is used instead so one window does not swallow the whole backlog.
CREATE OR REPLACE FUNCTION pgque.find_tick_helper(
    i_queue_id integer, i_prev_tick_id bigint, i_prev_tick_time timestamptz,
    i_prev_tick_seq bigint, i_min_count bigint, i_min_interval interval,
    OUT next_tick_id bigint, OUT next_tick_time timestamptz, OUT next_tick_seq bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    newest record;
    cnt bigint;
    gap interval;
BEGIN
    IF i_min_count IS NULL AND i_min_interval IS NULL THEN
        SELECT t.tick_id, t.tick_time, t.tick_event_seq
          INTO next_tick_id, next_tick_time, next_tick_seq
          FROM pgque.tick t
         WHERE t.tick_queue = i_queue_id AND t.tick_id > i_prev_tick_id
         ORDER BY t.tick_id ASC LIMIT 1;
        RETURN;
    END IF;

    SELECT t.tick_id, t.tick_time, t.tick_event_seq INTO newest
      FROM pgque.tick t
     WHERE t.tick_queue = i_queue_id AND t.tick_id > i_prev_tick_id
     ORDER BY t.tick_id DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    cnt := newest.tick_event_seq - i_prev_tick_seq;
    gap := newest.tick_time - i_prev_tick_time;
    IF NOT (coalesce(cnt >= i_min_count, false) OR coalesce(gap >= i_min_interval, false)) THEN
        RETURN;
    END IF;

    IF coalesce(cnt > 2 * i_min_count, false) OR coalesce(gap > 2 * i_min_interval, false) THEN
        SELECT t.tick_id, t.tick_time, t.tick_event_seq
          INTO next_tick_id, next_tick_time, next_tick_seq
          FROM pgque.tick t
         WHERE t.tick_queue = i_queue_id AND t.tick_id > i_prev_tick_id
           AND (coalesce(t.tick_event_seq - i_prev_tick_seq >= i_min_count, false)
                OR coalesce(t.tick_time - i_prev_tick_time >= i_min_interval, false))
         ORDER BY t.tick_id ASC LIMIT 1;
    ELSE
        next_tick_id := newest.tick_id;
        next_tick_time := newest.tick_time;
        next_tick_seq := newest.tick_event_seq;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgque.next_batch_custom(
    i_queue_name text, i_consumer_name text,
    i_min_lag interval, i_min_count integer, i_min_interval interval,
    OUT batch_id bigint,
    OUT cur_tick_id bigint, OUT prev_tick_id bigint,
    OUT cur_tick_time timestamptz, OUT prev_tick_time timestamptz,
    OUT cur_tick_event_seq bigint, OUT prev_tick_event_seq bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
    prev_tick pgque.tick%ROWTYPE;
    cur_tick pgque.tick%ROWTYPE;
BEGIN
    SELECT s.sub_id, s.sub_queue, s.sub_consumer, s.sub_role, s.sub_last_tick,
           s.sub_batch, s.sub_next_tick
      INTO sub
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
      JOIN pgque.consumer c ON c.co_id = s.sub_consumer
     WHERE q.queue_name = i_queue_name AND c.co_name = i_consumer_name
       FOR UPDATE OF s;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Not subscriber to queue: %/%',
            coalesce(i_queue_name, 'NULL'), coalesce(i_consumer_name, 'NULL')
            USING ERRCODE = 'PQ002';
    END IF;

    IF sub.sub_role = 'coop_member' THEN
        RAISE EXCEPTION 'consumer % on queue % is a cooperative subconsumer; use cooperative receive/next_batch with its main consumer and subconsumer names',
            i_consumer_name, i_queue_name
            USING ERRCODE = 'PQ101';
    END IF;
    IF sub.sub_role = 'coop_main' THEN
        IF EXISTS (SELECT 1 FROM pgque.subscription m
                    WHERE m.sub_queue = sub.sub_queue AND m.sub_id = sub.sub_id
                      AND m.sub_role = 'coop_member') THEN
            RAISE EXCEPTION 'consumer % on queue % is a cooperative main consumer; use cooperative receive/next_batch with a subconsumer',
                i_consumer_name, i_queue_name
                USING ERRCODE = 'PQ101';
        END IF;
    END IF;

    IF sub.sub_last_tick IS NOT NULL THEN
        SELECT * INTO prev_tick FROM pgque.tick
         WHERE tick_queue = sub.sub_queue AND tick_id = sub.sub_last_tick;
    END IF;
    IF sub.sub_last_tick IS NULL OR prev_tick.tick_id IS NULL THEN
        RAISE EXCEPTION 'PgQ corruption: Consumer % on queue % does not see tick %',
            i_consumer_name, i_queue_name, coalesce(sub.sub_last_tick::text, 'NULL')
            USING ERRCODE = 'PQ901';
    END IF;

    IF sub.sub_batch IS NOT NULL THEN
        SELECT * INTO cur_tick FROM pgque.tick
         WHERE tick_queue = sub.sub_queue AND tick_id = sub.sub_next_tick;
        batch_id := sub.sub_batch;
    ELSE
        -- A memberless cooperative main keeps its cursor for a future group and must
        -- never hold a batch itself.
        IF sub.sub_role <> 'normal' THEN
            RETURN;
        END IF;
        SELECT h.next_tick_id, h.next_tick_time, h.next_tick_seq
          INTO cur_tick.tick_id, cur_tick.tick_time, cur_tick.tick_event_seq
          FROM pgque.find_tick_helper(sub.sub_queue, prev_tick.tick_id, prev_tick.tick_time,
                                      prev_tick.tick_event_seq, i_min_count, i_min_interval) h;
        IF cur_tick.tick_id IS NULL THEN
            RETURN;
        END IF;
        IF i_min_lag IS NOT NULL AND now() - cur_tick.tick_time < i_min_lag THEN
            RETURN;
        END IF;
        batch_id := nextval('pgque.batch_id_seq');
        UPDATE pgque.subscription
           SET sub_batch = batch_id, sub_next_tick = cur_tick.tick_id, sub_active = now()
         WHERE sub_queue = sub.sub_queue AND sub_consumer = sub.sub_consumer
           AND sub_role = 'normal';
    END IF;

    cur_tick_id := cur_tick.tick_id;
    prev_tick_id := prev_tick.tick_id;
    cur_tick_time := cur_tick.tick_time;
    prev_tick_time := prev_tick.tick_time;
    cur_tick_event_seq := cur_tick.tick_event_seq;
    prev_tick_event_seq := prev_tick.tick_event_seq;
END
$$;

CREATE OR REPLACE FUNCTION pgque.next_batch_info(
    i_queue_name text, i_consumer_name text,
    OUT batch_id bigint,
    OUT cur_tick_id bigint, OUT prev_tick_id bigint,
    OUT cur_tick_time timestamptz, OUT prev_tick_time timestamptz,
    OUT cur_tick_event_seq bigint, OUT prev_tick_event_seq bigint)
LANGUAGE sql
SET search_path = pgque, pg_catalog
AS $$
    SELECT * FROM pgque.next_batch_custom(i_queue_name, i_consumer_name, NULL, NULL, NULL);
$$;

CREATE OR REPLACE FUNCTION pgque.next_batch(i_queue_name text, i_consumer_name text)
RETURNS bigint
LANGUAGE sql
SET search_path = pgque, pg_catalog
AS $$
    SELECT batch_id FROM pgque.next_batch_custom(i_queue_name, i_consumer_name, NULL, NULL, NULL);
$$;

-- The event tables a batch window may need (§4.6), from its queue's rotation state: the
-- previous table alone if the window ended before the last rotation started, the
-- current one alone if it began after the rotation completed, otherwise both.
CREATE OR REPLACE FUNCTION pgque._batch_tables(
    i_data_pfx text, i_cur_table integer, i_ntables integer, i_switch_step1 bigint,
    i_switch_step2 bigint, i_last_snapshot pg_snapshot, i_cur_snapshot pg_snapshot)
RETURNS text[]
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT CASE
        WHEN pg_catalog.pg_snapshot_xmax(i_cur_snapshot)::text::bigint < i_switch_step1
            THEN ARRAY[i_data_pfx || '_' || prev_table]
        WHEN i_switch_step2 IS NOT NULL
             AND pg_catalog.pg_snapshot_xmin(i_last_snapshot)::text::bigint > i_switch_step2
            THEN ARRAY[i_data_pfx || '_' || i_cur_table]
        ELSE ARRAY[i_data_pfx || '_' || prev_table, i_data_pfx || '_' || i_cur_table]
    END
      FROM (SELECT (i_cur_table + i_ntables - 1) % i_ntables AS prev_table) p;
$$;

-- The event tables a batch may need (the rule in _batch_tables).
CREATE OR REPLACE FUNCTION pgque.batch_event_tables(x_batch_id bigint)
RETURNS SETOF text
LANGUAGE plpgsql
STABLE
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    b record;
BEGIN
    -- Each tick read by its whole key (see batch_event_sql).
    SELECT q.queue_data_pfx, q.queue_cur_table, q.queue_ntables,
           q.queue_switch_step1, q.queue_switch_step2,
           (SELECT t.tick_snapshot FROM pgque.tick t
             WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick) AS last_snapshot,
           (SELECT t.tick_snapshot FROM pgque.tick t
             WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_next_tick) AS cur_snapshot
      INTO b
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
     WHERE s.sub_batch = x_batch_id;
    IF NOT FOUND OR b.last_snapshot IS NULL OR b.cur_snapshot IS NULL THEN
        RAISE EXCEPTION 'batch not found: %', x_batch_id USING ERRCODE = 'PQ003';
    END IF;

    RETURN QUERY SELECT unnest(pgque._batch_tables(
        b.queue_data_pfx, b.queue_cur_table, b.queue_ntables, b.queue_switch_step1,
        b.queue_switch_step2, b.last_snapshot, b.cur_snapshot));
END
$$;

-- The query returning a batch's events. Rather than scanning from xmin of the cursor
-- snapshot (which a long transaction drags far back), the txid range starts at its
-- xmax; transactions that were in progress at the cursor tick and finished by the end
-- tick are picked up by exact xid, or by stretching the range when they are close.
CREATE OR REPLACE FUNCTION pgque.batch_event_sql(x_batch_id bigint)
RETURNS text
LANGUAGE plpgsql
STABLE
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    b record;
    range_start bigint;
    exact_xids bigint[] := '{}';
    xid bigint;
    tbl text;
    visibility text;
    parts text[] := '{}';
    cols constant text := 'ev_id, ev_time, ev_txid::text::bigint AS ev_txid, ev_retry, ev_type, '
                          'ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4';
BEGIN
    -- Each tick read by its whole key in a subquery of its own: joined to the
    -- subscription, the two tick lookups share tick_queue with it, and on a tick table
    -- whose statistics lag behind its growth (a queue ticked on every commit adds ticks
    -- faster than autovacuum analyzes) the planner probed the second by tick_queue alone
    -- and filtered every tick of the queue: 0.6 ms per call at 1,200 ticks.
    SELECT s.sub_id, q.queue_data_pfx, q.queue_cur_table, q.queue_ntables,
           q.queue_switch_step1, q.queue_switch_step2,
           (SELECT t.tick_snapshot FROM pgque.tick t
             WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick) AS last_snapshot,
           (SELECT t.tick_snapshot FROM pgque.tick t
             WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_next_tick) AS cur_snapshot
      INTO b
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
     WHERE s.sub_batch = x_batch_id;
    IF NOT FOUND OR b.last_snapshot IS NULL OR b.cur_snapshot IS NULL THEN
        RAISE EXCEPTION 'batch not found: %', x_batch_id USING ERRCODE = 'PQ003';
    END IF;

    range_start := pg_snapshot_xmax(b.last_snapshot)::text::bigint;
    FOR xid IN
        SELECT x::text::bigint FROM pg_snapshot_xip(b.last_snapshot) AS x
        EXCEPT
        SELECT x::text::bigint FROM pg_snapshot_xip(b.cur_snapshot) AS x
        ORDER BY 1 DESC
    LOOP
        IF xid >= range_start - 100 THEN
            range_start := xid;
        ELSE
            exact_xids := exact_xids || xid;
        END IF;
    END LOOP;

    visibility := format('pg_visible_in_snapshot(ev_txid, %L::pg_snapshot) '
                         'AND NOT pg_visible_in_snapshot(ev_txid, %L::pg_snapshot) '
                         'AND (ev_owner IS NULL OR ev_owner = %s)',
                         b.cur_snapshot, b.last_snapshot, b.sub_id);
    FOREACH tbl IN ARRAY pgque._batch_tables(
            b.queue_data_pfx, b.queue_cur_table, b.queue_ntables, b.queue_switch_step1,
            b.queue_switch_step2, b.last_snapshot, b.cur_snapshot) LOOP
        parts := parts || format('SELECT %s FROM %s WHERE ev_txid >= %L::xid8 AND ev_txid < %L::xid8 AND %s',
                                 cols, pgque.quote_fqname(tbl), range_start,
                                 pg_snapshot_xmax(b.cur_snapshot), visibility);
        IF cardinality(exact_xids) > 0 THEN
            parts := parts || format('SELECT %s FROM %s WHERE ev_txid = ANY (%L::xid8[]) AND %s',
                                     cols, pgque.quote_fqname(tbl), exact_xids::text, visibility);
        END IF;
    END LOOP;
    RETURN array_to_string(parts, ' UNION ALL ') || ' ORDER BY 1';
END
$$;

-- Security definer so that a reader-only role can list a batch (the reference engine
-- grants it to readers but fails on internal helpers).
CREATE OR REPLACE FUNCTION pgque.get_batch_events(
    x_batch_id bigint,
    OUT ev_id bigint, OUT ev_time timestamptz, OUT ev_txid bigint, OUT ev_retry integer,
    OUT ev_type text, OUT ev_data text,
    OUT ev_extra1 text, OUT ev_extra2 text, OUT ev_extra3 text, OUT ev_extra4 text)
RETURNS SETOF record
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    RETURN QUERY EXECUTE pgque.batch_event_sql(x_batch_id);
END
$$;

CREATE OR REPLACE FUNCTION pgque.get_batch_cursor(
    i_batch_id bigint, i_cursor_name text, i_quick_limit integer, i_extra_where text,
    OUT ev_id bigint, OUT ev_time timestamptz, OUT ev_txid bigint, OUT ev_retry integer,
    OUT ev_type text, OUT ev_data text,
    OUT ev_extra1 text, OUT ev_extra2 text, OUT ev_extra3 text, OUT ev_extra4 text)
RETURNS SETOF record
LANGUAGE plpgsql
AS $$
DECLARE
    batch_sql text;
BEGIN
    IF i_batch_id IS NULL OR i_cursor_name IS NULL OR i_quick_limit IS NULL THEN
        RETURN;
    END IF;
    batch_sql := pgque.batch_event_sql(i_batch_id);
    -- i_extra_where is trusted SQL from an admin caller, applied as given.
    IF i_extra_where IS NOT NULL THEN
        batch_sql := 'SELECT * FROM (' || batch_sql || ') AS batch WHERE ' || i_extra_where
                     || ' ORDER BY ev_id';
    END IF;
    EXECUTE format('DECLARE %I NO SCROLL CURSOR FOR %s', i_cursor_name, batch_sql);
    RETURN QUERY EXECUTE format('FETCH %s FROM %I', i_quick_limit, i_cursor_name);
END
$$;

CREATE OR REPLACE FUNCTION pgque.get_batch_cursor(
    i_batch_id bigint, i_cursor_name text, i_quick_limit integer,
    OUT ev_id bigint, OUT ev_time timestamptz, OUT ev_txid bigint, OUT ev_retry integer,
    OUT ev_type text, OUT ev_data text,
    OUT ev_extra1 text, OUT ev_extra2 text, OUT ev_extra3 text, OUT ev_extra4 text)
RETURNS SETOF record
LANGUAGE sql
AS $$
    SELECT * FROM pgque.get_batch_cursor(i_batch_id, i_cursor_name, i_quick_limit, NULL);
$$;

CREATE OR REPLACE FUNCTION pgque.finish_batch(x_batch_id bigint)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
BEGIN
    SELECT s.sub_queue, s.sub_consumer, s.sub_role INTO sub
      FROM pgque.subscription s
     WHERE s.sub_batch = x_batch_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE WARNING 'finish_batch: batch % not found', x_batch_id;
        RETURN 0;
    END IF;

    IF sub.sub_role = 'coop_main' THEN
        RAISE EXCEPTION 'cannot finish cooperative main consumer batch %: a main consumer never holds a batch',
            x_batch_id
            USING ERRCODE = 'PQ901';
    ELSIF sub.sub_role = 'coop_member' THEN
        -- The group cursor on the main row moved when the window was handed out.
        UPDATE pgque.subscription
           SET sub_last_tick = NULL, sub_next_tick = NULL, sub_batch = NULL, sub_active = now()
         WHERE sub_queue = sub.sub_queue AND sub_consumer = sub.sub_consumer;
    ELSE
        UPDATE pgque.subscription
           SET sub_last_tick = sub_next_tick, sub_next_tick = NULL, sub_batch = NULL,
               sub_active = now()
         WHERE sub_queue = sub.sub_queue AND sub_consumer = sub.sub_consumer;
    END IF;
    RETURN 1;
END
$$;

CREATE OR REPLACE FUNCTION pgque.ack(i_batch_id bigint)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.finish_batch(i_batch_id);
$$;

-- Stream the open (or a newly opened) batch of a subscription as messages. A window
-- without events is finished here so the consumer moves on without an ack; a
-- partially read batch stays open and is re-streamed from its first row.
CREATE OR REPLACE FUNCTION pgque.receive(
    i_queue text, i_consumer text, i_max_return integer DEFAULT 100)
RETURNS SETOF pgque.message
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    batch bigint;
BEGIN
    IF i_max_return IS NULL OR i_max_return < 1 THEN
        RAISE EXCEPTION 'pgque.receive: max_return must be >= 1, got %', coalesce(i_max_return::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    batch := pgque.next_batch(i_queue, i_consumer);
    IF batch IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT ev_id, $1, ev_type, ev_data, ev_retry, ev_time, '
        '       ev_extra1, ev_extra2, ev_extra3, ev_extra4 '
        '  FROM (' || pgque.batch_event_sql(batch) || ') AS ev ORDER BY ev_id LIMIT $2'
        USING batch, i_max_return;
    IF NOT FOUND THEN
        PERFORM pgque.finish_batch(batch);
    END IF;
END
$$;

GRANT EXECUTE ON FUNCTION
    pgque.next_batch_custom(text, text, interval, integer, interval),
    pgque.next_batch_info(text, text),
    pgque.next_batch(text, text),
    pgque.get_batch_events(bigint),
    pgque.finish_batch(bigint),
    pgque.ack(bigint),
    pgque.receive(text, text, integer)
TO pgque_reader;
