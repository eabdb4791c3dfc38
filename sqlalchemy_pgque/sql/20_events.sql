-- sqlalchemy-pgque engine: producing events.
--
-- Every insert draws nextval from the queue's event sequence, even a re-injected retry
-- copy that keeps its old id: the ticker measures pending work by that sequence.

-- Resolve a queue for writing: its row, or the producer-facing errors.
CREATE OR REPLACE FUNCTION pgque._writable_queue(i_queue_name text)
RETURNS pgque.queue
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
BEGIN
    SELECT * INTO q FROM pgque.queue WHERE queue_name = i_queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue not found: %', i_queue_name;
    END IF;
    IF q.queue_disable_insert AND current_setting('session_replication_role') <> 'replica' THEN
        RAISE EXCEPTION 'Insert into queue disallowed';
    END IF;
    RETURN q;
END
$$;

-- The one place rows enter an event table. A NULL ev_id takes the sequence value just
-- drawn; a given ev_id (retry re-injection) is kept.
CREATE OR REPLACE FUNCTION pgque.insert_event_raw(
    queue_name text, ev_id bigint, ev_time timestamptz, ev_owner integer, ev_retry integer,
    ev_type text, ev_data text, ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    drawn bigint;
BEGIN
    q := pgque._writable_queue(queue_name);
    drawn := nextval(pgque.quote_fqname(q.queue_event_seq)::regclass);
    EXECUTE format('INSERT INTO %s (ev_id, ev_time, ev_owner, ev_retry, ev_type, ev_data, '
                   'ev_extra1, ev_extra2, ev_extra3, ev_extra4) '
                   'VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)',
                   pgque.quote_fqname(q.queue_data_pfx || '_' || q.queue_cur_table))
        USING coalesce(ev_id, drawn), coalesce(ev_time, now()), ev_owner, ev_retry,
              ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4;
    RETURN coalesce(ev_id, drawn);
END
$$;

CREATE OR REPLACE FUNCTION pgque.insert_event(
    queue_name text, ev_type text, ev_data text,
    ev_extra1 text, ev_extra2 text, ev_extra3 text, ev_extra4 text)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.insert_event_raw(queue_name, NULL, now(), NULL, NULL, ev_type, ev_data,
                                  ev_extra1, ev_extra2, ev_extra3, ev_extra4);
$$;

CREATE OR REPLACE FUNCTION pgque.insert_event(queue_name text, ev_type text, ev_data text)
RETURNS bigint
LANGUAGE sql
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.insert_event(queue_name, ev_type, ev_data, NULL, NULL, NULL, NULL);
$$;

-- Set-based insert of many events of one type: one queue lookup, one INSERT. Ids are
-- drawn in input order, so result[i] belongs to ev_data_list[i] and ids ascend.
CREATE OR REPLACE FUNCTION pgque.insert_event_bulk(
    queue_name text, ev_type text, ev_data_list text[])
RETURNS bigint[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
DECLARE
    q pgque.queue%ROWTYPE;
    ids bigint[];
BEGIN
    IF ev_data_list IS NULL THEN
        RAISE EXCEPTION 'payloads must not be null';
    END IF;
    IF cardinality(ev_data_list) = 0 THEN
        RETURN '{}'::bigint[];
    END IF;
    q := pgque._writable_queue(queue_name);
    EXECUTE format(
        'WITH numbered AS MATERIALIZED ('
        '    SELECT nextval(%L::regclass) AS id, data, ord'
        '      FROM (SELECT data, ord FROM unnest($1) WITH ORDINALITY AS u(data, ord)'
        '             ORDER BY ord) AS ordered'
        '), inserted AS ('
        '    INSERT INTO %s (ev_id, ev_time, ev_type, ev_data)'
        '    SELECT id, now(), $2, data FROM numbered'
        ')'
        ' SELECT array_agg(id ORDER BY ord) FROM numbered',
        pgque.quote_fqname(q.queue_event_seq),
        pgque.quote_fqname(q.queue_data_pfx || '_' || q.queue_cur_table))
        INTO ids
        USING ev_data_list, ev_type;
    RETURN ids;
END
$$;

CREATE OR REPLACE FUNCTION pgque.send(queue_name text, payload jsonb)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.insert_event_raw(queue_name, NULL, now(), NULL, NULL, 'default', payload::text,
                                  NULL, NULL, NULL, NULL);
$$;

CREATE OR REPLACE FUNCTION pgque.send(queue_name text, payload text)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.insert_event_raw(queue_name, NULL, now(), NULL, NULL, 'default', payload,
                                  NULL, NULL, NULL, NULL);
$$;

CREATE OR REPLACE FUNCTION pgque.send(queue_name text, type_name text, payload jsonb)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.insert_event_raw(queue_name, NULL, now(), NULL, NULL, type_name, payload::text,
                                  NULL, NULL, NULL, NULL);
$$;

CREATE OR REPLACE FUNCTION pgque.send(queue_name text, type_name text, payload text)
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.insert_event_raw(queue_name, NULL, now(), NULL, NULL, type_name, payload,
                                  NULL, NULL, NULL, NULL);
$$;

CREATE OR REPLACE FUNCTION pgque.send_batch(queue_name text, type_name text, payloads text[])
RETURNS bigint[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF payloads IS NULL THEN
        RAISE EXCEPTION 'payloads must not be null';
    END IF;
    RETURN pgque.insert_event_bulk(queue_name, type_name, payloads);
END
$$;

CREATE OR REPLACE FUNCTION pgque.send_batch(queue_name text, type_name text, payloads jsonb[])
RETURNS bigint[]
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
BEGIN
    IF payloads IS NULL THEN
        RAISE EXCEPTION 'payloads must not be null';
    END IF;
    RETURN pgque.insert_event_bulk(queue_name, type_name, payloads::text[]);
END
$$;

CREATE OR REPLACE FUNCTION pgque.send_batch(queue_name text, payloads text[])
RETURNS bigint[]
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.send_batch(queue_name, 'default', payloads);
$$;

CREATE OR REPLACE FUNCTION pgque.send_batch(queue_name text, payloads jsonb[])
RETURNS bigint[]
LANGUAGE sql
SECURITY DEFINER
SET search_path = pgque, pg_catalog
AS $$
    SELECT pgque.send_batch(queue_name, 'default', payloads);
$$;

GRANT EXECUTE ON FUNCTION
    pgque.insert_event(text, text, text),
    pgque.insert_event(text, text, text, text, text, text, text),
    pgque.send(text, jsonb),
    pgque.send(text, text),
    pgque.send(text, text, jsonb),
    pgque.send(text, text, text),
    pgque.send_batch(text, text[]),
    pgque.send_batch(text, jsonb[]),
    pgque.send_batch(text, text, text[]),
    pgque.send_batch(text, text, jsonb[])
TO pgque_writer;
