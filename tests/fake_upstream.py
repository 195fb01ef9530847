"""A fake OpenAI-compatible Chat Completions server on a real socket, scripted per prompt.

The tests point the `openai` provider at it instead of patching an HTTP client, so the
real httpx code path runs: connect, status codes, chunked SSE, broken connections.
It runs its own event loop in a thread, so sync and async tests can both use it.

Without a script, a prompt is answered with the words of `"Echo: " + prompt`, each its
own chunk with its leading space ("Echo:", " hello", " world"): their concatenation is
exactly "Echo: " + prompt when the prompt's words are separated by single spaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Script:
    """What the fake upstream answers to one prompt."""

    chunks: list[str] = field(default_factory=list)
    delay: float = 0.0  # seconds before each chunk
    first_delay: float | None = None  # before the first chunk (default: delay)
    # After the chunks: "done" (finish_reason stop, then [DONE]), "stall" (send nothing
    # more until the client goes away), "drop" (cut the connection mid-body),
    # "error_event" (an OpenAI error object in the stream, then a clean end).
    then: str = "done"
    status: int = 200  # not 200: answer with an OpenAI error body instead of a stream
    error_message: str = "fake upstream failure"


class FakeUpstream:
    """The server. Use as a context manager, or start() and stop()."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._scripts: dict[str, Script] = {}
        self._closed_streams = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        return self

    def stop(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        future.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, prompt: str, script: Script) -> None:
        """Answer requests whose last user message is `prompt` this way."""
        with self._lock:
            self._scripts[prompt] = script

    def closed_streams(self) -> int:
        """How many streaming answers ended because the client closed the connection."""
        with self._lock:
            return self._closed_streams

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while await self._handle_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _handle_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection stays open for another."""
        request_line = await reader.readline()
        if not request_line:
            return False
        method, path, _ = request_line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        keep_alive = headers.get("connection", "").lower() != "close"
        if method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
            await self._send_json(writer, 200, models)
            return keep_alive
        if method != "POST" or path != "/v1/chat/completions":
            await self._send_json(writer, 404, {"error": {"message": "not found"}})
            return keep_alive
        request = json.loads(body)
        with self._lock:
            self.requests.append(request)
            self.headers.append(headers)
        prompt = _last_user_text(request.get("messages", []))
        with self._lock:
            script = self._scripts.get(prompt) or Script(_echo(prompt))
        if script.status != 200:
            error = {"message": script.error_message, "type": "server_error", "code": None}
            await self._send_json(writer, script.status, {"error": error})
            return keep_alive
        if not request.get("stream"):
            await self._send_json(writer, 200, _completion(request, "".join(script.chunks)))
            return keep_alive
        return await self._stream(reader, writer, request, script) and keep_alive

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: dict[str, Any],
        script: Script,
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
        )
        model = request.get("model", "fake-model")
        try:
            await _send_chunk(writer, _event(model, {"role": "assistant", "content": ""}))
            for index, text in enumerate(script.chunks):
                pause = (
                    script.first_delay
                    if index == 0 and script.first_delay is not None
                    else script.delay
                )
                await asyncio.sleep(pause)
                await _send_chunk(writer, _event(model, {"content": text}))
            if script.then == "stall":
                await reader.read()  # until the client closes the connection
                raise ConnectionResetError
            if script.then == "drop":
                writer.transport.abort()  # no terminating chunk: the body is cut short
                return False
            if script.then == "error_event":
                error = {"error": {"message": script.error_message, "type": "server_error"}}
                await _send_chunk(writer, f"data: {json.dumps(error)}\n\n".encode())
            else:
                await _send_chunk(writer, _event(model, {}, finish_reason="stop"))
                await _send_chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        except ConnectionError:
            with self._lock:
                self._closed_streams += 1
            return False

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One HTTP chunk, flushed, so the client sees it now."""
    if writer.is_closing():
        raise ConnectionResetError
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


def _event(model: str, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(event)}\n\n".encode()


def _completion(request: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake-model"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
    }


def _echo(prompt: str) -> list[str]:
    words = f"Echo: {prompt}".split(" ")
    return [words[0]] + [" " + word for word in words[1:]]


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""
