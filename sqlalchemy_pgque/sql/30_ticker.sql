-- sqlalchemy-pgque engine: ticks.
--
-- A tick records a snapshot; the events between two ticks of a queue form the batches
-- of its subscribers. Ticks of one queue are serialised on the queue row: the lock is
-- taken in a statement of its own, so the statements that read the latest tick and
-- insert the new one run on snapshots taken after any concurrent ticker committed.
-- That keeps tick ids, event_seq and snapshots monotone (invariant I1) even when
-- several sessions call ticker() at once.

-- The snapshot a tick records. pg_current_snapshot() leaves the caller's own
-- transaction out of its in-progress list, so once any later transaction has finished,
-- our own xid falls below xmax and reads as committed. A tick taken in the transaction
-- that also sent events would then put those events in a batch that was visible before
-- they committed. Listing our own xid as in progress keeps them for the next tick.
CREATE OR REPLACE FUNCTION pgque._tick_snapshot()
RETURNS pg_snapshot
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    snap pg_snapshot := pg_current_snapshot();
    own xid8 := pg_current_xact_id_if_assigned();
    low xid8;
BEGIN
    IF own IS NULL OR NOT pg_visible_in_snapshot(own, snap) THEN
        RETURN snap;
    END IF;
    low := pg_snapshot_xmin(snap);
    IF own < low THEN
        low := own;
    END IF;
    RETURN format('%s:%s:%s', low, pg_snapshot_xmax(snap),
                  (SELECT string_agg(x::text, ',' ORDER BY x::text::bigint)
                     FROM (SELECT pg_snapshot_xip(snap) AS x UNION SELECT own) xs)
           )::pg_snapshot;
END
$$;

-- Tick one queue if its thresholds say so. With i_skip_ineligible a queue that vanished,
-- was paused or switched to an external ticker since the caller listed it is skipped
-- (NULL) rather than raising, so ticker() survives concurrent DDL.
CREATE OR REPLACE FUNCTION pgque._tick_queue(i_queue_name text, i_skip_ineligible boolean)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    last_tick pgque.tick%ROWTYPE;
    prev_time timestamptz;
    event_seq bigint;
    pending bigint;
    lag interval;
    cur_txid bigint;
    new_tick bigint;
BEGIN
    PERFORM 1 FROM pgque.queue WHERE queue_name = i_queue_name FOR NO KEY UPDATE;

    SELECT * INTO q FROM pgque.queue WHERE queue_name = i_queue_name;
    IF NOT FOUND THEN
        IF i_skip_ineligible THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'no such queue: %', i_queue_name USING ERRCODE = 'PQ001';
    END IF;
    IF q.queue_external_ticker THEN
        IF i_skip_ineligible THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'This queue has external tick source.' USING ERRCODE = 'PQ106';
    END IF;
    IF q.queue_ticker_paused THEN
        IF i_skip_ineligible THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'Ticker has been paused for this queue' USING ERRCODE = 'PQ105';
    END IF;

    event_seq := pgque.seq_getval(q.queue_event_seq);

    SELECT * INTO last_tick FROM pgque.tick
     WHERE tick_queue = q.queue_id ORDER BY tick_id DESC LIMIT 1;
    IF FOUND THEN
        cur_txid := pg_current_xact_id()::text::bigint;
        IF pg_snapshot_xmin(last_tick.tick_snapshot)::text::bigint > cur_txid THEN
            RAISE EXCEPTION 'Invalid PgQ state: old xmin=%, old xmax=%, cur txid=%',
                pg_snapshot_xmin(last_tick.tick_snapshot),
                pg_snapshot_xmax(last_tick.tick_snapshot), cur_txid
                USING ERRCODE = 'PQ901';
        END IF;
        IF pg_snapshot_xmax(last_tick.tick_snapshot)::text::bigint > cur_txid THEN
            RAISE WARNING 'Dubious PgQ state: old xmax=%, cur txid=%',
                pg_snapshot_xmax(last_tick.tick_snapshot), cur_txid;
        END IF;

        lag := now() - last_tick.tick_time;
        pending := event_seq - last_tick.tick_event_seq;
        IF pending < 0 THEN
            RAISE WARNING 'Dubious PgQ state: event sequence % went below last tick event_seq %',
                event_seq, last_tick.tick_event_seq;
        END IF;

        IF pending > 0 THEN
            IF pending < q.queue_ticker_max_count AND lag < q.queue_ticker_max_lag THEN
                RETURN NULL;
            END IF;
        ELSE
            -- Idle queue: back off, doubling the spacing up to the idle period.
            SELECT tick_time INTO prev_time FROM pgque.tick
             WHERE tick_queue = q.queue_id AND tick_id < last_tick.tick_id
             ORDER BY tick_id DESC LIMIT 1;
            IF FOUND THEN
                IF lag < q.queue_ticker_max_lag / 2
                   OR (lag < 2 * (last_tick.tick_time - prev_time)
                       AND lag < q.queue_ticker_idle_period) THEN
                    RETURN NULL;
                END IF;
            END IF;
        END IF;
    END IF;

    INSERT INTO pgque.tick (tick_queue, tick_id, tick_snapshot, tick_event_seq)
    VALUES (q.queue_id, nextval(pgque.quote_fqname(q.queue_tick_seq)::regclass),
            pgque._tick_snapshot(), event_seq)
    RETURNING tick_id INTO new_tick;
    PERFORM pg_notify('pgque_' || q.queue_name, new_tick::text);
    RETURN new_tick;
