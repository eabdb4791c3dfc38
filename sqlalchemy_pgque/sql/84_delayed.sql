-- sqlalchemy-pgque engine: delayed delivery (PgQue 0.3 send_at / maint_deliver_delayed).
--
-- A future send_at stores a holding row; the mover (maint_deliver_delayed, also run by
-- maint()) inserts every due row into its queue. Upstream deletes each delivered row,
-- one dead tuple per delayed message. Here the holding rows are only ever inserted and
-- truncated, like the event tables:
--
-- * "Delivered" is not written on the row. It is derived, PgQ-style, from the latest
--   run of the mover, which records (insert-only, in pgque.delayed_mover_log) its
--   snapshot, its now(), its own xid, the highest de_id among its own transaction's rows
--   and the rows it kept back. A row is delivered iff that run saw it (see
--   pgque._delayed_seen), it was due by then and it was not kept back. A row one run
--   saw is seen by every later run, so only the latest state matters, and each run
--   moves exactly the rows delivered by its own state but not by the previous one.
-- * Holding rows live in pgque.delayed_store, three partitions by slot; inserts go to
--   the current slot (kept in a sequence: no tuple, no lock). A non-current partition
--   whose rows are all delivered is truncated. The mover's state log is likewise split
--   in two partitions, and the one it switches into (holding only superseded states)
--   is truncated.
-- * pgque.delayed_events, the name tests and operators use, is a view of the rows not
--   delivered yet, with INSTEAD OF INSERT, UPDATE and DELETE. A DELETE (an operator
--   cancelling a delayed message) is a real delete, and an UPDATE a delete and a new
--   row: the only paths that leave dead tuples.
--
-- The mover relies on READ COMMITTED: after taking its lock it must see the previous
-- run's state, and its reclaim checks must see every committed row.

CREATE SEQUENCE IF NOT EXISTS pgque.delayed_events_de_id_seq;
-- The slot inserts go to. setval is not transactional: a switch survives a rollback of
-- the mover, which is harmless, as any row may sit in any partition.
CREATE SEQUENCE IF NOT EXISTS pgque.delayed_slot_seq MINVALUE 0 MAXVALUE 2 START 0;

CREATE TABLE IF NOT EXISTS pgque.delayed_store (
    de_id         bigint NOT NULL DEFAULT nextval('pgque.delayed_events_de_id_seq'),
    slot          smallint NOT NULL,
    de_queue_name text NOT NULL,
    de_deliver_at timestamptz NOT NULL,
    de_type       text,
    de_data       text,
    de_extra1     text,
    de_extra2     text,
    de_extra3     text,
    de_extra4     text,
    de_txid       xid8 NOT NULL DEFAULT pg_current_xact_id()
) PARTITION BY LIST (slot);
CREATE TABLE IF NOT EXISTS pgque.delayed_store_0 PARTITION OF pgque.delayed_store FOR VALUES IN (0);
CREATE TABLE IF NOT EXISTS pgque.delayed_store_1 PARTITION OF pgque.delayed_store FOR VALUES IN (1);
CREATE TABLE IF NOT EXISTS pgque.delayed_store_2 PARTITION OF pgque.delayed_store FOR VALUES IN (2);
-- Rows becoming due; rows committed since a mover's snapshot (with the due time, so that
-- the index alone filters out the ones not due yet); kept-back rows and cancellation.
CREATE INDEX IF NOT EXISTS delayed_store_deliver_idx ON pgque.delayed_store (de_deliver_at);
CREATE INDEX IF NOT EXISTS delayed_store_txid_idx ON pgque.delayed_store (de_txid, de_deliver_at);
CREATE INDEX IF NOT EXISTS delayed_store_id_idx ON pgque.delayed_store (de_id);

