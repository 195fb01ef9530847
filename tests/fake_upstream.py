"""A fake OpenAI-compatible Chat Completions server on a real socket, scripted per prompt.

The tests point the `openai` provider at it instead of patching an HTTP client, so the
real client code path runs: connect, status codes, chunked SSE, broken connections.
It speaks just enough HTTP/1.1 by hand (asyncio streams, standard library only) and
runs its own event loop in a thread, so sync and async tests can both use it. Why not an
ASGI app under uvicorn (or pytest-httpserver): `drop` aborts the socket mid-chunk and
`closed_streams()` sees a hang-up at once, and those servers hide the socket from handlers.

Routes:
    POST /v1/chat/completions  answered as the prompt's `Script` says (see below)
    GET  /v1/models            one model, "fake-model"
    anything else              404 with an OpenAI-style JSON error

A prompt is the content of the request's LAST user message. Without a script it is
answered with `"Echo: " + prompt` split on single spaces, each piece its own chunk with
its leading space: "Echo:", " hello", " world". Joining the chunks gives back exactly
"Echo: " + prompt (runs of spaces just make chunks that are a lone space), so for a
prompt whose words are separated by single spaces, every chunk is one word.

A streamed answer is: the headers, at once an event whose delta is
{"role": "assistant", "content": ""} (as OpenAI sends), then one event per chunk, each
its own HTTP chunk flushed immediately, then the script's ending.

    with FakeUpstream() as upstream:
        upstream.script("slow", Script(["a", " b"], delay=0.5, then="stall"))
        ...  # point the app at upstream.base_url
        assert upstream.closed_streams() == 1

Token usage, as OpenAI does it: a request with `"stream_options": {"include_usage": true}`
that ends "done" gets, after the finishing event and before `[DONE]`, an event with
`"choices": []` and `"usage": {"prompt_tokens", "completion_tokens", "total_tokens"}`:
the script's `usage`, or by default a token per word of every message's text and a
token per chunk. `FakeUpstream(refuse_stream_options=400)` (or 422) plays a server that
predates the field: any request carrying it gets that status, with the body such servers
send (an OpenAI-style proxy's "Unknown parameter", a pydantic server's extra_forbidden).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

# What Script.then may be; checked up front so a typo fails loudly, not as a odd timeout.
ENDINGS = ("done", "stall", "drop", "error_event")

MODELS = {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}


@dataclass
class Script:
    """What the fake upstream answers to one prompt."""

    # Delta contents, one SSE event each. Defaults to empty so an error script can be
    # written as Script(status=500).
    chunks: list[str] = field(default_factory=list)
    delay: float = 0.0  # seconds before each chunk
    first_delay: float | None = None  # seconds before the first chunk (default: delay)
    # After the chunks:
    #   "done"        finish_reason "stop", then `data: [DONE]`, then the end of the body
    #   "stall"       send nothing more until the client closes or the server stops
    #   "drop"        close the TCP connection abruptly, mid-body (no terminating chunk)
    #   "error_event" an OpenAI error object as an event, then the end of the body
    then: str = "done"
    status: int = 200  # not 200: answer this status with an OpenAI JSON error, no stream
    error_message: str = "fake upstream failure"
    set_cookie: str | None = None  # a Set-Cookie header on the streamed answer
    # Token counts (prompt, completion) for the usage event, when the request asks.
    usage: tuple[int, int] | None = None
    send_usage: bool = True  # False: ignore include_usage, as older Ollama does
    usage_on_finish: bool = False  # the counts on the finishing event (older llama.cpp)

    def __post_init__(self) -> None:
        """Reject an unknown `then` when the script is written, not when it is played."""
        if self.then not in ENDINGS:
            raise ValueError(f"Script.then must be one of {ENDINGS}, not {self.then!r}")


class FakeUpstream:
    """The server. Use as a context manager, or call start() and stop()."""

    def __init__(
        self, refuse_stream_options: int | None = None, refusal_delay: float = 0.0
    ) -> None:
        """Prepare an unstarted server; nothing listens until start().

        `refuse_stream_options`: answer every request that carries stream_options with
        this status (400 or 422), as servers that predate the field do, after
        `refusal_delay` seconds (so that concurrent requests are all refused).
        """
        if refuse_stream_options not in (None, 400, 422):
            raise ValueError("refuse_stream_options must be None, 400 or 422")
        self.refuse_stream_options = refuse_stream_options
        self.refusal_delay = refusal_delay
        # Public, for assertions: the JSON body and the headers (lower-cased names) of
        # every chat completions request, at the same index in both lists.
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = 0
        self._scripts: dict[str, Script] = {}
        self._closed_streams = 0
        # The test thread reads what the server thread writes, so both go through this.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        # Only touched on the server's loop: the per-connection tasks, so stop() can
        # cancel the ones stuck in a stall instead of waiting for them forever.
        self._connections: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client, e.g. "http://127.0.0.1:41234/v1"."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        """Listen on a free port of 127.0.0.1 in a background thread; return self."""
        if self._thread is not None:
            raise RuntimeError("FakeUpstream.start() was already called")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-upstream", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return  # never started, or already stopped
        # Bounded waits everywhere: a stuck fake must not hang the whole test session.
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> FakeUpstream:
        """Start, for `with FakeUpstream() as upstream:`."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop, whatever happened in the block."""
        self.stop()

    def script(self, prompt: str, script: Script) -> None:
        """Answer requests whose last user message is exactly `prompt` this way."""
        with self._lock:
            self._scripts[prompt] = script

    def closed_streams(self) -> int:
        """How many streamed answers ended because the client closed the connection."""
        with self._lock:
            return self._closed_streams

    # Everything below runs on the server's own event loop.

    async def _open(self) -> None:
        """Bind port 0 so the OS picks a free port, then remember which one it was."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        """Stop accepting, cancel every connection (stalls included) and wait for them."""
        self._stopping = True  # so cancelled stalls are not counted as client closes
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until either side closes it (keep-alive)."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while not self._stopping:
                request = await _read_request(reader)
                if request is None:
                    break  # the client closed an idle connection
                if not await self._answer(request, reader, writer):
                    break
        except _BadRequest as error:
            with contextlib.suppress(ConnectionError):
                body = _error_body(str(error), "invalid_request_error")
                await _send_json(writer, 400, body, keep_alive=False)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away in the middle of a request: no one to answer
        except asyncio.CancelledError:
            # stop() cancels us. Ending normally instead of as "cancelled" avoids a
            # spurious traceback that Python 3.11's stream callback logs for those.
            if not self._stopping:
                raise
        finally:
            self._connections.discard(task)
            writer.close()

    async def _answer(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; return whether the connection stays open for another."""
        keep_alive = request.keep_alive
        if request.method == "GET" and request.path == "/v1/models":
            await _send_json(writer, 200, MODELS, keep_alive)
            return keep_alive
        if request.method != "POST" or request.path != "/v1/chat/completions":
            message = f"no route for {request.method} {request.path}"
            body = _error_body(message, "invalid_request_error", "not_found")
            await _send_json(writer, 404, body, keep_alive)
            return keep_alive
        try:
            payload = json.loads(request.body)
        except ValueError:  # also covers bytes that are not UTF-8
            payload = None
        if not isinstance(payload, dict):
            body = _error_body("the body must be a JSON object", "invalid_request_error")
            await _send_json(writer, 400, body, keep_alive)
            return keep_alive

        prompt = _last_user_text(payload.get("messages"))
        with self._lock:
            # Appended together so requests[i] and headers[i] are the same request.
            self.requests.append(payload)
            self.headers.append(request.headers)
            script = self._scripts.get(prompt) or Script(echo_chunks(prompt))
        model = payload.get("model") or "fake-model"

        if self.refuse_stream_options and "stream_options" in payload:
            status = self.refuse_stream_options
            await asyncio.sleep(self.refusal_delay)
            await _send_json(writer, status, _STREAM_OPTIONS_REFUSALS[status], keep_alive)
            return keep_alive
        if script.status != 200:
            error_type = "server_error" if script.status >= 500 else "invalid_request_error"
            body = _error_body(script.error_message, error_type, str(script.status))
            await _send_json(writer, script.status, body, keep_alive)
            return keep_alive
        if payload.get("stream") is not True:
            # Not streamed: the whole text at once; pacing and `then` do not apply.
            await _send_json(writer, 200, _completion(model, "".join(script.chunks)), keep_alive)
            return keep_alive
        usage = _usage(payload, script)
        try:
            ended_properly = await _stream(reader, writer, model, script, keep_alive, usage)
        except (_ClientGone, ConnectionError):
            with self._lock:
                self._closed_streams += 1
            return False
        return ended_properly and keep_alive


