"""The dashboard's guards: an optional login (token or basic auth), security headers
on every response, and the CSRF token every POST must carry.

CSRF is the double-submit pattern: a random token in an HttpOnly ``SameSite=Strict``
cookie, set on a GET, echoed by the page's forms in a hidden field. Another site can
make a browser send the cookie (not with SameSite=Strict, in current browsers) but
can never read it, so it cannot put the matching value in the form.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSRF_COOKIE = "pgque_csrf"
CSRF_FIELD = "csrf_token"
TOKEN_COOKIE = "pgque_token"

# The page's own scripts, styles and images only; inline SVG is markup, not an image.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def cookie_path(request: Request) -> str:
    """The mount path, so that the cookies go only to the dashboard."""
    return root_of(request) + "/"


def root_of(request: Request) -> str:
    """Where the application is mounted (``""`` at the server's root)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def csrf_token_for(request: Request) -> tuple[str, bool]:
    """The request's CSRF token and whether it is new (then the response must set the
    cookie with :func:`set_csrf_cookie`)."""
    current = request.cookies.get(CSRF_COOKIE)
    if current and len(current) >= 32:
        return current, False
    return secrets.token_urlsafe(32), True


def set_csrf_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(CSRF_COOKIE, token, path=cookie_path(request), httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def csrf_valid(request: Request, form: dict[str, list[str]]) -> bool:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get(CSRF_FIELD, [""])[0]
    return bool(cookie) and hmac.compare_digest(cookie.encode(), sent.encode())


class SecurityHeaders:
    """Adds the security headers to every response; the API's JSON is never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "same-origin")
                headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Guard:
    """Lets a request through with the right credentials: basic auth for a
    ``(user, password)`` pair, else a token (bearer header, the cookie, or once
    ``?token=``, answered with the cookie and a redirect that drops it from the URL)."""

    def __init__(self, app: ASGIApp, auth: str | tuple[str, str]) -> None:
        self.app = app
        if isinstance(auth, tuple):
            user, password = auth
            self.basic: bytes | None = f"{user}:{password}".encode()
            self.token: bytes | None = None
        else:
            self.basic, self.token = None, auth.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.basic is not None:
            if self._basic_ok(request.headers.get("authorization", "")):
                await self.app(scope, receive, send)
                return
            response: Response = PlainTextResponse(
                "Log in to see the PgQue dashboard.\n", status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="PgQue dashboard", charset="UTF-8"'})
            await response(scope, receive, send)
            return
        assert self.token is not None
        header = request.headers.get("authorization", "")
        if (header[:7].lower() == "bearer " and self._same(header[7:].strip()))  \
                or self._same(request.cookies.get(TOKEN_COOKIE, "")):
            await self.app(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None and self._same(given):
            query = urlencode([(k, v) for k, v in parse_qsl(request.url.query) if k != "token"])
            target = request.url.path + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            # Lax, not Strict: a link to the dashboard from elsewhere (an alert, a chat)
            # opens it logged in. Only GETs, which change nothing, go out with it from
            # another site; every POST also needs the Strict CSRF cookie.
            response.set_cookie(TOKEN_COOKIE, given, path=cookie_path(request), httponly=True,
                                samesite="lax", secure=request.url.scheme == "https")
            await response(scope, receive, send)
            return
        response = PlainTextResponse(
            "This PgQue dashboard needs its token: open it once with ?token=<token>, or send "
            "'Authorization: Bearer <token>'.\n", status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="PgQue dashboard"'})
        await response(scope, receive, send)

    def _same(self, given: str) -> bool:
        assert self.token is not None
        return bool(given) and hmac.compare_digest(given.encode(), self.token)

    def _basic_ok(self, header: str) -> bool:
        assert self.basic is not None
        if header[:6].lower() != "basic ":
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.basic)
