"""SPEC 7 and issue 6: metrics, request ids and logs, OpenAPI, health, limits."""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from openapi_spec_validator import validate
from starlette.requests import Request

from sse_llm.config import Settings
from sse_llm.http_protocol import BoundedHttpToolsProtocol
from sse_llm.limits import RateLimiter, client_key
from sse_llm.logs import JsonFormatter, TextFormatter
from tests.conftest import RunningServer, start_server, word
from tests.fake_upstream import FakeUpstream, Script
from tests.sse_client import iter_events, stream_prompt
from tests.support import wait_until


def metric(text: str, name: str, default: float | None = None) -> float:
    """The value of one sample line (`name{labels} value`) of a Prometheus exposition."""
    pattern = re.compile(rf"^{re.escape(name)} ([0-9.e+-]+)$", re.MULTILINE)
    match = pattern.search(text)
    if match is None and default is not None:
        return default
    assert match is not None, f"{name} not in metrics"
    return float(match.group(1))


def test_metrics_count_requests_streams_chunks_and_latencies(demo_server: RunningServer) -> None:
    with httpx.Client(base_url=demo_server.url) as client:
        before = client.get("/metrics").text
        stream_prompt(client, "count me")
        client.get("/history/not-a-uuid")
        after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert metric(text, "sse_llm_chunks_total") - metric(before, "sse_llm_chunks_total") == 12
    streams = 'sse_llm_streams_total{status="completed"}'
    assert metric(text, streams) - metric(before, streams, default=0) == 1
    assert metric(text, "sse_llm_active_streams") == 0
    assert metric(text, "sse_llm_time_to_first_chunk_seconds_count") >= 1
    assert metric(text, "sse_llm_chunk_delivery_seconds_count") >= 12
    assert metric(text, "sse_llm_persist_batch_seconds_count") >= 1
    assert metric(text, "sse_llm_persist_batch_size_sum") >= 12
    assert 'sse_llm_requests_total{method="POST",route="stream",status="200"}' in text
    assert 'sse_llm_requests_total{method="GET",route="history_item",status="404"}' in text
    assert 'sse_llm_db_pool_connections{pool="streaming",state="idle"}' in text
    assert 'sse_llm_db_pool_connections{pool="queries",state="idle"}' in text


def test_stream_errors_are_counted_by_code(demo_server: RunningServer) -> None:
    with httpx.Client(base_url=demo_server.url) as client:
        with client.stream("POST", "/stream", json={"prompt": "count a cancel"}) as response:
            conversation_id = response.headers["x-conversation-id"]
            client.post(f"/conversations/{conversation_id}/cancel")
            list(iter_events(response))
        text = client.get("/metrics").text
    assert metric(text, 'sse_llm_stream_errors_total{code="cancelled"}') >= 1


def test_every_response_has_a_request_id(demo_server: RunningServer) -> None:
    plain = httpx.get(f"{demo_server.url}/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", plain.headers["x-request-id"])
    given = httpx.get(f"{demo_server.url}/healthz", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    hostile = httpx.get(
        f"{demo_server.url}/healthz", headers={"X-Request-Id": "a b\tc" + "x" * 100}
    )
    assert hostile.headers["x-request-id"] != "a b\tc" + "x" * 100


def test_one_log_line_per_request_and_per_stream_without_the_prompt(
    demo_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "my secret prompt text"
    caplog.set_level(logging.INFO)
    with httpx.Client(base_url=demo_server.url) as client:
        response, _ = stream_prompt(client, secret, headers={"X-Request-Id": "trace-77"})
    conversation_id = response.headers["x-conversation-id"]

    def mine() -> list[logging.LogRecord]:
        return [
            r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "trace-77"
        ]

    # The request's line is written as its response finishes, just after the last event.
    wait_until(lambda: len(mine()) >= 2, 5, message="the request's log lines are missing")
    kinds = sorted(r.getMessage() for r in mine())
    assert kinds == ["request", "stream ended"]
    stream_line = next(r for r in mine() if r.getMessage() == "stream ended")
    assert stream_line.fields["conversation_id"] == conversation_id  # type: ignore[attr-defined]
    assert stream_line.fields["status"] == "completed"  # type: ignore[attr-defined]
    assert stream_line.fields["chunks"] == 12  # type: ignore[attr-defined]
    assert "ttfc_ms" in stream_line.fields and "duration_ms" in stream_line.fields  # type: ignore[attr-defined]
    request_line = next(r for r in mine() if r.getMessage() == "request")
    assert request_line.fields["conversation_id"] == conversation_id  # type: ignore[attr-defined]
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            assert secret not in TextFormatter().format(record)


def test_log_formats() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"status": 200, "path": "/history"}
    assert TextFormatter().format(record).endswith("request status=200 path=/history")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "request"
    assert entry["status"] == 200 and entry["level"] == "info"


def test_openapi_document_is_valid_and_covers_every_json_route(
    demo_server: RunningServer,
) -> None:
    document = httpx.get(f"{demo_server.url}/openapi.json").json()
    validate(document)
    assert set(document["paths"]) >= {
        "/stream",
        "/conversations/{conversation_id}/stream",
        "/conversations/{conversation_id}/cancel",
        "/history",
        "/history/{conversation_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    }


def test_health_endpoints(demo_server: RunningServer) -> None:
    assert httpx.get(f"{demo_server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{demo_server.url}/readyz").json() == {"status": "ready"}


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(2, 60)
    assert limiter.acquire("a", now=0) is None
    assert limiter.acquire("a", now=0) is None
    wait = limiter.acquire("a", now=0)
    assert wait == pytest.approx(30)
    assert limiter.acquire("b", now=0) is None  # other clients are not affected
    assert limiter.acquire("a", now=31) is None


@pytest.fixture(scope="module")
def limited_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(base_settings.with_changes(rate_limit="3/minute", max_streams=1000))
    yield running
    running.stop()


def test_too_many_streams_from_one_client_get_429(limited_server: RunningServer) -> None:
    with httpx.Client(base_url=limited_server.url) as client:
        for _ in range(3):
            assert stream_prompt(client, "allowed")[0].status_code == 200
        refused, _ = stream_prompt(client, "one too many")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 20


def test_made_up_bearer_values_and_cookies_do_not_earn_a_client_more_streams(
    base_settings: Settings,
) -> None:
    server = start_server(base_settings.with_changes(rate_limit="3/minute"))
    try:
        statuses = []
        for attempt in range(12):  # six random bearer values and six random cookies
            value = secrets.token_urlsafe(16)
            if attempt % 2 == 0:
                headers = {"Authorization": f"Bearer {value}"}
            else:
                headers = {"Cookie": f"sse_llm_session={value}", "Origin": server.url}
            with httpx.Client(base_url=server.url, headers=headers) as client:
                statuses.append(stream_prompt(client, "made up")[0].status_code)
    finally:
        server.stop()
    assert statuses == [200] * 3 + [429] * 9  # one client: one address


def test_each_signed_in_browser_has_a_limit_of_its_own(base_settings: Settings) -> None:
    server = start_server(base_settings.with_changes(rate_limit="3/minute", api_key="k"))
    try:
        sessions = []
        for _ in range(2):
            login = httpx.post(
                f"{server.url}/login", data={"key": "k"}, headers={"Origin": server.url}
            )
            sessions.append({"sse_llm_session": login.cookies["sse_llm_session"]})
        origin = {"Origin": server.url}
        with httpx.Client(base_url=server.url, headers=origin) as client:
            first = [
                stream_prompt(client, "first", cookies=sessions[0])[0].status_code for _ in range(4)
            ]
            second = stream_prompt(client, "second", cookies=sessions[1])[0].status_code
    finally:
        server.stop()
    assert first == [200, 200, 200, 429]
    assert second == 200  # the same address, another session


def key_of(address: str) -> str:
    """The rate limit's key for a client without a session at `address`."""
    return client_key(Request({"type": "http", "client": (address, 40000), "headers": []}))


def test_an_ipv6_client_is_one_client_across_its_64_network() -> None:
    assert key_of("2001:db8:1:2::5") == key_of("2001:db8:1:2:ffff:1:2:3")
    assert key_of("2001:db8:1:2::5") != key_of("2001:db8:1:3::5")
    assert key_of("::ffff:192.0.2.7") == key_of("192.0.2.7")
    assert key_of("192.0.2.7") != key_of("192.0.2.8")


@pytest.mark.slow
def test_streams_beyond_the_cap_get_503(base_settings: Settings) -> None:
    server = start_server(
        base_settings.with_changes(max_streams=1, demo_tokens=40, demo_tokens_per_second=20)
    )
    try:
        with (
            httpx.Client(base_url=server.url) as client,
            client.stream("POST", "/stream", json={"prompt": "first"}) as first,
        ):
            assert first.status_code == 200
            second, _ = stream_prompt(client, "second")
            assert second.status_code == 503
            assert second.json()["error"]["code"] == "too_many_streams"
    finally:
        server.stop()


@dataclass
class Attempt:
    """One stream of a burst: its answer, and when it ran (monotonic seconds) if it did."""

    status: int = 0
    code: str | None = None
    retry_after: str | None = None
    started: float = 0.0
    ended: float = 0.0
    end_event: str | None = None


def _stream_at_the_barrier(url: str, prompt: str, barrier: threading.Barrier) -> Attempt:
    attempt = Attempt()
    with httpx.Client(base_url=url, timeout=60) as client:
        barrier.wait()  # every thread sends its request at the same moment
        with client.stream("POST", "/stream", json={"prompt": prompt}) as response:
            attempt.status = response.status_code
            if response.status_code != 200:
                response.read()
                attempt.code = response.json()["error"]["code"]
                attempt.retry_after = response.headers.get("retry-after")
                return attempt
            events = iter_events(response)
            next(events)  # start: the generation runs
            attempt.started = time.monotonic()
            attempt.end_event = [event.event for event in events][-1]
            attempt.ended = time.monotonic()
    return attempt


def most_at_once(attempts: list[Attempt]) -> int:
    """The largest number of streams that ran at the same moment."""
    moments = sorted(
        [(a.started, 1) for a in attempts if a.status == 200]
        + [(a.ended, -1) for a in attempts if a.status == 200]
    )
    running = peak = 0
    for _, change in moments:  # an end sorts before a start at the same moment
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_a_burst_of_simultaneous_streams_runs_no_more_than_the_cap(
    base_settings: Settings, db: psycopg.Connection
) -> None:
    """30 requests at once under SSE_LLM_MAX_STREAMS=5: those still creating their row
    count too, so 5 run, 25 get 503 `too_many_streams` with Retry-After and create nothing."""
    server = start_server(
        base_settings.with_changes(max_streams=5, demo_tokens=30, demo_tokens_per_second=10)
    )
    tag = word()
    barrier = threading.Barrier(30)
    try:
        with ThreadPoolExecutor(30) as pool:
            futures = [
                pool.submit(_stream_at_the_barrier, server.url, f"{tag} {n}", barrier)
                for n in range(30)
            ]
            attempts = [future.result(timeout=120) for future in futures]
    finally:
        server.stop()
    ran = [a for a in attempts if a.status == 200]
    refused = [a for a in attempts if a.status != 200]
    assert most_at_once(attempts) <= 5
    assert len(ran) == 5, [(a.status, a.code) for a in attempts]  # all start before any ends
    assert all(a.end_event == "done" for a in ran)
    assert {(a.status, a.code, a.retry_after) for a in refused} == {(503, "too_many_streams", "1")}
    rows = db.execute(
        "SELECT status, count(*) FROM conversations WHERE prompt LIKE %s GROUP BY status",
        (f"{tag} %",),
    ).fetchall()
    assert rows == [("completed", 5)]


def test_a_stream_whose_row_could_not_be_created_gives_its_slot_back(
    base_settings: Settings, database_url: str, db: psycopg.Connection
) -> None:
    """Under SSE_LLM_MAX_STREAMS=1, a create that fails (the writer's connection drops
    while it waits for a lock) answers 503 and frees the one slot for the next stream."""
    server = start_server(base_settings.with_changes(max_streams=1))
    try:
        with psycopg.connect(database_url, autocommit=True) as blocker:
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE conversations IN EXCLUSIVE MODE")
            answers: list[httpx.Response] = []
            failing = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(f"{server.url}/stream", json={"prompt": "x"}, timeout=30)
                )
            )
            failing.start()
            writer = backend_waiting_for_lock(db, "INSERT INTO conversations")
            db.execute("SELECT pg_terminate_backend(%s)", (writer,))
            failing.join(30)
            blocker.execute("ROLLBACK")
        assert answers[0].status_code == 503
        assert answers[0].json()["error"]["code"] == "database_unavailable"
        with httpx.Client(base_url=server.url, timeout=30) as client:
            response, events = stream_prompt(client, "the slot is free again")
        assert response.status_code == 200 and events[-1].event == "done"
    finally:
        server.stop()


