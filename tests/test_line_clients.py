"""SPEC 2, 3 and the /v1 stream: a client that splits the stream with str.splitlines()
(httpx's iter_lines(), the README's example) reads every event whole.

JSON leaves U+0085, U+2028 and U+2029 raw, and splitlines() breaks lines on them; the
model's text, or a model name, holding one must not cut a `data:` line in two.
"""

from __future__ import annotations

import json
import uuid

import httpx

from tests.conftest import RunningServer
from tests.fake_upstream import FakeUpstream, Script
from tests.sse_client import chunk_text, iter_events

# One chunk per line break splitlines() knows and JSON does not escape, and one with all.
CHUNKS = ["one\u2028line", " two\u2029paragraphs", " next\x85line", " all\u2028\u2029\x85 end"]
RAW_BREAKS = ("\u2028".encode(), "\u2029".encode(), "\x85".encode())


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def test_native_stream_events_survive_line_splitting(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    prompt = unique("separators native")
    upstream.script(prompt, Script(CHUNKS))
    with httpx.Client(base_url=openai_server.url, timeout=30) as client:
        with client.stream("POST", "/stream", json={"prompt": prompt}) as response:
            events = list(iter_events(response))  # iter_lines() underneath
        conversation_id = response.headers["x-conversation-id"]
        stored = client.get(f"/history/{conversation_id}").json()
        # The replay of a finished conversation: start, every chunk, done.
        with client.stream("GET", f"/conversations/{conversation_id}/stream") as replay:
            replayed = list(iter_events(replay))
    for received in (events, replayed):
        assert [e.event for e in received] == ["start"] + ["message"] * len(CHUNKS) + ["done"]
        assert [e.json["text"] for e in received if e.event == "message"] == CHUNKS
        assert [e.id for e in received if e.event == "message"] == ["1", "2", "3", "4"]
    assert stored["response"] == chunk_text(events) == "".join(CHUNKS)


def test_v1_stream_events_survive_line_splitting(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    prompt = unique("separators v1")
    upstream.script(prompt, Script(CHUNKS))
    body = {
        # The model name is in every chunk of the /v1 stream, and in the native start event.
        "model": "fake\u2028model\x85v2",
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
    }
    with httpx.Client(base_url=openai_server.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            raw = b"".join(response.iter_raw())
        lines = raw.decode().splitlines()
        conversation_id = response.headers["x-conversation-id"]
        with client.stream("GET", f"/conversations/{conversation_id}/stream") as attach:
            native = list(iter_events(attach))
    assert not any(separator in raw for separator in RAW_BREAKS)
    data = [line.removeprefix("data: ") for line in lines if line]
    assert all(line.startswith("data: ") for line in lines if line), lines
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]  # every line is a whole event
    assert {event["model"] for event in events} == {"fake\u2028model\x85v2"}
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "".join(CHUNKS)
    assert native[0].event == "start" and native[0].json["model"] == "fake\u2028model\x85v2"
    assert chunk_text(native) == text
