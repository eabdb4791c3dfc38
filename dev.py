"""Bootstrap for the quick start: ``python3 dev.py demo`` and ``python3 dev.py test``.

Needs only Python 3.10+: it creates ``.venv`` beside this file, installs the project
and its ``dev`` dependency group into it (again whenever pyproject.toml changes), then
runs the demo or pytest there. Extra arguments go to pytest: ``python3 dev.py test -k
outbox``. ``python3 dev.py lint`` runs ruff and mypy.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed-from"


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
    print("installing sqlalchemy-pgque and its dev group into .venv ...", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Dependency groups (PEP 735) need pip 25.1; a new venv may bring an older one.
    subprocess.run([*pip, "--upgrade", "pip>=25.1"], check=True)
    subprocess.run([*pip, "-e", str(ROOT), "--group", f"{ROOT / 'pyproject.toml'}:dev"],
                   check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "lint"}:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    ensure_venv()
    if argv[0] == "lint":
        for tool in ("ruff", "mypy"):
            args = ["check", "."] if tool == "ruff" else []
            code = subprocess.run([str(BIN / tool), *args], cwd=ROOT).returncode
            if code:
                return code
        return 0
    if argv[0] == "demo":
        cmd = [str(PYTHON), str(ROOT / "examples" / "demo.py"), *argv[1:]]
    else:
        cmd = [str(PYTHON), "-m", "pytest", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
