"""A small W3C WebDriver client (urllib + json) driving headless Chromium.

Enough for the dashboard's browser tests and docs/screenshots.py: start chromedriver on
a free port, open a headless session, navigate, find elements by CSS selector, read
their text and attributes, click, type, run a script, take a PNG screenshot, and wait
for a condition with a deadline. Everything started is stopped by :meth:`Browser.close`
(also on errors: use the browser as a context manager).

Chromium and chromedriver come from Debian's ``chromium`` and ``chromium-driver``
packages (``.ci/run`` installs them); :func:`missing_binaries` says what is absent so a
test can skip with that reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

CHROMIUM = os.environ.get("PGQUE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PGQUE_CHROMEDRIVER", "/usr/bin/chromedriver")

# The key under which the W3C protocol carries an element reference.
_ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"

T = TypeVar("T")


class WebDriverError(RuntimeError):
    """An error answered by chromedriver: ``error`` is the W3C error code
    (``no such element``, ``stale element reference``, ...)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error


def missing_binaries() -> str | None:
    """Why no browser can be started here, or None when both binaries are present."""
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if absent:
        return (f"{' and '.join(absent)} not installed "
                "(Debian packages chromium and chromium-driver)")
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Element:
    """A reference to an element of the current page."""

    def __init__(self, browser: Browser, element_id: str) -> None:
        self.browser = browser
        self.id = element_id

    def _path(self, tail: str) -> str:
        return f"element/{self.id}/{tail}"

    @property
    def text(self) -> str:
        """The rendered text (what a user sees, whitespace collapsed)."""
        return str(self.browser.command("GET", self._path("text")))

    def attribute(self, name: str) -> str | None:
        value = self.browser.command("GET", self._path(f"attribute/{name}"))
        return None if value is None else str(value)

    def is_selected(self) -> bool:
        return bool(self.browser.command("GET", self._path("selected")))

    def click(self) -> None:
        self.browser.command("POST", self._path("click"), {})

    def send_keys(self, text: str) -> None:
        self.browser.command("POST", self._path("value"), {"text": text})

    def clear(self) -> None:
        self.browser.command("POST", self._path("clear"), {})

    def find(self, css: str) -> Element:
        """The first descendant matching ``css`` (WebDriverError when there is none)."""
        found = self.browser.command("POST", self._path("element"),
                                     {"using": "css selector", "value": css})
        return Element(self.browser, found[_ELEMENT_KEY])

    def find_all(self, css: str) -> list[Element]:
        found = self.browser.command("POST", self._path("elements"),
                                     {"using": "css selector", "value": css})
        return [Element(self.browser, item[_ELEMENT_KEY]) for item in found]


