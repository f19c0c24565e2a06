"""A real browser on another site: a page served from a second origin tries what a browser lets any page
do without a preflight (a form POST, no-cors uploads and fetches, an <img>) against the service, with no
API key configured; and a link that points the service's own page at another server cannot collect a key
without asking."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Server
from tests.helpers import make_image_bytes

pytestmark = pytest.mark.browser

ATTACK = """<!doctype html><html><body>
<form id="form" method="post" action="{base}/reindex?all=true"></form>
<script>
(async () => {{
  const body = new FormData();
  body.append("file", new Blob([new Uint8Array({jpeg})], {{type: "image/jpeg"}}), "planted.jpg");
  const tries = [
    fetch("{base}/images", {{method: "POST", mode: "no-cors", body}}),
    fetch("{base}/clusters", {{method: "POST", mode: "no-cors"}}),
    fetch("{base}/clusters?refresh=true&k=2", {{mode: "no-cors"}}),
    fetch("{base}/images/1", {{method: "DELETE", mode: "no-cors"}}),
  ];
  const img = new Image();
  img.src = "{base}/clusters?refresh=true&k=3";
  await Promise.allSettled(tries);
  document.getElementById("form").submit();
}})();
</script></body></html>"""


@contextmanager
def site(folder: Path, handler: Any = None) -> Iterator[str]:
    """A second web server on 127.0.0.1's other name, `localhost`: another site to the browser. It serves
    `folder`, or answers with `handler` (a request handler class)."""
    if handler is None:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_page_on_another_site_cannot_make_the_service_do_anything(browser, server: Server, tmp_path: Path) -> None:
    first = httpx.post(server.base + "/images", files={"file": ("mine.jpg", make_image_bytes(1), "image/jpeg")})
    assert first.status_code == 201
    jpeg = list(make_image_bytes(2))
    (tmp_path / "attack.html").write_text(ATTACK.format(base=server.base, jpeg=jpeg))
    with site(tmp_path) as attacker:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{attacker}/attack.html")
        page.wait_for_url(f"{server.base}/reindex*")  # the fetches were sent, then the form was submitted
        assert "cross_site_refused" in page.text_content("body")
        context.close()
    assert server.get("/jobs")["count"] == 0  # no re-embedding, no clustering
    listing = server.get("/images")
    assert [image["filename"] for image in listing["data"]] == ["mine.jpg"]  # nothing planted, nothing deleted


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Another service, as a link could point the page at: it records every API key it is sent."""

    keys: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the handler's interface
        key = self.headers.get("X-API-Key")
        if key:
            self.keys.append(key)
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.end_headers()
        self.wfile.write(b'{"detail": "a valid X-API-Key header is required", "code": "unauthorized"}')

    def do_OPTIONS(self) -> None:  # noqa: N802 - a CORS preflight: let the browser send the real request
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_link_pointing_the_page_elsewhere_asks_before_a_key_is_sent(browser, server: Server) -> None:
    _Recorder.keys = []
    with site(Path("."), _Recorder) as other:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{server.base}/?api={other}")
        assert page.input_value("#api-base") == other
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.fill("#api-key", "io_typed-by-the-user")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector(f".toast:has-text('The key was not sent to {other}')")
        page.wait_for_timeout(500)
        assert _Recorder.keys == [] and page.input_value("#api-key") == ""
        asked: list[str] = []

        def accept(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        page.fill("#api-key", "io_typed-by-the-user")
        page.click("#key-form button[type=submit]")
        page.wait_for_function("document.querySelector('#api-key').value === 'io_typed-by-the-user'")
        page.wait_for_timeout(500)
        assert asked and other in asked[0] and server.base in asked[0]
        assert "io_typed-by-the-user" in _Recorder.keys  # sent once the user said so
        context.close()
