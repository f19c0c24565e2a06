"""HTTP-level middleware: the request-size limit and CORS (answering in the service's JSON error format),
and the headers every response carries."""

from __future__ import annotations

import json

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.apikeys import HEADER
from backend.errors import RequestTooLargeError, error_response


class BodySizeLimitMiddleware:
    """413 before reading when Content-Length is over the limit; for chunked bodies, as soon as the count passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLargeError(self.max_bytes)
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
