-- sqlalchemy-pgque engine: the PgQue 0.3 observability functions (upstream ships them
-- as an opt-in experimental file; ours are in the default install, SECURITY DEFINER and
-- granted to pgque_reader, who may SELECT everything they read anyway).
--
-- The figures follow the 0.3 definitions, quirks included, because clients and
-- dashboards written for upstream compare them: depth, pending_events, events_per_sec
-- and throughput are event-sequence distances, so every force_next_tick inflates them by
-- 2 * ticker_max_count + 1000 (a commit-woken ticker forces a tick per commit). The
-- figures net of forced ticks are get_consumer_info().pending_events and
-- get_queue_info().ev_new / ev_per_sec (30_ticker.sql), which the Python layer's
-- admin.queues() / admin.consumers() and the `status` command read.
--
-- "Cursor tick" is the tick a subscription's sub_last_tick names; "newest tick" is the
-- queue's highest tick_id. Cooperative members are ordinary subscription rows named
-- '<consumer>.<sub>' whose cursor is NULL while idle: their cursor figures are NULL or
-- 0, never an error.
--
-- A tick named by a subscription is read in a LATERAL subquery with LIMIT 1, which the
-- planner cannot flatten into a join: joined, the tick lookup shares tick_queue with
-- the other tables, and on a tick table whose statistics lag behind its growth the
-- planner probed it by tick_queue alone and filtered every tick of the queue.

-- One row per queue, by name.
CREATE OR REPLACE FUNCTION pgque.queue_stats()
RETURNS TABLE (
    queue_name text, queue_id int4, depth bigint, oldest_msg_age interval, consumers int4,
    events_per_sec numeric, cur_table int4, rotation_age interval, rotation_period interval,
    ticker_paused boolean, last_tick_time timestamptz, last_tick_id bigint, dlq_count bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT q.queue_name, q.queue_id,
           coalesce(newest.tick_event_seq - subs.min_seq, 0),
           now() - subs.min_time,
           subs.n::int4,
           CASE WHEN prev.tick_id IS NULL THEN NULL
                WHEN newest.tick_time = prev.tick_time THEN 0
                ELSE (newest.tick_event_seq - prev.tick_event_seq)
                     / extract(epoch FROM newest.tick_time - prev.tick_time)
           END,
           q.queue_cur_table, now() - q.queue_switch_time, q.queue_rotation_period,
           q.queue_ticker_paused, ticks.max_time, ticks.max_id, dl.n
      FROM pgque.queue q
     CROSS JOIN LATERAL (
            SELECT max(t.tick_time) AS max_time, max(t.tick_id) AS max_id
              FROM pgque.tick t WHERE t.tick_queue = q.queue_id
     ) ticks
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = q.queue_id AND t.tick_id = ticks.max_id
                         LIMIT 1) newest ON true
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = q.queue_id AND t.tick_id = ticks.max_id - 1
                         LIMIT 1) prev ON true
     CROSS JOIN LATERAL (
            SELECT count(*) AS n, min(ct.tick_event_seq) AS min_seq,
                   min(ct.tick_time) AS min_time
              FROM pgque.subscription s
              LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                                 WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
                                 LIMIT 1) ct ON true
             WHERE s.sub_queue = q.queue_id
     ) subs
     CROSS JOIN LATERAL (
            SELECT count(*) AS n FROM pgque.dead_letter d WHERE d.dl_queue_id = q.queue_id
     ) dl
     ORDER BY q.queue_name;
$$;

-- One row per subscription row, by queue then consumer name. last_batch_start is
-- sub_active, the last allocation or finish, as upstream names it.
CREATE OR REPLACE FUNCTION pgque.consumer_stats()
RETURNS TABLE (
    queue_name text, consumer_name text, lag interval, pending_events bigint,
    last_batch_start timestamptz, batch_active boolean, batch_id bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT q.queue_name, c.co_name,
           now() - ct.tick_time,
           coalesce(newest.tick_event_seq - ct.tick_event_seq, 0),
           s.sub_active, s.sub_batch IS NOT NULL, s.sub_batch
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
      JOIN pgque.consumer c ON c.co_id = s.sub_consumer
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
                         LIMIT 1) ct ON true
      LEFT JOIN LATERAL (
            SELECT t.tick_event_seq FROM pgque.tick t
             WHERE t.tick_queue = s.sub_queue ORDER BY t.tick_id DESC LIMIT 1
      ) newest ON true
     ORDER BY q.queue_name, c.co_name;
$$;

