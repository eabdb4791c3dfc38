-- sqlalchemy-pgque engine: producer idempotency (PgQue 0.3 send_idem / maint_idem).
--
-- send_idem appends an event at most once per live window of a (queue, key) claim. The
-- reference keeps one row per key, updates it with the event id, takes expired keys over
-- with an upsert-update and collects garbage with DELETE: a dead tuple per accepted send
-- and per expiry. Here claims are only ever inserted and space comes back by TRUNCATE,
-- as for the event tables:
--
--   * pgque.idem_claim is LIST-partitioned on a slot number into three partitions. New
--     claims go to the current slot (a sequence, so switching it writes no tuple); GC
--     truncates a non-current partition once all of its rows have expired and moves the
--     current slot on to an empty partition.
--   * A key is claimed again by inserting a newer generation (gen) of it, never by
--     updating the old row; its newest generation is its state. The event id is drawn
--     before the claim is inserted, so the row is complete from the start.
--   * pgque.idem, the relation PgQue names, is a view of each key's newest claim that
--     hides claims expired before the last GC run (a watermark, also a sequence): GC
--     "removes" expired claims of a partition it cannot truncate yet by hiding them.
--
-- The unique index covers (queue_id, idem_key, gen, slot): it must contain the partition
-- key, so it holds per partition only. Two claimers of one key therefore have to insert
-- into the same partition, or both could win. pgque.idem_switch is the barrier for that:
-- every send_idem holds ROW EXCLUSIVE on it (which never blocks another sender) before it
-- reads the current slot, and the slot switch takes a lock that conflicts with it, so the
-- switch waits for every claimer in flight and every later claimer reads the new slot.
-- The same barrier makes TRUNCATE possible under load: every send_idem also holds
-- ACCESS SHARE on all partitions until it commits, so a bare TRUNCATE would wait for
-- them and every later send_idem would queue behind it. maint_idem waits for the barrier
-- at most lock_timeout (a run that cannot get it leaves the work to the next one), so
-- producers queue behind a waiting maint_idem at most that long; once it holds the
-- barrier they wait for the end of its transaction, which maint() keeps short.
--
-- No foreign key to pgque.queue: its check would lock the queue row on every send.
-- drop_queue deletes the queue's claims itself.

CREATE TABLE IF NOT EXISTS pgque.idem_claim (
    queue_id   int4 NOT NULL,
    idem_key   text NOT NULL,
    gen        int4 NOT NULL,
    event_id   int8 NOT NULL,
    expires_at timestamptz NOT NULL,
    slot       smallint NOT NULL
) PARTITION BY LIST (slot);
CREATE TABLE IF NOT EXISTS pgque.idem_claim_0 PARTITION OF pgque.idem_claim
    FOR VALUES IN (0) WITH (fillfactor = 100);
CREATE TABLE IF NOT EXISTS pgque.idem_claim_1 PARTITION OF pgque.idem_claim
    FOR VALUES IN (1) WITH (fillfactor = 100);
CREATE TABLE IF NOT EXISTS pgque.idem_claim_2 PARTITION OF pgque.idem_claim
    FOR VALUES IN (2) WITH (fillfactor = 100);
CREATE UNIQUE INDEX IF NOT EXISTS idem_claim_key_idx
    ON pgque.idem_claim (queue_id, idem_key, gen, slot);
-- For the GC's max(expires_at) per partition.
CREATE INDEX IF NOT EXISTS idem_claim_expires_at_idx ON pgque.idem_claim (expires_at);

-- Never holds a row: only its lock is used (see above).
CREATE TABLE IF NOT EXISTS pgque.idem_switch ();

-- The partition new claims go to.
CREATE SEQUENCE IF NOT EXISTS pgque.idem_slot MINVALUE 0 MAXVALUE 2 START 0;
-- Claims with expires_at before this time (microseconds since the Unix epoch) are
-- hidden from pgque.idem.
CREATE SEQUENCE IF NOT EXISTS pgque.idem_gc_watermark MINVALUE 0 START 0;

CREATE OR REPLACE VIEW pgque.idem AS
SELECT c.queue_id, c.idem_key, c.event_id, c.expires_at
  FROM (SELECT DISTINCT ON (queue_id, idem_key) queue_id, idem_key, event_id, expires_at
          FROM pgque.idem_claim
         ORDER BY queue_id, idem_key, gen DESC) c
 WHERE c.expires_at >= timestamptz 'epoch'
                       + interval '1 microsecond' * (SELECT last_value FROM pgque.idem_gc_watermark);

