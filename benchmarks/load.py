"""The load generator: C concurrent SSE clients, S streams in all, cheap on CPU.

Each client POSTs `/stream` on a new connection (as a browser's fetch or EventSource
would), reads the SSE events with raw asyncio protocols and the httptools parser (a few
microseconds per read, so the client is not what is measured), and records:

- time to first chunk: from just before connecting to reading the first chunk event;
- per-chunk delivery latency: the read time minus the emission time the fake upstream
  wrote into the chunk's text (`"<seq>:<time_ns>|"`, see upstream.py);
- chunks/s over the window from the first chunk read to the last;
- protocol checks: every stream gets `start`, chunks with ids 1..K in order exactly once,
  and `done` saying K chunks.

With `--verify`, once every stream has ended it prints `{"phase": "streams_done"}` (so a
driver can stop its CPU clock) and then fetches `GET /history/{id}` of each stream,
checking that the stored response equals exactly what the client received: 0 lost,
0 duplicated (streams refused with an HTTP error created no conversation: they count
as failed streams, not here). The last line printed is the JSON summary.

    python benchmarks/load.py --url http://127.0.0.1:8000 -c 100 -s 300 --verify
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

try:
    import uvloop
except ImportError:
    uvloop = None


@dataclass
class StreamResult:
    """What one client saw."""

    started_ns: int = 0
    first_chunk_ns: int = 0
    ended_ns: int = 0
    status_code: int = 0
    conversation_id: str | None = None
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    done_chunks: int | None = None
    error: str | None = None


class Recorder:
    """Latencies and counters shared by every client (one event loop, no locks)."""

    def __init__(self, full: int) -> None:
        self.latencies_ns: list[int] = []
        self.first_read_ns = 0
        self.last_read_ns = 0
        self.reads = 0
        # "Steady" samples: read while at least `full` streams were open (90% of C), so
        # the ramp-up and the tail of a run do not dilute the figures at concurrency C.
        self.open = 0
        self.full = full
        self.steady_ns: list[int] = []
        self.steady_first_ns = 0
        self.steady_last_ns = 0
        self.trace: list[tuple[int, int]] | None = None  # (read time, latency) with --trace


class SSEClient(asyncio.Protocol):
    """One `POST /stream` and its event stream, parsed as bytes arrive."""

    def __init__(self, request: bytes, result: StreamResult, recorder: Recorder) -> None:
        self.request = request
        self.result = result
        self.recorder = recorder
        self.parser = httptools.HttpResponseParser(self)
        self.buffer = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.finish(f"bad HTTP: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("connection closed before the end" if exc is None else repr(exc))

    def finish(self, error: str | None = None) -> None:
        if self.done.done():
            return
        if error and self.result.error is None and self.result.done_chunks is None:
            self.result.error = error
        self.result.ended_ns = time.time_ns()
        self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-conversation-id":
            self.result.conversation_id = value.decode()

    def on_headers_complete(self) -> None:
        self.result.status_code = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.result.status_code != 200:
            self.buffer += body
            return
        now = time.time_ns()
        recorder = self.recorder
        recorder.reads += 1
        if not recorder.first_read_ns:
            recorder.first_read_ns = now
        recorder.last_read_ns = now
        buffer = self.buffer + body
        *events, self.buffer = buffer.split(b"\n\n")
        for event in events:
            self.on_event(event, now)

    def on_message_complete(self) -> None:
        if self.result.status_code != 200:
            self.finish(f"HTTP {self.result.status_code}: {self.buffer[:200]!r}")
        elif self.result.done_chunks is None and self.result.error is None:
            self.finish("stream ended without done")
        else:
            self.finish()

    def on_event(self, event: bytes, now: int) -> None:
        result = self.result
        if event.startswith(b"id: "):  # a chunk: `id: N\ndata: {"text": ...}`
            newline = event.index(b"\n")
            result.ids.append(int(event[4:newline]))
            text = chunk_text(event[newline + 1 :])
            result.texts.append(text)
            if not result.first_chunk_ns:
                result.first_chunk_ns = now
            colon = text.find(":")
            bar = text.find("|", colon)
            if colon > 0 and bar > colon:
                recorder = self.recorder
                latency = now - int(text[colon + 1 : bar])
                recorder.latencies_ns.append(latency)
                if recorder.trace is not None:
                    recorder.trace.append((time.time_ns(), latency))
                if recorder.open >= recorder.full:
                    recorder.steady_ns.append(latency)
                    if not recorder.steady_first_ns:
                        recorder.steady_first_ns = now
                    recorder.steady_last_ns = now
            return
        if event.startswith(b":") or event.startswith(b"retry:") or not event.strip():
            return  # ping comment, retry hint
        name, _, rest = event.partition(b"\n")
        data = rest[rest.index(b"{") :] if b"{" in rest else b"{}"
        if name == b"event: start":
            result.conversation_id = json.loads(data).get("id") or result.conversation_id
        elif name == b"event: done":
            result.done_chunks = int(json.loads(data).get("chunks", -1))
        elif name == b"event: error":
            result.error = f"error event: {json.loads(data).get('error')}"


def chunk_text(data: bytes) -> str:
    """The text of `data: {"text": "..."}`: sliced when it holds no escape, else JSON-decoded."""
    key = data.find(b'"text"')
    if key >= 0 and data.endswith(b'"}'):
        opening = data.find(b'"', data.find(b":", key + 6))
        raw = data[opening + 1 : -2]
        if b"\\" not in raw and b'"' not in raw:
            return raw.decode()
    return str(json.loads(data[data.index(b"{") :])["text"])


async def run_stream(
    host: str, port: int, prompt: str, recorder: Recorder, limit: float
) -> StreamResult:
    """Open one connection, POST the prompt, read the stream to its end."""
    body = json.dumps({"prompt": prompt}).encode()
    request = (
        f"POST /stream HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    result = StreamResult(started_ns=time.time_ns())
    loop = asyncio.get_running_loop()
    client: SSEClient | None = None
    recorder.open += 1
    try:
        async with asyncio.timeout(limit):
            _, client = await loop.create_connection(
                lambda: SSEClient(request, result, recorder), host, port
            )
            await client.done
    except TimeoutError:
        result.error = result.error or "timed out"
    except OSError as exc:
        result.error = result.error or f"connect failed: {exc!r}"
    finally:
        recorder.open -= 1
        if client is not None and client.transport is not None:
            client.transport.close()
    if not result.ended_ns:
        result.ended_ns = time.time_ns()
    return result


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of unsorted values (None if empty)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def latency_figures(values: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of latencies in ms."""
    return {
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


def check_stream(result: StreamResult, chunks: int) -> list[str]:
    """Protocol problems of one stream as the client saw it."""
    problems = []
    if result.error:
        problems.append(result.error)
    if result.ids != list(range(1, len(result.ids) + 1)):
        problems.append("chunk ids not 1..N in order")
    if len(result.texts) != chunks:
        problems.append(f"{len(result.texts)} chunks received, {chunks} expected")
    if result.done_chunks is not None and result.done_chunks != len(result.texts):
        problems.append(f"done says {result.done_chunks} chunks, {len(result.texts)} received")
    return problems


def upstream_seqs(text: str) -> list[int]:
    """The upstream sequence numbers inside an answer made of `<seq>:<ns>|` pieces."""
    seqs = []
    for piece in text.split("|"):
        head = piece.lstrip(".").partition(":")[0]
        if head.isdigit():
            seqs.append(int(head))
    return seqs


async def verify(url: str, results: list[StreamResult], chunks: int) -> dict[str, object]:
    """Compare each stored response with what its client received."""
    import aiohttp

    checked = mismatched = lost = duplicated = missing = not_completed = 0
    examples: list[str] = []
    limit = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, result: StreamResult) -> None:
        nonlocal checked, mismatched, lost, duplicated, missing, not_completed
        if result.status_code != 200:
            return  # refused (counted as a failed stream): no conversation was created
        if result.conversation_id is None:
            missing += 1
            return
        async with limit, session.get(f"{url}/history/{result.conversation_id}") as response:
            if response.status != 200:
                missing += 1
                return
            stored = await response.json()
        checked += 1
        if result.done_chunks is not None and stored.get("status") != "completed":
            not_completed += 1  # the client heard `done`, the database does not say so
        received = "".join(result.texts)
        seqs = upstream_seqs(stored["response"])
        duplicated += len(seqs) - len(set(seqs))
        lost += len(set(range(1, chunks + 1)) - set(seqs))
        if stored["response"] != received or stored.get("chunks") != len(result.texts):
            mismatched += 1
            if len(examples) < 3:
                examples.append(
                    f"{result.conversation_id}: stored {stored.get('chunks')} chunks "
                    f"({stored.get('status')}), received {len(result.texts)}"
                )

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, result) for result in results))
    return {
        "checked": checked,
        "not_found": missing,
        "mismatched": mismatched,
        "lost": lost,
        "duplicated": duplicated,
        "done_but_not_completed": not_completed,
        "examples": examples,
    }


