"""A PgBouncer that a test owns, in front of the suite's server, in transaction mode.

:class:`PgBouncer` writes a configuration of its own into a fresh directory under /tmp,
with a free port on 127.0.0.1, trust authentication and every database of the server
behind it (a ``*`` entry), and runs the ``pgbouncer`` program from the system's
packages (Debian: ``apt-get install pgbouncer``; :func:`find_pgbouncer` says whether
it is there). It refuses to run as root, so as root it runs as the OS user that can
reach the server: the owner of the server's socket directory (the embedded server's
own user), else ``postgres``. Its admin console (``dbname=pgbouncer``) answers
``SHOW`` commands through :meth:`PgBouncer.show`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psycopg
from pgcluster import _free_port, _run_as
from psycopg import conninfo
from sqlalchemy.engine import URL

from sqlalchemy_pgque._listen import url_from_conninfo

__all__ = ["PgBouncer", "find_pgbouncer"]

_START_TIMEOUT = 10.0


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` program, or ``None`` when it is not installed."""
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


class PgBouncer:
    """One pgbouncer process in front of the server ``server_dsn`` reaches.

    ``pool_size`` server connections per database and user: fewer than a test has
    clients, so that they share them the way the clients of a busy pool do.
    """

    def __init__(self, program: str, server_dsn: str, *, pool_size: int = 6) -> None:
        params = conninfo.conninfo_to_dict(server_dsn)
        self.user = str(params.get("user") or "postgres")
        server_host = str(params.get("host") or "/var/run/postgresql")
        server_port = str(params.get("port") or 5432)
        self.port = _free_port()
        # Under /tmp, not pytest's tmp_path: the pgbouncer user must reach it.
        self.base_dir = Path(tempfile.mkdtemp(prefix="pgque-pgbouncer-"))
        self.log_path = self.base_dir / "pgbouncer.log"
        run_as = _owner(server_host) if os.geteuid() == 0 else None
        (self.base_dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        config = self.base_dir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={server_host} port={server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.base_dir / 'userlist.txt'}\n"
            f"admin_users = {self.user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.log_path}\n"
        )
        if run_as is not None:
            for path in (self.base_dir, *self.base_dir.iterdir()):
                os.chown(path, *run_as)
        self.base_dir.chmod(0o755)
        uid, gid = run_as or (None, None)
        self._output: IO[bytes] = (self.base_dir / "stdout.log").open("wb")
        self.process = subprocess.Popen(
            [program, str(config)], stdout=self._output, stderr=subprocess.STDOUT,
            user=uid, group=gid, extra_groups=None if uid is None else [],
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def dsn(self, dbname: str) -> str:
        """libpq connection string to ``dbname`` through the pool."""
        return conninfo.make_conninfo(host="127.0.0.1", port=self.port, user=self.user,
                                      dbname=dbname)

    def url(self, dbname: str) -> URL:
        return url_from_conninfo(self.dsn(dbname))

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (``CLIENTS``, ``SERVERS``, ``STATS``...)."""
        # The console speaks only the simple query protocol: a client-side cursor.
        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True,
                             cursor_factory=psycopg.ClientCursor) as console:
            cursor = console.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}:\n"
                                   f"{self.log_text()}")
            try:
                self.show("VERSION")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pgbouncer not ready after {_START_TIMEOUT} s: "
                                       f"{exc}\n{self.log_text()}") from exc
            time.sleep(0.02)


def _owner(server_host: str) -> tuple[int, int]:
    """(uid, gid) to run pgbouncer as, as root: the owner of the server's socket
    directory, who can connect there, or the user the suite runs servers as."""
    if server_host.startswith("/"):
        status = os.stat(server_host)
        if status.st_uid != 0:
            return status.st_uid, status.st_gid
    run_as = _run_as()
    assert run_as is not None
    return run_as
