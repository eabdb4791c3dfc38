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
GRANT SELECT ON ALL TABLES IN SCHEMA pgque TO pgque_reader;
GRANT ALL ON ALL TABLES IN SCHEMA pgque TO pgque_admin;
GRANT ALL ON ALL SEQUENCES IN SCHEMA pgque TO pgque_admin;

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