@dataclass
class _Request:
    """One HTTP request as read off the socket."""

    method: str
    path: str  # without the query string
    headers: dict[str, str]  # lower-cased names
    body: bytes
    keep_alive: bool  # whether the client lets us answer another request afterwards


class _BadRequest(Exception):
    """The bytes on the wire are not an HTTP/1.x request this fake understands."""


class _ClientGone(Exception):
    """The client closed its connection while we were still answering."""


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """Read one request (line, headers, Content-Length body); None if the client left."""
    try:
        line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(f"malformed request line: {line!r}")
        method, target, version = parts
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n"):
            if not line:
                raise ConnectionResetError("the client closed the connection mid-headers")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _BadRequest(f"malformed header line: {line!r}")
            headers[name.strip().lower()] = value.strip()
    except ValueError as error:  # readline's "line too long"
        raise _BadRequest(str(error)) from None
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequest("chunked request bodies are not supported")  # clients send JSON
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest("Content-Length is not a number") from None
    if length < 0:
        raise _BadRequest("Content-Length is negative")
    body = await reader.readexactly(length)
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 the other way round.
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return _Request(method, target.split("?", 1)[0], headers, body, keep_alive)


async def _stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    model: str,
    script: Script,
    keep_alive: bool,
    usage: dict[str, int] | None,
) -> bool:
    """Play `script` as an OpenAI event stream; return whether the body ended properly.

    `usage`, if any, goes after the finishing event (or on it, see Script).

    Raises _ClientGone (or ConnectionError) when the client closes the connection first.
    """
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/event-stream\r\n"
        "Cache-Control: no-cache\r\n"
        "Transfer-Encoding: chunked\r\n"
        + (f"Set-Cookie: {script.set_cookie}\r\n" if script.set_cookie else "")
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    )
    writer.write(head.encode("latin-1"))
    await _send_chunk(reader, writer, _event(model, {"role": "assistant", "content": ""}))
    for index, text in enumerate(script.chunks):
        first = index == 0 and script.first_delay is not None
        await _pause(reader, script.first_delay if first else script.delay)
        await _send_chunk(reader, writer, _event(model, {"content": text}))

    if script.then == "stall":
        # Returns only when the client closes; stop() ends a stall by cancelling us.
        await _wait_for_eof(reader)
        raise _ClientGone
    if script.then == "drop":
        writer.transport.abort()  # no terminating chunk: the client sees a cut-short body
        return False
    if script.then == "error_event":
        error = {"error": {"message": script.error_message, "type": "server_error"}}
        await _send_chunk(reader, writer, _data(error))
    else:
        finish = _event(model, {}, finish_reason="stop")
        if usage is not None and script.usage_on_finish:
            finish = _event(model, {}, finish_reason="stop", usage=usage)
        await _send_chunk(reader, writer, finish)
        if usage is not None and not script.usage_on_finish:
            await _send_chunk(reader, writer, _usage_event(model, usage))
        await _send_chunk(reader, writer, b"data: [DONE]\n\n")
    writer.write(b"0\r\n\r\n")  # the zero-length chunk that ends a chunked body
    await writer.drain()
    return True


