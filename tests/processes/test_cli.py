"""The operator's command line, run as a process against a database with real traffic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from conftest import Database
from engine_helpers import Conn, drain, scalar, send_many, tick
from traffic_helpers import (
    dead_letter,
    make_ticking_queue,
    orders_and_mail,
    rotation_blocked_by_a_stopped_consumer,
)

from sqlalchemy_pgque import schema


def cli(db: Database, *args: str, url: str | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_pgque", *args,
         "--url", url or db.url.render_as_string(hide_password=False)],
        capture_output=True, text=True, timeout=60, input=stdin,
    )



@pytest.fixture
def traffic(db: Database, conn: Conn) -> Conn:
    """See :func:`orders_and_mail`."""
    orders_and_mail(conn)
    return conn


def test_status_prints_the_figures_the_database_holds(db: Database, traffic: Conn) -> None:
    done = cli(db, "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    queues = {q["queue"]: q for q in status["queues"]}
    consumers = {(c["queue"], c["consumer"]): c for c in status["consumers"]}
    assert set(queues) == {"orders", "mail"}
    assert set(consumers) == {("orders", "fast"), ("orders", "slow"), ("mail", "sender")}
    # slow: the 40, the 2 that became dead letters for fast, and 3 not yet ticked.
    assert queues["orders"]["pending_events"] == 40 + 2 + 3
    assert queues["orders"]["dlq_events"] == 2
    assert queues["mail"]["pending_events"] == 0 and queues["mail"]["dlq_events"] == 0
    assert consumers[("orders", "slow")]["pending_events"] == 42
    assert consumers[("orders", "fast")]["pending_events"] == 0
    for key in ("queue", "pending_events", "ticker_lag_seconds", "dlq_events"):
        assert key in queues["orders"]
    for key in ("queue", "consumer", "lag_seconds", "last_seen_seconds", "pending_events",
                "batch_id"):
        assert key in consumers[("orders", "slow")]
    real_lag = scalar(traffic, "select extract(epoch from lag) from pgque.get_consumer_info("
                      "'orders', 'slow')")
    assert consumers[("orders", "slow")]["lag_seconds"] <= float(real_lag)

    table = cli(db, "status").stdout.splitlines()
    assert table[0].split()[:3] == ["QUEUE", "PENDING", "NOT"]
    orders_row = next(line for line in table if line.startswith("orders "))
    assert orders_row.split()[1:3] == ["45", "3"]
    slow_row = next(line for line in table if line.split()[:2] == ["orders", "slow"])
    assert "42" in slow_row.split()


def test_status_check_exit_code_says_whether_all_is_within(db: Database, traffic: Conn) -> None:
    within = cli(db, "status", "--check", "--max-pending", "100", "--max-dlq", "5",
                 "--max-lag", "1 hour", "--max-tick-age", "1 hour")
    assert within.returncode == 0, within.stdout + within.stderr
    assert within.stdout.startswith("ok: 2 queues and 3 consumers")
    over = cli(db, "status", "--check", "--max-pending", "10", "--max-dlq", "1")
    assert over.returncode == 1
    assert over.stdout.splitlines() == [
        "over: orders: 2 dead letters > 1",
        "over: orders/slow: 42 pending events > 10",
    ]
    as_json = json.loads(cli(db, "status", "--check", "--max-pending", "10", "--json").stdout)
    assert as_json == {"ok": False, "over": ["orders/slow: 42 pending events > 10"]}


def test_dlq_list_show_replay_and_purge(db: Database, traffic: Conn) -> None:
    listed = json.loads(cli(db, "dlq", "list", "--json").stdout)
    assert [(e["queue"], e["consumer"], e["type"], e["reason"]) for e in listed] == [
        ("orders", "fast", "order.created", "boom")] * 2
    assert [e["payload"] for e in listed] == [{"n": 0}, {"n": 1}]
    assert {"id", "queue", "consumer", "type", "reason", "payload"} <= set(listed[0])
    assert json.loads(cli(db, "dlq", "list", "--json", "--type", "other").stdout) == []
    shown = cli(db, "dlq", "show", str(listed[0]["id"]))
    assert shown.returncode == 0 and '"n": 0' in shown.stdout
    missing = cli(db, "dlq", "show", "999999")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: dead letter entry not found: 999999"

    # Without --yes and without a terminal, nothing is replayed.
    refused = cli(db, "dlq", "replay", "--queue", "orders", stdin="")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert len(json.loads(cli(db, "dlq", "list", "--json").stdout)) == 2
    replayed = cli(db, "dlq", "replay", str(listed[0]["id"]), "--yes")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == "replayed 1 dead letters"
    tick(traffic, "orders", force=False)
    again = drain(traffic, "orders", "fast")
    assert [json.loads(row[3]) for row in again if row[2] == "order.created"] == [{"n": 0}]
    assert cli(db, "dlq", "replay", str(listed[0]["id"]), "--yes").returncode == 2

    purged = cli(db, "dlq", "purge", str(listed[1]["id"]), "--yes")
    assert purged.stdout.strip() == "purged 1 dead letters"
    assert json.loads(cli(db, "dlq", "list", "--json").stdout) == []
    nothing = cli(db, "dlq", "purge", "--older-than", "1 day", "--yes")
    assert nothing.returncode == 0 and nothing.stdout.strip() == "purged 0 dead letters"
    assert cli(db, "dlq", "purge", "--yes").returncode == 2  # neither ids nor filters

    # Filters as `dlq list` takes them: only the matching entries go.
    dead_letter(traffic, "orders", "fast", 2, "order.created", reason="SMTP 550")
    dead_letter(traffic, "mail", "sender", 1, "mail.send", reason="smtp timeout")
    by_reason = cli(db, "dlq", "purge", "--queue", "orders", "--reason", "smtp", "--yes")
    assert by_reason.stdout.strip() == "purged 2 dead letters", by_reason.stderr
    left = json.loads(cli(db, "dlq", "list", "--json").stdout)
    assert [(e["queue"], e["reason"]) for e in left] == [("mail", "smtp timeout")]


def test_tick_runs_one_ticker_pass(db: Database, conn: Conn) -> None:
    make_ticking_queue(conn, "q", "c")
    # Nothing but the new event may make the CLI's pass tick: a CLI that takes longer to
    # start than the default ticker_max_lag (3 s, on a loaded machine) met a due idle tick.
    for param in ("ticker_max_lag", "ticker_idle_period"):
        conn.execute("select pgque.set_queue_config('q', %s, '1 hour')", (param,))
    assert cli(db, "tick", "q").stdout.strip() == "q: no tick needed"
    send_many(conn, "q", 1)
    assert cli(db, "tick", "q").stdout.strip().startswith("q: tick ")
    assert len(drain(conn, "q", "c")) == 1
    forced = cli(db, "tick", "q", "--force")
    assert forced.stdout.strip().startswith("q: tick "), forced.stderr
    assert cli(db, "tick").stdout.strip().endswith("queues ticked")


def test_watch_refreshes_in_place_until_interrupted(db: Database, traffic: Conn) -> None:
    """Ctrl-C ends it, also when started with SIGINT ignored, as a script's ``cmd &``
    starts it (Python then installs no KeyboardInterrupt of its own)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sqlalchemy_pgque", "status", "--watch", "0.2",
         "--url", db.url.render_as_string(hide_password=False)],
        stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert process.stdout is not None
    screens = 0
    deadline = time.monotonic() + 30
    while screens < 2 and time.monotonic() < deadline:
        line = process.stdout.readline()
        screens += line.count("\x1b[2J")
    process.send_signal(signal.SIGINT)
    # communicate() keeps reading: a watcher blocked on a full pipe would not see SIGINT.
    process.communicate(timeout=30)
    assert process.returncode == 0
    assert screens >= 2