-- One row per mover run. run counts the runs; log_part is the partition the run went
-- to, current since run part_since.
CREATE TABLE IF NOT EXISTS pgque.delayed_mover_log (
    run        bigint NOT NULL,
    log_part   smallint NOT NULL,
    part_since bigint NOT NULL,
    moved_at   timestamptz NOT NULL,
    snap       pg_snapshot NOT NULL,
    mover_xid  xid8 NOT NULL,
    own_max_id bigint NOT NULL,
    kept_ids   bigint[] NOT NULL
) PARTITION BY LIST (log_part);
CREATE TABLE IF NOT EXISTS pgque.delayed_mover_log_0 PARTITION OF pgque.delayed_mover_log FOR VALUES IN (0);
CREATE TABLE IF NOT EXISTS pgque.delayed_mover_log_1 PARTITION OF pgque.delayed_mover_log FOR VALUES IN (1);
CREATE INDEX IF NOT EXISTS delayed_mover_log_run_idx ON pgque.delayed_mover_log (run);

-- Taking over an upstream install that loaded its experimental delayed.sql: its holding
-- table makes way for the view, its rows move into the store. Inserted by this
-- transaction, they are pending for every state recorded so far, and keep their ids
-- (the sequence, owned by the old table, is kept).
DO $upstream_delayed$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class
                WHERE oid = to_regclass('pgque.delayed_events') AND relkind = 'r') THEN
        ALTER SEQUENCE pgque.delayed_events_de_id_seq OWNED BY NONE;
        INSERT INTO pgque.delayed_store (de_id, slot, de_queue_name, de_deliver_at, de_type,
                                         de_data, de_extra1, de_extra2, de_extra3, de_extra4)
        SELECT de_id, 0, de_queue_name, de_deliver_at, de_type, de_data,
               de_extra1, de_extra2, de_extra3, de_extra4
          FROM pgque.delayed_events;
        DROP TABLE pgque.delayed_events;
    END IF;
END
$upstream_delayed$;

-- The state before any run: due never, nothing seen (xmax 1), so every row is pending.
-- Only a first install adds it; a reinstall keeps the log, and with it which rows were
-- delivered.
INSERT INTO pgque.delayed_mover_log
SELECT 0, 0, 0, '-infinity', '1:1:', '0', 0, '{}'
 WHERE NOT EXISTS (SELECT 1 FROM pgque.delayed_mover_log);

-- Whether the mover run with this snapshot and xid saw the row. Its own transaction's
-- rows cannot be judged by the snapshot: pg_current_snapshot() does not list the
-- current transaction as running, so its xid tests visible as soon as a later one has
-- ended, also for rows it inserts after the run. Those rows are told apart by de_id,
-- drawn in increasing order within the transaction.
CREATE OR REPLACE FUNCTION pgque._delayed_seen(
    de_id bigint, de_txid xid8, snap pg_snapshot, mover_xid xid8, own_max_id bigint)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT CASE WHEN de_txid = mover_xid THEN de_id <= own_max_id
                ELSE pg_visible_in_snapshot(de_txid, snap) END;
$$;

-- Store a holding row in the current slot and return its de_id.
CREATE OR REPLACE FUNCTION pgque._delayed_hold(
    queue_name text, deliver_at timestamptz, ev_type text, ev_data text,
    ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text)
RETURNS bigint
LANGUAGE sql
AS $$
    INSERT INTO pgque.delayed_store (slot, de_queue_name, de_deliver_at, de_type, de_data,
                                     de_extra1, de_extra2, de_extra3, de_extra4)
    SELECT s.last_value::smallint, queue_name, deliver_at, ev_type, ev_data,
           ev_extra1, ev_extra2, ev_extra3, ev_extra4
      FROM pgque.delayed_slot_seq s
    RETURNING de_id;
$$;

