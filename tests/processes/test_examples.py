"""The orders example's own tests (examples/tests/, written with the testing toolkit
only) pass when run as its README says: ``pytest`` from the examples folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_example_projects_tests_pass(pg_server: Server) -> None:
    # On the suite's own server, which saves starting another embedded one.
    env = dict(os.environ, PGQUE_TEST_DSN=pg_server.base_dsn)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout
