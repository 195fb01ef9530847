"""The HTTP/1.1 protocol uvicorn runs: its fast httptools parser, with two guards added.

- A bounded request head. httptools (unlike h11) puts no limit on the size of the URL
  and headers of a request, so a client could make the server buffer megabytes before
  the app sees anything. Heads over MAX_HEAD_BYTES get uvicorn's own `400 Invalid HTTP
  request`.
- Clients that stop reading are dropped. A stream's sends wait while the socket's
  buffer is full; a client that never reads again would hold its connection forever.
  The transport tells the protocol when its buffer fills up and drains, so a timer armed
  only in that rare case replaces a timeout around every send (sse-starlette's
  `send_timeout` cost ~7 µs per send, a few % of the CPU of a stream).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
# Marks in a request's ASGI scope once its connection is gone: what a delivery sent is
# what went out before (deliveries.py). Sends after a disconnect return quietly.
CONNECTION_LOST = "sse_llm.connection_lost"
CLIENT_STALLED = "sse_llm.client_stalled"  # dropped for reading nothing

log = logging.getLogger(__name__)


class RequestHeadTooLarge(Exception):
    """The URL and headers of a request passed MAX_HEAD_BYTES."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that bounds request heads and drops clients that stop reading."""

    head_bytes = 0
    # A client whose socket takes nothing for this long (the write buffer stays full) is
    # disconnected: its response's sends return and its stream ends as if it had left.
    stalled_client_timeout = 60.0
    _stall_timer: asyncio.TimerHandle | None = None

    def on_message_begin(self) -> None:
        self.head_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            # Raised inside a parser callback, it surfaces as httptools.HttpParserError,
            # which uvicorn answers with 400 and a closed connection.
            raise RequestHeadTooLarge

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(
                self.stalled_client_timeout, self._drop_stalled_client
            )

    def resume_writing(self) -> None:
        self._cancel_stall_timer()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall_timer()
        self._mark_request(CONNECTION_LOST)
        super().connection_lost(exc)

    def _mark_request(self, key: str) -> None:
        """Mark the current request's scope (its app reads the key)."""
        if self.cycle is not None:
            cast(dict[str, Any], self.cycle.scope)[key] = True

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _drop_stalled_client(self) -> None:
        self._stall_timer = None
        self._mark_request(CLIENT_STALLED)
        log.info("dropping a client that read nothing for %gs", self.stalled_client_timeout)
        # connection_lost follows: uvicorn marks the request disconnected, its pending
        # send returns, and the app's receive() gets http.disconnect.
        self.transport.abort()
