-- sqlalchemy-pgque engine: privileges. Runs after every function exists.
--
-- Reader and writer EXECUTE grants live at the end of each file, next to the
-- functions they cover; this file only opens the schema, grants table access, takes
-- the default EXECUTE away from PUBLIC and gives the admin role everything it needs.

GRANT USAGE ON SCHEMA pgque TO PUBLIC;
GRANT USAGE ON SCHEMA pgque TO pgque_reader, pgque_writer;
GRANT ALL ON SCHEMA pgque TO pgque_admin;

GRANT SELECT ON pgque.consumer, pgque.queue, pgque.tick, pgque.subscription,
                pgque.event_template, pgque.retry_queue
    TO PUBLIC;
-- What GRANT ... ON ALL TABLES / SEQUENCES IN SCHEMA pgque would give, granted only
-- where missing: a reinstall over thousands of queues then locks none of their tables
-- (see pgque._grant_if_missing).
DO $tables$
DECLARE
    rel record;
BEGIN
    FOR rel IN
        SELECT c.oid::regclass AS oid, c.relkind
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'pgque' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
    LOOP
        IF rel.relkind <> 'S' THEN
            PERFORM pgque._grant_if_missing(rel.oid, 'SELECT', 'pgque_reader'::regrole);
        END IF;
        PERFORM pgque._grant_if_missing(rel.oid, 'ALL', 'pgque_admin'::regrole);
    END LOOP;
END
$tables$;

-- PostgreSQL grants EXECUTE to PUBLIC on every new function; nothing here is public.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgque FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgque TO pgque_admin;

-- uninstall() drops everything: owner only.
REVOKE EXECUTE ON FUNCTION pgque.uninstall() FROM pgque_admin, pgque_reader, pgque_writer;

-- insert_event_bulk trusts its caller (send_batch checks the arguments): owner only.
REVOKE EXECUTE ON FUNCTION pgque.insert_event_bulk(text, text, text[])
    FROM PUBLIC, pgque_admin, pgque_reader, pgque_writer;

-- Queues created by an earlier install get the current template privileges again.
DO $queues$
DECLARE
    name text;
BEGIN
    FOR name IN SELECT queue_name FROM pgque.queue ORDER BY queue_id LOOP
        PERFORM pgque.grant_perms(name);
    END LOOP;
END
$queues$;

-- Idempotency claims (82_idem.sql): owner only, for every role including admin, as in
-- PgQue 0.3 (ENGINE-0.3 §2.1). A claimer that bypassed send_idem, or a slot moved
-- without its barrier, would break deduplication. The blanket grants above reach
-- these objects on every install, so they are taken back after them.
REVOKE ALL ON pgque.idem, pgque.idem_claim, pgque.idem_claim_0, pgque.idem_claim_1,
              pgque.idem_claim_2, pgque.idem_switch
    FROM PUBLIC, pgque_reader, pgque_writer, pgque_admin;
REVOKE ALL ON SEQUENCE pgque.idem_slot, pgque.idem_gc_watermark
    FROM PUBLIC, pgque_reader, pgque_writer, pgque_admin;
