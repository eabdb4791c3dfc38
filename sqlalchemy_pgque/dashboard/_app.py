"""The dashboard's Starlette application: routes, pages and the dead-letter actions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import admin
from .._duration import Duration, as_seconds
from ..errors import (
    DeadLetterNotFound,
    PermissionDenied,
    PgqueError,
    QueueNotFound,
    _first_line,
    _translate,
)
from . import _figures, _format
from ._security import (
    CSRF_FIELD,
    Guard,
    SecurityHeaders,
    cookie_path,
    csrf_token_for,
    csrf_valid,
    root_of,
    set_csrf_cookie,
)

T = TypeVar("T")

FLASH_COOKIE = "pgque_flash"
MAX_FORM_BYTES = 1 << 20
_STATIC_TYPES = {"dashboard.css": "text/css; charset=utf-8",
                 "dashboard.js": "text/javascript; charset=utf-8"}


def engine_from(engine_or_url: Engine | str | URL) -> Engine:
    """The given Engine, or one for the URL (psycopg for a plain ``postgresql://``)."""
    if isinstance(engine_or_url, Engine):
        return engine_or_url
    url = make_url(engine_or_url)
    if url.drivername == "postgresql":
        # The package depends on psycopg; SQLAlchemy's default would be psycopg2.
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class Settings:
    engine: Engine
    allow_writes: bool
    refresh_ms: int
    title: str
    stale_after: float


def build_app(engine_or_url: Engine | str | URL, *, allow_writes: bool, refresh_seconds: float,
              title: str, auth: str | tuple[str, str] | None,
              stale_after: Duration) -> Starlette:
    if refresh_seconds < 0:
        raise ValueError(f"refresh_seconds must be >= 0, got {refresh_seconds}")
    if auth is not None and not (auth if isinstance(auth, str) else all(auth)):
        raise ValueError("auth: give a non-empty token, or a (user, password) pair "
                         "with both set")
    settings = Settings(engine_from(engine_or_url), allow_writes,
                        int(refresh_seconds * 1000), title, as_seconds(stale_after))
    pages = _Pages(settings)
    routes = [
        Route("/", pages.overview),
        Route("/api/overview", pages.overview_live),
        Route("/queues/{name:path}", pages.queue),
        Route("/api/queues/{name:path}", pages.queue_live),
        Route("/dlq", pages.dead_letters),
        Route("/dlq/{id:int}", pages.dead_letter),
        Route("/dlq/replay", pages.replay, methods=["POST"]),
        Route("/dlq/purge", pages.purge, methods=["POST"]),
        Route("/static/{file}", pages.static),
    ]
    # Outermost first: every response gets the security headers, the guard's 401 too;
    # the guard answers before the routes, so nothing (not even a 404) does without it.
    middleware = [Middleware(SecurityHeaders)]
    if auth is not None:
        middleware.append(Middleware(Guard, auth=auth))
    owns_engine = not isinstance(engine_or_url, Engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # An engine made from a URL is ours to close; a given one is the caller's.
            if owns_engine:
                settings.engine.dispose()

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={404: pages.not_found, 405: pages.not_allowed})
    return app


def _templates() -> Environment:
    environment = Environment(
        loader=PackageLoader("sqlalchemy_pgque.dashboard", "templates"),
        autoescape=select_autoescape(["html"], default=True, default_for_string=True),
        trim_blocks=True, lstrip_blocks=True,
    )
    environment.filters["segment"] = lambda value: quote(str(value), safe="")
    environment.filters["duration"] = _format.duration
    environment.filters["ago"] = _format.ago
    environment.filters["count"] = _format.count
    environment.filters["rate"] = _format.rate
    environment.filters["moment"] = _format.moment
    environment.filters["preview"] = _format.preview
    return environment


class _Pages:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.templates = _templates()
        self.static_files = {
            name: resources.files(__package__).joinpath("static").joinpath(name).read_bytes()
            for name in _STATIC_TYPES
        }

    # -- plumbing ------------------------------------------------------------------------

    async def _read(self, read: Callable[[Connection], T]) -> T:
        def in_snapshot() -> T:
            with _figures.snapshot(self.settings.engine) as connection:
                return read(connection)

        return await run_in_threadpool(in_snapshot)

    def _page(self, request: Request, template: str, status_code: int = 200,
              **context: Any) -> HTMLResponse:
        token, new = csrf_token_for(request)
        root = root_of(request)
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        html = self.templates.get_template(template).render(
            root=root, here=here, title=self.settings.title,
            allow_writes=self.settings.allow_writes, csrf_field=CSRF_FIELD, csrf_token=token,
            refresh_ms=self.settings.refresh_ms, **context)
        response = HTMLResponse(html, status_code=status_code)
        if new:
            set_csrf_cookie(response, request, token)
        return response

    def _error(self, request: Request, status_code: int, message: str) -> HTMLResponse:
        return self._page(request, "error.html", status_code, heading=_REASONS.get(
            status_code, "Error"), message=message)

    async def _guarded(self, request: Request, read: Callable[[], Any]) -> Response:
        """Run a page's work; what the database says wrong becomes a page that says so."""
        try:
            response: Response = await read()
            return response
        except QueueNotFound as exc:
            return self._error(request, 404, str(exc))
        except DeadLetterNotFound as exc:
            return self._error(request, 404, str(exc))
        except _figures.BadFilter as exc:
            return self._error(request, 400, str(exc))
        except PermissionDenied as exc:
            return self._error(request, 403, str(exc))
        except PgqueError as exc:
            return self._error(request, 503, str(exc))
        except DBAPIError as exc:
            error = _translate(exc)
            return self._error(request, 503, str(error) if error is not None
                               else _first_line(exc.orig or exc))

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self._error(request, 404, f"nothing at {request.url.path}")

    async def not_allowed(self, request: Request, exc: Exception) -> Response:
        return self._error(request, 405, f"{request.method} is not allowed here")

    async def static(self, request: Request) -> Response:
        name = request.path_params["file"]
        if name not in self.static_files:
            return self._error(request, 404, f"no static file {name}")
        # Cached an hour: the files change only with the package.
        return Response(self.static_files[name], media_type=_STATIC_TYPES[name],
                        headers={"Cache-Control": "public, max-age=3600"})

    # -- pages ---------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        async def page() -> Response:
            overview = await self._read(
                lambda c: _figures.overview(c, self.settings.stale_after))
            return self._page(request, "overview.html", overview=overview,
                              live_url=f"{root_of(request)}/api/overview")

        return await self._guarded(request, page)

    async def overview_live(self, request: Request) -> Response:
        """The overview's refreshing figures: ``admin.queues()`` and the throughput
        history, three statements, where the page reads five (the consumers and the
        DLQ growth are only needed for the problems list)."""
        try:
            return JSONResponse(await self._read(_figures.overview_live))
        except (PgqueError, DBAPIError) as exc:
            return JSONResponse({"error": _first_line(exc)}, status_code=503)

    async def queue(self, request: Request) -> Response:
        name = request.path_params["name"]  # decoded by the server already

        async def page() -> Response:
            figures = await self._read(
                lambda c: _figures.queue_page(c, name, self.settings.stale_after))
            return self._page(request, "queue.html", page=figures,
                              live_url=f"{root_of(request)}/api/queues/{quote(name, safe='')}")

        return await self._guarded(request, page)

    async def queue_live(self, request: Request) -> Response:
        """The queue page's refreshing figures: ``admin.queues(queue)`` and
        ``admin.consumers(queue)``, three statements, where the page reads seven."""
        name = request.path_params["name"]  # decoded by the server already
        try:
            return JSONResponse(await self._read(lambda c: _figures.queue_live(c, name)))
        except QueueNotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except (PgqueError, DBAPIError) as exc:
            return JSONResponse({"error": _first_line(exc)}, status_code=503)

    async def dead_letters(self, request: Request) -> Response:
        async def page() -> Response:
            filters = _figures.DeadLetterFilter.parse(dict(request.query_params))
            after_id = _int_or_none(request.query_params.get("after_id"))
            listing = await self._read(lambda c: _figures.dead_letters(c, filters, after_id))
            flash = unquote(request.cookies.get(FLASH_COOKIE, "")) or None
            response = self._page(
                request, "dlq.html", listing=listing, filters=filters, after_id=after_id,
                filter_query=urlencode(filters.given), flash=flash)
            if flash:
                response.delete_cookie(FLASH_COOKIE, path=cookie_path(request))
            return response

        return await self._guarded(request, page)

    async def dead_letter(self, request: Request) -> Response:
        entry_id = int(request.path_params["id"])

        async def page() -> Response:
            entry = await self._read(lambda c: admin.dlq_show(c, entry_id))
            payload = json.dumps(entry.payload, indent=2, ensure_ascii=False)
            return self._page(request, "entry.html", entry=entry, payload=payload)

        return await self._guarded(request, page)

    # -- writes --------------------------------------------------------------------------

    async def replay(self, request: Request) -> Response:
        return await self._write(request, "replay")

    async def purge(self, request: Request) -> Response:
        return await self._write(request, "purge")

    async def _write(self, request: Request, action: str) -> Response:
        if not self.settings.allow_writes:
            return self._error(request, 403, "This dashboard is read-only: writes need "
                               "create_app(..., allow_writes=True) or --allow-writes.")
        form = await _form(request)
        if form is None:
            return self._error(request, 400, "expected a form "
                               "(application/x-www-form-urlencoded) of at most 1 MiB")
        if not csrf_valid(request, form):
            return self._error(request, 403, "The form's CSRF token is missing or wrong: "
                               "reload the page and try again.")

        async def work() -> Response:
            filters = _figures.DeadLetterFilter.parse(
                {name: values[0] for name, values in form.items() if values})
            back = f"{root_of(request)}/dlq" + (
                f"?{urlencode(filters.given)}" if filters.given else "")
            try:
                ids = sorted({int(value) for value in form.get("id", [])})
            except ValueError:
                return self._error(request, 400, "dead-letter ids are numbers")
            matching = form.get("scope", [""])[0] == "matching"
            if matching and filters.empty:
                return self._flash_redirect(request, back, "Set a filter first: acting on "
                                            "every dead letter takes a deliberate filter.")
            if not matching and not ids:
                return self._flash_redirect(request, back, "Nothing selected.")
            if form.get("confirm", [""])[0] != "yes":
                count = len(ids) if not matching else await self._read(
                    lambda c: admin.dlq_count(c, **filters.admin_filters()))
                return self._page(request, "confirm.html", action=action,
                                  ids=[] if matching else ids, matching=matching,
                                  filters=filters, count=count, back=back)
            message = await run_in_threadpool(self._do, action, None if matching else ids,
                                              filters)
            return self._flash_redirect(request, back, message)

        return await self._guarded(request, work)

    def _do(self, action: str, ids: list[int] | None,
            filters: _figures.DeadLetterFilter) -> str:
        """Replay or purge in one transaction: all of it happens, or none (an entry
        gone meanwhile, say replayed from another tab, undoes the whole action)."""
        try:
            with self.settings.engine.begin() as connection:
                chosen = ids if ids is not None else [
                    entry.id for entry in admin.dlq_list(connection, limit=None,
                                                         **filters.admin_filters())]
                if not chosen:
                    return "No dead letters matched: nothing done."
                if action == "replay":
                    replayed = admin.dlq_replay(connection, chosen)
                    shown = ", ".join(f"{entry} as event {event}"
                                      for entry, event in list(replayed.items())[:10])
                    more = "" if len(replayed) <= 10 else f" and {len(replayed) - 10} more"
                    return f"Replayed {_plural(len(replayed))}: {shown}{more}."
                purged = admin.dlq_purge(connection, chosen)
                return f"Purged {_plural(purged)} for good."
        except DeadLetterNotFound as exc:
            return f"Nothing done: {exc} (replayed or purged meanwhile?)."

    def _flash_redirect(self, request: Request, target: str, message: str) -> Response:
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(FLASH_COOKIE, quote(message), path=cookie_path(request),
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response


_REASONS = {400: "Bad request", 403: "Forbidden", 404: "Not found",
            405: "Method not allowed", 503: "Database unavailable"}


def _plural(count: int) -> str:
    return f"{count} dead letter" + ("" if count == 1 else "s")


def _int_or_none(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise _figures.BadFilter(f"after_id: {value!r} is not a number") from None


async def _form(request: Request) -> dict[str, list[str]] | None:
    """The urlencoded body (without python-multipart, which Starlette's own parser
    needs); ``None`` for another content type or a body over the limit."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return None
