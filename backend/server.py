"""Running the service under uvicorn, with a deadline for the head of every request.

uvicorn (h11) waits for a request's head as long as the client keeps sending, a byte at a time: twenty
such clients hold twenty connections for ever. `HeadTimeoutH11Protocol` closes a connection whose request
head is not complete REQUEST_HEADER_TIMEOUT seconds after the connection opened, or after the previous
response on it ended. The body has deadlines of its own (`middleware.RequestBodyMiddleware`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from backend.config import Settings


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head arrives too slowly."""

    head_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:  # a request's head is complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection has the same deadline

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self.logger.info("closing a connection whose request head did not arrive in %.0f s", self.head_timeout)
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def serve(settings: Settings, *, host: str, port: int, log_level: str = "info") -> None:
    """Start the service on `host:port` in this process (one worker: in the embedded mode the vector index
    lives in its memory) until it is told to stop."""
    from backend.main import create_app

    protocol = type("HeadTimeoutH11", (HeadTimeoutH11Protocol,), {"head_timeout": settings.request_header_timeout})
    uvicorn.run(create_app(settings), host=host, port=port, workers=1, http=protocol, log_level=log_level)
