-- sqlalchemy-pgque engine: queue lifecycle, configuration and subscriptions.
--
-- Per-queue objects are named after the queue id, never the queue name, so any name
-- (up to the 57-byte notify-channel budget) works without quoting trouble.

-- 'schema.name' -> '"schema"."name"' with each part quoted only where needed.
CREATE OR REPLACE FUNCTION pgque.quote_fqname(i_name text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT CASE WHEN position('.' IN i_name) > 0
                THEN quote_ident(split_part(i_name, '.', 1)) || '.'
                     || quote_ident(substr(i_name, position('.' IN i_name) + 1))
                ELSE quote_ident(i_name)
           END;
$$;

-- last_value of a sequence: 1 both before and right after its first nextval, which is
-- why a queue's very first event does not count towards the ticker threshold.
CREATE OR REPLACE FUNCTION pgque.seq_getval(i_seq_name text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    v bigint;
BEGIN
    EXECUTE 'SELECT last_value FROM ' || pgque.quote_fqname(i_seq_name) INTO v;
    RETURN v;
END
$$;

-- Raise a sequence to at least i_new_value; never moves it backwards.
CREATE OR REPLACE FUNCTION pgque.seq_setval(i_seq_name text, i_new_value bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    cur bigint;
BEGIN
    cur := pgque.seq_getval(i_seq_name);
    IF i_new_value IS NULL OR i_new_value <= cur THEN
        RETURN cur;
    END IF;
    PERFORM setval(pgque.quote_fqname(i_seq_name)::regclass, i_new_value);
    RETURN i_new_value;
END
$$;

-- last_value and is_called of a sequence, read together. is_called is false only before
-- the first nextval, while last_value reads 1 with no value handed out (see above).
CREATE OR REPLACE FUNCTION pgque._seq_state(
    i_seq_name text, OUT last_value bigint, OUT is_called boolean)
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    EXECUTE 'SELECT last_value, is_called FROM ' || pgque.quote_fqname(i_seq_name)
       INTO last_value, is_called;
END
$$;

-- GRANT i_privilege ('ALL': every privilege the owner has) on a table or sequence to a
-- role (0: PUBLIC) unless the relation's ACL holds it already. Why only where missing:
-- on PostgreSQL 18 a GRANT locks the relation until the transaction ends, and install()
-- re-grants every queue's tables and sequences in its one transaction; at 10,000 queues
-- (40,000 tables, 20,000 sequences) a reinstall ran out of the shared lock table. The
-- check reads the catalog, which locks nothing.
CREATE OR REPLACE FUNCTION pgque._grant_if_missing(
    i_rel regclass, i_privilege text, i_grantee oid, i_grantable boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    kind "char";
    owner oid;
    acl aclitem[];
BEGIN
    SELECT c.relkind, c.relowner,
           coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char",
                                         c.relowner))
      INTO kind, owner, acl
      FROM pg_class c WHERE c.oid = i_rel;
    IF NOT EXISTS (
        SELECT d.privilege_type
          FROM aclexplode(acldefault(CASE WHEN kind = 'S' THEN 's' ELSE 'r' END::"char", owner)) d
         WHERE d.grantee = owner AND (i_privilege = 'ALL' OR d.privilege_type = i_privilege)
        EXCEPT
        SELECT a.privilege_type FROM aclexplode(acl) a
         WHERE a.grantee = i_grantee AND (a.is_grantable OR NOT i_grantable)) THEN
        RETURN false;
    END IF;
    EXECUTE format('GRANT %s ON %s %s TO %s%s', i_privilege,
                   CASE WHEN kind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, i_rel,
                   CASE WHEN i_grantee = 0 THEN 'PUBLIC'
                        ELSE quote_ident(pg_get_userbyid(i_grantee)) END,
                   CASE WHEN i_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    RETURN true;
END
$$;

-- Copy the explicit privileges of one relation onto another (grantee by grantee), those
-- it lacks.
CREATE OR REPLACE FUNCTION pgque._grant_perms_from(
    i_src_schema text, i_src_table text, i_dst_schema text, i_dst_table text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    acl record;
    granted integer := 0;
BEGIN
    FOR acl IN
        SELECT a.grantee, a.privilege_type, a.is_grantable
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         CROSS JOIN LATERAL aclexplode(c.relacl) a
         WHERE n.nspname = i_src_schema AND c.relname = i_src_table
           AND a.grantee <> c.relowner
    LOOP
        IF pgque._grant_if_missing(format('%I.%I', i_dst_schema, i_dst_table)::regclass,
                                   acl.privilege_type, acl.grantee, acl.is_grantable) THEN
            granted := granted + 1;
        END IF;
    END LOOP;
    RETURN granted;
END
$$;

-- Give a queue's tables the privileges of event_template and its sequences read access
-- for everyone (monitoring reads last_value) plus full use for the admin role.
CREATE OR REPLACE FUNCTION pgque.grant_perms(x_queue_name text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    tbl text;
    i integer;
    seq regclass;
    admin oid := to_regrole('pgque_admin');
BEGIN
    SELECT * INTO q FROM pgque.queue WHERE queue_name = x_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Queue not found' USING ERRCODE = 'PQ001';
    END IF;
    tbl := split_part(q.queue_data_pfx, '.', 2);
    PERFORM pgque._grant_perms_from('pgque', 'event_template', 'pgque', tbl);
    FOR i IN 0 .. q.queue_ntables - 1 LOOP
        PERFORM pgque._grant_perms_from('pgque', 'event_template', 'pgque', tbl || '_' || i);
    END LOOP;
    FOREACH seq IN ARRAY ARRAY[pgque.quote_fqname(q.queue_event_seq)::regclass,
                               pgque.quote_fqname(q.queue_tick_seq)::regclass] LOOP
        PERFORM pgque._grant_if_missing(seq, 'SELECT', 0);
        IF admin IS NOT NULL THEN
            PERFORM pgque._grant_if_missing(seq, 'ALL', admin);
        END IF;
    END LOOP;
    RETURN 1;
END
$$;

-- send and insert_event reach the current event table of a queue through
-- pgque._insert_static: one static INSERT per event table, so each keeps a cached plan
-- per session, where a dynamic EXECUTE is parsed and planned on every event (about
-- 20 us more server time per send, bench/bench_scale.py). The code is generated from
-- pgque.queue in two levels so that neither its size nor the work of create_queue grows
-- with the number of queues:
--   * an insert group holds the queues whose ids share queue_id / 64; its function
--     pgque._insert_static_g<group> has the INSERTs of those queues. create_queue and
--     drop_queue regenerate only their group.
--   * pgque._insert_static dispatches to the group functions by a binary search on
--     queue_id; it is regenerated only when a group appears or empties.
-- A session compiles a function on its first call after a change, so a session sending
-- to a few queues compiles a few groups, not every queue. Any (queue, table) the code
-- does not know answers false and the caller falls back to EXECUTE: a queue committed
-- concurrently with a REPEATABLE READ create_queue that regenerated its group without
-- seeing it stays correct, only slower. A dropped queue's branch is never reached: its
-- lookup fails first.
--
-- Memory: every expression PL/pgSQL evaluates keeps a cached plan of a few kB in the
-- session, so the generated code is laid out for few expressions per queue. A group
-- function branches on the table number first, then on queue_id (a binary search down
-- to runs of at most 8 equality tests), and every INSERT falls through to one shared
-- RETURN true: a session that sends to a queue keeps one test of its own besides the
-- INSERT's plan.
CREATE OR REPLACE FUNCTION pgque._insert_group_size()
RETURNS integer
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT 64;
$$;

-- PL/pgSQL code choosing among arms[lo .. hi] by $1 in a binary search: ranges of more
-- than 8 arms are split at split_at[mid] ($1 < it goes left), and a leaf tests
-- conditions[i] in turn, then runs otherwise. split_at and conditions ascend with i.
CREATE OR REPLACE FUNCTION pgque._search_branches(
    split_at integer[], conditions text[], arms text[], otherwise text,
    lo integer, hi integer)
RETURNS text
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    mid integer;
    code text := '';
BEGIN
    IF hi - lo >= 8 THEN
        mid := (lo + hi + 1) / 2;
        RETURN format($tmpl$IF $1 < %s THEN
%sELSE
%sEND IF;
$tmpl$, split_at[mid],
            pgque._search_branches(split_at, conditions, arms, otherwise, lo, mid - 1),
            pgque._search_branches(split_at, conditions, arms, otherwise, mid, hi));
    END IF;
    FOR i IN lo .. hi LOOP
        code := code || format($tmpl$%s %s THEN
%s$tmpl$, CASE WHEN i = lo THEN 'IF' ELSE 'ELSIF' END, conditions[i], arms[i]);
    END LOOP;
    RETURN code || otherwise || $tmpl$END IF;
$tmpl$;
END
$$;

-- Superseded by _search_branches.
DROP FUNCTION IF EXISTS pgque._insert_group_branches(integer[], text[], integer, integer, integer);
DROP FUNCTION IF EXISTS pgque._insert_dispatch_branches(integer[], integer, integer);

-- Write the function of one insert group, or drop it when the group has no queue left.
-- True when the function appeared or went, i.e. when the dispatcher must follow.
-- The generated bodies are only compiled by their first call; validating them at
-- CREATE time would repeat that parse. Invoker rights and no SET clause (each one costs
-- microseconds per call): they run inside the SECURITY DEFINER send functions, under
-- their search_path.
CREATE OR REPLACE FUNCTION pgque._write_insert_group(i_group integer)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
SET check_function_bodies = off
AS $fn$
DECLARE
    fn constant text := format('pgque._insert_static_g%s', i_group);
    sig constant text := '(integer, integer, bigint, text, text, text, text, text, text)';
    existed constant boolean := to_regprocedure(fn || sig) IS NOT NULL;
    table_count integer;
    queue_ids integer[];
    pfxs text[];
    code text := '';
BEGIN
    SELECT max(q.queue_ntables) INTO table_count FROM pgque.queue q
     WHERE q.queue_id >= i_group * pgque._insert_group_size()
       AND q.queue_id < (i_group + 1) * pgque._insert_group_size();
    IF table_count IS NULL THEN
        IF existed THEN
            EXECUTE 'DROP FUNCTION ' || fn || sig;
        END IF;
        RETURN existed;
    END IF;
    FOR n IN 0 .. table_count - 1 LOOP
        SELECT array_agg(q.queue_id ORDER BY q.queue_id),
               array_agg(q.queue_data_pfx ORDER BY q.queue_id)
          INTO queue_ids, pfxs
          FROM pgque.queue q
         WHERE q.queue_id >= i_group * pgque._insert_group_size()
           AND q.queue_id < (i_group + 1) * pgque._insert_group_size()
           AND q.queue_ntables > n;
        -- One INSERT per queue into its table number n, found by queue_id.
        code := code || format($tmpl$%s $2 = %s THEN
%s$tmpl$, CASE WHEN n = 0 THEN 'IF' ELSE 'ELSIF' END, n,
            pgque._search_branches(
                queue_ids,
                ARRAY(SELECT '$1 = ' || id FROM unnest(queue_ids) WITH ORDINALITY AS u(id, k)
                       ORDER BY k),
                ARRAY(SELECT format($ins$    INSERT INTO %I.%I (ev_id, ev_time, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
    VALUES ($3, pg_catalog.now(), $4, $5, $6, $7, $8, $9);
$ins$, split_part(pfx, '.', 1), split_part(pfx, '.', 2) || '_' || n)
                        FROM unnest(pfxs) WITH ORDINALITY AS u(pfx, k) ORDER BY k),
                $else$ELSE
    RETURN false;
$else$,
                1, cardinality(queue_ids)));
    END LOOP;
    EXECUTE format($tmpl$CREATE OR REPLACE FUNCTION %s(
    queue_id integer, cur_table integer, ev_id bigint, ev_type text, ev_data text,
    ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text)
RETURNS boolean
LANGUAGE plpgsql
AS $body$
BEGIN
%sELSE
    RETURN false;
END IF;
RETURN true;
END
$body$
$tmpl$, fn, code);
    IF existed THEN
        RETURN false;
    END IF;
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s%s FROM PUBLIC', fn, sig);
    RETURN true;
END
$fn$;

-- Write the dispatcher over the group functions that exist.
CREATE OR REPLACE FUNCTION pgque._write_insert_dispatch()
RETURNS void
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
SET check_function_bodies = off
AS $fn$
DECLARE
    groups integer[];
BEGIN
    groups := ARRAY(
        SELECT g FROM (SELECT DISTINCT queue_id / pgque._insert_group_size() AS g
                         FROM pgque.queue) AS present
         WHERE to_regprocedure(format('pgque._insert_static_g%s(integer, integer, bigint, '
                                      'text, text, text, text, text, text)', g)) IS NOT NULL
         ORDER BY g);
    EXECUTE format($tmpl$CREATE OR REPLACE FUNCTION pgque._insert_static(
    queue_id integer, cur_table integer, ev_id bigint, ev_type text, ev_data text,
    ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text)
RETURNS boolean
LANGUAGE plpgsql
AS $body$
BEGIN
%sRETURN false;
END
$body$
$tmpl$,
        -- A leaf tests only the upper bound of each group: an id in a group without a
        -- function lands in the next group's function, which does not know it and
        -- answers false.
        CASE WHEN cardinality(groups) = 0 THEN ''
             ELSE pgque._search_branches(
                 ARRAY(SELECT g * pgque._insert_group_size() FROM unnest(groups) WITH
                       ORDINALITY AS u(g, k) ORDER BY k),
                 ARRAY(SELECT '$1 < ' || (g + 1) * pgque._insert_group_size()
                         FROM unnest(groups) WITH ORDINALITY AS u(g, k) ORDER BY k),
                 ARRAY(SELECT format($ret$    RETURN pgque._insert_static_g%s($1, $2, $3, $4, $5, $6, $7, $8, $9);
$ret$, g) FROM unnest(groups) WITH ORDINALITY AS u(g, k) ORDER BY k),
                 '', 1, cardinality(groups)) END);
END
$fn$;

-- The group of one queue, after create_queue or drop_queue. Two sessions replacing one
-- function at once would fail with "tuple concurrently updated"; the later one waits on
-- this lock and then reads what the first committed.
CREATE OR REPLACE FUNCTION pgque._rebuild_insert_group(i_queue_id integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('sqlalchemy_pgque.insert_static'));
    IF pgque._write_insert_group(i_queue_id / pgque._insert_group_size()) THEN
        PERFORM pgque._write_insert_dispatch();
    END IF;
END
$fn$;

-- Earlier versions generated one function for the first 256 queues with this helper.
DROP FUNCTION IF EXISTS pgque._insert_static_branches(integer[], integer, integer);

-- Everything, on install: every group with queues, no function for a group without,
-- and the dispatcher.
CREATE OR REPLACE FUNCTION pgque._rebuild_insert_static()
RETURNS void
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $fn$
DECLARE
    g integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('sqlalchemy_pgque.insert_static'));
    FOR g IN
        SELECT queue_id / pgque._insert_group_size() FROM pgque.queue
        UNION
        SELECT substr(proname, length('_insert_static_g') + 1)::integer
          FROM pg_proc
         WHERE pronamespace = 'pgque'::regnamespace AND proname ~ '^_insert_static_g[0-9]+$'
    LOOP
        PERFORM pgque._write_insert_group(g);
    END LOOP;
    PERFORM pgque._write_insert_dispatch();
END
$fn$;

CREATE OR REPLACE FUNCTION pgque.create_queue(i_queue_name text)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    qid integer;
    tbl text;
    event_seq text;
    tick_seq text;
    i integer;
BEGIN
    IF i_queue_name IS NULL THEN
        RAISE EXCEPTION 'Invalid NULL value' USING ERRCODE = '22004';
    END IF;
    IF i_queue_name = '' THEN
        RAISE EXCEPTION 'queue name must not be empty' USING ERRCODE = 'PQ201';
    END IF;
    -- The notify channel 'pgque_' || name must fit in a 63-byte identifier.
    IF octet_length(i_queue_name) > 57 THEN
        RAISE EXCEPTION 'queue name too long: % bytes (max 57). The notify channel pgque_<name> must fit in 63 bytes', octet_length(i_queue_name)
            USING ERRCODE = 'PQ201';
    END IF;
    IF EXISTS (SELECT 1 FROM pgque.queue WHERE queue_name = i_queue_name) THEN
        RETURN 0;
    END IF;

    qid := nextval('pgque.queue_queue_id_seq');
    tbl := 'pgque.event_' || qid;
    event_seq := tbl || '_id_seq';
    tick_seq := tbl || '_tick_seq';

    -- A concurrent create of the same name wins; this one then reports "exists".
    INSERT INTO pgque.queue (queue_id, queue_name, queue_data_pfx, queue_event_seq, queue_tick_seq)
    VALUES (qid, i_queue_name, tbl, event_seq, tick_seq)
    ON CONFLICT (queue_name) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    EXECUTE 'CREATE SEQUENCE ' || event_seq;
    EXECUTE 'CREATE SEQUENCE ' || tick_seq;
    EXECUTE format('CREATE TABLE %s () INHERITS (pgque.event_template)', tbl);
    FOR i IN 0 .. 2 LOOP
        EXECUTE format('CREATE TABLE %s_%s () INHERITS (%s) '
                       'WITH (fillfactor = 100, autovacuum_enabled = off, toast.autovacuum_enabled = off)',
                       tbl, i, tbl);
        EXECUTE format('ALTER TABLE %s_%s ALTER COLUMN ev_id SET DEFAULT nextval(%L)',
                       tbl, i, event_seq);
        EXECUTE format('CREATE INDEX event_%s_%s_txid_idx ON %s_%s (ev_txid)', qid, i, tbl, i);
    END LOOP;
    PERFORM pgque.grant_perms(i_queue_name);
    PERFORM pgque.ticker(i_queue_name);
    PERFORM pgque._rebuild_insert_group(qid);
    RETURN 1;
END
$$;

CREATE OR REPLACE FUNCTION pgque.register_consumer_at(
    x_queue_name text, x_consumer_name text, x_tick_pos bigint)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    qid integer;
    cid integer;
    sub record;
    start_tick bigint;
BEGIN
    SELECT queue_id INTO qid FROM pgque.queue WHERE queue_name = x_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Event queue not created yet' USING ERRCODE = 'PQ001';
    END IF;
    IF x_tick_pos IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pgque.tick WHERE tick_queue = qid AND tick_id = x_tick_pos) THEN
        RAISE EXCEPTION 'cannot reposition, tick not found: %', x_tick_pos USING ERRCODE = 'PQ005';
    END IF;

    SELECT co_id INTO cid FROM pgque.consumer WHERE co_name = x_consumer_name;
    IF NOT FOUND THEN
        INSERT INTO pgque.consumer (co_name) VALUES (x_consumer_name)
        ON CONFLICT (co_name) DO NOTHING;
        SELECT co_id INTO cid FROM pgque.consumer WHERE co_name = x_consumer_name;
    END IF;

    SELECT * INTO sub FROM pgque.subscription
     WHERE sub_queue = qid AND sub_consumer = cid FOR UPDATE;
    IF FOUND THEN
        IF x_tick_pos IS NOT NULL THEN
            UPDATE pgque.subscription
               SET sub_last_tick = x_tick_pos, sub_batch = NULL, sub_next_tick = NULL,
                   sub_active = now()
             WHERE sub_queue = qid AND sub_consumer = cid;
        END IF;
        RETURN 0;
    END IF;

    IF x_tick_pos IS NOT NULL THEN
        start_tick := x_tick_pos;
    ELSE
        SELECT max(tick_id) INTO start_tick FROM pgque.tick WHERE tick_queue = qid;
        IF start_tick IS NULL THEN
            RAISE EXCEPTION 'No ticks for this queue.  Please run ticker on database.'
                USING ERRCODE = 'PQ107';
        END IF;
    END IF;
    INSERT INTO pgque.subscription (sub_queue, sub_consumer, sub_last_tick)
    VALUES (qid, cid, start_tick)
    ON CONFLICT (sub_queue, sub_consumer) DO NOTHING;
    -- Not found: a concurrent subscribe of the same pair committed first.
    RETURN CASE WHEN FOUND THEN 1 ELSE 0 END;
END
$$;

CREATE OR REPLACE FUNCTION pgque.register_consumer(x_queue_name text, x_consumer_id text)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.register_consumer_at(x_queue_name, x_consumer_id, NULL);
$$;

CREATE OR REPLACE FUNCTION pgque.subscribe(queue text, consumer text)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.register_consumer_at(queue, consumer, NULL);
$$;

-- Remove a cooperative member row, and its consumer row unless another queue still uses
-- it; with its last member gone the main becomes a normal consumer again. Retry rows
-- stay: they belong to the group's shared sub_id. The caller has locked the member row
-- and dealt with any open batch.
CREATE OR REPLACE FUNCTION pgque._drop_coop_member(
    i_queue_id integer, i_member_consumer integer, i_sub_id integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    DELETE FROM pgque.subscription
     WHERE sub_queue = i_queue_id AND sub_consumer = i_member_consumer;
    DELETE FROM pgque.consumer c
     WHERE c.co_id = i_member_consumer
       AND NOT EXISTS (SELECT 1 FROM pgque.subscription s WHERE s.sub_consumer = c.co_id);
    UPDATE pgque.subscription m
       SET sub_role = 'normal'
     WHERE m.sub_queue = i_queue_id AND m.sub_id = i_sub_id AND m.sub_role = 'coop_main'
       AND NOT EXISTS (SELECT 1 FROM pgque.subscription o
                        WHERE o.sub_queue = i_queue_id AND o.sub_id = i_sub_id
                          AND o.sub_role = 'coop_member');
END
$$;

-- Removes one subscription row. Cooperative groups share one sub_id: a member leaves
-- alone (the main is demoted to a normal consumer with the last one), while the main
-- can go only once it has no members.
CREATE OR REPLACE FUNCTION pgque.unregister_consumer(x_queue_name text, x_consumer_name text)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    sub record;
    sharing integer;
BEGIN
    -- A member's group main row is locked before the member row, the order the
    -- cooperative allocator uses; the other order can deadlock with an allocation.
    PERFORM 1
       FROM pgque.subscription s
       JOIN pgque.queue q ON q.queue_id = s.sub_queue
       JOIN pgque.consumer c ON c.co_id = s.sub_consumer
       JOIN pgque.subscription m ON m.sub_queue = s.sub_queue AND m.sub_id = s.sub_id
      WHERE q.queue_name = x_queue_name AND c.co_name = x_consumer_name
        AND s.sub_role = 'coop_member' AND m.sub_role = 'coop_main'
        FOR UPDATE OF m;
    SELECT s.sub_id, s.sub_queue, s.sub_consumer, s.sub_role, s.sub_batch
      INTO sub
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
      JOIN pgque.consumer c ON c.co_id = s.sub_consumer
     WHERE q.queue_name = x_queue_name AND c.co_name = x_consumer_name
       FOR UPDATE OF s;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    IF sub.sub_role = 'coop_member' THEN
        IF sub.sub_batch IS NOT NULL THEN
            RAISE EXCEPTION 'cannot unregister active cooperative subconsumer without forced batch handling: %/%',
                x_queue_name, x_consumer_name
                USING ERRCODE = 'PQ102';
        END IF;
        PERFORM pgque._drop_coop_member(sub.sub_queue, sub.sub_consumer, sub.sub_id);
        RETURN 1;
    END IF;

    IF sub.sub_role = 'coop_main' THEN
        IF EXISTS (SELECT 1 FROM pgque.subscription o
                    WHERE o.sub_queue = sub.sub_queue AND o.sub_id = sub.sub_id
                      AND o.sub_role = 'coop_member' AND o.sub_batch IS NOT NULL) THEN
            RAISE EXCEPTION 'cannot unregister cooperative consumer with active subconsumer batches: %/%',
                x_queue_name, x_consumer_name
                USING ERRCODE = 'PQ102';
        END IF;
        IF EXISTS (SELECT 1 FROM pgque.subscription o
                    WHERE o.sub_queue = sub.sub_queue AND o.sub_id = sub.sub_id
                      AND o.sub_role = 'coop_member') THEN
            RAISE EXCEPTION 'cannot unregister cooperative main consumer with registered subconsumers: %/%',
                x_queue_name, x_consumer_name
                USING ERRCODE = 'PQ101';
        END IF;
    END IF;

    SELECT count(*) INTO sharing FROM pgque.subscription
     WHERE sub_queue = sub.sub_queue AND sub_id = sub.sub_id;
    DELETE FROM pgque.retry_queue WHERE ev_owner = sub.sub_id AND ev_queue = sub.sub_queue;
    DELETE FROM pgque.subscription
     WHERE sub_queue = sub.sub_queue AND sub_consumer = sub.sub_consumer;
    DELETE FROM pgque.consumer c
     WHERE c.co_id = sub.sub_consumer
       AND NOT EXISTS (SELECT 1 FROM pgque.subscription s WHERE s.sub_consumer = c.co_id);
    RETURN sharing;
END
$$;

CREATE OR REPLACE FUNCTION pgque.unsubscribe(queue text, consumer text)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.unregister_consumer(queue, consumer);
$$;

CREATE OR REPLACE FUNCTION pgque.drop_queue(x_queue_name text, x_force boolean)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    member_name text;
BEGIN
    SELECT * INTO q FROM pgque.queue WHERE queue_name = x_queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'No such event queue' USING ERRCODE = 'PQ001';
    END IF;

    IF x_force THEN
        -- Name order puts a cooperative main before its '<main>.<sub>' members, so a
        -- group with members makes the drop fail instead of silently losing them.
        FOR member_name IN
            SELECT c.co_name FROM pgque.subscription s
              JOIN pgque.consumer c ON c.co_id = s.sub_consumer
             WHERE s.sub_queue = q.queue_id
             ORDER BY c.co_name
        LOOP
            PERFORM pgque.unregister_consumer(x_queue_name, member_name);
        END LOOP;
    ELSIF EXISTS (SELECT 1 FROM pgque.subscription WHERE sub_queue = q.queue_id) THEN
        RAISE EXCEPTION 'cannot drop queue, consumers still attached' USING ERRCODE = 'PQ103';
    END IF;

    EXECUTE 'DROP TABLE ' || pgque.quote_fqname(q.queue_data_pfx) || ' CASCADE';
    DELETE FROM pgque.tick WHERE tick_queue = q.queue_id;
    DELETE FROM pgque.retry_queue WHERE ev_queue = q.queue_id;
    -- Idempotency claims (82_idem.sql) have no foreign key to cascade from.
    DELETE FROM pgque.idem_claim WHERE queue_id = q.queue_id;
    EXECUTE 'DROP SEQUENCE ' || pgque.quote_fqname(q.queue_event_seq);
    EXECUTE 'DROP SEQUENCE ' || pgque.quote_fqname(q.queue_tick_seq);
    DELETE FROM pgque.queue WHERE queue_id = q.queue_id;
    PERFORM pgque._rebuild_insert_group(q.queue_id);
    RETURN 1;
END
$$;

CREATE OR REPLACE FUNCTION pgque.drop_queue(x_queue_name text)
RETURNS integer
LANGUAGE sql
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.drop_queue(x_queue_name, false);
$$;

CREATE OR REPLACE FUNCTION pgque.set_queue_config(
    x_queue_name text, x_param_name text, x_param_value text)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    param text;
    qid integer;
    int_value bigint;
    interval_value interval;
BEGIN
    IF x_queue_name IS NULL OR x_param_name IS NULL THEN
        RAISE EXCEPTION 'Invalid NULL value' USING ERRCODE = '22004';
    END IF;
    SELECT queue_id INTO qid FROM pgque.queue WHERE queue_name = x_queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'No such event queue' USING ERRCODE = 'PQ001';
    END IF;

    param := CASE WHEN x_param_name LIKE 'queue\_%' THEN substr(x_param_name, 7)
                  ELSE x_param_name END;
    IF param NOT IN ('ticker_max_count', 'ticker_max_lag', 'ticker_idle_period',
                     'ticker_paused', 'rotation_period', 'external_ticker', 'max_retries') THEN
        RAISE EXCEPTION 'cannot change parameter "%"', x_param_name USING ERRCODE = '22023';
    END IF;

    IF x_param_value IS NULL THEN
        EXECUTE format('UPDATE pgque.queue SET %I = DEFAULT WHERE queue_id = $1', 'queue_' || param)
            USING qid;
        RETURN 1;
    END IF;

    IF param = 'max_retries' THEN
        int_value := x_param_value::integer;
        IF int_value < 0 THEN
            RAISE EXCEPTION 'set_queue_config: max_retries must be >= 0, got %', int_value
                USING ERRCODE = '22023';
        END IF;
    ELSIF param = 'ticker_max_count' THEN
        int_value := x_param_value::integer;
        IF int_value <= 0 THEN
            RAISE EXCEPTION 'set_queue_config: ticker_max_count must be > 0, got %', int_value
                USING ERRCODE = '22023';
        END IF;
    ELSIF param IN ('ticker_max_lag', 'ticker_idle_period', 'rotation_period') THEN
        interval_value := x_param_value::interval;
        IF interval_value <= interval '0' THEN
            RAISE EXCEPTION 'set_queue_config: % must be > 0, got %', param, interval_value
                USING ERRCODE = '22023';
        END IF;
    END IF;

    EXECUTE format('UPDATE pgque.queue SET %1$I = $1::%2$s WHERE queue_id = $2',
                   'queue_' || param,
                   CASE WHEN param IN ('max_retries', 'ticker_max_count') THEN 'integer'
                        WHEN param IN ('ticker_paused', 'external_ticker') THEN 'boolean'
                        ELSE 'interval' END)
        USING x_param_value, qid;
    RETURN 1;
END
$$;

CREATE OR REPLACE FUNCTION pgque.current_event_table(x_queue_name text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
BEGIN
    SELECT * INTO q FROM pgque.queue WHERE queue_name = x_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Event queue not found' USING ERRCODE = 'PQ001';
    END IF;
    IF q.queue_disable_insert AND current_setting('session_replication_role') <> 'replica' THEN
        RAISE EXCEPTION 'Writing to queue disabled' USING ERRCODE = 'PQ104';
    END IF;
    RETURN q.queue_data_pfx || '_' || q.queue_cur_table;
END
$$;

GRANT EXECUTE ON FUNCTION
    pgque.register_consumer_at(text, text, bigint),
    pgque.register_consumer(text, text),
    pgque.subscribe(text, text),
    pgque.unregister_consumer(text, text),
    pgque.unsubscribe(text, text)
TO pgque_reader;