-- Health checks in fixed group order (clients read them top-down): ticker, consumer
-- lag, rotation, dead letters, then the two scheduler jobs. Statuses are ok, warning
-- or critical only.
CREATE OR REPLACE FUNCTION pgque.queue_health()
RETURNS TABLE (queue_name text, check_name text, status text, detail text)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    -- A ticker that runs ticks an idle queue at least every ticker_idle_period (1 minute
    -- by default), so 10 s is upstream's fixed alarm, independent of those settings.
    RETURN QUERY
        SELECT q.queue_name, 'ticker_running'::text,
               CASE WHEN last_tick.t IS NULL OR last_tick.t < now() - interval '10 seconds'
                    THEN 'critical' ELSE 'ok' END,
               'Last tick: ' || coalesce(last_tick.t::text, 'never')
          FROM pgque.queue q
         CROSS JOIN LATERAL (
                SELECT max(t.tick_time) AS t FROM pgque.tick t WHERE t.tick_queue = q.queue_id
         ) last_tick
         WHERE NOT q.queue_ticker_paused
         ORDER BY q.queue_name;

    RETURN QUERY
        SELECT cs.queue_name, 'consumer_lag:' || cs.consumer_name,
               CASE WHEN cs.lag IS NULL THEN 'warning'
                    WHEN cs.lag > q.queue_rotation_period THEN 'critical'
                    WHEN cs.lag > q.queue_rotation_period / 2 THEN 'warning'
                    ELSE 'ok' END,
               cs.consumer_name || ' lag: ' || coalesce(cs.lag::text, 'never consumed')
          FROM pgque.consumer_stats() cs
          JOIN pgque.queue q ON q.queue_name = cs.queue_name
         ORDER BY cs.queue_name, cs.consumer_name;

    RETURN QUERY
        SELECT q.queue_name, 'rotation_health'::text,
               CASE WHEN q.queue_switch_step2 IS NULL
                         OR now() - q.queue_switch_time > 2 * q.queue_rotation_period
                    THEN 'warning' ELSE 'ok' END,
               CASE WHEN q.queue_switch_step2 IS NULL THEN 'mid-rotation (step2 pending)'
                    ELSE 'last rotation: ' || q.queue_switch_time END
          FROM pgque.queue q
         ORDER BY q.queue_name;

    RETURN QUERY
        SELECT q.queue_name, 'dlq_health'::text,
               CASE WHEN dl.n > 1000 THEN 'warning' ELSE 'ok' END,
               dl.n || ' dead letter events'
          FROM pgque.queue q
         CROSS JOIN LATERAL (
                SELECT count(*) AS n FROM pgque.dead_letter d WHERE d.dl_queue_id = q.queue_id
         ) dl
         ORDER BY q.queue_name;

    RETURN QUERY
        SELECT 'system'::text, job.check_name,
               CASE WHEN job.id IS NULL THEN 'critical' ELSE 'ok' END,
               coalesce('job_id=' || job.id, job.missing)
          FROM pgque.config cfg
         CROSS JOIN LATERAL (VALUES
                (1, 'pg_cron_ticker'::text, cfg.ticker_job_id, 'ticker job not scheduled'::text),
                (2, 'pg_cron_maint', cfg.maint_job_id, 'maint job not scheduled')
         ) AS job (ord, check_name, id, missing)
         ORDER BY job.ord;
END
$$;

-- The figures of queue_stats and consumer_stats as OpenTelemetry-style gauges: six
-- groups in fixed order, one row per queue (or per subscription row) in each.
CREATE OR REPLACE FUNCTION pgque.otel_metrics()
RETURNS TABLE (metric_name text, metric_type text, value numeric, labels jsonb)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT m.metric_name, 'gauge'::text, m.value, m.labels
      FROM (
        SELECT 1 AS grp, 'pgque.queue.depth'::text AS metric_name,
               qs.depth::numeric AS value, jsonb_build_object('queue', qs.queue_name) AS labels,
               qs.queue_name AS q, ''::text AS c
          FROM pgque.queue_stats() qs
        UNION ALL
        SELECT 2, 'pgque.queue.oldest_message_age_seconds',
               coalesce(extract(epoch FROM qs.oldest_msg_age), 0),
               jsonb_build_object('queue', qs.queue_name), qs.queue_name, ''
          FROM pgque.queue_stats() qs
        UNION ALL
        SELECT 3, 'pgque.consumer.lag_seconds', extract(epoch FROM cs.lag),
               jsonb_build_object('queue', cs.queue_name, 'consumer', cs.consumer_name),
               cs.queue_name, cs.consumer_name
          FROM pgque.consumer_stats() cs
        UNION ALL
        SELECT 4, 'pgque.consumer.pending_events', cs.pending_events,
               jsonb_build_object('queue', cs.queue_name, 'consumer', cs.consumer_name),
               cs.queue_name, cs.consumer_name
          FROM pgque.consumer_stats() cs
        UNION ALL
        SELECT 5, 'pgque.message.dead_lettered', qs.dlq_count,
               jsonb_build_object('queue', qs.queue_name), qs.queue_name, ''
          FROM pgque.queue_stats() qs
        UNION ALL
        SELECT 6, 'pgque.queue.throughput', coalesce(qs.events_per_sec, 0),
               jsonb_build_object('queue', qs.queue_name), qs.queue_name, ''
          FROM pgque.queue_stats() qs
      ) m
     ORDER BY m.grp, m.q, m.c;
$$;

