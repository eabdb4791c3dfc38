-- sqlalchemy-pgque engine: cooperative consumers (experimental in the PgQue 0.2 API).
--
-- One logical consumer is a coop_main subscription (the group cursor, never holding a
-- batch) plus coop_member rows that share its sub_id, so retry and dead-letter
-- ownership belong to the group. Member consumer rows are named '<consumer>.<sub>'.
-- Every allocation locks the main row first: that row is the group's serialisation
-- point, so two members never receive the same window.

CREATE OR REPLACE FUNCTION pgque._validate_coop_names(
    i_queue text, i_consumer text, i_subconsumer text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF coalesce(i_queue, '') = '' THEN
        RAISE EXCEPTION 'queue name must not be empty' USING ERRCODE = 'PQ201';
    END IF;
    IF coalesce(i_consumer, '') = '' THEN
        RAISE EXCEPTION 'consumer name must not be empty' USING ERRCODE = 'PQ201';
    END IF;
    IF coalesce(i_subconsumer, '') = '' THEN
        RAISE EXCEPTION 'subconsumer name must not be empty' USING ERRCODE = 'PQ201';
    END IF;
    -- A member row is named consumer || '.' || subconsumer; a dot in either part would
    -- make that name ambiguous.
    IF strpos(i_consumer, '.') > 0 THEN
        RAISE EXCEPTION 'cooperative consumer name must not contain dot: %', i_consumer
            USING ERRCODE = 'PQ201';
    END IF;
    IF strpos(i_subconsumer, '.') > 0 THEN
        RAISE EXCEPTION 'cooperative subconsumer name must not contain dot: %', i_subconsumer
            USING ERRCODE = 'PQ201';
    END IF;
END
$$;
COMMENT ON FUNCTION pgque._validate_coop_names(text, text, text) IS
    'Experimental (cooperative consumers), internal: reject empty names and dots in consumer/subconsumer names.';


CREATE OR REPLACE FUNCTION pgque.register_subconsumer(
    i_queue text, i_consumer text, i_subconsumer text, i_convert_normal boolean DEFAULT false)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    v_queue_id   integer;
    v_main_co    integer;
    v_member_co  integer;
    v_member_name text := i_consumer || '.' || i_subconsumer;
    v_latest     bigint;
    main_sub     pgque.subscription%ROWTYPE;
    member_sub   pgque.subscription%ROWTYPE;
BEGIN
    PERFORM pgque._validate_coop_names(i_queue, i_consumer, i_subconsumer);

    SELECT queue_id INTO v_queue_id FROM pgque.queue WHERE queue_name = i_queue;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Event queue not created yet' USING ERRCODE = 'PQ001';
    END IF;

    -- Concurrent first registrations of one name: the loser's insert waits for the
    -- winner and then finds its row.
    INSERT INTO pgque.consumer (co_name) VALUES (i_consumer) ON CONFLICT (co_name) DO NOTHING;
    SELECT co_id INTO v_main_co FROM pgque.consumer WHERE co_name = i_consumer;

    SELECT * INTO main_sub FROM pgque.subscription
     WHERE sub_queue = v_queue_id AND sub_consumer = v_main_co
       FOR UPDATE;
    IF NOT FOUND THEN
        SELECT max(tick_id) INTO v_latest FROM pgque.tick WHERE tick_queue = v_queue_id;
        IF v_latest IS NULL THEN
            RAISE EXCEPTION 'No ticks for this queue.  Please run ticker on database.'
                USING ERRCODE = 'PQ107';
        END IF;
        INSERT INTO pgque.subscription (sub_queue, sub_consumer, sub_last_tick, sub_role)
        VALUES (v_queue_id, v_main_co, v_latest, 'coop_main')
        ON CONFLICT (sub_queue, sub_consumer) DO NOTHING;
        SELECT * INTO main_sub FROM pgque.subscription
         WHERE sub_queue = v_queue_id AND sub_consumer = v_main_co
           FOR UPDATE;
    END IF;

    IF main_sub.sub_role = 'normal' THEN
        IF NOT coalesce(i_convert_normal, false) THEN
            RAISE EXCEPTION 'consumer % on queue % is already a normal consumer; explicit conversion is required',
                i_consumer, i_queue
                USING ERRCODE = 'PQ101';
        END IF;
        IF main_sub.sub_batch IS NOT NULL THEN
            RAISE EXCEPTION 'cannot convert active normal consumer % on queue % while batch % is open',
                i_consumer, i_queue, main_sub.sub_batch
                USING ERRCODE = 'PQ102';
        END IF;
        UPDATE pgque.subscription SET sub_role = 'coop_main'
         WHERE sub_queue = v_queue_id AND sub_consumer = v_main_co;
    ELSIF main_sub.sub_role <> 'coop_main' THEN
        RAISE EXCEPTION 'consumer % on queue % is not a cooperative main consumer',
            i_consumer, i_queue
            USING ERRCODE = 'PQ101';
    END IF;

    INSERT INTO pgque.consumer (co_name) VALUES (v_member_name) ON CONFLICT (co_name) DO NOTHING;
    SELECT co_id INTO v_member_co FROM pgque.consumer WHERE co_name = v_member_name;

    SELECT * INTO member_sub FROM pgque.subscription
     WHERE sub_queue = v_queue_id AND sub_consumer = v_member_co
       FOR UPDATE;
    IF FOUND THEN
        IF member_sub.sub_role <> 'coop_member' OR member_sub.sub_id <> main_sub.sub_id THEN
            RAISE EXCEPTION 'consumer name % on queue % is already registered incompatibly',
                v_member_name, i_queue
                USING ERRCODE = 'PQ101';
        END IF;
        UPDATE pgque.subscription SET sub_active = now()
         WHERE sub_queue = v_queue_id AND sub_consumer = v_member_co;
        RETURN 0;
    END IF;

    INSERT INTO pgque.subscription (sub_id, sub_queue, sub_consumer, sub_role)
    VALUES (main_sub.sub_id, v_queue_id, v_member_co, 'coop_member');
    RETURN 1;
END
$$;
COMMENT ON FUNCTION pgque.register_subconsumer(text, text, text, boolean) IS
    'Experimental (cooperative consumers): register a subconsumer under a cooperative main consumer; 1 new, 0 already registered.';


CREATE OR REPLACE FUNCTION pgque.subscribe_subconsumer(
    i_queue text, i_consumer text, i_subconsumer text, i_convert_normal boolean DEFAULT false)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.register_subconsumer(i_queue, i_consumer, i_subconsumer, i_convert_normal);
$$;
COMMENT ON FUNCTION pgque.subscribe_subconsumer(text, text, text, boolean) IS
    'Experimental (cooperative consumers): alias of register_subconsumer.';


CREATE OR REPLACE FUNCTION pgque.unregister_subconsumer(
    i_queue text, i_consumer text, i_subconsumer text, i_batch_handling integer DEFAULT 0)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    v_queue_id    integer;
    v_max_retries integer;
    v_member_name text := i_consumer || '.' || i_subconsumer;
    main_sub      pgque.subscription%ROWTYPE;
    member_sub    pgque.subscription%ROWTYPE;
    ev            pgque.event_template;
BEGIN
    IF i_batch_handling IS NULL OR i_batch_handling NOT IN (0, 1) THEN
        RAISE EXCEPTION 'unsupported batch_handling value: %', coalesce(i_batch_handling::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    PERFORM pgque._validate_coop_names(i_queue, i_consumer, i_subconsumer);

    SELECT queue_id, coalesce(queue_max_retries, 5) INTO v_queue_id, v_max_retries
      FROM pgque.queue WHERE queue_name = i_queue;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    -- Main row first, as in allocation, so unregistering never deadlocks with it.
    SELECT s.* INTO main_sub
      FROM pgque.subscription s JOIN pgque.consumer c ON c.co_id = s.sub_consumer
     WHERE s.sub_queue = v_queue_id AND c.co_name = i_consumer AND s.sub_role = 'coop_main'
       FOR UPDATE OF s;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    SELECT s.* INTO member_sub
      FROM pgque.subscription s JOIN pgque.consumer c ON c.co_id = s.sub_consumer
     WHERE s.sub_queue = v_queue_id AND c.co_name = v_member_name
       AND s.sub_role = 'coop_member' AND s.sub_id = main_sub.sub_id
       FOR UPDATE OF s;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    IF member_sub.sub_batch IS NOT NULL THEN
        IF i_batch_handling = 0 THEN
            RAISE EXCEPTION 'cannot unregister active cooperative subconsumer %/%/% without batch_handling = 1',
                i_queue, i_consumer, i_subconsumer
                USING ERRCODE = 'PQ102';
        END IF;
        -- The same budget rule as nack: exhausted events go to the DLQ, the rest come
        -- back to the group through the retry queue. Each event is parked from the row
        -- in hand; event_retry would read the whole batch again for every event.
        FOR ev IN
            SELECT e.ev_id, e.ev_time, e.ev_txid::text::xid8, NULL::integer, e.ev_retry,
                   e.ev_type, e.ev_data, e.ev_extra1, e.ev_extra2, e.ev_extra3, e.ev_extra4
              FROM pgque.get_batch_events(member_sub.sub_batch) AS e
        LOOP
            IF coalesce(ev.ev_retry, 0) >= v_max_retries THEN
                PERFORM pgque.event_dead(member_sub.sub_batch, ev.ev_id, 'subconsumer unregistered',
                                         ev.ev_time, ev.ev_txid, ev.ev_retry,
                                         ev.ev_type, ev.ev_data, ev.ev_extra1, ev.ev_extra2,
                                         ev.ev_extra3, ev.ev_extra4);
            ELSE
                PERFORM pgque._park_event(v_queue_id, main_sub.sub_id,
                                          now() + interval '60 seconds', ev);
            END IF;
        END LOOP;
    END IF;

    PERFORM pgque._drop_coop_member(v_queue_id, member_sub.sub_consumer, main_sub.sub_id);
    RETURN 1;
END
$$;
COMMENT ON FUNCTION pgque.unregister_subconsumer(text, text, text, integer) IS
    'Experimental (cooperative consumers): remove a subconsumer; batch_handling 1 sends its open batch to retry/DLQ. 1 removed, 0 absent.';


CREATE OR REPLACE FUNCTION pgque.unsubscribe_subconsumer(
    i_queue text, i_consumer text, i_subconsumer text, i_batch_handling integer DEFAULT 0)
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.unregister_subconsumer(i_queue, i_consumer, i_subconsumer, i_batch_handling);
$$;
COMMENT ON FUNCTION pgque.unsubscribe_subconsumer(text, text, text, integer) IS
    'Experimental (cooperative consumers): alias of unregister_subconsumer.';


CREATE OR REPLACE FUNCTION pgque.touch_subconsumer(
    i_queue text, i_consumer text, i_subconsumer text)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    v_touched integer;
BEGIN
    UPDATE pgque.subscription m
       SET sub_active = clock_timestamp()
      FROM pgque.queue q, pgque.consumer mc, pgque.consumer gc, pgque.subscription g
     WHERE q.queue_name = i_queue
       AND mc.co_name = i_consumer || '.' || i_subconsumer
       AND gc.co_name = i_consumer
       AND m.sub_queue = q.queue_id AND m.sub_consumer = mc.co_id AND m.sub_role = 'coop_member'
       AND g.sub_queue = q.queue_id AND g.sub_consumer = gc.co_id AND g.sub_role = 'coop_main'
       AND g.sub_id = m.sub_id;
    GET DIAGNOSTICS v_touched = ROW_COUNT;
    RETURN v_touched;
END
$$;
COMMENT ON FUNCTION pgque.touch_subconsumer(text, text, text) IS
    'Experimental (cooperative consumers): heartbeat of a registered subconsumer; rows touched (never creates rows).';


CREATE OR REPLACE FUNCTION pgque.next_batch_custom(
    i_queue text, i_consumer text, i_subconsumer text,
    i_min_lag interval, i_min_count integer, i_min_interval interval,
    i_dead_interval interval DEFAULT NULL,
    OUT batch_id bigint, OUT prev_tick_id bigint, OUT next_tick_id bigint)
RETURNS record
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    v_queue_id    integer;
    v_member_name text := i_consumer || '.' || i_subconsumer;
    main_sub      pgque.subscription%ROWTYPE;
    member_sub    pgque.subscription%ROWTYPE;
    victim        pgque.subscription%ROWTYPE;
    cursor_tick   pgque.tick%ROWTYPE;
    end_tick      pgque.tick%ROWTYPE;
    v_attempt     integer;
BEGIN
    PERFORM pgque._validate_coop_names(i_queue, i_consumer, i_subconsumer);

    SELECT queue_id INTO v_queue_id FROM pgque.queue WHERE queue_name = i_queue;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Event queue not created yet' USING ERRCODE = 'PQ001';
    END IF;

    -- Lock the main row, then the member row. A missing or mismatched pair is handed to
    -- register_subconsumer (without conversion), which either creates it or raises the
    -- precise error, and the pair is locked again.
    FOR v_attempt IN 1..2 LOOP
        SELECT s.* INTO main_sub
          FROM pgque.subscription s JOIN pgque.consumer c ON c.co_id = s.sub_consumer
         WHERE s.sub_queue = v_queue_id AND c.co_name = i_consumer
           FOR UPDATE OF s;
        IF FOUND AND main_sub.sub_role = 'coop_main' THEN
            SELECT s.* INTO member_sub
              FROM pgque.subscription s JOIN pgque.consumer c ON c.co_id = s.sub_consumer
             WHERE s.sub_queue = v_queue_id AND c.co_name = v_member_name
               FOR UPDATE OF s;
            EXIT WHEN FOUND AND member_sub.sub_role = 'coop_member'
                       AND member_sub.sub_id = main_sub.sub_id;
        END IF;
        IF v_attempt = 2 THEN
            RAISE EXCEPTION 'cooperative subconsumer %/%/% vanished during registration',
                i_queue, i_consumer, i_subconsumer
                USING ERRCODE = 'PQ901';
        END IF;
        PERFORM pgque.register_subconsumer(i_queue, i_consumer, i_subconsumer, false);
    END LOOP;

    -- Member activity is stamped with clock_timestamp(), not now(): an allocation may
    -- have waited for the group's row, and a stamp from before that wait would make a
    -- batch handed out just now look stalled to a peer's dead_interval. (The staleness
    -- test below keeps the spec's now() - dead_interval.)

    -- Until finished, the member keeps getting the same batch.
    IF member_sub.sub_batch IS NOT NULL THEN
        UPDATE pgque.subscription SET sub_active = clock_timestamp()
         WHERE sub_queue = v_queue_id AND sub_consumer = member_sub.sub_consumer;
        batch_id := member_sub.sub_batch;
        prev_tick_id := member_sub.sub_last_tick;
        next_tick_id := member_sub.sub_next_tick;
        RETURN;
    END IF;

    IF i_dead_interval IS NOT NULL THEN
        SELECT * INTO victim FROM pgque.subscription
         WHERE sub_queue = v_queue_id AND sub_id = main_sub.sub_id
           AND sub_role = 'coop_member' AND sub_batch IS NOT NULL
           AND sub_consumer <> member_sub.sub_consumer
           AND sub_active < now() - i_dead_interval
         ORDER BY sub_active
         LIMIT 1
           FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            -- A fresh id: the stalled holder's token must stop working, so a late ack
            -- or nack from it cannot touch the window now owned by this member.
            batch_id := nextval('pgque.batch_id_seq');
            UPDATE pgque.subscription
               SET sub_last_tick = NULL, sub_next_tick = NULL, sub_batch = NULL
             WHERE sub_queue = v_queue_id AND sub_consumer = victim.sub_consumer;
            UPDATE pgque.subscription
               SET sub_last_tick = victim.sub_last_tick, sub_next_tick = victim.sub_next_tick,
                   sub_batch = batch_id, sub_active = clock_timestamp()
             WHERE sub_queue = v_queue_id AND sub_consumer = member_sub.sub_consumer;
            prev_tick_id := victim.sub_last_tick;
            next_tick_id := victim.sub_next_tick;
            RETURN;
        END IF;
    END IF;

    IF main_sub.sub_batch IS NOT NULL THEN
        RAISE EXCEPTION 'cooperative main consumer % on queue % has an unexpected active batch %',
            i_consumer, i_queue, main_sub.sub_batch
            USING ERRCODE = 'PQ901';
    END IF;
    SELECT * INTO cursor_tick FROM pgque.tick
     WHERE tick_queue = v_queue_id AND tick_id = main_sub.sub_last_tick;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'PgQ corruption: Consumer % on queue % does not see tick %',
            i_consumer, i_queue, coalesce(main_sub.sub_last_tick::text, 'NULL')
            USING ERRCODE = 'PQ901';
    END IF;

    SELECT h.next_tick_id, h.next_tick_time INTO end_tick.tick_id, end_tick.tick_time
      FROM pgque.find_tick_helper(v_queue_id, cursor_tick.tick_id, cursor_tick.tick_time,
                                  cursor_tick.tick_event_seq, i_min_count, i_min_interval) h;

    IF end_tick.tick_id IS NULL
       OR (i_min_lag IS NOT NULL AND now() - end_tick.tick_time < i_min_lag) THEN
        RETURN;
    END IF;

    -- The group cursor moves at once; the window now lives only in the member row
    -- (which also pins rotation through its sub_last_tick until finished).
    batch_id := nextval('pgque.batch_id_seq');
    UPDATE pgque.subscription SET sub_last_tick = end_tick.tick_id, sub_active = now()
     WHERE sub_queue = v_queue_id AND sub_consumer = main_sub.sub_consumer;
    UPDATE pgque.subscription
       SET sub_last_tick = cursor_tick.tick_id, sub_next_tick = end_tick.tick_id,
           sub_batch = batch_id, sub_active = clock_timestamp()
     WHERE sub_queue = v_queue_id AND sub_consumer = member_sub.sub_consumer;
    prev_tick_id := cursor_tick.tick_id;
    next_tick_id := end_tick.tick_id;
END
$$;
COMMENT ON FUNCTION pgque.next_batch_custom(text, text, text, interval, integer, interval, interval) IS
    'Experimental (cooperative consumers): allocate or re-fetch the batch of a subconsumer; dead_interval allows taking over a stalled sibling''s window under a fresh batch id.';


CREATE OR REPLACE FUNCTION pgque.next_batch(
    i_queue text, i_consumer text, i_subconsumer text, i_dead_interval interval DEFAULT NULL)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT b.batch_id
      FROM pgque.next_batch_custom(i_queue, i_consumer, i_subconsumer,
                                   NULL::interval, NULL::integer, NULL::interval,
                                   i_dead_interval) AS b;
$$;
COMMENT ON FUNCTION pgque.next_batch(text, text, text, interval) IS
    'Experimental (cooperative consumers): batch id for a subconsumer, or NULL when there is no new window.';


CREATE OR REPLACE FUNCTION pgque.receive_coop(
    i_queue text, i_consumer text, i_subconsumer text,
    i_max_return integer DEFAULT 100, i_dead_interval interval DEFAULT NULL)
RETURNS SETOF pgque.message
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    v_batch_id bigint;
    v_returned bigint;
BEGIN
    IF i_max_return IS NULL OR i_max_return < 1 THEN
        RAISE EXCEPTION 'pgque.receive_coop: max_return must be >= 1, got %',
            coalesce(i_max_return::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;

    v_batch_id := pgque.next_batch(i_queue, i_consumer, i_subconsumer, i_dead_interval);
    IF v_batch_id IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
        SELECT e.ev_id, v_batch_id, e.ev_type, e.ev_data, e.ev_retry, e.ev_time,
               e.ev_extra1, e.ev_extra2, e.ev_extra3, e.ev_extra4
          FROM pgque.get_batch_events(v_batch_id) AS e
         ORDER BY e.ev_id
         LIMIT i_max_return;
    GET DIAGNOSTICS v_returned = ROW_COUNT;

    -- An empty window has no token for the caller to ack: release it here so the
    -- member is idle again (the group cursor already moved past it).
    IF v_returned = 0 THEN
        UPDATE pgque.subscription
           SET sub_last_tick = NULL, sub_next_tick = NULL, sub_batch = NULL, sub_active = now()
         WHERE sub_batch = v_batch_id AND sub_role = 'coop_member';
    END IF;
END
$$;
COMMENT ON FUNCTION pgque.receive_coop(text, text, text, integer, interval) IS
    'Experimental (cooperative consumers): receive the messages of a subconsumer''s batch via the cooperative allocator.';

GRANT EXECUTE ON FUNCTION pgque.register_subconsumer(text, text, text, boolean) TO pgque_reader;
GRANT EXECUTE ON FUNCTION pgque.subscribe_subconsumer(text, text, text, boolean) TO pgque_reader;
GRANT EXECUTE ON FUNCTION pgque.unregister_subconsumer(text, text, text, integer) TO pgque_reader;
GRANT EXECUTE ON FUNCTION pgque.unsubscribe_subconsumer(text, text, text, integer) TO pgque_reader;
GRANT EXECUTE ON FUNCTION pgque.touch_subconsumer(text, text, text) TO pgque_reader;
GRANT EXECUTE ON FUNCTION pgque.next_batch_custom(text, text, text, interval, integer, interval, interval) TO pgque_reader;
GRANT EXECUTE ON FUNCTION pgque.next_batch(text, text, text, interval) TO pgque_reader;
GRANT EXECUTE ON FUNCTION pgque.receive_coop(text, text, text, integer, interval) TO pgque_reader;