END
$$;

CREATE OR REPLACE FUNCTION pgque.ticker(i_queue_name text)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque._tick_queue(i_queue_name, false);
$$;

CREATE OR REPLACE FUNCTION pgque.ticker()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    name text;
    ticked bigint := 0;
BEGIN
    FOR name IN
        SELECT queue_name FROM pgque.queue
         WHERE NOT queue_ticker_paused AND NOT queue_external_ticker
         ORDER BY queue_name
    LOOP
        IF pgque._tick_queue(name, true) IS NOT NULL THEN
            ticked := ticked + 1;
        END IF;
    END LOOP;
    RETURN ticked;
END
$$;

-- Tick supplied by an outside source (e.g. a replica of another ticker): the caller
-- picks id, time and event_seq; the local sequences are raised to follow.
CREATE OR REPLACE FUNCTION pgque.ticker(
    i_queue_name text, i_tick_id bigint, i_orig_timestamp timestamptz, i_event_seq bigint)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    last_tick pgque.tick%ROWTYPE;
BEGIN
    PERFORM 1 FROM pgque.queue WHERE queue_name = i_queue_name FOR NO KEY UPDATE;
    SELECT * INTO q FROM pgque.queue WHERE queue_name = i_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue not found: %', i_queue_name USING ERRCODE = 'PQ001';
    END IF;
    IF q.queue_ticker_paused THEN
        RAISE EXCEPTION 'queue % is paused (queue_ticker_paused = true)', i_queue_name
            USING ERRCODE = 'PQ105';
    END IF;
    IF NOT q.queue_external_ticker THEN
        RAISE EXCEPTION 'queue % is not configured for external ticker (queue_external_ticker = false)',
            i_queue_name
            USING ERRCODE = 'PQ106';
    END IF;
    IF i_tick_id IS NULL OR i_orig_timestamp IS NULL OR i_event_seq IS NULL THEN
        RAISE EXCEPTION 'external tick for queue % needs tick_id, timestamp and event_seq, got %, %, %',
            i_queue_name, i_tick_id, i_orig_timestamp, i_event_seq
            USING ERRCODE = '22004';
    END IF;

    SELECT * INTO last_tick FROM pgque.tick
     WHERE tick_queue = q.queue_id ORDER BY tick_id DESC LIMIT 1;
    IF FOUND THEN
        IF i_tick_id <= last_tick.tick_id THEN
            RAISE EXCEPTION 'external tick_id % must be greater than the latest tick_id % of queue %',
                i_tick_id, last_tick.tick_id, i_queue_name
                USING ERRCODE = 'PQ108';
        END IF;
        IF i_event_seq < last_tick.tick_event_seq THEN
            RAISE EXCEPTION 'external event_seq % is below the latest tick event_seq % of queue %',
                i_event_seq, last_tick.tick_event_seq, i_queue_name
                USING ERRCODE = 'PQ108';
        END IF;
    END IF;

    INSERT INTO pgque.tick (tick_queue, tick_id, tick_time, tick_snapshot, tick_event_seq)
    VALUES (q.queue_id, i_tick_id, i_orig_timestamp, pgque._tick_snapshot(), i_event_seq);
    PERFORM pgque.seq_setval(q.queue_tick_seq, i_tick_id);
    PERFORM pgque.seq_setval(q.queue_event_seq, i_event_seq);
    PERFORM pg_notify('pgque_' || q.queue_name, i_tick_id::text);
    RETURN i_tick_id;
END
$$;

-- Make the next ticker() call tick regardless of thresholds, by pushing the event
-- sequence well past ticker_max_count. Returns the latest existing tick.
CREATE OR REPLACE FUNCTION pgque.force_next_tick(i_queue_name text)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    seq regclass;
    latest bigint;
BEGIN
    SELECT * INTO q FROM pgque.queue WHERE queue_name = i_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue not found: %', i_queue_name USING ERRCODE = 'PQ001';
    END IF;
    IF q.queue_ticker_paused THEN
        RAISE EXCEPTION 'queue % is paused (queue_ticker_paused = true)', i_queue_name
            USING ERRCODE = 'PQ105';
    END IF;
    IF q.queue_external_ticker THEN
        RAISE EXCEPTION 'queue % has an external tick source (queue_external_ticker = true)', i_queue_name
            USING ERRCODE = 'PQ106';
    END IF;
    seq := pgque.quote_fqname(q.queue_event_seq)::regclass;
    PERFORM setval(seq, nextval(seq) + 2 * q.queue_ticker_max_count + 1000);
    SELECT max(tick_id) INTO latest FROM pgque.tick WHERE tick_queue = q.queue_id;
    RETURN latest;
END
$$;

CREATE OR REPLACE FUNCTION pgque.force_tick(i_queue_name text)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.force_next_tick(i_queue_name);
$$;