-- Subscription rows inactive for more than i_threshold: measured from the cursor tick,
-- or from sub_active for a row without one (an idle cooperative member). A cursor tick
-- always lies in the past, so '0 seconds' lists every consumer whose cursor predates
-- the calling transaction. NULL threshold: no rows.
CREATE OR REPLACE FUNCTION pgque.stuck_consumers(i_threshold interval DEFAULT '1 hour')
RETURNS TABLE (queue_name text, consumer_name text, lag interval, last_active timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT cs.queue_name, cs.consumer_name, cs.lag, cs.last_batch_start
      FROM pgque.consumer_stats() cs
     WHERE coalesce(cs.lag, now() - cs.last_batch_start) > i_threshold
     ORDER BY cs.lag DESC NULLS FIRST, cs.queue_name, cs.consumer_name;
$$;

-- Open batches of one queue, by consumer name. estimated_events is the sequence
-- distance of the batch window, 0 when either tick is gone.
CREATE OR REPLACE FUNCTION pgque.in_flight(i_queue_name text)
RETURNS TABLE (consumer_name text, batch_id bigint, batch_age interval, estimated_events bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT c.co_name, s.sub_batch, now() - s.sub_active,
           coalesce(next_tick.tick_event_seq - last_tick.tick_event_seq, 0)
      FROM pgque.subscription s
      JOIN pgque.queue q ON q.queue_id = s.sub_queue
      JOIN pgque.consumer c ON c.co_id = s.sub_consumer
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
                         LIMIT 1) last_tick ON true
      LEFT JOIN LATERAL (SELECT * FROM pgque.tick t
                         WHERE t.tick_queue = s.sub_queue AND t.tick_id = s.sub_next_tick
                         LIMIT 1) next_tick ON true
     WHERE q.queue_name = i_queue_name AND s.sub_batch IS NOT NULL
     ORDER BY c.co_name;
$$;

-- Sequence movement per time bucket over the ticks of the last i_period. As upstream,
-- each delta is taken from the previous tick in tick_id order, not in time order, and
-- buckets align to the Unix epoch (floor(epoch / size) * size), not to now(), so that
-- the buckets of two calls line up. The first tick of the period only sets the start
-- value: a bucket holding nothing else gets no row.
CREATE OR REPLACE FUNCTION pgque.throughput(
    i_queue_name text, i_period interval, i_bucket_size interval)
RETURNS TABLE (bucket_start timestamptz, events bigint, events_per_sec numeric)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    qid integer;
    size_seconds numeric;
BEGIN
    IF i_bucket_size IS NULL OR i_bucket_size <= interval '0' THEN
        RAISE EXCEPTION 'throughput: bucket size must be > 0, got %',
            coalesce(i_bucket_size::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    SELECT q.queue_id INTO qid FROM pgque.queue q WHERE q.queue_name = i_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue not found: %', i_queue_name USING ERRCODE = 'PQ001';
    END IF;
    size_seconds := extract(epoch FROM i_bucket_size);

    RETURN QUERY
        SELECT to_timestamp((floor(extract(epoch FROM d.tick_time) / size_seconds)
                             * size_seconds)::float8) AS bucket,
               sum(d.delta)::bigint,
               sum(d.delta) / size_seconds
          FROM (
            SELECT t.tick_time,
                   t.tick_event_seq - lag(t.tick_event_seq) OVER (ORDER BY t.tick_id) AS delta
              FROM pgque.tick t
             WHERE t.tick_queue = qid AND t.tick_time >= now() - i_period
          ) d
         WHERE d.delta IS NOT NULL
         GROUP BY 1
         ORDER BY 1;
END
$$;

-- Parked retries (by due time) and dead letters (by death time) per bucket. Buckets run
-- from the minute of now() - i_period to the minute of now() in steps of i_bucket_size,
-- empty ones included; the step is not checked (0 is generate_series' own error).
CREATE OR REPLACE FUNCTION pgque.error_rate(
    i_queue_name text, i_period interval, i_bucket_size interval)
RETURNS TABLE (bucket_start timestamptz, retries bigint, dead_letters bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    qid integer;
BEGIN
    SELECT q.queue_id INTO qid FROM pgque.queue q WHERE q.queue_name = i_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue not found: %', i_queue_name USING ERRCODE = 'PQ001';
    END IF;

    RETURN QUERY
        SELECT b.start,
               (SELECT count(*) FROM pgque.retry_queue r
                 WHERE r.ev_queue = qid
                   AND r.ev_retry_after >= b.start AND r.ev_retry_after < b.start + i_bucket_size),
               (SELECT count(*) FROM pgque.dead_letter d
                 WHERE d.dl_queue_id = qid
                   AND d.dl_time >= b.start AND d.dl_time < b.start + i_bucket_size)
          FROM generate_series(date_trunc('minute', now() - i_period),
                               date_trunc('minute', now()), i_bucket_size) AS b (start)
         ORDER BY b.start;
END
$$;

GRANT EXECUTE ON FUNCTION
    pgque.queue_stats(),
    pgque.consumer_stats(),
    pgque.queue_health(),
    pgque.otel_metrics(),
    pgque.stuck_consumers(interval),
    pgque.in_flight(text),
    pgque.throughput(text, interval, interval),
    pgque.error_rate(text, interval, interval)
TO pgque_reader;