-- The rows not delivered yet, by the latest mover state. The three branches are
-- disjoint and each can use one index: not due at the last run; due, but committed
-- after its snapshot or kept back; older and kept back. The seen test is written out
-- rather than calling pgque._delayed_seen: a view's functions are checked against the
-- querying role, and a reader has no EXECUTE on internal helpers.
CREATE OR REPLACE VIEW pgque.delayed_events AS
WITH latest AS (
    SELECT moved_at, snap, mover_xid, own_max_id, kept_ids
      FROM pgque.delayed_mover_log
     ORDER BY run DESC
     LIMIT 1
)
SELECT s.de_id, s.de_queue_name, s.de_deliver_at, s.de_type, s.de_data,
       s.de_extra1, s.de_extra2, s.de_extra3, s.de_extra4
  FROM latest l JOIN pgque.delayed_store s ON s.de_deliver_at > l.moved_at
UNION ALL
SELECT s.de_id, s.de_queue_name, s.de_deliver_at, s.de_type, s.de_data,
       s.de_extra1, s.de_extra2, s.de_extra3, s.de_extra4
  FROM latest l JOIN pgque.delayed_store s
    ON s.de_deliver_at <= l.moved_at AND s.de_txid >= pg_snapshot_xmin(l.snap)
 WHERE s.de_id = ANY (l.kept_ids)
    OR NOT CASE WHEN s.de_txid = l.mover_xid THEN s.de_id <= l.own_max_id
                ELSE pg_visible_in_snapshot(s.de_txid, l.snap) END
UNION ALL
SELECT s.de_id, s.de_queue_name, s.de_deliver_at, s.de_type, s.de_data,
       s.de_extra1, s.de_extra2, s.de_extra3, s.de_extra4
  FROM latest l JOIN pgque.delayed_store s
    ON s.de_deliver_at <= l.moved_at AND s.de_txid < pg_snapshot_xmin(l.snap)
 WHERE s.de_id = ANY (l.kept_ids);

-- The row goes to the current slot with a fresh de_id, whatever de_id the INSERT named:
-- the mover tells its own transaction's rows apart by increasing ids.
CREATE OR REPLACE FUNCTION pgque._delayed_events_insert()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    NEW.de_id := pgque._delayed_hold(NEW.de_queue_name, NEW.de_deliver_at, NEW.de_type,
                                     NEW.de_data, NEW.de_extra1, NEW.de_extra2,
                                     NEW.de_extra3, NEW.de_extra4);
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION pgque._delayed_events_delete()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    DELETE FROM pgque.delayed_store WHERE de_id = OLD.de_id;
    RETURN OLD;
END
$$;

-- An UPDATE (rescheduling; the testing toolkit's deliver(include_delayed=True) makes
-- held events due now) holds the new version as a new row: a row keeps the
-- inserting transaction's id, so rewriting it in place under a newer due time could
-- make it count as delivered by a mover run that never saw it.
CREATE OR REPLACE FUNCTION pgque._delayed_events_update()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    DELETE FROM pgque.delayed_store WHERE de_id = OLD.de_id;
    NEW.de_id := pgque._delayed_hold(NEW.de_queue_name, NEW.de_deliver_at, NEW.de_type,
                                     NEW.de_data, NEW.de_extra1, NEW.de_extra2,
                                     NEW.de_extra3, NEW.de_extra4);
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER delayed_events_insert
    INSTEAD OF INSERT ON pgque.delayed_events
    FOR EACH ROW EXECUTE FUNCTION pgque._delayed_events_insert();
CREATE OR REPLACE TRIGGER delayed_events_delete
    INSTEAD OF DELETE ON pgque.delayed_events
    FOR EACH ROW EXECUTE FUNCTION pgque._delayed_events_delete();
CREATE OR REPLACE TRIGGER delayed_events_update
    INSTEAD OF UPDATE ON pgque.delayed_events
    FOR EACH ROW EXECUTE FUNCTION pgque._delayed_events_update();

CREATE OR REPLACE FUNCTION pgque.send_at(
    i_queue text, i_type text, i_payload jsonb, i_deliver_at timestamptz)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    RETURN pgque.send_at(i_queue, i_type, i_payload, i_deliver_at, NULL, NULL, NULL, NULL);
END
$$;

