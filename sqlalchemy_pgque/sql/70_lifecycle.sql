-- sqlalchemy-pgque engine: schedulers, status, version, uninstall and observability.
--
-- pg_cron and pg_timetable are optional and absent from most installs, so every
-- reference to their schemas goes through dynamic SQL behind an existence check.

CREATE OR REPLACE FUNCTION pgque.version()
RETURNS text
LANGUAGE sql
IMMUTABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT '0.2.0'::text;
$$;

CREATE OR REPLACE FUNCTION pgque._pg_cron_installed()
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pgque, pg_catalog
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron');
$$;

-- A pg_timetable API we may call with our owner's rights: the timetable schema and its
-- add_job / delete_job functions belong to the current user or to a superuser, so
-- nobody else could have planted code there.
CREATE OR REPLACE FUNCTION pgque._pg_timetable_state()
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pgque, pg_catalog
AS $$
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'timetable') THEN 'absent'
        WHEN NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                          WHERE n.nspname = 'timetable' AND p.proname = 'add_job'
                            AND p.pronargs IN (11, 12))
          OR NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                          WHERE n.nspname = 'timetable' AND p.proname = 'delete_job')
            THEN 'absent'
        WHEN EXISTS (SELECT 1 FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
                      WHERE n.nspname = 'timetable'
                        AND r.rolname <> current_user AND NOT r.rolsuper)
          OR EXISTS (SELECT 1 FROM pg_proc p
                       JOIN pg_namespace n ON n.oid = p.pronamespace
                       JOIN pg_roles r ON r.oid = p.proowner
                      WHERE n.nspname = 'timetable' AND p.proname IN ('add_job', 'delete_job')
                        AND r.rolname <> current_user AND NOT r.rolsuper)
            THEN 'untrusted'
        ELSE 'trusted'
    END;
$$;

CREATE OR REPLACE FUNCTION pgque.stop_timetable()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    job text;
BEGIN
    IF pgque._pg_timetable_state() = 'trusted' THEN
        FOREACH job IN ARRAY ARRAY['pgque_ticker', 'pgque_retry_events', 'pgque_maint',
                                   'pgque_rotate_step2'] LOOP
            EXECUTE 'SELECT timetable.delete_job($1)' USING job;
        END LOOP;
    ELSIF pgque._pg_timetable_state() = 'untrusted' THEN
        RAISE WARNING 'untrusted pg_timetable API (schema timetable or its functions owned by another non-superuser role): jobs not removed';
    END IF;
    UPDATE pgque.config
       SET ticker_job_id = NULL, maint_job_id = NULL, scheduler = NULL
     WHERE scheduler = 'pg_timetable';
END
$$;

CREATE OR REPLACE FUNCTION pgque.stop()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    cfg pgque.config%ROWTYPE;
    job_id bigint;
BEGIN
    SELECT * INTO cfg FROM pgque.config;
    IF cfg.scheduler = 'pg_timetable' THEN
        PERFORM pgque.stop_timetable();
        RETURN;
    END IF;
    IF NOT pgque._pg_cron_installed() THEN
        RETURN;
    END IF;
    FOR job_id IN
        SELECT unnest(ARRAY[cfg.ticker_job_id, cfg.maint_job_id])
        UNION
        SELECT j.jobid FROM cron.job j
         WHERE j.jobname IN ('pgque_ticker', 'pgque_retry_events', 'pgque_maint',
                             'pgque_rotate_step2')
           AND j.database = current_database()
    LOOP
        CONTINUE WHEN job_id IS NULL;
        -- A job removed by hand is already what we want.
        BEGIN
            EXECUTE 'SELECT cron.unschedule($1)' USING job_id;
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
    END LOOP;
    UPDATE pgque.config SET ticker_job_id = NULL, maint_job_id = NULL, scheduler = NULL;
END
$$;

CREATE OR REPLACE FUNCTION pgque.start()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    ticker_job bigint;
    maint_job bigint;