def test_problems_are_one_line_and_exit_2(db: Database, empty_db: Database) -> None:
    bad_url = cli(db, "status", url="nosuchdriver://x")
    assert bad_url.returncode == 2 and bad_url.stderr.startswith("error: bad database URL")
    assert len(bad_url.stderr.strip().splitlines()) == 1
    no_engine = cli(empty_db, "status")
    assert no_engine.returncode == 2
    assert "not installed" in no_engine.stderr and len(no_engine.stderr.splitlines()) == 1
    unreachable = cli(db, "status", url="postgresql+psycopg://nobody@127.0.0.1:1/x")
    assert unreachable.returncode == 2 and len(unreachable.stderr.splitlines()) == 1


def test_a_user_without_the_pgque_role_is_told_which_one(db: Database, conn: Conn) -> None:
    assert schema  # the engine is installed in ``db``
    role = f"cli_nobody_{db.name[-12:]}"
    conn.execute(f'create role "{role}" login')
    try:
        conn.execute("revoke all on schema pgque from public")
        url = db.url.set(username=role).render_as_string(hide_password=False)
        denied = cli(db, "dlq", "purge", "1", "--yes", url=url)
        assert denied.returncode == 2
        assert "permission denied" in denied.stderr and len(denied.stderr.splitlines()) == 1
    finally:
        conn.execute("grant usage on schema pgque to public")
        with psycopg.connect(db.dsn, autocommit=True) as admin_conn:
            admin_conn.execute(f'drop owned by "{role}"')
            admin_conn.execute(f'drop role "{role}"')


def test_status_names_the_consumer_that_blocks_rotation(db: Database, conn: Conn) -> None:
    rotation_blocked_by_a_stopped_consumer(conn)
    (queue,) = json.loads(cli(db, "status", "--json", "--queue", "r").stdout)["queues"]
    assert queue["rotation_blocked_by"] == ["forgotten"]
    row = next(line for line in cli(db, "status", "--queue", "r").stdout.splitlines()
               if line.startswith("r "))
    assert row.split()[-1] == "forgotten"