-- Ours, beyond the 0.3 API: send_at with the four extra fields, which the delivered
-- event carries (the Python layer's Queue.send(deliver_at=..., extra1=...), and the
-- trace context it puts in extra4). No defaults, so the 4-argument calls stay unambiguous.
CREATE OR REPLACE FUNCTION pgque.send_at(
    i_queue text, i_type text, i_payload jsonb, i_deliver_at timestamptz,
    i_extra1 text, i_extra2 text, i_extra3 text, i_extra4 text)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF i_deliver_at <= now() THEN
        RETURN pgque._insert_event(i_queue, i_type, i_payload::text,
                                   i_extra1, i_extra2, i_extra3, i_extra4);
    END IF;
    -- Neither the queue nor its insert switch is checked here (spec): the mover does it.
    RETURN pgque._delayed_hold(i_queue, i_deliver_at, i_type, i_payload::text,
                               i_extra1, i_extra2, i_extra3, i_extra4);
END
$$;

-- Whether partition slot of the store holds rows, all delivered by the given state.
-- Each query is a statement of its own, so under READ COMMITTED it sees every row
-- committed so far, also after the state's snapshot (those count as not delivered).
CREATE OR REPLACE FUNCTION pgque._delayed_slot_drained(
    i_slot smallint, moved_at timestamptz, snap pg_snapshot, mover_xid xid8,
    own_max_id bigint, kept_ids bigint[])
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgque.delayed_store WHERE slot = i_slot) THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pgque.delayed_store
                WHERE slot = i_slot AND de_deliver_at > moved_at) THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pgque.delayed_store s
                WHERE s.slot = i_slot AND s.de_deliver_at <= moved_at
                  AND s.de_txid >= pg_snapshot_xmin(snap)
                  AND NOT pgque._delayed_seen(s.de_id, s.de_txid, snap, mover_xid, own_max_id)) THEN
        RETURN false;
    END IF;
    RETURN NOT EXISTS (SELECT 1 FROM pgque.delayed_store
                        WHERE slot = i_slot AND de_id = ANY (kept_ids));
END
$$;

CREATE OR REPLACE FUNCTION pgque.maint_deliver_delayed()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    -- Runs a log partition takes before the mover switches to the other one.
    log_runs CONSTANT integer := 1000;
    -- Rows (by de_id span) the current slot takes before inserts move on: a truncation
    -- rewrites a few catalog rows, so it should free many holding rows at once.
    slot_rows CONSTANT integer := 1000;
    prev pgque.delayed_mover_log%ROWTYPE;
    snap pg_snapshot;
    mover_xid xid8;
    own_max_id bigint;
    moved_at timestamptz;
    kept_ids bigint[] := '{}';
    discarded jsonb := '{}';
    held jsonb := '{}';
    woken text[] := '{}';
    moved integer := 0;
    log_part smallint;
    part_since bigint;
    cur_slot smallint;
    other_slot smallint;
    r record;
