"""Delayed delivery and idempotent send without bloat, against DELETE-based designs.

    .venv/bin/python bench/bench_delayed_idem.py                  # embedded PostgreSQL 18
    .venv/bin/python bench/bench_delayed_idem.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/delayed-idem-pg15.json              # a running server

Creates a scratch database (dropped afterwards), installs the bundled engine, then:

* delayed: 100,000 events sent with ``pgque.send_at`` due a few seconds later (100
  transactions of 1,000), moved by ``pgque.maint_deliver_delayed()`` once due (as the
  worker's ticker calls it), then ``pgque.maint()`` runs (its 30-s cycle) and the
  queue is drained by a consumer. For every table of schema ``pgque`` it reports rows
  inserted, updated and deleted, dead tuples and total size, before and after; the
  figures that matter are the delayed-delivery storage's ``n_tup_upd + n_tup_del`` and
  ``n_dead_tup`` (target: 0).
* idem: 100,000 ``pgque.send_idem`` calls with distinct keys and a 2-s lifetime (plus
  10,000 repeats inside the lifetime, deduplicated), then, once the keys expired,
  ``pgque.maint_idem()`` as ``maint()`` would call it, until the claims' storage is
  empty (the first run moves new claims to another partition, a later one truncates
  the expired one). Same figures for the idempotency storage.
* The same two loads on DELETE-based designs written here for the comparison (a holding
  table drained with ``DELETE ... RETURNING``; a claims table updated with the event id
  and collected with ``DELETE``), the way a row-per-item design does it.
* cost: the time per event of ``send`` and ``send_idem`` (distinct keys), as a producer
  pays it, one autocommit statement per event from Python (median of ``--rounds``
  rounds of ``--calls`` calls, the two interleaved), and server-side only, in one
  statement over ``generate_series`` (the work of the function itself); the same for
  the DELETE-based claims table's send. Target: ``send_idem`` at most 1.3x ``send``.

Statistics are read from a fresh connection after the working connections closed (a
backend flushes its table statistics when it exits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from _common import run_facts, scratch_database

RESULTS = Path(__file__).resolve().parent / "results" / "delayed-idem.json"
EVENTS = 100_000
CHUNK = 1_000

# The DELETE-based designs compared against: what a row-per-item holding table and
# claims table do. Written here for this comparison only.
DELETE_BASED = """
CREATE TABLE bench_holding (
    id bigserial PRIMARY KEY, queue_name text NOT NULL, deliver_at timestamptz NOT NULL,
    ev_type text, ev_data text);
CREATE INDEX ON bench_holding (deliver_at);
CREATE FUNCTION bench_holding_move() RETURNS integer LANGUAGE sql AS $$
    WITH due AS (DELETE FROM bench_holding WHERE deliver_at <= now()
                 RETURNING queue_name, ev_type, ev_data)
    SELECT count(pgque.insert_event(queue_name, ev_type, ev_data))::integer FROM due
$$;
CREATE TABLE bench_claims (
    queue_id int NOT NULL, idem_key text NOT NULL, event_id bigint,
    expires_at timestamptz NOT NULL, PRIMARY KEY (queue_id, idem_key));
CREATE INDEX ON bench_claims (expires_at);
CREATE FUNCTION bench_send_idem(q text, t text, p jsonb, k text, ttl interval)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    qid int := (SELECT queue_id FROM pgque.queue WHERE queue_name = q);
    claimed boolean;
    id bigint;
BEGIN
    INSERT INTO bench_claims AS c (queue_id, idem_key, expires_at)
    VALUES (qid, k, now() + ttl)
    ON CONFLICT (queue_id, idem_key) DO UPDATE
        SET expires_at = excluded.expires_at, event_id = NULL
        WHERE c.expires_at <= now()
    RETURNING true INTO claimed;
    IF claimed THEN
        id := pgque.insert_event(q, t, p::text);
        UPDATE bench_claims SET event_id = id WHERE queue_id = qid AND idem_key = k;
        RETURN id;
    END IF;
    RETURN (SELECT event_id FROM bench_claims WHERE queue_id = qid AND idem_key = k);