def backend_waiting_for_lock(db: psycopg.Connection, statement: str) -> int:
    """The process id of the connection whose `statement` waits for a lock, once it does."""

    def waiting() -> tuple[int] | None:
        return db.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{statement}%",),
        ).fetchone()

    return int(wait_until(waiting, 10, message=f"nobody waited to run {statement}")[0])


def test_oversized_headers_and_urls_are_refused_by_the_server(demo_server: RunningServer) -> None:
    host, port = demo_server.url.removeprefix("http://").split(":")
    for request in (
        b"GET /history HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /history?q=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request)
            reply = sock.recv(1024)
        assert reply.startswith(b"HTTP/1.1 4"), reply[:80]


class QuickToDropProtocol(BoundedHttpToolsProtocol):
    stalled_client_timeout = 0.5


def test_a_client_that_stops_reading_is_dropped_and_its_answer_still_saved(
    base_settings: Settings,
    upstream: FakeUpstream,
    db: psycopg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 3 MB of answer at full speed: far more than the sockets' buffers hold, so the
    # server's write buffer fills and stays full while the client reads nothing.
    upstream.script("never read", Script(["x" * 8000] * 400))
    settings = base_settings.with_changes(
        provider="openai", openai_base_url=upstream.base_url, model="fake-model"
    )
    server = start_server(settings, http=QuickToDropProtocol)
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "never read"}).encode()
    request = (
        b"POST /stream HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        with caplog.at_level(logging.INFO), socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(request)
            head = sock.recv(4096)  # the headers (and perhaps a little more); then nothing
            conversation_id = re.search(rb"x-conversation-id: ([0-9a-f-]+)", head, re.I)
            assert conversation_id is not None, head[:300]
            deadline = time.monotonic() + 20
            wait_until(
                lambda: any("read nothing" in r.getMessage() for r in caplog.records),
                20,
                message="the stalled client was not dropped",
            )
            # Its request ends (logged once the response returns), and the answer is whole.
            wait_until(
                lambda: any(
                    getattr(r, "fields", {}).get("route") == "stream" for r in caplog.records
                ),
                deadline - time.monotonic(),  # one deadline for both waits
                message="the stalled stream did not end",
            )
        stored = wait_for_status(db, conversation_id.group(1).decode(), "completed")
        assert stored == ("completed", 400, 400 * 8000)
    finally:
        server.stop()


def wait_for_status(
    db: psycopg.Connection, conversation_id: str, status: str
) -> tuple[str, int, int]:
    """The conversation's (status, chunk count, response length) once it has `status`."""

    def reached() -> tuple[str, int, int] | None:
        row = db.execute(
            "SELECT status, chunk_count, length(response) FROM conversations WHERE id = %s",
            (conversation_id,),
        ).fetchone()
        return row if row is not None and row[0] == status else None

    return wait_until(reached, 20, message=f"the conversation never became {status}")
