"""The ceiling: a bare Starlette SSE passthrough of an OpenAI-compatible upstream, no database.

It speaks sse-llm's wire format (SPEC 2: `event: start`, one `id: N` / `data: {"text": ...}`
event per chunk, `event: done`) and does the work any passthrough must do — parse the
upstream's SSE, decode its JSON, re-frame each chunk — and nothing else: no persistence,
no subscribers, no pings. sse-llm's figures are divided by this one's, so it must be the
fastest honest passthrough, not a naive one: by default it reads the upstream with raw
aiohttp (connector limit raised to the stream count; see shared PERFORMANCE.md), and is
served by uvicorn with uvloop and httptools.

    OPENAI_BASE_URL=http://127.0.0.1:9000/v1 python benchmarks/ceiling.py --port 8100
    python benchmarks/ceiling.py --client httpx-aiohttp   # or httpx, for comparison
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "bench"


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


class AiohttpUpstream:
    """Raw aiohttp: the cheapest client measured (PERFORMANCE.md)."""

    def __init__(self, url: str, max_connections: int) -> None:
        self.url = url
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=10)
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def lines(self, body: dict[str, object]) -> AsyncIterator[bytes]:
        assert self.session is not None
        async with self.session.post(self.url, json=body) as response:
            response.raise_for_status()
            async for line in response.content:
                yield line


class HttpxUpstream:
    """httpx, on its own pool or on the httpx-aiohttp transport."""

    def __init__(self, url: str, max_connections: int, transport: str) -> None:
        self.url = url
        self.max_connections = max_connections
        self.transport = transport
        self.client: object | None = None

    async def open(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=100)
        timeout = httpx.Timeout(None, connect=10.0)
        if self.transport == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=10),
            )
            self.client = httpx.AsyncClient(
                transport=AiohttpTransport(client=session), timeout=timeout
            )
        else:
            self.client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()  # type: ignore[attr-defined]

    async def lines(self, body: dict[str, object]) -> AsyncIterator[bytes]:
        async with self.client.stream("POST", self.url, json=body) as response:  # type: ignore[attr-defined]
            response.raise_for_status()
            async for line in response.aiter_lines():
                yield line.encode()


async def pieces(upstream: AiohttpUpstream | HttpxUpstream, prompt: str) -> AsyncIterator[str]:
    """Each `delta.content` of the upstream's stream until `[DONE]`."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}
    async for line in upstream.lines(body):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        for choice in json.loads(data).get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content


async def events(upstream: AiohttpUpstream | HttpxUpstream, prompt: str) -> AsyncIterator[bytes]:
    """SPEC 2's events: start, one per chunk, done (or error)."""
    conversation_id = str(uuid.uuid4())
    start = {
        "id": conversation_id,
        "created_at": datetime.now(UTC).isoformat(),
        "model": MODEL,
    }
    yield f"event: start\ndata: {_json(start)}\n\n".encode()
    seq = 0
    try:
        async for text in pieces(upstream, prompt):
            seq += 1
            yield f"id: {seq}\ndata: {_json({'text': text})}\n\n".encode()
    except Exception as exc:  # the upstream failed: end like sse-llm does
        error = {
            "id": conversation_id,
            "status": "failed",
            "chunks": seq,
            "error": {"code": "upstream_error", "message": type(exc).__name__},
        }
        yield f"event: error\ndata: {_json(error)}\n\n".encode()
        return
    done = {"id": conversation_id, "status": "completed", "chunks": seq}
    yield f"event: done\ndata: {_json(done)}\n\n".encode()


async def stream(request: Request) -> Response:
    body = await request.json()
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        return JSONResponse({"error": {"code": "validation_error"}}, status_code=422)
    return StreamingResponse(
        events(request.app.state.upstream, prompt.strip()),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(base_url: str, client: str, max_connections: int) -> Starlette:
    url = base_url.rstrip("/") + "/chat/completions"
    upstream: AiohttpUpstream | HttpxUpstream
    if client == "aiohttp":
        upstream = AiohttpUpstream(url, max_connections)
    else:
        upstream = HttpxUpstream(url, max_connections, client)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await upstream.open()
        app.state.upstream = upstream
        try:
            yield
        finally:
            await upstream.close()

    return Starlette(
        routes=[Route("/stream", stream, methods=["POST"]), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--upstream",
        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:9000/v1"),
        help="OpenAI-compatible base URL (default OPENAI_BASE_URL)",
    )
    parser.add_argument(
        "--client", choices=("aiohttp", "httpx-aiohttp", "httpx"), default="aiohttp"
    )
    parser.add_argument("--max-connections", type=int, default=20_000)
    args = parser.parse_args()
    app = create_app(args.upstream, args.client, args.max_connections)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
