"""The WebDriver client of tests/webdriver.py against a tiny page served by
http.server in a thread: proven on its own before it drives the dashboard."""

from __future__ import annotations

import http.server
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import webdriver
from webdriver import Browser, WebDriverError, missing_binaries

pytestmark = pytest.mark.skipif(missing_binaries() is not None,
                                reason=str(missing_binaries()))

PAGES = {
    "/": """<!doctype html>
<html><head><title>Tiny</title></head>
<body data-clicks="0">
<main id="content">
  <h1>Hello <em>there</em></h1>
  <ul id="items"><li data-n="1">one</li><li data-n="2">two</li><li data-n="3">three</li></ul>
  <input id="name" name="name" value="">
  <input id="ok" type="checkbox" name="ok" value="yes">
  <button id="greet" type="button">Greet</button>
  <p id="greeting"></p>
  <p id="scripted">no script ran</p>
  <a id="next" href="/second">next</a>
</main>
<script>
document.getElementById("scripted").textContent = "script ran";
document.getElementById("greet").addEventListener("click", function () {
  var name = document.getElementById("name").value;
  document.body.dataset.clicks = String(Number(document.body.dataset.clicks) + 1);
  // Later, not at once: the test has to wait for it.
  setTimeout(function () {
    document.getElementById("greeting").textContent = "Hello, " + name + "!";
  }, 300);
});
</script>
</body></html>""",
    "/second": """<!doctype html><html><head><title>Second</title></head>
<body><main id="content"><p id="where">the second page</p></main></body></html>""",
}


class _TinyPages(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        page = PAGES.get(self.path)
        body = (page or "not found").encode()
        self.send_response(200 if page else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet test output


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TinyPages)
    thread = threading.Thread(target=server.serve_forever, name="tiny-pages", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser() as opened:
        yield opened


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_navigates_and_reads_text_and_attributes(browser: Browser, site: str) -> None:
    browser.get(site + "/")
    assert browser.title == "Tiny"
    assert browser.url == site + "/"
    assert browser.find("h1").text == "Hello there"
    items = browser.find_all("#items li")
    assert [item.text for item in items] == ["one", "two", "three"]
    assert [item.attribute("data-n") for item in items] == ["1", "2", "3"]
    assert browser.find("#items").find("li[data-n='2']").text == "two"
    assert [li.text for li in browser.find("#items").find_all("li")][-1] == "three"
    assert browser.find("#name").attribute("missing") is None
    assert browser.find_all(".nothing-has-this-class") == []
    assert "<ul id=\"items\">" in browser.page_source


def test_types_clicks_and_waits_for_what_the_page_does_later(
    browser: Browser, site: str
) -> None:
    browser.get(site + "/")
    assert browser.find("#scripted").text == "script ran"
    browser.find("#name").send_keys("Ada")
    box = browser.find("#ok")
    assert not box.is_selected()
    box.click()
    assert box.is_selected()
    browser.find("#greet").click()
    assert browser.find("body").attribute("data-clicks") == "1"
    # The greeting comes 300 ms after the click: right now it is still empty.
    greeting = browser.wait_until(lambda: browser.find("#greeting").text, timeout=10,
                                  message="the greeting")
    assert greeting == "Hello, Ada!"
    browser.find("#next").click()
    assert browser.wait_until(lambda: browser.title == "Second", message="second page")
    assert browser.find("#where").text == "the second page"


def test_executes_scripts_with_arguments_and_elements(browser: Browser, site: str) -> None:
    browser.get(site + "/")
    assert browser.execute("return arguments[0] + arguments[1];", 2, 3) == 5
    heading = browser.find("h1")
    assert browser.execute("return arguments[0].tagName;", heading) == "H1"
    assert browser.execute("return {a: [1, 'x'], b: null};") == {"a": [1, "x"], "b": None}
    browser.execute("document.getElementById('where-not') === null && "
                    "document.body.setAttribute('data-marked', arguments[0]);", "yes")
    assert browser.find("body").attribute("data-marked") == "yes"


def test_cookies_are_deleted(browser: Browser, site: str) -> None:
    browser.get(site + "/")
    browser.execute("document.cookie = 'flavour=oat; path=/';")
    assert browser.execute("return document.cookie;") == "flavour=oat"
    browser.delete_cookies()
    assert browser.execute("return document.cookie;") == ""


def test_screenshot_is_a_png_of_the_window(browser: Browser, site: str,
                                           tmp_path: Path) -> None:
    browser.get(site + "/")
    shot = browser.save_screenshot(tmp_path / "tiny.png")
    width, height = png_size(shot.read_bytes())
    assert width == 1280
    assert 0 < height <= 900


def test_errors_and_timeouts_are_reported(browser: Browser, site: str) -> None:
    browser.get(site + "/")
    with pytest.raises(WebDriverError) as missing:
        browser.find("#not-there")
    assert missing.value.error == "no such element"
    with pytest.raises(TimeoutError, match=r"never true: not true within 0\.3 s"):
        browser.wait_until(lambda: browser.find("#not-there"), timeout=0.3,
                           message="never true")
    with pytest.raises(WebDriverError) as bad_script:
        browser.execute("throw new Error('boom');")
    assert "boom" in str(bad_script.value)


def test_javascript_can_be_turned_off(site: str) -> None:
    with Browser(javascript=False) as plain:
        plain.get(site + "/")
        assert plain.find("#scripted").text == "no script ran"
        plain.find("#next").click()
        assert plain.wait_until(lambda: plain.title == "Second", message="second page")


def test_close_stops_chromedriver_and_removes_the_profile(site: str) -> None:
    browser = Browser()
    browser.get(site + "/second")
    process = browser.process
    assert process is not None and process.poll() is None
    profile = browser.profile
    assert os.path.isdir(profile)
    browser.close()
    assert process.poll() is not None
    assert not os.path.exists(profile)
    with pytest.raises(RuntimeError, match="closed"):
        browser.get(site + "/")
    browser.close()  # a second close does nothing


def test_a_driver_that_cannot_start_is_reported_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A temporary directory of the test's own: other browsers (another test run on the
    # machine) come and go in the shared one.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def profiles() -> set[str]:
        return {name for name in os.listdir(tmp_path) if name.startswith("pgque-chromium-")}

    before = profiles()
    # An executable that exits at once, as chromedriver does when its port is taken.
    monkeypatch.setattr(webdriver, "CHROMEDRIVER", "/bin/false")
    with pytest.raises(ChildProcessError, match="chromedriver exited with 1"):
        Browser()
    assert profiles() == before