async def _send_chunk(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    """Write one HTTP chunk and flush it, so the client sees it now, not at the end."""
    # A client that closed its end shows up as EOF on our reader; writing to it may still
    # "succeed" once (the kernel accepts the bytes, the peer answers with a reset), so
    # check first rather than rely on the write failing.
    if reader.at_eof() or writer.is_closing():
        raise _ClientGone
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _pause(reader: asyncio.StreamReader, seconds: float) -> None:
    """Sleep `seconds`, but raise _ClientGone as soon as the client closes the connection."""
    if seconds <= 0:
        return
    # While it reads our answer, an HTTP/1.1 client sends nothing (no pipelining), so
    # this read can only end with EOF, i.e. the client closing, or time out.
    with contextlib.suppress(TimeoutError):
        if not await asyncio.wait_for(reader.read(1), seconds):
            raise _ClientGone


async def _wait_for_eof(reader: asyncio.StreamReader) -> None:
    """Wait until the client closes its end of the connection, discarding anything sent."""
    while await reader.read(65536):
        pass


async def _send_json(
    writer: asyncio.StreamWriter, status: int, body: object, keep_alive: bool
) -> None:
    """Send a complete JSON response with a Content-Length."""
    data = json.dumps(body).encode()
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:  # a made-up status in a script, e.g. 599
        reason = "Unknown"
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n"
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    )
    writer.write(head.encode("latin-1") + data)
    await writer.drain()


