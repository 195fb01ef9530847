"""Token usage: the model's own counts stored with the end, estimates only where it gave none."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import psycopg
import pytest

from sse_llm.config import Settings
from tests.conftest import RunningServer, start_server
from tests.fake_upstream import FakeUpstream, Script
from tests.sse_client import Event, chunk_text, iter_events, stream_prompt


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def estimate(text: str) -> int:
    """sse-llm's estimate: characters / 4, rounded up."""
    return -(-len(text) // 4)


def run(server: RunningServer, prompt: str) -> tuple[str, list[Event]]:
    """Stream a prompt to the end through POST /stream; its id and events."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response, events = stream_prompt(client, prompt)
    assert response.status_code == 200
    return response.headers["x-conversation-id"], events


def stored_usage(db: psycopg.Connection, conversation_id: str) -> tuple[Any, ...]:
    row = db.execute(
        """
        SELECT prompt_tokens, completion_tokens, tokens_estimated, chunk_count, status
        FROM conversations WHERE id = %s
        """,
        (conversation_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def requests_for(upstream: FakeUpstream, prompt: str) -> list[dict[str, Any]]:
    """What the upstream received for this prompt, in order."""
    return [r for r in upstream.requests if r["messages"][-1]["content"] == prompt]


def openai_settings(base_settings: Settings, upstream: FakeUpstream) -> Settings:
    return base_settings.with_changes(
        provider="openai",
        openai_base_url=upstream.base_url,
        model="fake-model",
        first_chunk_timeout=2.0,
        chunk_timeout=2.0,
    )


def test_counts_are_stored_from_the_upstreams_usage_event(
    openai_server: RunningServer, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompt = unique("counted")
    upstream.script(prompt, Script(["Four", " words", " of", " answer"], usage=(321, 7)))
    conversation_id, _ = run(openai_server, prompt)
    (request,) = requests_for(upstream, prompt)
    assert request["stream_options"] == {"include_usage": True}
    assert stored_usage(db, conversation_id) == (321, 7, False, 4, "completed")
    stored = httpx.get(f"{openai_server.url}/history/{conversation_id}").json()
    assert stored["usage"] == {"prompt_tokens": 321, "completion_tokens": 7, "estimated": False}


def test_the_usage_event_is_never_a_chunk(
    openai_server: RunningServer, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompt = unique("no usage chunk")
    upstream.script(prompt, Script(["Only", " this"], usage=(11, 2)))
    conversation_id, events = run(openai_server, prompt)
    assert [e.id for e in events if e.event == "message"] == ["1", "2"]
    assert chunk_text(events) == "Only this"
    assert events[-1].event == "done" and events[-1].json["chunks"] == 2
    assert stored_usage(db, conversation_id)[3:] == (2, "completed")
    replayed = httpx.get(f"{openai_server.url}/conversations/{conversation_id}/stream")
    assert chunk_text(list(iter_events(replayed))) == "Only this"


def test_counts_on_the_finishing_event_are_read_too(
    openai_server: RunningServer, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompt = unique("usage on finish")  # as older llama.cpp servers send it
    upstream.script(prompt, Script(["A", " b"], usage=(55, 3), usage_on_finish=True))
    conversation_id, _ = run(openai_server, prompt)
    assert stored_usage(db, conversation_id) == (55, 3, False, 2, "completed")


def test_an_upstream_that_sends_no_usage_gets_an_estimate(
    openai_server: RunningServer, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompt = unique("no counts here")
    upstream.script(prompt, Script(["Twelve chars", " and more"], send_usage=False))
    conversation_id, _ = run(openai_server, prompt)
    expected = (estimate(prompt), estimate("Twelve chars and more"), True, 2, "completed")
    assert stored_usage(db, conversation_id) == expected
    stored = httpx.get(f"{openai_server.url}/history/{conversation_id}").json()
    assert stored["usage"]["estimated"] is True


def test_the_demo_provider_stores_estimates(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    prompt = unique("demo counts")
    conversation_id, events = run(demo_server, prompt)
    answer = chunk_text(events)
    assert stored_usage(db, conversation_id)[:3] == (estimate(prompt), estimate(answer), True)


def test_a_stream_that_broke_off_stores_an_estimate_and_is_not_retried(
    openai_server: RunningServer, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompt = unique("broken")
    upstream.script(prompt, Script(["Half", " of", " it"], usage=(9, 9), then="drop"))
    conversation_id, events = run(openai_server, prompt)
    assert events[-1].json["error"]["code"] == "upstream_error"
    expected = (estimate(prompt), estimate("Half of it"), True, 3, "failed")
    assert stored_usage(db, conversation_id) == expected
    assert len(requests_for(upstream, prompt)) == 1  # chunks had arrived: never again


def test_a_cancelled_stream_stores_an_estimate(
    openai_server: RunningServer, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompt = unique("cancel me")
    upstream.script(prompt, Script(["One", " two"], usage=(9, 9), then="stall"))
    events: list[Event] = []
    with (
        httpx.Client(base_url=openai_server.url, timeout=30) as client,
        client.stream("POST", "/stream", json={"prompt": prompt}) as response,
    ):
        conversation_id = response.headers["x-conversation-id"]
        for event in iter_events(response):
            events.append(event)
            if event.id == "2":
                client.post(f"/conversations/{conversation_id}/cancel").raise_for_status()
    assert events[-1].json["status"] == "cancelled"
    expected = (estimate(prompt), estimate("One two"), True, 2, "cancelled")
    assert stored_usage(db, conversation_id) == expected


@pytest.fixture
def front_door(openai_server: RunningServer) -> openai.OpenAI:
    """The official SDK on the openai-provider server's /v1."""
    return openai.OpenAI(base_url=f"{openai_server.url}/v1", api_key="unused", max_retries=0)


def test_v1_reports_the_upstreams_counts(
    front_door: openai.OpenAI, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompt = unique("v1 whole")
    upstream.script(prompt, Script(["Whole", " answer"], usage=(123, 4)))
    raw = front_door.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": prompt}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Whole answer"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (123, 4)
    assert completion.usage.total_tokens == 127
    assert stored_usage(db, raw.headers["x-conversation-id"])[:3] == (123, 4, False)


def test_v1_streaming_reports_them_in_its_final_usage_chunk(
    front_door: openai.OpenAI, upstream: FakeUpstream
) -> None:
    prompt = unique("v1 streamed")
    upstream.script(prompt, Script(["Streamed", " answer"], usage=(77, 5)))
    chunks = list(
        front_door.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert contents == ["", "Streamed", " answer", None]  # role, chunks, finish
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (77, 5)


def test_v1_reports_the_stored_estimate_where_the_upstream_gave_none(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": unique("estimated v1")},
    ]
    raw = client.chat.completions.with_raw_response.create(model="demo", messages=messages)
    completion = raw.parse()
    assert completion.usage is not None
    prompt_text = "".join(str(m["content"]) for m in messages)
    answer = completion.choices[0].message.content or ""
    counts = (completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert counts == (estimate(prompt_text), estimate(answer))
    assert stored_usage(db, raw.headers["x-conversation-id"])[:3] == (*counts, True)


@pytest.fixture(params=[400, 422])
def refusing(
    request: pytest.FixtureRequest, base_settings: Settings
) -> Iterator[tuple[RunningServer, FakeUpstream]]:
    """A server whose upstream predates stream_options and refuses it like real ones."""
    with FakeUpstream(refuse_stream_options=request.param) as upstream:
        server = start_server(openai_settings(base_settings, upstream))
        try:
            yield server, upstream
        finally:
            server.stop()


def test_an_upstream_that_refuses_stream_options_is_asked_once_then_never_again(
    refusing: tuple[RunningServer, FakeUpstream],
    db: psycopg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, upstream = refusing
    caplog.set_level(logging.WARNING, logger="sse_llm.providers.openai")
    first, second = unique("first"), unique("second")
    first_id, first_events = run(server, first)
    second_id, second_events = run(server, second)
    # The first request was refused, and sent again without the field; the second never
    # carried it.
    sent = [("stream_options" in r, r["messages"][-1]["content"]) for r in upstream.requests]
    assert sent == [(True, first), (False, first), (False, second)]
    for conversation_id, events, prompt in (
        (first_id, first_events, first),
        (second_id, second_events, second),
    ):
        assert events[-1].event == "done"
        answer = f"Echo: {prompt}"
        assert chunk_text(events) == answer
        assert stored_usage(db, conversation_id)[:3] == (estimate(prompt), estimate(answer), True)
    refusals = [r for r in caplog.records if "refuses stream_options" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.WARNING]  # logged once


def test_concurrent_refusals_are_logged_once(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sse_llm.providers.openai")
    prompts = [unique("together") for _ in range(3)]

    async def stream_all(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(prompt: str) -> int:
                response = await client.post("/stream", json={"prompt": prompt})
                return response.status_code

            return await asyncio.gather(*(one(prompt) for prompt in prompts))

    # Every request is in flight before the first refusal comes back: each is retried.
    with FakeUpstream(refuse_stream_options=400, refusal_delay=0.5) as upstream:
        server = start_server(openai_settings(base_settings, upstream))
        try:
            assert asyncio.run(stream_all(server.url)) == [200, 200, 200]
        finally:
            server.stop()
        assert sum("stream_options" in r for r in upstream.requests) == 3
        assert len(upstream.requests) == 6
    refusals = [r for r in caplog.records if "refuses stream_options" in r.getMessage()]
    assert len(refusals) == 1


def test_an_error_that_only_quotes_stream_options_changes_nothing_for_others(
    base_settings: Settings, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    # The upstream refuses this request for a reason of its own, quoting the body it got;
    # the same request without the field is refused too, so the field was not the reason.
    server = start_server(openai_settings(base_settings, upstream))
    try:
        quoting, after = unique("quoting"), unique("after")
        message = "bad request body: {'stream_options': {'include_usage': True}, ...}"
        upstream.script(quoting, Script(status=400, error_message=message))
        upstream.script(after, Script(["Still", " counted"], usage=(40, 2)))
        _, events = run(server, quoting)
        after_id, _ = run(server, after)
    finally:
        server.stop()
    assert events[-1].json["error"]["code"] == "upstream_error"
    assert ["stream_options" in r for r in requests_for(upstream, quoting)] == [True, False]
    (request,) = requests_for(upstream, after)
    assert request["stream_options"] == {"include_usage": True}
    assert stored_usage(db, after_id)[:3] == (40, 2, False)
