"""The dashboard served for real (uvicorn in a thread, on a free port) and spoken to
over HTTP with urllib, plus a small HTML tree to read the pages with."""

from __future__ import annotations

import http.cookiejar
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlencode

import pytest

pytest.importorskip("uvicorn")

import asgi_server

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
         "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text
                       for child in self.children)

    def find_all(self, tag: str | None = None, **attrs: str | None) -> list[Element]:
        """Descendants with ``tag`` (any when None) whose attributes have the given
        values (``None``: present with any value); ``data_queue`` means ``data-queue``."""
        wanted = {name.replace("_", "-"): value for name, value in attrs.items()}
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if (tag is None or child.tag == tag) and all(
                    name in child.attrs and (value is None or child.attrs[name] == value)
                    for name, value in wanted.items()):
                found.append(child)
            found.extend(child.find_all(tag, **attrs))
        return found

    def find(self, tag: str | None = None, **attrs: str | None) -> Element:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag or '*'} {attrs}> in the page"
        return found[0]

    def field(self, name: str) -> str:
        """The text of the descendant ``data-field=name``, stripped."""
        return self.find(data_field=name).text.strip()


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in _VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, {n: v or "" for n, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_html(markup: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    """Names in lower case."""
    body: str

    @property
    def html(self) -> Element:
        return parse_html(self.body)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """A browser without JavaScript: cookies kept, redirects not followed (a test
    sees the 303 and follows it with :meth:`get`)."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.cookies = http.cookiejar.CookieJar()
        self.headers = headers or {}
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.cookies), _NoRedirects())

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return self._open(urllib.request.Request(
            self.base + path, headers={**self.headers, **(headers or {})}))

    def post(self, path: str, fields: list[tuple[str, str]] | dict[str, str],
             headers: dict[str, str] | None = None) -> Reply:
        body = urlencode(fields).encode()
        return self._open(urllib.request.Request(
            self.base + path, data=body, method="POST",
            headers={**self.headers, "Content-Type": "application/x-www-form-urlencoded",
                     **(headers or {})}))

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.cookies if c.name == name), None)

    def _open(self, request: urllib.request.Request) -> Reply:
        try:
            with self.opener.open(request, timeout=30) as response:
                return Reply(response.status, _lower(response.headers.items()),
                             response.read().decode())
        except urllib.error.HTTPError as error:
            with error:
                return Reply(error.code, _lower(error.headers.items()), error.read().decode())


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


class Served(asgi_server.Served):
    """An ASGI application served by uvicorn in a thread of the test process."""

    def client(self, **kwargs: Any) -> Client:
        return Client(self.base, **kwargs)


@pytest.fixture
def serve() -> Iterator[Callable[[Any], Served]]:
    """``serve(app)`` starts serving ``app`` and returns it :class:`Served`; every one
    is stopped at the test's end."""
    started: list[Served] = []

    def start(app: Any) -> Served:
        served = Served(app).start()
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()
