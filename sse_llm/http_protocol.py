"""The HTTP/1.1 protocol uvicorn runs: its fast httptools parser, with a bounded request head.

httptools (unlike h11) puts no limit on the size of the URL and headers of a request,
so a client could make the server buffer megabytes before the app sees anything. This
refuses heads over MAX_HEAD_BYTES with uvicorn's own `400 Invalid HTTP request`.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024


class RequestHeadTooLarge(Exception):
    """The URL and headers of a request passed MAX_HEAD_BYTES."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that counts the bytes of each request's URL and headers."""

    head_bytes = 0

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
