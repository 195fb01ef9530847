"""A fake OpenAI-compatible Chat Completions server for benchmarks: cheap, timed, exact.

`POST /v1/chat/completions` with `"stream": true` answers with K chunks, one every T ms
(the first one T ms after the request, like a model's first token). Each chunk's
`delta.content` is `"<seq>:<emission time_ns>|"`, padded with dots to `pad` characters,
so a client on the same machine computes delivery latency as its receive time minus the
emission time written in the text, with no clock games.

K, T and the padding come from the server flags, and a request can override them with
words in its prompt: `k=50 t=50 pad=0` (any other words are ignored). A request with
`stream_options.include_usage` gets OpenAI's last event before `[DONE]`, `"choices": []`
with the counts (a token per chunk, a prompt token per 4 characters). `GET /stats`
(`/stats?reset`) tells how many chunks it sent and how late its ticks ran, so a driver
can check that the upstream itself kept pace. Written on raw
asyncio protocols with hand-made JSON (no framework, no json.dumps per chunk) so that a
thousand streams cost the machine little; every chunk of a stream is scheduled at an
absolute time (start + i*T), so a slow moment never makes the pace drift.

    python benchmarks/upstream.py --port 9000 --chunks 50 --interval-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import signal
import time

try:
    import uvloop
except ImportError:  # the plain event loop works too, a little slower
    uvloop = None

_OVERRIDE = re.compile(r"\b(k|t|pad)=(\d+)\b")
_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Stream:
    """One streamed answer on one connection; the server's ticker calls `tick` on time."""

    def __init__(
        self, connection: UpstreamProtocol, k: int, interval: float, pad: int, usage: bytes
    ) -> None:
        self.connection = connection
        self.usage = usage  # the usage event's counts, or b"" if not asked
        self.k = k
        self.interval = interval
        self.pad = pad
        self.seq = 0
        self.cancelled = False
        self.start = time.monotonic()
        self.prefix = (
            b'{"id":"chatcmpl-%x","object":"chat.completion.chunk","created":%d,"model":"bench",'
            b'"choices":[{"index":0,"delta":' % (id(self), int(time.time()))
        )
        role = self.prefix + b'{"role":"assistant","content":""},"finish_reason":null}]}'
        connection.write(_HEADERS + _http_chunk(b"data: " + role + b"\n\n"))
        connection.server.schedule(self.start + interval, self)

    def tick(self, now: float) -> None:
        """Emit the next chunk, or the end; then ask to be called at the next one's time."""
        connection = self.connection
        if self.cancelled or connection.closed:
            return
        server = connection.server
        self.seq += 1
        due = self.start + self.seq * self.interval
        server.lag.append(now - due)
        if self.seq <= self.k:
            text = b"%d:%d|" % (self.seq, time.time_ns())
            if len(text) < self.pad:
                text += b"." * (self.pad - len(text))
            event = b'data: %s{"content":"%s"},"finish_reason":null}]}\n\n' % (self.prefix, text)
            connection.write(_http_chunk(event))
            server.chunks += 1
            server.schedule(due + self.interval, self)
            return
        last = b'data: %s{},"finish_reason":"stop"}]}\n\n' % self.prefix
        if self.usage:
            head = self.prefix[: self.prefix.index(b'"choices"')]
            last += b'data: %s"choices":[],"usage":%s}\n\n' % (head, self.usage)
        last += b"data: [DONE]\n\n"
        connection.write(_http_chunk(last) + b"0\r\n\r\n")
        connection.stream = None
        connection.read_request()  # a pipelined next request, if any


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, one request at a time."""

    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.cancelled = True
            self.stream = None

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.stream is None:
            self.read_request()

    def read_request(self) -> None:
        """Parse one complete request from the buffer and answer it."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1")
        lines = head.split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < end + 4 + length:
            return  # the body is still coming
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        if method == "GET" and path.startswith("/stats"):
            stats = self.server.stats(reset="reset" in path)
            self.reply(200, json.dumps(stats).encode())
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            self.reply(404, b'{"error": {"message": "not found"}}')
            return
        try:
            request = json.loads(body)
            prompt = str(request["messages"][-1]["content"])
            options = request.get("stream_options") or {}
            include_usage = options.get("include_usage") is True
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self.reply(400, b'{"error": {"message": "bad request"}}')
            return
        k, interval, pad = self.server.k, self.server.interval, self.server.pad
        for name, value in _OVERRIDE.findall(prompt):
            if name == "k":
                k = int(value)
            elif name == "t":
                interval = int(value) / 1000
            else:
                pad = int(value)
        self.server.requests += 1
        usage = b""
        if include_usage:
            prompt_tokens = -(-len(prompt) // 4)
            usage = b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (
                prompt_tokens,
                k,
                prompt_tokens + k,
            )
        self.stream = Stream(self, k, interval, pad, usage)

    def reply(self, status: int, body: bytes) -> None:
        self.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )
        self.read_request()


