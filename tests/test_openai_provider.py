"""The openai provider against a fake OpenAI-compatible server on a real socket (SPEC 1, 2)."""

from __future__ import annotations

import itertools
import logging
import time
import uuid

import httpx
import pytest

from sse_llm.config import Settings
from tests.conftest import RunningServer, start_server
from tests.fake_upstream import FakeUpstream, Script
from tests.sse_client import Event, chunk_text, stream_prompt
from tests.support import free_port, wait_until


def run(server: RunningServer, prompt: str) -> tuple[str, list[Event], dict]:
    """Stream a prompt to the end; return its id, its events and what was stored."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response, events = stream_prompt(client, prompt)
        assert response.status_code == 200
        conversation_id = response.headers["x-conversation-id"]
        stored = client.get(f"/history/{conversation_id}").json()
    return conversation_id, events, stored


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def test_streams_the_upstream_answer_and_stores_it(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    prompt = unique("hello upstream")
    _, events, stored = run(openai_server, prompt)
    assert events[0].event == "start" and events[0].json["model"] == "fake-model"
    assert events[-1].event == "done"
    assert chunk_text(events) == f"Echo: {prompt}"
    assert stored["response"] == f"Echo: {prompt}"
    assert (stored["status"], stored["provider"], stored["model"]) == (
        "completed",
        "openai",
        "fake-model",
    )
    request = next(r for r in upstream.requests if r["messages"][-1]["content"] == prompt)
    assert request["stream"] is True
    assert request["model"] == "fake-model"
    headers = upstream.headers[upstream.requests.index(request)]
    assert headers["authorization"] == "Bearer test-upstream-key"


def test_chunks_arrive_one_by_one_as_the_model_emits_them(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    prompt = unique("paced")
    upstream.script(prompt, Script([" one", " two", " three"], delay=0.3))
    arrivals = []
    with httpx.stream(
        "POST", f"{openai_server.url}/stream", json={"prompt": prompt}, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("id: "):
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 3
    assert all(0.2 < gap < 0.5 for gap in gaps), gaps  # not buffered until the end


def test_stalled_upstream_times_out_and_keeps_the_partial_answer(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    prompt = unique("stall")
    upstream.script(prompt, Script(["Partial", " answer"], then="stall"))
    before = upstream.closed_streams()
    _, events, stored = run(openai_server, prompt)
    end = events[-1]
    assert end.event == "error"
    assert end.json["status"] == "failed"
    assert end.json["error"]["code"] == "upstream_timeout"
    assert "LLM_CHUNK_TIMEOUT" in end.json["error"]["message"]
    assert chunk_text(events) == "Partial answer"
    assert (stored["status"], stored["response"]) == ("failed", "Partial answer")
    assert stored["error"]["code"] == "upstream_timeout"
    # The upstream request was closed.
    wait_until(lambda: upstream.closed_streams() > before, 5, message="the upstream stayed open")


def test_first_chunk_timeout(openai_server: RunningServer, upstream: FakeUpstream) -> None:
    prompt = unique("slow start")
    upstream.script(prompt, Script(["late"], first_delay=3))
    _, events, stored = run(openai_server, prompt)
    assert events[-1].json["error"]["code"] == "upstream_timeout"
    assert "LLM_FIRST_CHUNK_TIMEOUT" in events[-1].json["error"]["message"]
    assert stored["chunks"] == 0 and stored["response"] == ""


def test_total_timeout(base_settings: Settings, upstream: FakeUpstream) -> None:
    server = start_server(
        base_settings.with_changes(
            provider="openai", openai_base_url=upstream.base_url, total_timeout=1.0
        )
    )
    prompt = unique("never ending")
    upstream.script(prompt, Script([f" w{n}" for n in range(40)], delay=0.1))
    try:
        _, events, stored = run(server, prompt)
    finally:
        server.stop()
    assert events[-1].json["error"]["code"] == "upstream_timeout"
    assert "LLM_TOTAL_TIMEOUT" in events[-1].json["error"]["message"]
    assert 5 <= stored["chunks"] < 40
    assert stored["response"] == chunk_text(events)


def test_connection_dropped_mid_stream(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    prompt = unique("drop")
    upstream.script(prompt, Script(["Half", " of", " it"], then="drop"))
    _, events, stored = run(openai_server, prompt)
    assert events[-1].json["error"]["code"] == "upstream_error"
    assert chunk_text(events) == "Half of it"
    assert (stored["status"], stored["response"]) == ("failed", "Half of it")


def test_error_event_in_the_stream(openai_server: RunningServer, upstream: FakeUpstream) -> None:
    prompt = unique("error event")
    upstream.script(prompt, Script(["Some"], then="error_event", error_message="overloaded"))
    _, events, stored = run(openai_server, prompt)
    assert events[-1].json["error"]["code"] == "upstream_error"
    assert "error" in events[-1].json["error"]["message"]
    assert stored["response"] == "Some"


def test_upstream_http_500(openai_server: RunningServer, upstream: FakeUpstream) -> None:
    prompt = unique("five hundred")
    upstream.script(prompt, Script(status=500, error_message="model crashed"))
    _, events, stored = run(openai_server, prompt)
    error = events[-1].json["error"]
    assert error == {"code": "upstream_error", "message": "The model server answered HTTP 500."}
    assert stored["status"] == "failed"


# What a proxy or a model server may put in an error body: internal names, a trace, keys.
LEAKY_BODY = (
    "upstream connect error: llm-gpu-07.internal.corp:8443 refused; trace: at "
    "/srv/gateway/proxy.py line 88; Authorization: Bearer abc.DEF-ghi123; "
    "Incorrect API key provided: sk-proj-Zx81********************Qm2; url ?api_key=hunter2&x=1 "
    "\x00 \ud800 " + "padding " * 300
)
SECRETS = ("abc.DEF-ghi123", "sk-proj-Zx81", "Qm2", "hunter2")


def assert_logged_safely(caplog: pytest.LogCaptureFixture, marker: str) -> None:
    """One WARNING names what the upstream said, its secrets masked, at most 500 bytes of it."""
    lines = [r.getMessage() for r in caplog.records if marker in r.getMessage()]
    assert lines, "the upstream's error was not logged"
    assert all(r.levelno == logging.WARNING for r in caplog.records if marker in r.getMessage())
    for line in lines:
        body = line.split(": ", 1)[1]
        assert len(body.encode()) <= 500
        assert not any(secret in line for secret in SECRETS), line
        assert "Bearer ***" in line and "sk-***" in line and "api_key=***" in line


def test_an_upstream_error_body_reaches_only_the_log_masked_and_bounded(
    openai_server: RunningServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = unique("leaky gateway")
    upstream.script(prompt, Script(status=502, error_message=LEAKY_BODY))
    with caplog.at_level(logging.WARNING, logger="sse_llm.providers.openai"):
        _, events, stored = run(openai_server, prompt)
    fixed = {"code": "upstream_error", "message": "The model server answered HTTP 502."}
    assert events[-1].json["error"] == fixed
    assert stored["error"] == fixed
    assert_logged_safely(caplog, "llm-gpu-07.internal.corp")


def test_an_error_event_mid_stream_reaches_only_the_log_masked_and_bounded(
    openai_server: RunningServer, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = unique("leaky event")
    upstream.script(prompt, Script(["Some"], then="error_event", error_message=LEAKY_BODY))
    with caplog.at_level(logging.WARNING, logger="sse_llm.providers.openai"):
        _, events, stored = run(openai_server, prompt)
    message = "The model server reported an error in the middle of the answer."
    assert events[-1].json["error"] == {"code": "upstream_error", "message": message}
    assert stored["error"] == {"code": "upstream_error", "message": message}
    assert (stored["status"], stored["response"]) == ("failed", "Some")
    assert_logged_safely(caplog, "llm-gpu-07.internal.corp")


def test_unreachable_upstream(base_settings: Settings) -> None:
    server = start_server(
        base_settings.with_changes(
            provider="openai", openai_base_url=f"http://127.0.0.1:{free_port()}/v1"
        )
    )
    try:
        _, events, stored = run(server, "anyone there?")
    finally:
        server.stop()
    assert events[-1].json["error"]["code"] == "upstream_unavailable"
    assert stored["status"] == "failed"
    assert stored["error"]["code"] == "upstream_unavailable"


def test_a_cookie_the_upstream_sets_for_one_user_is_never_sent_for_another(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    # One HTTP client serves every user: a cookie jar in it would carry one user's
    # upstream session into the next user's request.
    first, second = unique("cookie setter"), unique("cookie victim")
    upstream.script(first, Script([" a"], set_cookie="session=first-user-secret; Path=/"))
    run(openai_server, first)
    run(openai_server, second)
    request = next(r for r in upstream.requests if r["messages"][-1]["content"] == second)
    headers = upstream.headers[upstream.requests.index(request)]
    assert "cookie" not in headers


def test_hostile_upstream_text_is_stored_safely(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    prompt = unique("hostile")
    upstream.script(prompt, Script(["nul\x00here", " \ud800lone", " <script>x</script>"]))
    _, events, stored = run(openai_server, prompt)
    assert events[-1].event == "done"
    assert stored["response"] == chunk_text(events)
    assert "\x00" not in stored["response"]
    assert "<script>x</script>" in stored["response"]