def summarize(
    results: list[StreamResult],
    recorder: Recorder,
    chunks: int,
    concurrency: int,
    cpu_seconds: float,
) -> dict[str, object]:
    """The figures of one run."""
    ms = 1e-6
    latencies = [value * ms for value in recorder.latencies_ns]
    steady = [value * ms for value in recorder.steady_ns]
    steady_window = (recorder.steady_last_ns - recorder.steady_first_ns) / 1e9
    ttfc = [(r.first_chunk_ns - r.started_ns) * ms for r in results if r.first_chunk_ns]
    received = sum(len(r.texts) for r in results)
    window = (recorder.last_read_ns - recorder.first_read_ns) / 1e9
    problems: dict[str, int] = {}
    failed = 0
    for result in results:
        found = check_stream(result, chunks)
        failed += bool(found)
        for problem in found:
            key = problem if len(problem) < 80 else problem[:80]
            problems[key] = problems.get(key, 0) + 1
    duplicated_ids = sum(len(r.ids) - len(set(r.ids)) for r in results)
    return {
        "concurrency": concurrency,
        "streams": len(results),
        "streams_failed": failed,
        "streams_refused": sum(r.status_code not in (0, 200) for r in results),
        "problems": dict(sorted(problems.items(), key=lambda item: -item[1])[:10]),
        "chunks_expected": chunks * len(results),
        "chunks_received": received,
        "chunks_duplicated_by_id": duplicated_ids,
        "chunks_per_second": received / window if window > 0 else None,
        "window_seconds": window,
        "ttfc_ms": {"p50": percentile(ttfc, 0.50), "p99": percentile(ttfc, 0.99)},
        "chunk_latency_ms": latency_figures(latencies),
        # At full concurrency (>= 90% of C streams open): the headline figures.
        "steady_chunk_latency_ms": latency_figures(steady),
        "steady_chunks": len(steady),
        "steady_chunks_per_second": len(steady) / steady_window if steady_window > 0 else None,
        "reads_per_chunk": recorder.reads / received if received else None,
        "client_cpu_seconds": cpu_seconds,
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    recorder = Recorder(full=max(1, int(args.concurrency * 0.9)))
    if args.trace:
        recorder.trace = []
    results: list[StreamResult] = []
    started = 0
    stream_timeout = args.chunks * args.interval_ms / 1000 * 4 + 60
    deadline = time.monotonic() + args.max_seconds
    ramp = args.ramp if args.ramp is not None else args.chunks * args.interval_ms / 1000

    async def client(index: int) -> None:
        nonlocal started
        await asyncio.sleep(ramp * index / args.concurrency)
        while started < args.streams and time.monotonic() < deadline:
            started += 1
            prompt = (
                f"bench k={args.chunks} t={args.interval_ms:g} pad={args.pad} "
                f"stream {started} {random.getrandbits(32):08x}"
            )
            results.append(await run_stream(host, port, prompt, recorder, stream_timeout))

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(client(i) for i in range(args.concurrency)))
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    summary = summarize(results, recorder, args.chunks, args.concurrency, cpu)
    if recorder.trace is not None:
        summary["trace"] = recorder.trace  # written by main, once the loop has ended
    if args.verify:
        print(json.dumps({"phase": "streams_done"}), flush=True)
        summary["verification"] = await verify(args.url.rstrip("/"), results, args.chunks)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server under test")
    parser.add_argument("-c", "--concurrency", type=int, default=100, help="streams open at once")
    parser.add_argument("-s", "--streams", type=int, default=None, help="streams in all (3*C)")
    parser.add_argument("--chunks", type=int, default=50, help="chunks per stream (K)")
    parser.add_argument("--interval-ms", type=float, default=50, help="ms between chunks (T)")
    parser.add_argument("--pad", type=int, default=0, help="pad each chunk's text to N chars")
    parser.add_argument(
        "--ramp",
        type=float,
        default=None,
        help="seconds over which the C clients start (default: one stream's duration, "
        "so chunk emissions are spread evenly instead of arriving in bursts)",
    )
    parser.add_argument("--max-seconds", type=float, default=300, help="start no stream after")
    parser.add_argument("--verify", action="store_true", help="compare with GET /history/{id}")
    parser.add_argument(
        "--trace",
        help="write each chunk's read time (Unix ns) and latency (ns) to this file, "
        "to line latency up with what the server did at that moment",
    )
    args = parser.parse_args()
    if args.streams is None:
        args.streams = 3 * args.concurrency
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = uvloop.run if uvloop is not None else asyncio.run
    summary = runner(run(args))
    trace = summary.pop("trace", None)
    if trace is not None:
        with open(args.trace, "w") as out:
            out.writelines(f"{read} {latency}\n" for read, latency in trace)
    summary["pid"] = os.getpid()
    json.dump(summary, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    main()