BEGIN
    IF current_setting('transaction_isolation') NOT IN ('read committed', 'read uncommitted') THEN
        RAISE EXCEPTION 'pgque.maint_deliver_delayed needs READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = '25000',
                  HINT = 'a stricter level would hide the previous run of the mover and deliver its rows again';
    END IF;
    -- One mover at a time. A mover that waited here reads the state of the one before it
    -- in the next statement.
    LOCK TABLE pgque.delayed_mover_log IN SHARE ROW EXCLUSIVE MODE;
    SELECT * INTO prev FROM pgque.delayed_mover_log ORDER BY run DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgque.delayed_mover_log holds no state: reinstall the engine'
            USING ERRCODE = 'PQ901';
    END IF;
    SELECT pg_current_snapshot(), pg_current_xact_id() INTO snap, mover_xid;
    -- A mover whose transaction began before the previous one's still counts as later.
    moved_at := greatest(now(), prev.moved_at);
    SELECT coalesce(max(s.de_id), 0) INTO own_max_id
      FROM pgque.delayed_store s WHERE s.de_txid = mover_xid;

    -- Pending at the previous state, delivered by this one: due since the previous run;
    -- due before it but committed after its snapshot (or its own later rows); kept back.
    FOR r IN
        SELECT c.*, q.queue_id IS NULL AS unknown,
               coalesce(q.queue_disable_insert, false)
                   AND current_setting('session_replication_role') <> 'replica' AS disabled
          FROM (
            SELECT s.* FROM pgque.delayed_store s
             WHERE s.de_deliver_at > prev.moved_at AND s.de_deliver_at <= moved_at
            UNION ALL
            SELECT s.* FROM pgque.delayed_store s
             WHERE s.de_deliver_at <= prev.moved_at
               AND s.de_txid >= pg_snapshot_xmin(prev.snap)
               AND (s.de_id = ANY (prev.kept_ids)
                    OR NOT pgque._delayed_seen(s.de_id, s.de_txid, prev.snap,
                                               prev.mover_xid, prev.own_max_id))
            UNION ALL
            SELECT s.* FROM pgque.delayed_store s
             WHERE s.de_deliver_at <= prev.moved_at
               AND s.de_txid < pg_snapshot_xmin(prev.snap)
               AND s.de_id = ANY (prev.kept_ids)
          ) c
          LEFT JOIN pgque.queue q ON q.queue_name = c.de_queue_name
         -- Not rows committed after this run's snapshot was taken: the statement sees
         -- them, the state will not, so the next run moves them.
         WHERE pgque._delayed_seen(c.de_id, c.de_txid, snap, mover_xid, own_max_id)
         ORDER BY c.de_deliver_at, c.de_id
    LOOP
        IF r.unknown THEN
            -- The queue was dropped or renamed: this row can never be delivered, and
            -- kept it would warn on every run. Leaving it out of kept_ids discards it.
            discarded := jsonb_set(discarded, ARRAY[r.de_queue_name],
                                   to_jsonb(coalesce((discarded ->> r.de_queue_name)::int, 0) + 1));
        ELSIF r.disabled THEN
            kept_ids := kept_ids || r.de_id;
            held := jsonb_set(held, ARRAY[r.de_queue_name],
                              to_jsonb(coalesce((held ->> r.de_queue_name)::int, 0) + 1));
        ELSE
            PERFORM pgque._insert_event(r.de_queue_name, r.de_type, r.de_data,
                                        r.de_extra1, r.de_extra2, r.de_extra3, r.de_extra4);
            moved := moved + 1;
            IF NOT r.de_queue_name = ANY (woken) THEN
                woken := woken || r.de_queue_name;
            END IF;
        END IF;
    END LOOP;
    -- The commit-wake channel of the Python layer's ticker (sqlalchemy_pgque.Queue
    -- notifies it on every send): a ticker listening ticks these queues as soon as this
    -- transaction commits, whoever ran the mover (the ticker itself, or maint() under
    -- pg_cron). get_queue_info().ev_new cannot tell it: a queue's first event goes
    -- uncounted there (ENGINE.md §6.5).
    PERFORM pg_notify('sqlalchemy_pgque_wake', name) FROM unnest(woken) AS name;
    FOR r IN SELECT key, value FROM jsonb_each_text(discarded) ORDER BY key LOOP
        RAISE WARNING 'pgque.maint_deliver_delayed: queue not found: %; discarded % delayed event(s)',
            r.key, r.value;
    END LOOP;
    FOR r IN SELECT key, value FROM jsonb_each_text(held) ORDER BY key LOOP
        RAISE WARNING 'pgque.maint_deliver_delayed: inserts into queue % are disabled; kept % delayed event(s) for a later run',
            r.key, r.value;
    END LOOP;

    log_part := prev.log_part;
    part_since := prev.part_since;
    IF prev.run + 1 - prev.part_since >= log_runs THEN
        -- The other partition holds only states older than prev. A reader holding it
        -- (a long transaction that read delayed_events) defers the switch to a later run.
        BEGIN
            EXECUTE format('LOCK TABLE pgque.%I IN ACCESS EXCLUSIVE MODE NOWAIT',
                           'delayed_mover_log_' || (1 - prev.log_part));
            EXECUTE format('TRUNCATE pgque.%I', 'delayed_mover_log_' || (1 - prev.log_part));
            log_part := 1 - prev.log_part;
            part_since := prev.run + 1;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END IF;
    INSERT INTO pgque.delayed_mover_log
    VALUES (prev.run + 1, log_part, part_since, moved_at, snap, mover_xid, own_max_id, kept_ids);

    -- Reclaim: a non-current partition whose rows are all delivered is truncated. Lock
    -- first, then check again: the lock waits for no inserter (NOWAIT: one in flight
    -- means rows to come, so try next run), and the second check sees every row
    -- committed before the lock.
    SELECT last_value::smallint INTO cur_slot FROM pgque.delayed_slot_seq;
    FOR other_slot IN SELECT (cur_slot + k) % 3 FROM generate_series(1, 2) AS k LOOP
        CONTINUE WHEN NOT pgque._delayed_slot_drained(other_slot, moved_at, snap, mover_xid,
                                                      own_max_id, kept_ids);
        BEGIN
            EXECUTE format('LOCK TABLE pgque.%I IN ACCESS EXCLUSIVE MODE NOWAIT',
                           'delayed_store_' || other_slot);
        EXCEPTION WHEN lock_not_available THEN
            CONTINUE;
        END;
        IF pgque._delayed_slot_drained(other_slot, moved_at, snap, mover_xid,
                                       own_max_id, kept_ids) THEN
            EXECUTE format('TRUNCATE pgque.%I', 'delayed_store_' || other_slot);
        END IF;
    END LOOP;

    -- Move inserts on to an empty partition once the current one is full enough.
    IF (SELECT max(de_id) - min(de_id) + 1 FROM pgque.delayed_store WHERE slot = cur_slot)
       >= slot_rows THEN
        SELECT k.slot INTO other_slot
          FROM (SELECT ((cur_slot + n) % 3)::smallint AS slot, n FROM generate_series(1, 2) AS n) k
         WHERE NOT EXISTS (SELECT 1 FROM pgque.delayed_store s WHERE s.slot = k.slot)
         ORDER BY k.n
         LIMIT 1;
        IF FOUND THEN
            PERFORM setval('pgque.delayed_slot_seq', other_slot);
        END IF;
    END IF;
    RETURN moved;