BEGIN
    IF NOT pgque._pg_cron_installed() THEN
        RAISE EXCEPTION 'pg_cron extension is not installed. PgQue itself works without pg_cron: '
                        'run it in manual mode, calling pgque.ticker() every tick period '
                        '(or CALL pgque.ticker_loop() once a second), '
                        'pgque.maint_retry_events() and pgque.maint() every 30 seconds, and '
                        'pgque.maint_rotate_tables_step2() every 10 seconds in its own transaction'
            USING ERRCODE = '0A000',
                  HINT = 'sqlalchemy-pgque runs these for you: python -m sqlalchemy_pgque.worker --ticker';
    END IF;
    PERFORM pgque.stop_timetable();
    PERFORM pgque.stop();
    EXECUTE 'SELECT cron.schedule_in_database($1, $2, $3, current_database())'
        INTO ticker_job USING 'pgque_ticker', '1 second', 'CALL pgque.ticker_loop()';
    EXECUTE 'SELECT cron.schedule_in_database($1, $2, $3, current_database())'
        USING 'pgque_retry_events', '30 seconds',
              'SET statement_timeout = ''25s''; SELECT pgque.maint_retry_events()';
    EXECUTE 'SELECT cron.schedule_in_database($1, $2, $3, current_database())'
        INTO maint_job USING 'pgque_maint', '30 seconds',
              'SET statement_timeout = ''25s''; SELECT pgque.maint()';
    EXECUTE 'SELECT cron.schedule_in_database($1, $2, $3, current_database())'
        USING 'pgque_rotate_step2', '10 seconds', 'SELECT pgque.maint_rotate_tables_step2()';
    UPDATE pgque.config
       SET ticker_job_id = ticker_job, maint_job_id = maint_job, scheduler = 'pg_cron';
    RAISE NOTICE 'pgque scheduled with pg_cron: ticker job %, maintenance job %',
        ticker_job, maint_job;
END
$$;

CREATE OR REPLACE FUNCTION pgque.start_timetable(i_ticks_per_second integer DEFAULT 10)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    state text := pgque._pg_timetable_state();
    ticker_job bigint;
    maint_job bigint;
    add_job constant text :=
        'SELECT timetable.add_job(job_name => $1, job_schedule => $2, job_command => $3, '
        'job_kind => ''SQL'', job_max_instances => 1)';
BEGIN
    IF state = 'absent' THEN
        RAISE EXCEPTION 'pg_timetable is not installed (no timetable schema with add_job and delete_job). '
                        'Use pgque.start() with pg_cron, or run the ticker in manual mode'
            USING ERRCODE = '0A000';
    ELSIF state = 'untrusted' THEN
        RAISE EXCEPTION 'untrusted pg_timetable schema owner: schema timetable and its add_job / delete_job '
                        'functions must be owned by % or a superuser', current_user
            USING ERRCODE = 'PQ302';
    END IF;
    IF i_ticks_per_second IS NULL OR i_ticks_per_second < 1 OR i_ticks_per_second > 1000
       OR 1000 % i_ticks_per_second <> 0 THEN
        RAISE EXCEPTION 'ticks_per_second must be an exact divisor of 1000 between 1 and 1000 (got %)',
            i_ticks_per_second
            USING ERRCODE = '22023';
    END IF;
    UPDATE pgque.config SET tick_period_ms = 1000 / i_ticks_per_second;
    PERFORM pgque.stop();
    PERFORM pgque.stop_timetable();
    EXECUTE add_job INTO ticker_job
        USING 'pgque_ticker', '@every 1 second', 'CALL pgque.ticker_loop()';
    EXECUTE add_job
        USING 'pgque_retry_events', '@every 30 seconds',
              'SET statement_timeout = ''25s''; SELECT pgque.maint_retry_events()';
    EXECUTE add_job INTO maint_job
        USING 'pgque_maint', '@every 30 seconds',
              'SET statement_timeout = ''25s''; SELECT pgque.maint()';
    EXECUTE add_job
        USING 'pgque_rotate_step2', '@every 10 seconds', 'SELECT pgque.maint_rotate_tables_step2()';
    UPDATE pgque.config
       SET ticker_job_id = ticker_job, maint_job_id = maint_job, scheduler = 'pg_timetable';
    RAISE NOTICE 'pgque scheduled with pg_timetable at % ticks per second', i_ticks_per_second;