-- The claim and the event of one send_idem; invoker rights and no SET clause, like
-- pgque._insert_event: it runs inside the SECURITY DEFINER entry points below.
CREATE OR REPLACE FUNCTION pgque._send_idem(
    i_queue text, i_type text, i_payload text, i_idem_key text, i_ttl interval,
    i_partition_key text, OUT o_event_id bigint, OUT o_deduped boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    qid integer;
    event_seq regclass;
    hooks text[];
    disabled boolean;
    cur_table integer;
    data_pfx text;
    newest record;
    drawn bigint;
BEGIN
    IF i_idem_key IS NULL THEN
        RAISE EXCEPTION 'idem_key must not be null' USING ERRCODE = '22004';
    END IF;
    IF i_ttl IS NULL THEN
        RAISE EXCEPTION 'ttl must be a positive interval' USING ERRCODE = '22004';
    END IF;
    IF i_ttl <= interval '0' THEN
        RAISE EXCEPTION 'ttl must be a positive interval' USING ERRCODE = '22023';
    END IF;
    SELECT q.queue_id, q.queue_event_seq, q.queue_extra_maint, q.queue_disable_insert
      INTO qid, event_seq, hooks, disabled
      FROM pgque.queue q WHERE q.queue_name = i_queue;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue not found: %', i_queue USING ERRCODE = 'PQ001';
    END IF;

    -- maint() reaps the queue's claims through its extra-maintenance hook. Checked again
    -- under the row lock, so that concurrent first sends append it once.
    IF NOT coalesce('pgque.maint_idem' = ANY (hooks), false) THEN
        SELECT q.queue_extra_maint INTO hooks
          FROM pgque.queue q WHERE q.queue_id = qid FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'queue not found: %', i_queue USING ERRCODE = 'PQ001';
        END IF;
        IF NOT coalesce('pgque.maint_idem' = ANY (hooks), false) THEN
            UPDATE pgque.queue
               SET queue_extra_maint = array_append(queue_extra_maint, 'pgque.maint_idem')
             WHERE queue_id = qid;
        END IF;
    END IF;

    LOCK TABLE pgque.idem_switch IN ROW EXCLUSIVE MODE;
    -- Each pass sees a newer committed generation than the one before, so this ends: at
    -- a live claim, or with our own claim inserted.
    LOOP
        -- A statement of its own: under READ COMMITTED it sees the claim of a concurrent
        -- claimer that our INSERT below waited for.
        SELECT c.gen, c.event_id, c.expires_at INTO newest
          FROM pgque.idem_claim c
         WHERE c.queue_id = qid AND c.idem_key = i_idem_key
         ORDER BY c.gen DESC
         LIMIT 1;
        IF newest.expires_at > now() THEN
            IF drawn IS NOT NULL THEN
                -- We lost a race for the key after drawing an event id, which no event
                -- will carry: a gap in the queue's ids, only ever in this race. It is
                -- counted with the values forced ticks skip, so that the pending figures
                -- (30_ticker.sql) do not count it as an event.
                UPDATE pgque.queue SET queue_seq_skipped = queue_seq_skipped + 1
                 WHERE queue_id = qid;
            END IF;
            o_event_id := newest.event_id;
            o_deduped := true;
            RETURN;
        END IF;

        IF drawn IS NULL THEN
            -- Before drawing an id or claiming anything, like pgque._insert_event.
            IF disabled AND current_setting('session_replication_role') <> 'replica' THEN
                RAISE EXCEPTION 'Insert into queue disallowed' USING ERRCODE = 'PQ104';
            END IF;
            drawn := nextval(event_seq);
        END IF;
        -- A concurrent claimer of this generation makes the INSERT wait for its
        -- transaction, then do nothing if it committed (REPEATABLE READ raises a
        -- serialization failure instead). Only two claimers inserting at the very same
        -- instant can leave a tuple behind: the loser's killed speculative insert.
        INSERT INTO pgque.idem_claim (queue_id, idem_key, gen, event_id, expires_at, slot)
        SELECT qid, i_idem_key, coalesce(newest.gen, 0) + 1, drawn, now() + i_ttl,
               s.last_value
          FROM pgque.idem_slot s
        ON CONFLICT DO NOTHING;
        EXIT WHEN FOUND;
    END LOOP;

    -- Read now, not before the INSERT, which may have waited across a rotation.
    SELECT q.queue_cur_table, q.queue_data_pfx, q.queue_disable_insert
      INTO cur_table, data_pfx, disabled
      FROM pgque.queue q WHERE q.queue_id = qid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue not found: %', i_queue USING ERRCODE = 'PQ001';
    END IF;
    IF disabled AND current_setting('session_replication_role') <> 'replica' THEN
        RAISE EXCEPTION 'Insert into queue disallowed' USING ERRCODE = 'PQ104';
    END IF;
    IF NOT pgque._insert_static(qid, cur_table, drawn, i_type, i_payload,
                                i_partition_key, i_idem_key, NULL, NULL) THEN
        EXECUTE 'INSERT INTO ' || data_pfx || '_' || cur_table
                || ' (ev_id, ev_time, ev_type, ev_data, ev_extra1, ev_extra2)'
                   ' VALUES ($1, now(), $2, $3, $4, $5)'
            USING drawn, i_type, i_payload, i_partition_key, i_idem_key;
    END IF;
    o_event_id := drawn;
    o_deduped := false;
END
$$;

-- PL/pgSQL rather than SQL wrappers: a SQL function that cannot be inlined (SECURITY
-- DEFINER, SET) is planned again on every call before PostgreSQL 18, which made a
-- send_idem cost a third more than its work.
CREATE OR REPLACE FUNCTION pgque.send_idem(
    i_queue text, i_type text, i_payload text, i_idem_key text,
    i_ttl interval DEFAULT '1 hour', i_partition_key text DEFAULT NULL)
RETURNS TABLE (event_id bigint, deduped boolean)
LANGUAGE plpgsql
ROWS 1
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    SELECT r.o_event_id, r.o_deduped INTO event_id, deduped
      FROM pgque._send_idem(i_queue, i_type, i_payload, i_idem_key, i_ttl, i_partition_key) r;
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION pgque.send_idem(
    i_queue text, i_type text, i_payload jsonb, i_idem_key text,
    i_ttl interval DEFAULT '1 hour', i_partition_key text DEFAULT NULL)
RETURNS TABLE (event_id bigint, deduped boolean)
LANGUAGE plpgsql
ROWS 1
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    SELECT r.o_event_id, r.o_deduped INTO event_id, deduped
      FROM pgque._send_idem(i_queue, i_type, i_payload::text, i_idem_key, i_ttl,
                            i_partition_key) r;
    RETURN NEXT;
END
$$;

-- Claims GC for every queue: truncate each non-current partition whose claims have all
-- expired, move the current slot on to an empty partition, and hide the expired claims
-- left in the others. Nothing is capped, so it always returns 0 (PgQue's 1 means "cap
-- hit, call again").
--
-- The partition work takes the barrier described at the top only when there is some to
-- do. SHARE ROW EXCLUSIVE rather than SHARE: it also serialises concurrent runs, so each
-- decides on the slot it will switch from. Under the barrier no claimer runs, so a
-- partition cannot change between its check and its TRUNCATE. Any lock wait longer than
-- lock_timeout (the barrier, a partition someone reads directly, a concurrent run) gives
-- up this run's partition work: the subtransaction releases the locks it took, and the
-- next run tries again. The slot is set last; should the caller's transaction still roll
-- back, the slot stays switched (setval is not transactional) to a partition that may
-- then hold expired claims again, which costs space until a later run, not correctness.
CREATE OR REPLACE FUNCTION pgque.maint_idem()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
SET lock_timeout = '100ms'
AS $$
DECLARE
    cur integer;
    s integer;
    latest timestamptz;
    cur_used boolean;
    has_work boolean := false;
    target integer;
    watermark bigint := (extract(epoch FROM now()) * 1000000)::bigint;
BEGIN
    BEGIN
        SELECT last_value INTO cur FROM pgque.idem_slot;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgque.%I)', 'idem_claim_' || cur)
           INTO cur_used;
        FOR s IN 0 .. 2 LOOP
            CONTINUE WHEN s = cur;
            EXECUTE format('SELECT max(expires_at) FROM pgque.%I', 'idem_claim_' || s)
               INTO latest;
            IF latest < now() OR (latest IS NULL AND cur_used) THEN
                has_work := true;
            END IF;
        END LOOP;

        IF has_work THEN
            LOCK TABLE pgque.idem_switch IN SHARE ROW EXCLUSIVE MODE;
            -- Another run may have switched while we waited.
            SELECT last_value INTO cur FROM pgque.idem_slot;
            FOR i IN 1 .. 2 LOOP
                s := (cur + i) % 3;
                EXECUTE format('SELECT max(expires_at) FROM pgque.%I', 'idem_claim_' || s)
                   INTO latest;
                IF latest < now() THEN
                    EXECUTE format('TRUNCATE pgque.%I', 'idem_claim_' || s);
                    latest := NULL;
                END IF;
                IF latest IS NULL AND target IS NULL THEN
                    target := s;
                END IF;
            END LOOP;
            -- The first empty partition after the current one, not only the next: a
            -- long-lived claim in the next one must not keep the current one growing.
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgque.%I)', 'idem_claim_' || cur)
               INTO cur_used;
            IF target IS NOT NULL AND cur_used THEN
                PERFORM setval('pgque.idem_slot', target);
            END IF;
        END IF;
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;

    -- setval is not transactional either; never move the watermark back.
    IF watermark > (SELECT last_value FROM pgque.idem_gc_watermark) THEN
        PERFORM setval('pgque.idem_gc_watermark', watermark);
    END IF;
    RETURN 0;
END
$$;

-- The extra-maintenance hook maint() calls for each queue send_idem has used. The work
-- is global (expired claims of every queue go), which is harmless.
CREATE OR REPLACE FUNCTION pgque.maint_idem(i_queue_name text)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgque.queue WHERE queue_name = i_queue_name) THEN
        RETURN 0;
    END IF;
    RETURN pgque.maint_idem();
END
$$;

REVOKE ALL ON FUNCTION
    pgque._send_idem(text, text, text, text, interval, text),
    pgque.send_idem(text, text, text, text, interval, text),
    pgque.send_idem(text, text, jsonb, text, interval, text),
    pgque.maint_idem(),
    pgque.maint_idem(text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pgque.send_idem(text, text, text, text, interval, text),
    pgque.send_idem(text, text, jsonb, text, interval, text)
TO pgque_writer;
GRANT EXECUTE ON FUNCTION pgque.maint_idem(), pgque.maint_idem(text) TO pgque_admin;
