"""The README's demo command keeps working: examples/demo.py end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Database

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_demo_runs_end_to_end(empty_db: Database) -> None:
    env = dict(os.environ, DATABASE_URL=empty_db.url.render_as_string(hide_password=False))
    result = subprocess.run(
        [sys.executable, str(DEMO)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "database: 3 orders, 3 shipments" in out
    assert "exit code 0" in out
    assert out.rstrip().endswith("[demo] done")