END
$$;

CREATE OR REPLACE FUNCTION pgque.status()
RETURNS TABLE (component text, status text, detail text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    cfg pgque.config%ROWTYPE;
    jobs text;
BEGIN
    SELECT * INTO cfg FROM pgque.config;
    jobs := concat_ws(', ',
                      'ticker_job_id=' || cfg.ticker_job_id,
                      'maint_job_id=' || cfg.maint_job_id,
                      format('tick_period_ms=%s (%s ticks/sec)', cfg.tick_period_ms,
                             trim_scale(round(1000.0 / cfg.tick_period_ms, 3))));

    component := 'postgresql'; status := 'info'; detail := current_setting('server_version');
    RETURN NEXT;
    component := 'pgque'; status := 'info'; detail := pgque.version();
    RETURN NEXT;
    component := 'scheduler'; status := coalesce(cfg.scheduler, 'manual'); detail := jobs;
    RETURN NEXT;
    component := 'ticker';
    status := CASE WHEN cfg.ticker_job_id IS NULL THEN 'stopped' ELSE 'scheduled' END;
    detail := CASE WHEN cfg.ticker_job_id IS NULL
                   THEN 'no scheduled job: call pgque.ticker() yourself'
                   ELSE format('%s job %s', cfg.scheduler, cfg.ticker_job_id) END;
    RETURN NEXT;
    component := 'maintenance';
    status := CASE WHEN cfg.maint_job_id IS NULL THEN 'stopped' ELSE 'scheduled' END;
    detail := CASE WHEN cfg.maint_job_id IS NULL
                   THEN 'no scheduled job: call pgque.maint_retry_events(), pgque.maint() and pgque.maint_rotate_tables_step2() yourself'
                   ELSE format('%s job %s', cfg.scheduler, cfg.maint_job_id) END;
    RETURN NEXT;
    component := 'pg_cron';
    IF pgque._pg_cron_installed() THEN
        status := 'available';
        detail := (SELECT 'version ' || extversion FROM pg_extension WHERE extname = 'pg_cron');
    ELSE
        status := 'unavailable'; detail := 'extension pg_cron is not installed in this database';
    END IF;
    RETURN NEXT;
    component := 'pg_timetable';
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'timetable') THEN
        status := 'available'; detail := 'timetable API ' || pgque._pg_timetable_state();
    ELSE
        status := 'unavailable'; detail := 'no timetable schema';
    END IF;
    RETURN NEXT;
    component := 'queues'; status := 'info';
    detail := (SELECT count(*) FROM pgque.queue) || ' queues configured';
    RETURN NEXT;
    component := 'consumers'; status := 'info';
    detail := (SELECT count(*) FROM pgque.subscription) || ' active subscriptions';
    RETURN NEXT;
END
$$;

-- Drop the whole engine. The roles stay: they are cluster-wide and may serve other
-- databases. Scheduler jobs go first; they are catalog rows that would outlive the schema.
CREATE OR REPLACE FUNCTION pgque.uninstall()
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    PERFORM pgque.stop();
    PERFORM pgque.stop_timetable();
    DROP SCHEMA pgque CASCADE;
    RAISE NOTICE 'pgque uninstalled. Roles pgque_reader, pgque_writer and pgque_admin were kept '
                 '(they are shared by every database of the cluster); drop them with DROP ROLE '
                 'once no database uses them';
END
$$;

