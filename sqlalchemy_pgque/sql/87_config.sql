-- sqlalchemy-pgque engine: the PgQue 0.3 configuration sugar (upstream's opt-in
-- experimental file; ours is in the default install). Each function is a shorthand for
-- create_queue(text) and set_queue_config, whose checks and errors it keeps; pgque_admin
-- gets them through the blanket grant of 90_grants.sql.

-- create_queue(i_queue) followed by set_queue_config(i_queue, key, value) for every
-- top-level key of i_options, also when the queue already existed. i_options has no
-- default: create_queue('q') would then match both overloads. Nothing is caught, so a
-- rejected option fails the statement and the caller's transaction keeps no queue.
CREATE OR REPLACE FUNCTION pgque.create_queue(i_queue text, i_options jsonb)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    created integer;
    opt record;
BEGIN
    created := pgque.create_queue(i_queue);
    -- #>> '{}' gives a JSON string unquoted, a number or boolean as its literal, null as
    -- SQL NULL (set_queue_config then resets the default) and anything else as JSON text.
    FOR opt IN SELECT o.key, o.value #>> '{}' AS value FROM jsonb_each(i_options) AS o LOOP
        PERFORM pgque.set_queue_config(i_queue, opt.key, opt.value);
    END LOOP;
    RETURN created;
END
$$;

CREATE OR REPLACE FUNCTION pgque.pause_queue(i_queue text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    PERFORM pgque.set_queue_config(i_queue, 'ticker_paused', 'true');
END
$$;

CREATE OR REPLACE FUNCTION pgque.resume_queue(i_queue text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    PERFORM pgque.set_queue_config(i_queue, 'ticker_paused', 'false');
END
$$;
