"""The OpenAI-compatible front door, driven by the official `openai` package."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import psycopg
import pytest

from sse_llm.config import Settings
from sse_llm.providers.demo import DemoProvider
from tests.conftest import RunningServer, start_server
from tests.fake_upstream import FakeUpstream, Script
from tests.sse_client import chunk_text, iter_events

KEY = "front-door-key"


def expected(prompt: str, tokens: int = 12) -> str:
    return "".join(DemoProvider(None, tokens, 0).answer(prompt))


@pytest.fixture
def client(demo_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_configured_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["demo"]


def test_streaming_completion_is_persisted_and_listed(
    client: openai.OpenAI, demo_server: RunningServer
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is SSE?"},
        {"role": "assistant", "content": "Server-sent events."},
        {"role": "user", "content": "And why persist each chunk?"},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    conversation_id = raw.headers["x-conversation-id"]
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected("And why persist each chunk?")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    # The demo reports no counts: the stored estimate, characters / 4 (test_usage.py).
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == -(-len(text) // 4)
    assert {c.id for c in chunks} == {f"chatcmpl-{conversation_id.replace('-', '')}"}

    stored = httpx.get(f"{demo_server.url}/history/{conversation_id}").json()
    assert stored["prompt"] == "And why persist each chunk?"
    assert stored["response"] == text
    assert stored["status"] == "completed"
    # Resumable like any other conversation.
    replay = httpx.get(
        f"{demo_server.url}/conversations/{conversation_id}/stream",
        headers={"Last-Event-ID": "10"},
    )
    assert chunk_text(list(iter_events(replay))) == text[len(chunk_text_upto(text, 10)) :]


def chunk_text_upto(text: str, count: int) -> str:
    """The first `count` demo chunks of `text` (word pieces with their leading space)."""
    words = text.split(" ")
    return " ".join(words[:count])


def test_whole_messages_array_is_kept(client: openai.OpenAI, db: psycopg.Connection) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "join"}],
        },
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=messages, temperature=0.2, max_tokens=5, user="u-1"
    )
    row = db.execute(
        "SELECT prompt, messages, parameters FROM conversations WHERE id = %s",
        (raw.headers["x-conversation-id"],),
    ).fetchone()
    assert row == ("parts join", messages, {"temperature": 0.2, "max_tokens": 5, "user": "u-1"})


def test_non_streaming_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "non streaming please"}]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected("non streaming please")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == -(-len(expected("non streaming please")) // 4)


def test_max_tokens_and_stop(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "short"}], max_tokens=3
    )
    assert short.choices[0].message.content == expected("short")[: len("[demo] This is")]
    assert short.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "stop early"}], stop=["demo provider"]
    )
    assert stopped.choices[0].message.content == "[demo] This is sse-llm's built-in "


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "system", "content": "no user"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0]",
        ),
    ],
)
def test_unsupported_or_invalid_requests_get_a_clear_400(
    client: openai.OpenAI, kwargs: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", **kwargs)
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


@pytest.fixture(scope="module")
def locked_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(base_settings.with_changes(api_key=KEY))
    yield running
    running.stop()


def test_the_sdk_api_key_is_the_credential(locked_server: RunningServer) -> None:
    right = openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key=KEY, max_retries=0)
    assert (
        right.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello"}])
        .choices[0]
        .message.content
    )
    wrong = openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_client_dropping_the_stream_does_not_lose_the_answer(base_settings: Settings) -> None:
    server = start_server(base_settings.with_changes(demo_tokens=30, demo_tokens_per_second=40))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "drop me"}], stream=True
        )
        conversation_id = raw.headers["x-conversation-id"]
        stream = raw.parse()
        received = ""
        for chunk in stream:
            received += chunk.choices[0].delta.content or ""
            if len(received.split()) >= 5:
                break
        stream.close()  # the client goes away mid-answer
        # It carries on and is saved; resuming gives the rest.
        with httpx.stream(
            "GET", f"{server.url}/conversations/{conversation_id}/stream", timeout=30
        ) as response:
            events = list(iter_events(response))
    finally:
        server.stop()
    assert events[-1].event == "done"
    full = chunk_text(events)
    assert full == expected("drop me", 30)
    assert full.startswith(received)


def test_dashboard_shows_the_transcript(client: openai.OpenAI, demo_server: RunningServer) -> None:
    messages = [
        {"role": "system", "content": "Answer like a <b>pirate</b>."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=messages, temperature=0.5
    )
    page = httpx.get(f"{demo_server.url}/conversations/{raw.headers['x-conversation-id']}")
    assert page.status_code == 200
    html = page.text
    assert "Transcript" in html
    positions = [html.index(text) for text in ("pirate", "first question", "first answer")]
    assert positions == sorted(positions)
    assert "Answer like a &lt;b&gt;pirate&lt;/b&gt;." in html  # escaped, not rendered
    assert "temperature=0.5" in html


def test_in_front_of_an_openai_compatible_upstream(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    client = openai.OpenAI(base_url=f"{openai_server.url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "relay this please"}],
        stream=True,
        temperature=0.3,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Echo: relay this please"
    sent = next(r for r in upstream.requests if r["messages"][-1]["content"] == "relay this please")
    assert sent["temperature"] == 0.3 and sent["model"] == "fake-model"

    upstream.script("fail upstream", Script(["Par", "tial"], then="drop"))
    broken = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "fail upstream"}], stream=True
    )
    received = ""
    with pytest.raises(openai.APIError) as raised:
        for chunk in broken:
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert received == "Partial"
    assert "broke off" in raised.value.message

    upstream.script("fail whole", Script(status=500, error_message="model crashed"))
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "fail whole"}]
        )
    assert failed.value.status_code == 502
    # Fixed text with the upstream's status: its own words stay in the log (SPEC 6).
    assert "HTTP 500" in failed.value.message
    assert "model crashed" not in failed.value.message