def _data(payload: object) -> bytes:
    """One SSE event, compact JSON like OpenAI's. ASCII escapes keep lone surrogates valid."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _event(
    model: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> bytes:
    """One chat.completion.chunk event."""
    event: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        event["usage"] = usage
    return _data(event)


def _usage_event(model: str, usage: dict[str, int]) -> bytes:
    """OpenAI's last event under include_usage: no choices, the whole answer's counts."""
    return _data(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )


def _usage(payload: dict[str, Any], script: Script) -> dict[str, int] | None:
    """The usage object to send, if the request asked for it and the script sends it."""
    options = payload.get("stream_options")
    if not (isinstance(options, dict) and options.get("include_usage") is True):
        return None
    if not script.send_usage:
        return None
    if script.usage is not None:
        prompt_tokens, completion_tokens = script.usage
    else:
        messages = payload.get("messages")
        messages = messages if isinstance(messages, list) else []
        texts = [_text(m.get("content")) for m in messages if isinstance(m, dict)]
        prompt_tokens = sum(len(text.split()) for text in texts)
        completion_tokens = len(script.chunks)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# What servers that predate stream_options answer a request carrying it: an OpenAI-style
# proxy (one-api, new-api; older Azure API versions say "Unrecognized request argument
# supplied"), and a pydantic server with extra fields forbidden (FastAPI's 422; vLLM
# before 0.5 sent the same list in a 400).
_STREAM_OPTIONS_REFUSALS: dict[int, dict[str, Any]] = {
    400: {
        "error": {
            "message": "Unknown parameter: 'stream_options'.",
            "type": "invalid_request_error",
            "param": "stream_options",
            "code": "unknown_parameter",
        }
    },
    422: {
        "detail": [
            {
                "type": "extra_forbidden",
                "loc": ["body", "stream_options"],
                "msg": "Extra inputs are not permitted",
                "input": {"include_usage": True},
            }
        ]
    },
}


def _completion(model: str, text: str) -> dict[str, Any]:
    """A whole chat.completion, for requests that did not ask for a stream."""
    message = {"role": "assistant", "content": text}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


def _error_body(message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "code"}}."""
    return {"error": {"message": message, "type": error_type, "code": code}}


def echo_chunks(prompt: str) -> list[str]:
    """The default answer's chunks: "Echo:", then each word of `prompt` with its space."""
    words = f"Echo: {prompt}".split(" ")
    return [words[0]] + [" " + word for word in words[1:]]


def _last_user_text(messages: object) -> str:
    """The text of the last user message, the key that scripts are looked up by."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _text(content: object) -> str:
    """A message's content as text (of content parts, only the text ones)."""
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return content if isinstance(content, str) else ""
