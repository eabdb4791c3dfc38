-- sqlalchemy-pgque engine: table rotation, periodic maintenance and the ticker loop.
--
-- Each queue writes into one of three child tables. Rotation switches writes to the
-- next child after TRUNCATE-ing it, which is how space comes back without dead tuples.
-- It is split in two steps run in separate transactions: step 1 switches tables and
-- records its txid; step 2, committed later, records the txid from which no reader can
-- need the table before the switch any more. A table is recycled only when every
-- subscription's cursor tick was taken after the previous step 2.

CREATE OR REPLACE FUNCTION pgque.maint_rotate_tables_step1(i_queue_name text)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    cur_txid bigint;
    low_tick bigint;
    low_xmin bigint;
    next_table integer;
BEGIN
    SELECT * INTO q
      FROM pgque.queue
     WHERE queue_name = i_queue_name
       AND queue_rotation_period IS NOT NULL
       AND queue_switch_step2 IS NOT NULL
       AND queue_switch_time + queue_rotation_period < current_timestamp
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    cur_txid := pg_current_xact_id()::text::bigint;
    IF cur_txid < q.queue_switch_step1 THEN
        RAISE EXCEPTION 'queue % maint failure: step1=%, current=%',
            i_queue_name, q.queue_switch_step1, cur_txid
            USING ERRCODE = 'PQ901';
    END IF;

    -- The slowest subscription may still read the table written before the last
    -- switch until its cursor tick was taken after step 2 of that switch.
    SELECT min(sub_last_tick) INTO low_tick FROM pgque.subscription WHERE sub_queue = q.queue_id;
    IF low_tick IS NOT NULL THEN
        SELECT pg_snapshot_xmin(tick_snapshot)::text::bigint INTO low_xmin
          FROM pgque.tick WHERE tick_queue = q.queue_id AND tick_id = low_tick;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'queue % maint failure: tick % not found', i_queue_name, low_tick
                USING ERRCODE = 'PQ901';
        END IF;
        IF low_xmin <= q.queue_switch_step2 THEN
            RETURN 0;
        END IF;
    END IF;

    next_table := (q.queue_cur_table + 1) % q.queue_ntables;
    -- A reader still scanning the table makes TRUNCATE wait; try again next time instead.
    BEGIN
        EXECUTE format('LOCK TABLE %s NOWAIT',
                       pgque.quote_fqname(q.queue_data_pfx || '_' || next_table));
        EXECUTE format('TRUNCATE %s', pgque.quote_fqname(q.queue_data_pfx || '_' || next_table));
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;

    UPDATE pgque.queue
       SET queue_cur_table = next_table,
           queue_switch_time = current_timestamp,
           queue_switch_step1 = cur_txid,
           queue_switch_step2 = NULL
     WHERE queue_id = q.queue_id;

    DELETE FROM pgque.tick
     WHERE tick_queue = q.queue_id
       AND pg_snapshot_xmin(tick_snapshot) < q.queue_switch_step2::text::xid8;
    RETURN 0;
END
$$;

CREATE OR REPLACE FUNCTION pgque.maint_rotate_tables_step2()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    UPDATE pgque.queue
       SET queue_switch_step2 = pg_current_xact_id()::text::bigint
     WHERE queue_switch_step2 IS NULL;
    RETURN 0;
END
$$;

-- Tables that need a manual VACUUM: none while autovacuum runs. Event tables never do:
-- they are only inserted into and truncated.
CREATE OR REPLACE FUNCTION pgque.maint_tables_to_vacuum()
RETURNS SETOF text
LANGUAGE sql
STABLE
SET search_path = pgque, pg_catalog
AS $$
    SELECT t.name
      FROM unnest(ARRAY['pgque.queue', 'pgque.consumer', 'pgque.subscription',
                        'pgque.tick', 'pgque.retry_queue']) WITH ORDINALITY AS t(name, ord)
     WHERE NOT current_setting('autovacuum')::boolean
     ORDER BY t.ord;
$$;

-- The maintenance list: rotation step 1 of every queue due for it, the step 2 marker
-- (run separately, in a later transaction), each queue's extra maintenance functions,
-- then tables to vacuum.
CREATE OR REPLACE FUNCTION pgque.maint_operations(OUT func_name text, OUT func_arg text)
RETURNS SETOF record
LANGUAGE plpgsql
STABLE
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q record;
    extra text;
BEGIN
    FOR q IN
        SELECT queue_name FROM pgque.queue
         WHERE queue_rotation_period IS NOT NULL
           AND queue_switch_step2 IS NOT NULL
           AND queue_switch_time + queue_rotation_period < current_timestamp
         ORDER BY queue_name
    LOOP
        func_name := 'pgque.maint_rotate_tables_step1';
        func_arg := q.queue_name;
        RETURN NEXT;
    END LOOP;

    func_name := 'pgque.maint_rotate_tables_step2';
    func_arg := NULL;
    RETURN NEXT;

    FOR q IN
        SELECT queue_name, queue_extra_maint FROM pgque.queue
         WHERE queue_extra_maint IS NOT NULL
         ORDER BY queue_name
    LOOP
        FOREACH extra IN ARRAY q.queue_extra_maint LOOP
            func_name := extra;
            func_arg := q.queue_name;
            RETURN NEXT;
        END LOOP;
    END LOOP;

    FOR extra IN SELECT pgque.maint_tables_to_vacuum() LOOP
        func_name := 'vacuum';
        func_arg := extra;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Run the maintenance list. Step 2 and VACUUM are skipped (they cannot run here). Every