CREATE OR REPLACE FUNCTION pgque.get_queue_info(
    i_queue_name text,
    OUT queue_name text, OUT queue_ntables integer, OUT queue_cur_table integer,
    OUT queue_rotation_period interval, OUT queue_switch_time timestamptz,
    OUT queue_external_ticker boolean, OUT queue_ticker_paused boolean,
    OUT queue_ticker_max_count integer, OUT queue_ticker_max_lag interval,
    OUT queue_ticker_idle_period interval, OUT ticker_lag interval, OUT ev_per_sec float8,
    OUT ev_new bigint, OUT last_tick_id bigint)
RETURNS SETOF record
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    latest pgque.tick%ROWTYPE;
    oldest pgque.tick%ROWTYPE;
    seq record;
    span float8;
BEGIN
    FOR q IN
        SELECT * FROM pgque.queue qq
         WHERE i_queue_name IS NULL OR qq.queue_name = i_queue_name
         ORDER BY qq.queue_name
    LOOP
        queue_name := q.queue_name;
        queue_ntables := q.queue_ntables;
        queue_cur_table := q.queue_cur_table;
        queue_rotation_period := q.queue_rotation_period;
        queue_switch_time := q.queue_switch_time;
        queue_external_ticker := q.queue_external_ticker;
        queue_ticker_paused := q.queue_ticker_paused;
        queue_ticker_max_count := q.queue_ticker_max_count;
        queue_ticker_max_lag := q.queue_ticker_max_lag;
        queue_ticker_idle_period := q.queue_ticker_idle_period;

        SELECT * INTO latest FROM pgque.tick t
         WHERE t.tick_queue = q.queue_id ORDER BY t.tick_id DESC LIMIT 1;
        SELECT * INTO oldest FROM pgque.tick t
         WHERE t.tick_queue = q.queue_id AND t.tick_id >= latest.tick_id - 20
         ORDER BY t.tick_id LIMIT 1;
        last_tick_id := latest.tick_id;
        ticker_lag := now() - latest.tick_time;
        -- Sequence distances less the values forced ticks skipped (30_ticker.sql); the
        -- sequence "now" counts as a tick with the queue's current skipped total.
        SELECT * INTO seq FROM pgque._seq_state(q.queue_event_seq);
        ev_new := pgque._seq_events(
            latest.tick_event_seq, latest.tick_seq_skipped, seq.last_value,
            q.queue_seq_skipped + CASE WHEN seq.is_called THEN 0 ELSE 1 END);
        span := extract(epoch FROM latest.tick_time - oldest.tick_time);
        ev_per_sec := CASE WHEN span > 0
                           THEN pgque._seq_events(oldest.tick_event_seq, oldest.tick_seq_skipped,
                                                  latest.tick_event_seq, latest.tick_seq_skipped)
                                / span END;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgque.get_queue_info(
    OUT queue_name text, OUT queue_ntables integer, OUT queue_cur_table integer,
    OUT queue_rotation_period interval, OUT queue_switch_time timestamptz,
    OUT queue_external_ticker boolean, OUT queue_ticker_paused boolean,
    OUT queue_ticker_max_count integer, OUT queue_ticker_max_lag interval,
    OUT queue_ticker_idle_period interval, OUT ticker_lag interval, OUT ev_per_sec float8,
    OUT ev_new bigint, OUT last_tick_id bigint)
RETURNS SETOF record
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT * FROM pgque.get_queue_info(NULL::text);
$$;

