"""HTTP-level middleware: the request-size limit and CORS (answering in the service's JSON error format),
and the headers every response carries."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.apikeys import HEADER
from backend.errors import RequestTimeoutError, RequestTooLargeError, error_response


class RequestBodyMiddleware:
    """Bounds on a request body: its size and how slowly it may arrive.

    Size: 413 before reading when Content-Length is over the limit; for chunked bodies, as soon as the count
    passes it. Time: a body must keep arriving, at most `idle_timeout` seconds between two pieces and, once
    it has been arriving for `idle_timeout` seconds, at least `min_rate` bytes a second on average; else 408
    `request_timeout`, and whatever was staged of it is removed. Twenty clients sending a byte every few
    seconds would otherwise hold twenty uploads (and their temp files) open for ever.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout: float = 20.0, min_rate: float = 1024.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(send)
            return

        received = 0
        started = False
        body_done = False
        began = time.monotonic()

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # waiting for a disconnect while the answer streams: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout)
            except TimeoutError:
                raise RequestTimeoutError(
                    f"no part of the request body arrived for {self.idle_timeout:.0f} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLargeError(self.max_bytes)
                body_done = not message.get("more_body", False)
                elapsed = time.monotonic() - began
                if not body_done and elapsed > self.idle_timeout and received < self.min_rate * elapsed:
                    raise RequestTimeoutError(
                        f"the request body arrives too slowly ({received / elapsed:.0f} bytes/s, at least "
                        f"{self.min_rate:.0f} are needed)"
                    )
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestTooLargeError:
            # Raised outside the routes' error handlers (e.g. while a middleware read the body).
            if started:
                raise
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        error = RequestTooLargeError(self.max_bytes)
        body = json.dumps({"detail": error.detail, "code": error.code}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class SecurityHeadersMiddleware:
    """Headers on every response. `X-Content-Type-Options: nosniff`: a browser shows a stored file as the type
    the service decoded it as, never as what it might also parse as (an image with HTML appended stays an
    image). With API keys, `Vary: X-API-Key`: ids restart in each collection, so `/images/1/file` is another
    picture for another key, and no cache may hand one collection's answer to another."""

    def __init__(self, app: ASGIApp, vary_on_key: bool) -> None:
        self.app = app
        self.vary_on_key = vary_on_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                if self.vary_on_key:
                    headers.add_vary_header(HEADER)
            await send(message)

        await self.app(scope, receive, with_headers)


class SiteGuardMiddleware:
    """Who may ask at all, judged before anything runs.

    - **The Host header** must name this service (`ALLOWED_HOSTS`, loopback names by default): a page on
      another site that rebinds its DNS name to 127.0.0.1 sends its own name, and gets 400
      `host_not_allowed` instead of the collection.
    - **State-changing requests** (every method but GET, HEAD, OPTIONS) whose `Origin` is neither this
      service's own nor listed in `CORS_ORIGINS` get 403 `cross_site_refused`: a browser sends a multipart
      upload or a bodiless POST cross-site without a preflight, and it would be executed.
    - **Reads from another site** (`Sec-Fetch-Site: cross-site`, which browsers set on every request) are
      refused the same way unless their `Origin` is allowed, so no foreign page can make the service work
      (`GET /clusters?refresh=true`) or read through an `<img>`; following a link to the page or the API
      docs from another site still works. Clients that are not browsers (curl, scripts) send neither
      header and are unaffected.
    """

    SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
    NAVIGABLE = ("/", "/docs", "/redoc", "/openapi.json")

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], allowed_origins: list[str]) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {host.lower() for host in allowed_hosts if not host.startswith("*.")}
        self.host_suffixes = tuple(host.lower()[1:] for host in allowed_hosts if host.startswith("*."))
        self.any_origin = "*" in allowed_origins
        self.origins = {origin.lower() for origin in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self._host_allowed(host):
            response = error_response(
                400, "the Host header does not name this service (ALLOWED_HOSTS)", "host_not_allowed"
            )
            await response(scope, receive, send)
            return
        origin = headers.get("origin")
        cross_site = headers.get("sec-fetch-site") == "cross-site"
        method = scope["method"]
        foreign = origin is not None and not self._origin_allowed(origin, host)
        if origin is None and cross_site:
            navigation = headers.get("sec-fetch-mode") == "navigate" and method == "GET"
            foreign = not (navigation and scope["path"] in self.NAVIGABLE)
        if foreign and not (method == "OPTIONS" and origin is not None):  # preflights are CORS's to answer
            response = error_response(
                403,
                "a request from another site is refused: call the API from the service's own page, from a page "
                "whose origin is in CORS_ORIGINS, or from outside a browser",
                "cross_site_refused",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _hostname(host)
        return name in self.hosts or (bool(name) and name.endswith(self.host_suffixes))

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.lower()
        if origin in self.origins or (self.any_origin and origin != "null"):
            return True
        # The service's own origin: scheme://host[:port] of this very request.
        _, sep, netloc = origin.partition("://")
        return bool(sep) and netloc == host.lower()


def _hostname(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`, `Photos.local:80` -> `photos.local`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with a refused preflight answered in the service's JSON error format."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode("utf-8", errors="replace")
        refused = error_response(400, f"CORS preflight refused: {reason}", "cors_refused")
        refused.headers.update({k: v for k, v in response.headers.items() if k.lower() not in _BODY_HEADERS})
        return refused


_BODY_HEADERS = {"content-length", "content-type"}
