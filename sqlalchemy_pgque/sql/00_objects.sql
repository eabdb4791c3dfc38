-- sqlalchemy-pgque engine: schema objects (tables, sequences, type, roles, config).
--
-- Every statement here is safe to run again: a reinstall keeps queues, subscriptions,
-- cursors, event tables, retry and dead-letter rows, and adds whatever is missing.
-- The files of this directory run in name order inside one transaction.
--
-- Error codes. Every RAISE EXCEPTION of the engine sets the SQLSTATE of its kind of
-- error, so that clients can tell errors apart without reading the texts; the texts
-- stay those of PgQue 0.2, which raises them all as P0001 and whose clients match them
-- by substring. Our own kinds use class PQ: PostgreSQL leaves classes beginning with
-- I-Z to implementations and uses none starting with PQ, and psycopg files class P
-- (like PL/pgSQL's P0001) under the DB-API's ProgrammingError, as before. Where a
-- standard code means exactly the same thing it is used instead, as PostgreSQL's own
-- functions would raise it.
--
--   PQ001  queue not found
--   PQ002  consumer not subscribed to the queue
--   PQ003  batch not found: unknown, finished, or taken over by another member
--   PQ004  event not in the batch
--   PQ005  tick not found
--   PQ006  dead-letter entry not found
--   PQ101  consumer used as the wrong kind (normal, cooperative main, member)
--   PQ102  the consumer or member holds an open batch, so it cannot change now
--   PQ103  the queue still has consumers
--   PQ104  inserts into the queue are disabled
--   PQ105  the queue's ticker is paused
--   PQ106  the queue's tick source (external or local) is not the one the call needs
--   PQ107  the queue has no tick yet
--   PQ108  an external tick not ahead of the latest (tick_id, event_seq)
--   PQ201  a queue, consumer or subconsumer name the engine cannot accept
--   PQ301  a pgque schema that sqlalchemy-pgque did not create is in the way
--   PQ302  the pg_timetable API is owned by a role the engine cannot trust; not 42501
--          (insufficient_privilege): the caller lacks no privilege
--   PQ901  the engine's tables contradict its invariants (a bug or a manual edit);
--          not XX001 (data_corrupted), which reports damaged storage
--   22004  null_value_not_allowed: a required argument is NULL; not 23502
--          (not_null_violation), which drivers report as a constraint failure of a row
--   22023  invalid_parameter_value: an argument out of range, or an unknown parameter
--   25000  invalid_transaction_state: a call that needs READ COMMITTED ran under a
--          stricter isolation level
--   0A000  feature_not_supported: pg_cron or pg_timetable is not installed

-- Serialise concurrent installs (two migrations, two test workers) on one database.
SELECT pg_advisory_xact_lock(hashtext('sqlalchemy_pgque.install'));

-- Refuse to install over a pgque schema that we did not create (e.g. upstream PgQue),
-- unless the caller opted in with SET LOCAL pgque.take_over = 'on'.
DO $guard$
DECLARE
    marker text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgque') THEN
        SELECT obj_description(oid, 'pg_namespace') INTO marker
          FROM pg_namespace WHERE nspname = 'pgque';
        IF coalesce(marker, '') NOT LIKE 'sqlalchemy-pgque %'
           AND coalesce(current_setting('pgque.take_over', true), '') <> 'on' THEN
            RAISE EXCEPTION 'a pgque schema not created by sqlalchemy-pgque already exists in this database'
                USING ERRCODE = 'PQ301',
                      HINT = 'keep using that install (our Python layer works with any PgQue 0.2), '
                             'or run SET LOCAL pgque.take_over = ''on'' before installing to replace its functions';
        END IF;
    END IF;
END
$guard$;

CREATE SCHEMA IF NOT EXISTS pgque;

-- Roles are cluster-global and never dropped by uninstall. Installs into two databases
-- of one cluster may race on CREATE ROLE; the loser finds the role made and goes on.
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgque_reader', 'pgque_writer', 'pgque_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
    -- reader and writer are siblings: a writer must not be able to consume.
    IF pg_has_role('pgque_writer', 'pgque_reader', 'MEMBER') THEN
        REVOKE pgque_reader FROM pgque_writer;
    END IF;
    IF NOT pg_has_role('pgque_admin', 'pgque_reader', 'MEMBER') THEN
        GRANT pgque_reader TO pgque_admin;
    END IF;
    IF NOT pg_has_role('pgque_admin', 'pgque_writer', 'MEMBER') THEN
        GRANT pgque_writer TO pgque_admin;
    END IF;
END
$roles$;

CREATE TABLE IF NOT EXISTS pgque.consumer (
    co_id   serial PRIMARY KEY,
    co_name text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS pgque.queue (
    queue_id                 serial PRIMARY KEY,
    queue_name               text NOT NULL UNIQUE,
    queue_ntables            integer NOT NULL DEFAULT 3,
    queue_cur_table          integer NOT NULL DEFAULT 0,
    queue_rotation_period    interval NOT NULL DEFAULT '2 hours',
    queue_switch_step1       bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    queue_switch_step2       bigint DEFAULT pg_current_xact_id()::text::bigint,
    queue_switch_time        timestamptz NOT NULL DEFAULT now(),
    queue_external_ticker    boolean NOT NULL DEFAULT false,
    queue_disable_insert     boolean NOT NULL DEFAULT false,
    queue_ticker_paused      boolean NOT NULL DEFAULT false,
    queue_ticker_max_count   integer NOT NULL DEFAULT 500,
    queue_ticker_max_lag     interval NOT NULL DEFAULT '3 seconds',
    queue_ticker_idle_period interval NOT NULL DEFAULT '1 minute',
    queue_data_pfx           text NOT NULL,
    queue_event_seq          text NOT NULL,
    queue_tick_seq           text NOT NULL,
    queue_extra_maint        text[],
    queue_max_retries        int4
);

CREATE TABLE IF NOT EXISTS pgque.tick (
    tick_queue     int4 NOT NULL REFERENCES pgque.queue (queue_id),
    tick_id        bigint NOT NULL,
    tick_time      timestamptz NOT NULL DEFAULT now(),
    tick_snapshot  pg_snapshot NOT NULL DEFAULT pg_current_snapshot(),
    tick_event_seq bigint NOT NULL,
    PRIMARY KEY (tick_queue, tick_id)
);

-- Columns added after the first release, for true pending figures under forced ticks
-- (the note at the top of 30_ticker.sql explains them): queue_seq_skipped counts the event
-- sequence values force_next_tick has skipped; tick_seq_skipped is the part of a tick's
-- tick_event_seq that no event accounts for. An older install gets them with 0, which is
-- what its ticks would have recorded had no forced tick happened; the constant default
-- makes ADD COLUMN a catalog-only change that rewrites no row. They are added only when
-- missing, so a reinstall takes no lock on these hot tables and changes nothing.
DO $added_columns$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = 'pgque.queue'::regclass
                      AND attname = 'queue_seq_skipped' AND NOT attisdropped) THEN
        ALTER TABLE pgque.queue ADD COLUMN IF NOT EXISTS queue_seq_skipped bigint NOT NULL DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = 'pgque.tick'::regclass
                      AND attname = 'tick_seq_skipped' AND NOT attisdropped) THEN
        ALTER TABLE pgque.tick ADD COLUMN IF NOT EXISTS tick_seq_skipped bigint NOT NULL DEFAULT 0;
    END IF;