END
$$;

-- The earliest due time among rows not delivered yet (in the past for rows committed
-- after the last run), NULL if none: a ticker sleeps until then, then runs the mover.
-- Kept-back rows are left out, or the ticker would spin on a queue with inserts
-- disabled; maint() retries them.
CREATE OR REPLACE FUNCTION pgque.next_delayed_due()
RETURNS timestamptz
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    l pgque.delayed_mover_log%ROWTYPE;
BEGIN
    SELECT * INTO l FROM pgque.delayed_mover_log ORDER BY run DESC LIMIT 1;
    RETURN least(
        (SELECT min(s.de_deliver_at) FROM pgque.delayed_store s
          WHERE s.de_deliver_at > l.moved_at),
        (SELECT min(s.de_deliver_at) FROM pgque.delayed_store s
          WHERE s.de_deliver_at <= l.moved_at
            AND s.de_txid >= pg_snapshot_xmin(l.snap)
            AND s.de_id <> ALL (l.kept_ids)
            AND NOT pgque._delayed_seen(s.de_id, s.de_txid, l.snap, l.mover_xid, l.own_max_id)));
END
$$;

GRANT EXECUTE ON FUNCTION pgque.send_at(text, text, jsonb, timestamptz) TO pgque_writer;
GRANT EXECUTE ON FUNCTION pgque.send_at(text, text, jsonb, timestamptz, text, text, text, text)
    TO pgque_writer;