-- One row per subscription row, cooperative members included under their own consumer
-- name '<consumer>.<subconsumer>'. NULL arguments match everything. pending_events is the
-- sequence distance from the cursor tick to the latest tick less the values forced ticks
-- skipped in between (30_ticker.sql).
--
-- PL/pgSQL rather than SQL: a consumer asks after each empty receive, and before
-- PostgreSQL 18 a SQL function that cannot be inlined (SECURITY DEFINER, SET) plans its
-- query on every call, most of the call's time; PL/pgSQL keeps the plan for the
-- session. Ticks named by a subscription are read in LATERAL subqueries with LIMIT 1,
-- not joined (see 86_observability.sql).
CREATE OR REPLACE FUNCTION pgque.get_consumer_info(
    i_queue_name text, i_consumer_name text,
    OUT queue_name text, OUT consumer_name text, OUT lag interval, OUT last_seen interval,
    OUT last_tick bigint, OUT current_batch bigint, OUT next_tick bigint,
    OUT pending_events bigint)
RETURNS SETOF record
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT q.queue_name, c.co_name,
           now() - cursor_tick.tick_time,
           now() - s.sub_active,
           s.sub_last_tick, s.sub_batch, s.sub_next_tick,
           pgque._seq_events(cursor_tick.tick_event_seq, cursor_tick.tick_seq_skipped,
                             latest.tick_event_seq, latest.tick_seq_skipped)
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
      JOIN pgque.consumer c ON c.co_id = s.sub_consumer
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
                         LIMIT 1) cursor_tick ON true
      LEFT JOIN LATERAL (
            SELECT t.tick_event_seq, t.tick_seq_skipped FROM pgque.tick t
             WHERE t.tick_queue = s.sub_queue ORDER BY t.tick_id DESC LIMIT 1
      ) latest ON true
     WHERE (i_queue_name IS NULL OR q.queue_name = i_queue_name)
       AND (i_consumer_name IS NULL OR c.co_name = i_consumer_name)
     ORDER BY q.queue_name, c.co_name;
END
$$;

CREATE OR REPLACE FUNCTION pgque.get_consumer_info(
    i_queue_name text,
    OUT queue_name text, OUT consumer_name text, OUT lag interval, OUT last_seen interval,
    OUT last_tick bigint, OUT current_batch bigint, OUT next_tick bigint,
    OUT pending_events bigint)
RETURNS SETOF record
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT * FROM pgque.get_consumer_info($1, NULL::text);
$$;

CREATE OR REPLACE FUNCTION pgque.get_consumer_info(
    OUT queue_name text, OUT consumer_name text, OUT lag interval, OUT last_seen interval,
    OUT last_tick bigint, OUT current_batch bigint, OUT next_tick bigint,
    OUT pending_events bigint)
RETURNS SETOF record
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT * FROM pgque.get_consumer_info(NULL::text, NULL::text);
$$;

-- An unknown batch id yields one row of NULLs rather than no row. PL/pgSQL for its plan
-- cache, as get_consumer_info.
CREATE OR REPLACE FUNCTION pgque.get_batch_info(
    x_batch_id bigint,
    OUT queue_name text, OUT consumer_name text, OUT batch_start timestamptz,
    OUT batch_end timestamptz, OUT prev_tick_id bigint, OUT tick_id bigint,
    OUT lag interval, OUT seq_start bigint, OUT seq_end bigint)
RETURNS record
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
#variable_conflict use_column
BEGIN
    SELECT q.queue_name, c.co_name, prev.tick_time, cur.tick_time, s.sub_last_tick,
           s.sub_next_tick, now() - cur.tick_time, prev.tick_event_seq, cur.tick_event_seq
      INTO queue_name, consumer_name, batch_start, batch_end, prev_tick_id, tick_id, lag,
           seq_start, seq_end
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
      JOIN pgque.consumer c ON c.co_id = s.sub_consumer
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
                         LIMIT 1) prev ON true
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_next_tick
                         LIMIT 1) cur ON true
     WHERE s.sub_batch = x_batch_id;
END
$$;

GRANT EXECUTE ON FUNCTION
    pgque.version(),
    pgque.get_queue_info(),
    pgque.get_queue_info(text),
    pgque.get_consumer_info(),
    pgque.get_consumer_info(text),
    pgque.get_consumer_info(text, text),
    pgque.get_batch_info(bigint)
TO pgque_reader;