END
$added_columns$;

CREATE TABLE IF NOT EXISTS pgque.subscription (
    sub_id        serial NOT NULL,
    sub_queue     int4 NOT NULL REFERENCES pgque.queue (queue_id),
    sub_consumer  int4 NOT NULL REFERENCES pgque.consumer (co_id),
    sub_last_tick bigint,
    sub_active    timestamptz NOT NULL DEFAULT now(),
    sub_batch     bigint UNIQUE,
    sub_next_tick bigint,
    sub_role      text NOT NULL DEFAULT 'normal'
                  CHECK (sub_role IN ('normal', 'coop_main', 'coop_member')),
    PRIMARY KEY (sub_queue, sub_consumer)
);

-- Parent of every per-queue event table; never holds rows itself.
CREATE TABLE IF NOT EXISTS pgque.event_template (
    ev_id     bigint NOT NULL,
    ev_time   timestamptz NOT NULL,
    ev_txid   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    ev_owner  int4,
    ev_retry  int4,
    ev_type   text,
    ev_data   text,
    ev_extra1 text,
    ev_extra2 text,
    ev_extra3 text,
    ev_extra4 text
);

CREATE TABLE IF NOT EXISTS pgque.retry_queue (
    ev_retry_after timestamptz NOT NULL,
    ev_queue       int4 NOT NULL REFERENCES pgque.queue (queue_id),
    ev_id          bigint NOT NULL,
    ev_time        timestamptz NOT NULL,
    ev_txid        xid8,
    ev_owner       int4 NOT NULL,
    ev_retry       int4,
    ev_type        text,
    ev_data        text,
    ev_extra1      text,
    ev_extra2      text,
    ev_extra3      text,
    ev_extra4      text,
    PRIMARY KEY (ev_owner, ev_id)
);
CREATE INDEX IF NOT EXISTS rq_retry_idx ON pgque.retry_queue (ev_retry_after);

CREATE TABLE IF NOT EXISTS pgque.dead_letter (
    dl_id          bigserial PRIMARY KEY,
    dl_queue_id    int4 NOT NULL REFERENCES pgque.queue (queue_id) ON DELETE CASCADE,
    dl_consumer_id int4 NOT NULL REFERENCES pgque.consumer (co_id) ON DELETE CASCADE,
    dl_time        timestamptz NOT NULL DEFAULT now(),
    dl_reason      text,
    ev_id          bigint NOT NULL,
    ev_time        timestamptz NOT NULL,
    ev_txid        xid8,
    ev_retry       int4,
    ev_type        text,
    ev_data        text,
    ev_extra1      text,
    ev_extra2      text,
    ev_extra3      text,
    ev_extra4      text,
    UNIQUE (dl_queue_id, dl_consumer_id, ev_id)
);
CREATE INDEX IF NOT EXISTS dead_letter_queue_time_idx ON pgque.dead_letter (dl_queue_id, dl_time);

CREATE TABLE IF NOT EXISTS pgque.config (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    ticker_job_id  bigint,
    maint_job_id   bigint,
    scheduler      text CHECK (scheduler IN ('pg_cron', 'pg_timetable')),
    tick_period_ms integer NOT NULL DEFAULT 100
                   CHECK (tick_period_ms BETWEEN 1 AND 1000 AND 1000 % tick_period_ms = 0),
    installed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO pgque.config (singleton) VALUES (true) ON CONFLICT DO NOTHING;

CREATE SEQUENCE IF NOT EXISTS pgque.batch_id_seq;

DO $types$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                    WHERE n.nspname = 'pgque' AND t.typname = 'message') THEN
        CREATE TYPE pgque.message AS (
            msg_id      bigint,
            batch_id    bigint,
            type        text,
            payload     text,
            retry_count int4,
            created_at  timestamptz,
            extra1      text,
            extra2      text,
            extra3      text,
            extra4      text
        );
    END IF;
END
$types$;
