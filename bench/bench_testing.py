"""What a test using the ``pgque_url`` fixture pays for its fresh database.

    .venv/bin/python bench/bench_testing.py                       # embedded PostgreSQL 18
    .venv/bin/python bench/bench_testing.py --dsn "host=127.0.0.1 user=postgres" \\
        --output bench/results/testing-pg15.json                   # a running server

Writes a small user project into a temporary directory and runs it with pytest in a
subprocess, the plugin loaded with ``-p sqlalchemy_pgque.testing`` and a small plugin
of the benchmark's that records pytest's own setup and teardown durations of every
test. Two bodies, alternating over rounds (default 3), 60 tests each:

* ``work``: ``pgque_engine``, then create a queue, subscribe, send three events in one
  transaction and ``deliver()`` them (some 50 ms of real work, leaving dirty buffers
  behind as a test suite does);
* ``empty``: ``pgque_url`` and nothing else: the worst case, where no test body hides
  the copy of the template that the plugin makes for the next test.

The first test's setup starts the server and prepares the template, once per session:
it is reported apart. The figure of merit is the median (and p95) of setup + teardown
over the other tests of the ``work`` body.

Then the server-side cost of one copy, as the plugin's worker threads pay it in the
background: ``CREATE DATABASE ... TEMPLATE`` and ``DROP DATABASE``, 20 each per round,
with ``STRATEGY FILE_COPY`` (copy the files, a checkpoint before and after) and with
``WAL_LOG`` (PostgreSQL 15's default: every block through the WAL), alternating, on a
server set up as the plugin sets up its embedded one.

Target: setup + teardown <= 50 ms per test on the embedded server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import run_facts

RESULTS = Path(__file__).resolve().parent / "results" / "testing.json"
ROOT = Path(__file__).resolve().parents[1]

# Records every test's setup and teardown durations, as pytest measures them.
TIMER_PLUGIN = '''
import json, os

durations = {}


def pytest_runtest_logreport(report):
    if report.when in ("setup", "teardown"):
        durations.setdefault(report.nodeid, {})[report.when] = report.duration
    if report.failed:
        durations.setdefault("failed", []).append(report.nodeid)


def pytest_sessionfinish(session):
    with open(os.environ["BENCH_OUT"], "w") as out:
        json.dump(durations, out)
'''

TEST_MODULE = '''
from sqlalchemy import text
from sqlalchemy.orm import Session

from sqlalchemy_pgque import Consumer, Queue
from sqlalchemy_pgque.testing import deliver

q = Queue("bench")


def _scenario(engine):
    with engine.begin() as conn:
        conn.execute(text("SELECT pgque.create_queue('bench')"))
        conn.execute(text("SELECT pgque.subscribe('bench', 'c')"))
    with Session(engine) as session, session.begin():
        for n in range(3):
            q.send(session, {"n": n})
    consumer = Consumer(engine, queue=q, name="c")
    seen = []
    consumer.on("default")(lambda msg: seen.append(msg.msg_id))
    assert deliver(consumer).outcomes == ["handled"] * 3

'''


def write_project(directory: Path, tests: int) -> None:
    (directory / "bench_timer.py").write_text(TIMER_PLUGIN)
    work = TEST_MODULE + "".join(
        f"\ndef test_{n}(pgque_engine):\n    _scenario(pgque_engine)\n" for n in range(tests)
    )
    (directory / "test_work.py").write_text(work)
    empty = "".join(f"\ndef test_{n}(pgque_url):\n    pass\n" for n in range(tests))
    (directory / "test_empty.py").write_text(empty)


def run_once(directory: Path, body: str, dsn: str | None) -> dict[str, Any]:
    out = directory / f"durations-{body}.json"
    env = dict(os.environ, BENCH_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(directory), str(ROOT),
                                           os.environ.get("PYTHONPATH", "")]))
    env.pop("PGQUE_TEST_DSN", None)
    if dsn is not None:
        env["PGQUE_TEST_DSN"] = dsn
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "sqlalchemy_pgque.testing", "-p", "bench_timer", f"test_{body}.py"],
        cwd=directory, env=env, capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"the benchmark's tests failed:\n{result.stdout}\n{result.stderr}")
    durations: dict[str, Any] = json.loads(out.read_text())
    return durations


def summarise(durations: dict[str, Any]) -> dict[str, float]:
    phases = [durations[node] for node in sorted(durations, key=_test_number)]
    first, rest = phases[0], phases[1:]
    per_test = [p["setup"] + p["teardown"] for p in rest]
    return {
        "session_setup_ms": round(first["setup"] * 1000, 1),
        "per_test_median_ms": round(statistics.median(per_test) * 1000, 1),
        "per_test_p95_ms": round(sorted(per_test)[int(len(per_test) * 0.95)] * 1000, 1),
        "setup_median_ms": round(statistics.median(p["setup"] for p in rest) * 1000, 1),
        "teardown_median_ms": round(statistics.median(p["teardown"] for p in rest) * 1000, 1),
    }


def _test_number(nodeid: str) -> int:
    return int(nodeid.rsplit("_", 1)[1])


def copy_costs(dsn: str | None, rounds: int, copies: int) -> dict[str, Any]:
    """Median milliseconds of CREATE DATABASE ... TEMPLATE and DROP DATABASE."""
    from sqlalchemy_pgque.testing import _install_engine, _Server

    previous = os.environ.pop("PGQUE_TEST_DSN", None)
    if dsn is not None:
        os.environ["PGQUE_TEST_DSN"] = dsn
    try:
        server = _Server.start()
    finally:
        os.environ.pop("PGQUE_TEST_DSN", None)
        if previous is not None:
            os.environ["PGQUE_TEST_DSN"] = previous
    template = server.new_name("template")
    server.create(template)
    times: dict[str, dict[str, list[float]]] = {
        "FILE_COPY": {"create": [], "drop": []}, "WAL_LOG": {"create": [], "drop": []}}
    try:
        _install_engine(server.url(template))
        server.seal(template)
        for n in range(rounds):
            for strategy in (list(times) if n % 2 == 0 else list(reversed(times))):
                server._file_copy = strategy == "FILE_COPY"
                for _ in range(copies):
                    name = server.new_name("copy")
                    started = time.perf_counter()
                    server.create(name, template)
                    created = time.perf_counter()
                    server.drop(name)
                    times[strategy]["create"].append((created - started) * 1000)
                    times[strategy]["drop"].append((time.perf_counter() - created) * 1000)
    finally:
        server.drop(template)
        server.close()
    return {
        strategy: {f"{what}_median_ms": round(statistics.median(values), 1)
                   for what, values in phases.items()}
        for strategy, phases in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a running server (default: the embedded one)")
    parser.add_argument("--tests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    rounds: dict[str, list[dict[str, float]]] = {"work": [], "empty": []}
    with tempfile.TemporaryDirectory(prefix="pgque-bench-testing-") as tmp:
        directory = Path(tmp)
        write_project(directory, args.tests)
        for n in range(args.rounds):
            for body in (list(rounds) if n % 2 == 0 else list(reversed(rounds))):
                summary = summarise(run_once(directory, body, args.dsn))
                rounds[body].append(summary)
                print(f"round {n + 1} {body}: {summary}", flush=True)
    medians = {
        body: {key: round(statistics.median(r[key] for r in results), 1)
               for key in results[0]}
        for body, results in rounds.items()
    }
    copies = copy_costs(args.dsn, args.rounds, 20)
    print(json.dumps({"per_test": medians, "server_side_copy": copies}, indent=2))

    results = {
        **run_facts("pgque_url fixture: setup + teardown per test",
                    _server_version(args.dsn)),
        "tests_per_round": args.tests,
        "rounds": args.rounds,
        "bodies": {
            "work": "pgque_engine; create a queue, subscribe, send 3 events, deliver()",
            "empty": "pgque_url only",
        },
        "per_test_median_of_rounds": medians,
        "per_test_rounds": rounds,
        "server_side_copy_median_ms": copies,
        "target_per_test_ms": 50,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


def _server_version(dsn: str | None) -> int:
    if dsn is None:
        from sqlalchemy_pgque.embedded import EmbeddedPostgres

        with EmbeddedPostgres() as pg:
            return _version_of(pg.dsn)
    return _version_of(dsn)


def _version_of(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.info.server_version


if __name__ == "__main__":
    main()
