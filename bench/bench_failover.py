"""Failover of a streaming-replicated PostgreSQL, the long runs: several failovers back
and forth, synchronous and asynchronous replication.

    .venv/bin/python bench/bench_failover.py               # PostgreSQL 18 (embedded wheel)
    .venv/bin/python bench/bench_failover.py --major 15 \\
        --output bench/results/failover-pg15.json           # the system's PostgreSQL 15
    .venv/bin/python bench/bench_failover.py --cases async --failovers 3   # a subset

Each case builds a primary and a standby of its own from that major version's
binaries (``tests/replication.py``) and runs ``tests/failoverkit.py``: producers
sending through ``Queue.send`` and a ``python -m sqlalchemy_pgque.worker --ticker``
process, all on one multi-host URL with ``target_session_attrs=read-write``; mid-stream
the primary is stopped in ``immediate`` mode, the standby promoted once the worker has
been turned away by it (still read-only), and the dead node rebuilt as the new
primary's standby (``pg_basebackup``) for the next failover, while events keep flowing.

* ``sync`` / ``async``: the worker and two producers at 20 events/s in all (what the
  consumer keeps up with on a busy 2-core machine, so that catching up measures the
  failover, not a backlog of its own), with synchronous or asynchronous replication.
* ``sync-producers`` / ``async-producers``: four producers as fast as their commits
  return, no worker: what the producers' commits became, nothing else.
* ``sync-producers-10ms`` / ``async-producers-10ms``: the same with the standby behind
  a link that delays everything by 10 ms each way (``tests/delayed_link.py``), as a
  standby at another site; a failover cuts the link an instant before the primary
  stops, as the failure of the primary's site would, so the WAL in flight is lost.

Every case fails unless every event on the final primary was handled exactly once (with
a worker), no worker exited or logged a traceback, and, with synchronous replication,
every event whose commit returned (or was found committed after a failed commit)
survived. With asynchronous replication the events committed on a primary that its
standby never received are counted (``lost_committed``), not asserted.
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

from _common import run_facts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from failoverkit import FailoverFigures, failover_case
from pgcluster import find_bindir
from replication import ReplicatedPair

RESULTS = Path(__file__).resolve().parent / "results" / "failover.json"

# name: (synchronous, worker, events/s in all or None for as fast as commits return,
#        producers, link delay in seconds or None)
CASES: dict[str, tuple[bool, bool, float | None, int, float | None]] = {
    "sync": (True, True, 20, 2, None),
    "async": (False, True, 20, 2, None),
    "sync-producers": (True, False, None, 4, None),
    "async-producers": (False, False, None, 4, None),
    "sync-producers-10ms": (True, False, None, 4, 0.010),
    "async-producers-10ms": (False, False, None, 4, 0.010),
}


def run_case(bindir: Path, name: str, failovers: int, log_dir: Path) -> FailoverFigures:
    synchronous, worker, rate, producers, link_delay = CASES[name]
    with ReplicatedPair(bindir, synchronous=synchronous, link_delay=link_delay) as pair:
        pair.start()
        figures = failover_case(
            pair, log_dir, rate=rate, producers=producers, worker=worker,
            failovers=failovers, before_first=3, between=(2, 5), after_last=3,
            drain_timeout=300)
    figures.extra["case"] = name
    figures.extra["link_delay_ms"] = None if link_delay is None else link_delay * 1000
    assert (figures.unhandled, figures.duplicated, figures.unknown) == (0, 0, 0), figures
    assert (figures.worker_exits, figures.tracebacks) == (0, 0), figures
    assert figures.exit_code in (None, 0), figures
    if synchronous:
        assert figures.lost_committed == 0, figures
    return figures


def _p50_max(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": round(statistics.median(values), 3), "max": round(max(values), 3)}


def summary(figures: FailoverFigures) -> dict[str, Any]:
    row: dict[str, Any] = {
        "failovers": figures.failovers,
        "sent": figures.sent,
        "sent_per_s": figures.extra["sent_per_s"],
        "commit_ms_p50": figures.extra["commit_ms_p50"],
        "committed_after_failure": figures.committed_after_failure,
        "producer_retries": figures.producer_retries,
        "lost_committed": figures.lost_committed,
        "lost_per_failover": figures.lost_per_failover,
        "events": figures.events,
        "unhandled": figures.unhandled,
        "duplicated": figures.duplicated,
        "worker_exits": figures.worker_exits,
    }
    for key in ("stop_s", "read_only_s", "promote_s", "ticker_back_s", "resume_s",
                "catch_up_s", "rebuild_s"):
        measured = _p50_max(getattr(figures, key))
        if measured:
            row[key] = measured
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, default=None,
                        help="PostgreSQL major version to run (default: the embedded wheel's)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--failovers", type=int, default=5, help="failovers per case")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    bindir = find_bindir(args.major)
    if bindir is None:
        parser.error(f"no PostgreSQL {args.major or 'embedded'} programs found")
    results: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    server = 0
    with tempfile.TemporaryDirectory(prefix="pgque-failover-logs-") as log_root:
        for name in args.cases:
            log_dir = Path(log_root) / name
            log_dir.mkdir()
            figures = run_case(bindir, name, args.failovers, log_dir)
            details.append(asdict(figures))
            server = figures.extra["server_version"]
            results[name] = summary(figures)
            print(f"{name:<22} {json.dumps(results[name])}", flush=True)
    output = {
        **run_facts("failover of a streaming-replicated PostgreSQL (tests/failoverkit.py)",
                    server),
        "failovers_per_case": args.failovers,
        "cases": results,
        "runs": details,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    main()
