"""A web dashboard for PgQue: queues, consumers and the dead-letter queue at a glance.

::

    from sqlalchemy_pgque.dashboard import create_app

    app = create_app(engine)                    # an ASGI application, read-only
    # FastAPI / Starlette: mount it under any path
    main_app.mount("/ops/pgque", create_app(engine, allow_writes=True))

or from the command line: ``sqlalchemy-pgque dashboard --url URL``. It needs the
``dashboard`` extra (``pip install 'sqlalchemy-pgque[dashboard]'``: Starlette, Jinja2 and
uvicorn for the command). The figures are those of :mod:`sqlalchemy_pgque.admin`, the
same as the command line's and the metrics'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._duration import Duration

if TYPE_CHECKING:
    from sqlalchemy import URL, Engine
    from starlette.applications import Starlette

__all__ = ["MissingExtra", "create_app"]

INSTALL_HINT = "pip install 'sqlalchemy-pgque[dashboard]'"


class MissingExtra(ImportError):
    """The dashboard's optional dependencies (Starlette, Jinja2) are not installed."""


def create_app(
    engine_or_url: Engine | str | URL,
    *,
    allow_writes: bool = False,
    refresh_seconds: float = 2.0,
    title: str = "PgQue",
    auth: str | tuple[str, str] | None = None,
    stale_after: Duration = "5 minutes",
) -> Starlette:
    """The dashboard as a Starlette application (an ASGI callable).

    ``engine_or_url``: an :class:`~sqlalchemy.Engine` (yours to dispose), or a database
    URL (a plain ``postgresql://`` one uses psycopg; the engine made for it is disposed
    when the application shuts down). The dashboard reads with the ``pgque_reader``
    role's rights, each request in one short read-only transaction.

    ``allow_writes``: render and accept the dead-letter actions (replay needs
    ``pgque_writer``, purge ``pgque_admin``). Every write is a POST carrying a CSRF token
    and goes through a confirmation page; without ``allow_writes`` writes get 403.

    ``refresh_seconds``: how often the pages' script refreshes the figures (0: never).
    ``auth``: ``("user", "password")`` for HTTP basic auth, or a token string (sent as
    ``Authorization: Bearer <token>``, or once as ``?token=<token>``, which sets a
    cookie). ``stale_after``: a consumer lagging, a batch open or a latest tick older
    than this is shown as a problem.

    Links are made from the ASGI ``root_path``, so the application works mounted under
    any prefix. Raises :class:`MissingExtra` without the ``dashboard`` extra.
    """
    try:
        from ._app import build_app
    except ImportError as exc:
        if exc.name not in ("starlette", "jinja2") and not str(exc.name).startswith(
                ("starlette.", "jinja2.")):
            raise
        raise MissingExtra(
            f"the dashboard needs {exc.name}: {INSTALL_HINT}") from exc
    return build_app(engine_or_url, allow_writes=allow_writes,
                     refresh_seconds=refresh_seconds, title=title, auth=auth,
                     stale_after=stale_after)
