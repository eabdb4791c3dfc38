-- sqlalchemy-pgque engine: ticks.
--
-- A tick records a snapshot; the events between two ticks of a queue form the batches
-- of its subscribers. Ticks of one queue are serialised on the queue row: the lock is
-- taken in a statement of its own, so the statements that read the latest tick and
-- insert the new one run on snapshots taken after any concurrent ticker committed.
-- That keeps tick ids, event_seq and snapshots monotone (invariant I1) even when
-- several sessions call ticker() at once.

-- Forced ticks and the pending figures.
--
-- PgQue 0.2 measures pending work as a distance on a queue's event sequence: the tick
-- decision below, and the figures users read (get_consumer_info's pending_events,
-- get_queue_info's ev_new and ev_per_sec). force_next_tick makes the next ticker call
-- tick by moving that sequence 2 * ticker_max_count + 1000 past a wasted nextval, with no
-- event behind any of those values. A ticker woken by every commit forces a tick per
-- commit, so those distances grow by about 2000 per commit while the real backlog may
-- be a few events (an operator saw pending_events = 230,472 for a backlog of 357).
--
-- So the engine keeps books on what the sequence skipped:
--   * queue.queue_seq_skipped: the running total of values force_next_tick skipped (the
--     wasted nextval plus the jump), added to by each force_next_tick;
--   * tick.tick_seq_skipped: the part of tick_event_seq no event accounts for, recorded
--     by every tick: queue_seq_skipped at that moment, plus 1 when the sequence has not
--     handed out a value yet (last_value then reads 1 with nothing used).
-- A figure is then the sequence distance minus the growth of the skipped count between
-- its two ends (pgque._seq_events). The tick decision keeps the raw distance: that a
-- forced jump makes the next ticker() tick is what force_next_tick is for.
--
-- Why a running total copied onto ticks: each figure costs one subtraction however many
-- forced ticks lie in its window (a stalled consumer under commit-woken ticking has one
-- per commit behind it), and nothing needs pruning. A log of forced jumps, summed per
-- window, would need no lock but grows with every commit; replacing the jump by a flag
-- would change what the sequence reads, which spec §4.3 and older tools observe.
--
-- Consistency: a tick must read the sequence and the total as of one moment. The
-- sequence is not transactional, the total is; force_next_tick therefore takes the
-- queue-row lock every tick takes first (FOR NO KEY UPDATE) before it moves the
-- sequence, and keeps it until its transaction ends. A tick then sees both or neither.
-- Residual error, documented rather than locked away (producers never wait on a tick):
--   * a producer that draws a value between force_next_tick's nextval and its setval
--     (one expression apart) has its event inside the skipped range: the figures
--     undercount by those events, a handful at most per forced tick under heavy
--     concurrent sending (the concurrency test allows 1 %);
--   * ev_new reads the live sequence: from force_next_tick's setval until its
--     transaction commits it also reads the jump. Run force_next_tick in its own short
--     transaction, as pgque-py and our Ticker do; it also makes a tick of the queue
--     wait for that transaction.
-- Without forced ticks every figure is exactly the spec's sequence distance (§3.7).

-- Events behind the sequence distance from (seq_from, skipped_from) to (seq_to,
-- skipped_to): the distance minus the values skipped in between. A negative growth of
-- the skipped count happens only across the sequence's first nextval with no forced tick
-- in between (ticks taken before it record 1): then the spec's raw distance stands, the
-- first event uncounted as in PgQue 0.2. The subtraction never takes a figure below 0 (an external
-- tick source may supply a smaller event_seq than the local sequence reached).
CREATE OR REPLACE FUNCTION pgque._seq_events(
    i_seq_from bigint, i_skipped_from bigint, i_seq_to bigint, i_skipped_to bigint)
RETURNS bigint
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT i_seq_to - i_seq_from
           - least(greatest(i_skipped_to - i_skipped_from, 0),
                   greatest(i_seq_to - i_seq_from, 0));
$$;

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

-- Tick one queue: if its thresholds say so, or with i_force whatever they say.
-- i_skip_ineligible is ticker()'s mode: a queue that vanished, was paused or switched to
-- an external ticker since the caller listed it is skipped (NULL) rather than raising,
-- so a pass survives concurrent DDL; so is one whose row another transaction holds (a
-- force_next_tick, set_queue_config, rotation or drop_queue not yet committed, or another
-- ticker): the next pass takes it up. Waiting there could deadlock: the pass already
-- holds a lock on every queue's event sequence it read (see ticker()), and drop_queue
-- needs those after taking the queue row.
CREATE OR REPLACE FUNCTION pgque._tick_queue(
    i_queue_name text, i_skip_ineligible boolean, i_force boolean)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    last_tick pgque.tick%ROWTYPE;
    prev_time timestamptz;
    event_seq bigint;
    seq_called boolean;
    pending bigint;
    lag interval;
    cur_txid bigint;
    new_tick bigint;
BEGIN
    IF i_skip_ineligible THEN
        SELECT * INTO q FROM pgque.queue WHERE queue_name = i_queue_name
           FOR NO KEY UPDATE SKIP LOCKED;
    ELSE
        SELECT * INTO q FROM pgque.queue WHERE queue_name = i_queue_name FOR NO KEY UPDATE;
    END IF;
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

    -- pg_sequence_last_value is NULL until the first nextval; only then is the slower
    -- dynamic read of both fields needed.
    event_seq := pg_sequence_last_value(pgque.quote_fqname(q.queue_event_seq)::regclass);
    seq_called := event_seq IS NOT NULL;
    IF NOT seq_called THEN
        SELECT s.last_value, s.is_called INTO event_seq, seq_called
          FROM pgque._seq_state(q.queue_event_seq) s;
    END IF;

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
        -- The raw distance, forced jumps included (see the note at the top).
        pending := event_seq - last_tick.tick_event_seq;
        IF pending < 0 THEN
            RAISE WARNING 'Dubious PgQ state: event sequence % went below last tick event_seq %',
                event_seq, last_tick.tick_event_seq;
        END IF;

        IF i_force THEN
            NULL;
        ELSIF pending > 0 THEN
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

    INSERT INTO pgque.tick (tick_queue, tick_id, tick_snapshot, tick_event_seq, tick_seq_skipped)
    VALUES (q.queue_id, nextval(pgque.quote_fqname(q.queue_tick_seq)::regclass),
            pgque._tick_snapshot(), event_seq,
            q.queue_seq_skipped + CASE WHEN seq_called THEN 0 ELSE 1 END)
    RETURNING tick_id INTO new_tick;
    PERFORM pg_notify('pgque_' || q.queue_name, new_tick::text);
    RETURN new_tick;
END
$$;

-- The two-argument form of earlier installs; nothing calls it any more.
DROP FUNCTION IF EXISTS pgque._tick_queue(text, boolean);

CREATE OR REPLACE FUNCTION pgque.ticker(i_queue_name text)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque._tick_queue(i_queue_name, false, false);
$$;

-- Tick one queue now, whatever its thresholds: what force_next_tick followed by
-- ticker(queue) does, in one call and one transaction. Ours, not PgQue's; the worker's
-- commit-woken ticker calls it where it exists. A tick made here needs no forced jump of
-- the event sequence (that jump exists only to make the next ticker() call tick), so the
-- tick records the true sequence value and queue_seq_skipped is left alone. Errors as
-- ticker(queue): unknown, paused and external queues raise.
CREATE OR REPLACE FUNCTION pgque.tick_now(i_queue_name text)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque._tick_queue(i_queue_name, false, true);
$$;

-- Tick the queues, neither paused nor external, among the i_queues queues (all when NULL)
-- that follow queue id i_after_queue_id, in name order (ENGINE.md's order for ticker());
-- ticked: how many ticked; next_queue_id: the id
-- to pass as i_after_queue_id for the rest of the pass, NULL when no queue is left.
-- The decision for the queues is made by one query that reads each queue's two latest
-- ticks and its event sequence and writes nothing: a queue with nothing due costs an
-- index descent and a sequence read instead of a locked row, a plpgsql call and a
-- transaction id. Only the queues the query picks go through _tick_queue, which decides
-- again under the queue-row lock, so the query may pick too many but must never leave
-- out a queue _tick_queue would tick; its conditions mirror _tick_queue's, plus the ones
-- that make _tick_queue raise or warn (a latest tick ahead of every transaction id we
-- could get, an event sequence below the latest tick), so those still do.
--
-- Why steps: a sequence read holds a lock on the sequence until the transaction ends,
-- and a tick takes one more (its tick sequence). One transaction over all queues takes
-- a lock-table entry per queue plus one per queue it ticks: 10,000 idle queues fit in
-- the default shared lock table (max_locks_per_transaction 64 times the connections),
-- using most of it while the pass runs, but a pass that ticks thousands of queues at once
-- runs out of shared memory. ticker_step in a transaction each bounds that by i_queues.
--
-- pg_sequence_last_value reads NULL for a sequence that has handed out no value; it then
-- still holds its start value (nothing in the engine moves it without calling it). A
-- sequence missing from the catalog leaves pending NULL, and _tick_queue decides.
-- A drop_queue that committed while this step waited for the sequence it dropped makes
-- pg_sequence_last_value fail with internal_error ("could not open relation"): that step
-- falls back to asking _tick_queue about every queue it covers.
CREATE OR REPLACE FUNCTION pgque._tick_due(
    i_after_queue_id integer, i_queues integer,
    OUT ticked bigint, OUT next_queue_id integer)
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    covered integer;
    last_id integer;
    due text[];
    name text;
BEGIN
    ticked := 0;
    SELECT count(*), max(c.queue_id) INTO covered, last_id
      FROM (SELECT queue_id FROM pgque.queue
             WHERE queue_id > coalesce(i_after_queue_id, 0)
             ORDER BY queue_id LIMIT i_queues) c;
    IF i_queues IS NOT NULL AND covered >= i_queues THEN
        next_queue_id := last_id;
    END IF;
    IF covered = 0 THEN
        RETURN;
    END IF;
    BEGIN
        SELECT array_agg(q.queue_name ORDER BY q.queue_name) INTO due
          FROM pgque.queue q
          -- The latest tick and the time of the one before it, in one index descent.
          LEFT JOIN LATERAL (
               SELECT t.tick_id, t.tick_time, t.tick_snapshot, t.tick_event_seq,
                      lead(t.tick_time) OVER (ORDER BY t.tick_id DESC) AS prev_time
                 FROM pgque.tick t
                WHERE t.tick_queue = q.queue_id
                ORDER BY t.tick_id DESC
                LIMIT 1) latest ON true
          CROSS JOIN LATERAL (
               SELECT coalesce(pg_sequence_last_value(s.seq),
                               (SELECT p.seqstart FROM pg_sequence p WHERE p.seqrelid = s.seq))
                      - latest.tick_event_seq AS pending,
                      now() - latest.tick_time AS lag
                 FROM (SELECT to_regclass(q.queue_event_seq) AS seq) s) d
         WHERE q.queue_id > coalesce(i_after_queue_id, 0)
           AND q.queue_id <= last_id
           AND NOT q.queue_ticker_paused
           AND NOT q.queue_external_ticker
           AND (latest.tick_id IS NULL
                OR d.pending IS NULL
                OR d.pending < 0
                -- No transaction id this pass could get is below its snapshot's xmax.
                OR pg_snapshot_xmin(latest.tick_snapshot)
                   > (SELECT pg_snapshot_xmax(pg_current_snapshot()))
                OR pg_snapshot_xmax(latest.tick_snapshot)
                   > (SELECT pg_snapshot_xmax(pg_current_snapshot()))
                OR (d.pending > 0
                    AND (d.pending >= q.queue_ticker_max_count
                         OR d.lag >= q.queue_ticker_max_lag))
                OR (d.pending = 0
                    AND (latest.prev_time IS NULL
                         OR (d.lag >= q.queue_ticker_max_lag / 2
                             AND (d.lag >= 2 * (latest.tick_time - latest.prev_time)
                                  OR d.lag >= q.queue_ticker_idle_period)))));
    EXCEPTION WHEN internal_error THEN
        SELECT array_agg(queue_name ORDER BY queue_name) INTO due
          FROM pgque.queue
         WHERE queue_id > coalesce(i_after_queue_id, 0) AND queue_id <= last_id
           AND NOT queue_ticker_paused AND NOT queue_external_ticker;
    END;
    FOREACH name IN ARRAY coalesce(due, '{}') LOOP
        IF pgque._tick_queue(name, true, false) IS NOT NULL THEN
            ticked := ticked + 1;
        END IF;
    END LOOP;
END
$$;

-- One pass over every queue in one transaction (PgQue's ticker()); how many ticked.
CREATE OR REPLACE FUNCTION pgque.ticker()
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT ticked FROM pgque._tick_due(0, NULL);
$$;

-- Ours, not PgQue's: one step of a pass, the queues after i_after_queue_id, i_queues at
-- most (see _tick_due). A pass calls it from 0 until next_queue_id is NULL, each step in
-- a transaction of its own, so the locks it holds stay bounded whatever the number of
-- queues; the worker's ticker does so where the function exists.
CREATE OR REPLACE FUNCTION pgque.ticker_step(
    i_after_queue_id integer DEFAULT 0, i_queues integer DEFAULT 500,
    OUT ticked bigint, OUT next_queue_id integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF i_queues IS NULL OR i_queues < 1 THEN
        RAISE EXCEPTION 'ticker_step: i_queues must be >= 1, got %', i_queues
            USING ERRCODE = '22023';
    END IF;
    SELECT d.ticked, d.next_queue_id INTO ticked, next_queue_id
      FROM pgque._tick_due(i_after_queue_id, i_queues) d;
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

    -- The source's event_seq counts its own sequence; only our forced jumps are known.
    INSERT INTO pgque.tick (tick_queue, tick_id, tick_time, tick_snapshot, tick_event_seq,
                            tick_seq_skipped)
    VALUES (q.queue_id, i_tick_id, i_orig_timestamp, pgque._tick_snapshot(), i_event_seq,
            q.queue_seq_skipped);
    PERFORM pgque.seq_setval(q.queue_tick_seq, i_tick_id);
    PERFORM pgque.seq_setval(q.queue_event_seq, i_event_seq);
    PERFORM pg_notify('pgque_' || q.queue_name, i_tick_id::text);
    RETURN i_tick_id;
END
$$;

-- Make the next ticker() call tick regardless of thresholds, by pushing the event
-- sequence well past ticker_max_count. Returns the latest existing tick. The values it
-- skips go into queue_seq_skipped under the queue-row lock (see the note at the top).
CREATE OR REPLACE FUNCTION pgque.force_next_tick(i_queue_name text)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    seq regclass;
    jump bigint;
    latest bigint;
BEGIN
    SELECT * INTO q FROM pgque.queue WHERE queue_name = i_queue_name FOR NO KEY UPDATE;
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
    jump := 2 * q.queue_ticker_max_count::bigint + 1000;
    PERFORM setval(seq, nextval(seq) + jump);
    -- The wasted nextval and the jump above it.
    UPDATE pgque.queue SET queue_seq_skipped = queue_seq_skipped + jump + 1
     WHERE queue_id = q.queue_id;
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