class Browser:
    """One headless Chromium session behind its own chromedriver process."""

    def __init__(self, *, javascript: bool = True, width: int = 1280, height: int = 900,
                 start_timeout: float = 30.0) -> None:
        reason = missing_binaries()
        if reason:
            raise FileNotFoundError(reason)
        self.profile = tempfile.mkdtemp(prefix="pgque-chromium-")
        self.driver_log = Path(self.profile) / "chromedriver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.session: str | None = None
        try:
            for attempt in range(3):
                try:
                    self._start_driver(start_timeout)
                    break
                except ChildProcessError:
                    # Most likely the free port was taken before chromedriver bound it.
                    if attempt == 2:
                        raise
            self._start_session(javascript, width, height)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------------

    def _start_driver(self, timeout: float) -> None:
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        with open(self.driver_log, "wb") as log:
            # Its own process group: close() can end chromedriver and the Chromium it
            # started even when the session could not be deleted cleanly.
            self.process = subprocess.Popen(
                [CHROMEDRIVER, f"--port={port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ChildProcessError(f"chromedriver exited with {self.process.returncode}: "
                                        f"{self._log_tail()}")
            try:
                if self._request("GET", "/status", timeout=2).get("ready"):
                    return
            except (OSError, WebDriverError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromedriver not ready within {timeout} s: "
                                   f"{self._log_tail()}")
            time.sleep(0.05)

    def _start_session(self, javascript: bool, width: int, height: int) -> None:
        options: dict[str, Any] = {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", f"--window-size={width},{height}",
                     f"--user-data-dir={Path(self.profile) / 'profile'}",
                     "--no-first-run", "--no-default-browser-check",
                     "--disable-extensions", "--hide-scrollbars"],
        }
        if not javascript:
            options["prefs"] = {"profile.managed_default_content_settings.javascript": 2}
        capabilities = {"alwaysMatch": {"browserName": "chrome",
                                        "goog:chromeOptions": options}}
        reply = self._request("POST", "/session", {"capabilities": capabilities},
                              timeout=60)
        self.session = str(reply["sessionId"])

    def close(self) -> None:
        """Delete the session, stop chromedriver (and anything left of its group),
        remove the temporary profile. Safe to call more than once."""
        if self.session is not None:
            session, self.session = self.session, None
            try:
                self._request("DELETE", f"/session/{session}", timeout=20)
            except (OSError, WebDriverError):
                pass  # the process group is ended below whatever happened here
        if self.process is not None:
            process, self.process = self.process, None
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            try:
                # Chromium processes orphaned by a failed session delete.
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # -- protocol ------------------------------------------------------------------

    def _log_tail(self) -> str:
        try:
            return self.driver_log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _request(self, method: str, path: str, body: Any = None,
                 timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json; charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as failure:
            with failure:
                raw = failure.read()
            try:
                value = json.loads(raw)["value"]
                raise WebDriverError(str(value["error"]), str(value["message"])) from None
            except (ValueError, KeyError, TypeError):
                raise WebDriverError("http", f"{failure.code}: {raw[:500]!r}") from None
        return payload.get("value")

    def command(self, method: str, path: str, body: Any = None) -> Any:
        """One command of the session: ``path`` relative to ``/session/{id}/``."""
        if self.session is None:
            raise RuntimeError("the browser is closed")
        return self._request(method, f"/session/{self.session}/{path}", body)

    # -- pages ---------------------------------------------------------------------

    def get(self, url: str) -> None:
        """Navigate and wait for the page to load (the protocol's default strategy)."""
        self.command("POST", "url", {"url": url})

    @property
    def url(self) -> str:
        return str(self.command("GET", "url"))

    @property
    def title(self) -> str:
        return str(self.command("GET", "title"))

    @property
    def page_source(self) -> str:
        return str(self.command("GET", "source"))

    def find(self, css: str) -> Element:
        """The first element matching ``css`` (WebDriverError ``no such element``)."""
        found = self.command("POST", "element", {"using": "css selector", "value": css})
        return Element(self, found[_ELEMENT_KEY])

    def find_all(self, css: str) -> list[Element]:
        found = self.command("POST", "elements", {"using": "css selector", "value": css})
        return [Element(self, item[_ELEMENT_KEY]) for item in found]

    def execute(self, script: str, *args: Any) -> Any:
        """Run ``script`` as a function body in the page (``arguments[i]`` are ``args``;
        Elements are passed as element references) and return what it returns."""
        wire = [{_ELEMENT_KEY: arg.id} if isinstance(arg, Element) else arg for arg in args]
        return self.command("POST", "execute/sync", {"script": script, "args": wire})

    def delete_cookies(self) -> None:
        """Forget every cookie of the current page's domain."""
        self.command("DELETE", "cookie")

    def set_window_size(self, width: int, height: int) -> None:
        self.command("POST", "window/rect", {"width": width, "height": height})

    def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        return base64.b64decode(self.command("GET", "screenshot"))

    def save_screenshot(self, path: Path | str) -> Path:
        target = Path(path)
        target.write_bytes(self.screenshot())
        return target

    def wait_until(self, predicate: Callable[[], T], timeout: float = 10.0,
                   message: str = "condition", interval: float = 0.05) -> T:
        """Poll ``predicate`` until it returns something true, and return that; a page
        changing under it (stale or not-yet-present elements) counts as not yet.
        TimeoutError after ``timeout`` seconds, naming ``message`` and the last error."""
        deadline = time.monotonic() + timeout
        last_error: WebDriverError | None = None
        while True:
            try:
                result = predicate()
                if result:
                    return result
            except WebDriverError as error:
                if error.error not in {"stale element reference", "no such element"}:
                    raise
                last_error = error
            if time.monotonic() > deadline:
                detail = f" (last: {last_error})" if last_error else ""
                raise TimeoutError(f"{message}: not true within {timeout} s{detail}")
            time.sleep(interval)