-- other entry is called as <name>(text) with the queue name, but only if it has the same
-- owner as this function: maint() runs with its owner's rights, and queue_extra_maint
-- must not let whoever can edit a queue row run arbitrary code as that owner.
-- Then the delayed-delivery mover (84_delayed.sql) runs, and its count is added; it needs
-- READ COMMITTED, so under a stricter level maint() skips it with a warning rather than
-- fail rotation and the other entries with it.
CREATE OR REPLACE FUNCTION pgque.maint()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    op record;
    fn regprocedure;
    fn_row record;
    maint_owner oid;
    result bigint;
    total bigint := 0;
BEGIN
    SELECT proowner INTO maint_owner FROM pg_proc WHERE oid = 'pgque.maint()'::regprocedure;
    FOR op IN SELECT func_name, func_arg FROM pgque.maint_operations() LOOP
        CONTINUE WHEN op.func_name IN ('vacuum', 'pgque.maint_rotate_tables_step2');
        BEGIN
            fn := to_regprocedure(op.func_name || '(text)');
        EXCEPTION WHEN OTHERS THEN
            fn := NULL;
        END;
        IF fn IS NULL THEN
            RAISE WARNING 'pgque.maint: skipping %(text) for queue %: function not found',
                op.func_name, op.func_arg;
            CONTINUE;
        END IF;
        SELECT n.nspname, p.proname, p.proowner, p.prorettype INTO fn_row
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE p.oid = fn;
        IF fn_row.proowner <> maint_owner THEN
            RAISE WARNING 'pgque.maint: skipping % for queue %: its owner is not the owner of pgque.maint()',
                fn, op.func_arg;
            CONTINUE;
        END IF;
        IF fn_row.prorettype IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype) THEN
            EXECUTE format('SELECT %I.%I($1::text)', fn_row.nspname, fn_row.proname)
                INTO result USING op.func_arg;
            total := total + coalesce(result, 0);
        ELSE
            EXECUTE format('SELECT %I.%I($1::text)', fn_row.nspname, fn_row.proname)
                USING op.func_arg;
        END IF;
    END LOOP;
    IF current_setting('transaction_isolation') IN ('read committed', 'read uncommitted') THEN
        total := total + pgque.maint_deliver_delayed();
    ELSE
        RAISE WARNING 'pgque.maint: skipping pgque.maint_deliver_delayed(): it needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    RETURN total;
END
$$;

-- One second of ticking for a once-per-second scheduler: tick every tick_period_ms,
-- committing each tick so consumers see it at once. COMMIT rules out a SET clause, so
-- this runs with the caller's rights and names every object with its schema.
CREATE OR REPLACE PROCEDURE pgque.ticker_loop()
LANGUAGE plpgsql
AS $$
DECLARE
    period_ms integer;
    iterations integer;
    started timestamptz := pg_catalog.clock_timestamp();
    i integer;
    after_id integer;
BEGIN
    SELECT c.tick_period_ms INTO period_ms FROM pgque.config c;
    IF period_ms IS NULL OR period_ms < 1 THEN
        period_ms := 100;
    ELSIF period_ms > 1000 THEN
        period_ms := 1000;
    END IF;
    iterations := GREATEST(1, 1000 / period_ms);
    FOR i IN 1 .. iterations LOOP
        -- A pass in steps, each committed: the locks held stay bounded however many
        -- queues there are (see pgque._tick_due).
        after_id := 0;
        LOOP
            SELECT s.next_queue_id INTO after_id FROM pgque.ticker_step(after_id) s;
            COMMIT;
            EXIT WHEN after_id IS NULL;
        END LOOP;
        EXIT WHEN i = iterations
               OR pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - started) * 1000
                  + period_ms >= 1000;
        PERFORM pg_catalog.pg_sleep(period_ms / 1000.0);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgque.set_tick_period_ms(p_period_ms integer)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF p_period_ms IS NULL OR p_period_ms < 1 OR p_period_ms > 1000
       OR 1000 % p_period_ms <> 0 THEN
        RAISE EXCEPTION 'tick_period_ms must be an exact divisor of 1000 between 1 and 1000 (got %)',
            p_period_ms
            USING ERRCODE = '22023';
    END IF;
    UPDATE pgque.config SET tick_period_ms = p_period_ms;
    RETURN p_period_ms;
END
$$;

-- Procedures are outside "ALL FUNCTIONS" grants, so this one is handled here.
REVOKE ALL ON PROCEDURE pgque.ticker_loop() FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE pgque.ticker_loop() TO pgque_admin;