class UpstreamServer:
    """Defaults for every stream, the ticker that paces them, and what it measured.

    Streams due in the same millisecond share one timer: a thousand streams cost 20
    timer callbacks per 50 ms, not a thousand. `lag` holds how late each tick ran
    (seconds after its due time) so a driver can tell whether this process kept pace.
    """

    def __init__(self, k: int, interval_ms: float, pad: int) -> None:
        self.k = k
        self.interval = interval_ms / 1000
        self.pad = pad
        self.requests = 0
        self.chunks = 0
        self.lag: list[float] = []
        self._slots: dict[int, list[Stream]] = {}

    def schedule(self, when: float, stream: Stream) -> None:
        """Call `stream.tick` at `when` (time.monotonic()), to the millisecond.

        time.monotonic(), not loop.time(): uvloop's clock is cached per loop iteration
        at millisecond resolution, which would skew the pace.
        """
        slot = math.ceil(when * 1000)  # never early
        streams = self._slots.get(slot)
        if streams is None:
            streams = self._slots[slot] = []
            delay = slot / 1000 - time.monotonic()
            asyncio.get_running_loop().call_later(max(0.0, delay), self._fire, slot)
        streams.append(stream)

    def _fire(self, slot: int) -> None:
        now = time.monotonic()
        for stream in self._slots.pop(slot, ()):
            stream.tick(now)

    def stats(self, reset: bool) -> dict[str, object]:
        """Requests, chunks and tick lag (ms) since the last reset."""
        lag = sorted(self.lag)
        figures = {
            "requests": self.requests,
            "chunks": self.chunks,
            "lag_ms_p50": lag[len(lag) // 2] * 1000 if lag else None,
            "lag_ms_p99": lag[int(len(lag) * 0.99)] * 1000 if lag else None,
            "lag_ms_max": lag[-1] * 1000 if lag else None,
            "cpu_seconds": sum(os.times()[:2]),
        }
        if reset:
            self.requests = self.chunks = 0
            self.lag = []
        return figures


async def serve(host: str, port: int, server: UpstreamServer) -> None:
    """Listen until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: UpstreamProtocol(server), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"upstream listening on http://{host}:{port}/v1", flush=True)
    await stop.wait()
    listener.close()


def raise_file_limit() -> None:
    """Thousands of streams need thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunks", type=int, default=50, help="chunks per stream (k=)")
    parser.add_argument("--interval-ms", type=float, default=50, help="ms between chunks (t=)")
    parser.add_argument("--pad", type=int, default=0, help="pad each chunk's text to N chars")
    args = parser.parse_args()
    raise_file_limit()
    server = UpstreamServer(args.chunks, args.interval_ms, args.pad)
    runner = uvloop.run if uvloop is not None else asyncio.run
    runner(serve(args.host, args.port, server))


if __name__ == "__main__":
    main()
