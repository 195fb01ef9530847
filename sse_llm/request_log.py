"""One log line and one metric count per HTTP request, and its X-Request-Id.

Why not asgi-correlation-id: its default validator keeps only UUIDs (a caller's plain id
would be replaced), and the metric and the log line would still need this middleware,
so every request would pass two wrappers instead of one.
"""

from __future__ import annotations

import logging
import re
import time
from uuid import uuid4

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sse_llm.metrics import Metrics

log = logging.getLogger("sse_llm.requests")

# A caller's own request id is kept only if it is short and plain (it goes into logs).
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestLog:
    """ASGI middleware: request id in, X-Request-Id out, a structured line when done.

    For a stream, "done" is when the stream ends, so the duration is the stream's.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        response: dict[str, object] = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                response["status"] = message["status"]
                response["conversation_id"] = headers.get("x-conversation-id")
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = _route_name(scope)
            status = response["status"]
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            fields = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            if response.get("conversation_id"):
                fields["conversation_id"] = response["conversation_id"]
            log.info("request", extra={"fields": fields})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _route_name(scope: Scope) -> str:
    """The matched endpoint's name: a metric label that does not grow with ids."""
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return "unmatched"
    return getattr(endpoint, "__name__", type(endpoint).__name__)