END $$;
CREATE FUNCTION bench_claims_gc() RETURNS integer LANGUAGE sql AS $$
    WITH gone AS (DELETE FROM bench_claims WHERE expires_at < now() RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;
"""


def scalar(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def table_stats(dsn: str, schemas: tuple[str, ...]) -> dict[str, dict[str, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || relname, n_tup_ins, n_tup_upd, n_tup_del, "
            "n_dead_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables "
            "WHERE schemaname = ANY(%s) ORDER BY 1", (list(schemas),)).fetchall()
    return {name: {"n_tup_ins": ins, "n_tup_upd": upd, "n_tup_del": dele,
                   "n_dead_tup": dead, "total_bytes": size}
            for name, ins, upd, dele, dead, size in rows}


def delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
          tables: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in tables:
        b = before.get(name, dict.fromkeys(after[name], 0))
        a = after[name]
        out[name] = {
            "inserted": a["n_tup_ins"] - b["n_tup_ins"],
            "updated": a["n_tup_upd"] - b["n_tup_upd"],
            "deleted": a["n_tup_del"] - b["n_tup_del"],
            "dead_tuples_after": a["n_dead_tup"],
            "bytes_before": b["total_bytes"],
            "bytes_after": a["total_bytes"],
        }
    out["total_updated_plus_deleted"] = sum(v["updated"] + v["deleted"]
                                            for v in out.values() if isinstance(v, dict))
    out["total_dead_tuples_after"] = sum(v["dead_tuples_after"]
                                         for v in out.values() if isinstance(v, dict))
    return out


def matching(stats: dict[str, dict[str, int]], *needles: str) -> list[str]:
    return sorted(n for n in stats if any(needle in n for needle in needles))


def drain(dsn: str, queue: str) -> int:
    total = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgque.force_next_tick(%s)", (queue,))
        conn.execute("SELECT pgque.ticker(%s)", (queue,))
        while True:
            with conn.transaction():
                rows = conn.execute("SELECT batch_id FROM pgque.receive(%s, 'c', 1000000)",
                                    (queue,)).fetchall()
                if not rows:
                    break
                conn.execute("SELECT pgque.ack(%s)", (rows[0][0],))
            total += len(rows)
    return total


def run_delayed(dsn: str, send_sql: str, move_sql: str, queue: str) -> dict[str, Any]:
    due_in = 5.0
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        for chunk in range(EVENTS // CHUNK):
            conn.execute(send_sql, {"lo": chunk * CHUNK, "hi": (chunk + 1) * CHUNK - 1,
                                    "queue": queue, "due": due_in})
        send_seconds = time.perf_counter() - started
        moved = 0
        deadline = time.monotonic() + 120
        while moved < EVENTS and time.monotonic() < deadline:
            moved += scalar(conn, move_sql)
            if moved < EVENTS:
                time.sleep(0.1)
        conn.execute("SELECT pgque.maint()")
    return {"sent_seconds": round(send_seconds, 2), "moved": moved,
            "received": drain(dsn, queue)}


def run_idem(dsn: str, queue: str, send_sql: str, gc_sql: str, collected_sql: str
             ) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for chunk in range(EVENTS // CHUNK):
            conn.execute(send_sql, (chunk * CHUNK, (chunk + 1) * CHUNK - 1))
            if chunk % 10 == 0:
                # Repeats inside the lifetime: deduplicated, no event.
                conn.execute(send_sql, (chunk * CHUNK, (chunk + 1) * CHUNK - 1))
        time.sleep(2.5)  # the keys' lifetime is the thing measured here
        runs = 0
        while runs < 10:
            conn.execute(gc_sql)
            runs += 1
            if scalar(conn, collected_sql) == 0:
                break
    return {"gc_runs": runs, "received": drain(dsn, queue)}


def cost(dsn: str, calls: int, rounds: int) -> dict[str, Any]:
    per_event: dict[str, list[float]] = {"send": [], "send_idem": [], "delete_based": []}
    statements = {
        "send": "SELECT pgque.send('cq', 't', '{\"n\": 1}'::jsonb)",
        "send_idem": "SELECT event_id FROM pgque.send_idem('cq', 't', '{\"n\": 1}'::jsonb, "
                     "%s, interval '1 hour')",
        "delete_based": "SELECT bench_send_idem('cq', 't', '{\"n\": 1}'::jsonb, %s, "
                        "interval '1 hour')",
    }
    key = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgque.create_queue('cq')")
        for _ in range(rounds):
            for name in statements:
                started = time.perf_counter()
                for _ in range(calls):
                    key += 1
                    params = (f"key-{key}",) if name != "send" else None
                    conn.execute(statements[name], params)
                per_event[name].append((time.perf_counter() - started) / calls)
        server: dict[str, float] = {}
        for name, stmt in (
            ("send", "SELECT count(pgque.send('cq', 't', '{\"n\": 1}'::jsonb)) "
                     "FROM generate_series(1, %s)"),
            ("send_idem", "SELECT count(r.event_id) FROM generate_series(1, %s) g, "
                          "pgque.send_idem('cq', 't', '{\"n\": 1}'::jsonb, 'srv-' || g, "
                          "interval '1 hour') r"),
            ("delete_based", "SELECT count(bench_send_idem('cq', 't', '{\"n\": 1}'::jsonb, "
                             "'srv-' || g, interval '1 hour')) FROM generate_series(1, %s) g"),
        ):
            samples = []
            for _ in range(rounds):
                conn.execute("SELECT pgque.maint_idem()")
                started = time.perf_counter()
                with conn.transaction():
                    conn.execute(stmt, (calls * 10,))
                    samples.append((time.perf_counter() - started) / (calls * 10))
                    raise psycopg.Rollback()
            server[name] = statistics.median(samples)
    client = {name: statistics.median(v) for name, v in per_event.items()}
    return {
        "calls_per_round": calls, "rounds": rounds,
        "client_us_per_event": {k: round(v * 1e6, 1) for k, v in client.items()},
        "client_ratio": round(client["send_idem"] / client["send"], 3),
        "server_us_per_event": {k: round(v * 1e6, 1) for k, v in server.items()},
        "server_ratio": round(server["send_idem"] / server["send"], 3),
        "delete_based_client_ratio": round(client["delete_based"] / client["send"], 3),
        "delete_based_server_ratio": round(server["delete_based"] / server["send"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="libpq dsn of a running server (default: embedded)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with scratch_database(args.dsn, "delayed_idem", setup=DELETE_BASED) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            server_version = conn.info.server_version
            for queue in ("dq", "iq", "bd", "bq"):
                conn.execute("SELECT pgque.create_queue(%s)", (queue,))
                conn.execute("SELECT pgque.subscribe(%s, 'c')", (queue,))
        schemas = ("pgque", "public")
        results: dict[str, Any] = run_facts("delayed-idem", server_version)

        before = table_stats(dsn, schemas)
        run = run_delayed(
            dsn,
            "SELECT count(pgque.send_at(%(queue)s, 't', jsonb_build_object('n', g), "
            "clock_timestamp() + make_interval(secs => %(due)s))) "
            "FROM generate_series(%(lo)s::int, %(hi)s::int) g",
            "SELECT pgque.maint_deliver_delayed()", "dq")
        after = table_stats(dsn, schemas)
        results["delayed"] = {**run, "tables": delta(before, after, matching(
            after, "pgque.delayed"))}
        results["delayed"]["event_tables"] = delta(before, after, matching(
            after, "pgque.event_"))

        before = table_stats(dsn, schemas)
        run = run_delayed(
            dsn,
            "INSERT INTO bench_holding (queue_name, deliver_at, ev_type, ev_data) "
            "SELECT %(queue)s, clock_timestamp() + make_interval(secs => %(due)s), 't', "
            "jsonb_build_object('n', g)::text FROM generate_series(%(lo)s::int, %(hi)s::int) g",
            "SELECT bench_holding_move()", "bd")
        after = table_stats(dsn, schemas)
        results["delayed_delete_based"] = {**run, "tables": delta(
            before, after, ["public.bench_holding"])}

        before = table_stats(dsn, schemas)
        run = run_idem(
            dsn, "iq",
            "SELECT count(r.event_id) FROM generate_series(%s::int, %s::int) g, "
            "pgque.send_idem('iq', 't', jsonb_build_object('n', g), 'key-' || g, "
            "interval '2 seconds') r",
            "SELECT pgque.maint_idem()",
            "SELECT count(*) FROM pgque.idem_claim")
        after = table_stats(dsn, schemas)
        results["idem"] = {**run, "tables": delta(before, after, matching(
            after, "pgque.idem"))}

        before = table_stats(dsn, schemas)
        run = run_idem(
            dsn, "bq",
            "SELECT count(bench_send_idem('bq', 't', jsonb_build_object('n', g), "
            "'key-' || g, interval '2 seconds')) FROM generate_series(%s::int, %s::int) g",
            "SELECT bench_claims_gc()",
            "SELECT count(*) FROM bench_claims")
        after = table_stats(dsn, schemas)
        results["idem_delete_based"] = {**run, "tables": delta(
            before, after, ["public.bench_claims"])}

        results["cost"] = cost(dsn, args.calls, args.rounds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
