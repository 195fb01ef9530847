"""POST /stream (SPEC 2): events in order, every chunk persisted before it is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from sse_llm.config import Settings
from sse_llm.providers.demo import DemoProvider
from tests.conftest import RunningServer, start_server
from tests.sse_client import aiter_events, chunk_text, iter_events, stream_prompt
from tests.support import wait_until


@pytest.fixture(scope="module")
def slow_server(base_settings: Settings) -> Iterator[RunningServer]:
    """A demo server slow enough to act in the middle of a stream (20 tokens at 40/s)."""
    running = start_server(
        base_settings.with_changes(demo_tokens=20, demo_tokens_per_second=40, ping_interval=0.2)
    )
    yield running
    running.stop()


def test_stream_sends_start_chunks_in_order_then_done(demo_server: RunningServer) -> None:
    with httpx.Client(base_url=demo_server.url) as client:
        response, events = stream_prompt(client, "Explain server-sent events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    conversation_id = response.headers["x-conversation-id"]

    start, *chunks, done = events
    assert start.event == "start"
    assert start.json["id"] == conversation_id
    assert start.json["model"] == "demo"
    assert "T" in start.json["created_at"]
    assert [c.event for c in chunks] == ["message"] * 12
    assert [c.id for c in chunks] == [str(n) for n in range(1, 13)]
    assert done.event == "done"
    assert done.json == {"id": conversation_id, "status": "completed", "chunks": 12}


def test_concatenated_chunks_equal_the_stored_response(demo_server: RunningServer) -> None:
    prompt = "What is a write-ahead log?"
    with httpx.Client(base_url=demo_server.url) as client:
        response, events = stream_prompt(client, prompt)
        conversation_id = response.headers["x-conversation-id"]
        stored = client.get(f"/history/{conversation_id}").json()
    received = chunk_text(events)
    assert received == "".join(DemoProvider(None, 12, 0).answer(prompt))
    assert stored["response"] == received
    assert stored["status"] == "completed"
    assert stored["chunks"] == 12
    assert stored["prompt"] == prompt
    assert stored["provider"] == "demo"
    assert stored["error"] is None
    assert stored["completed_at"] is not None


def test_prompt_is_stored_trimmed(demo_server: RunningServer) -> None:
    with httpx.Client(base_url=demo_server.url) as client:
        response, _ = stream_prompt(client, "  padded prompt \n")
        stored = client.get(f"/history/{response.headers['x-conversation-id']}").json()
    assert stored["prompt"] == "padded prompt"


def test_conversation_exists_before_the_first_byte(slow_server: RunningServer) -> None:
    with (
        httpx.Client(base_url=slow_server.url) as client,
        client.stream("POST", "/stream", json={"prompt": "row first"}) as response,
    ):
        # Only the headers have arrived: the row must already be there.
        conversation_id = response.headers["x-conversation-id"]
        stored = client.get(f"/history/{conversation_id}")
        assert stored.status_code == 200
        assert stored.json()["status"] == "streaming"


def test_every_chunk_is_persisted_before_the_client_gets_it(
    slow_server: RunningServer, db: psycopg.Connection
) -> None:
    checked = 0
    with (
        httpx.Client(base_url=slow_server.url) as client,
        client.stream("POST", "/stream", json={"prompt": "persist first"}) as response,
    ):
        conversation_id = response.headers["x-conversation-id"]
        for event in iter_events(response):
            if event.event != "message":
                continue
            row = db.execute(
                "SELECT text FROM chunks WHERE conversation_id = %s AND seq = %s",
                (conversation_id, int(event.id or 0)),
            ).fetchone()
            assert row is not None, f"chunk {event.id} was sent before it was stored"
            assert row[0] == event.json["text"]
            checked += 1
    assert checked == 20


def test_streaming_conversation_shows_what_is_persisted_so_far(slow_server: RunningServer) -> None:
    with (
        httpx.Client(base_url=slow_server.url) as client,
        client.stream("POST", "/stream", json={"prompt": "partial view"}) as response,
    ):
        conversation_id = response.headers["x-conversation-id"]
        received = []
        for event in iter_events(response):
            if event.event == "message":
                received.append(event)
            if len(received) == 5:
                break
        stored = client.get(f"/history/{conversation_id}").json()
    assert stored["status"] == "streaming"
    assert stored["chunks"] >= 5
    assert stored["response"].startswith(chunk_text(received))


def test_client_disconnect_mid_stream_still_completes(slow_server: RunningServer) -> None:
    with httpx.Client(base_url=slow_server.url) as client:
        with client.stream("POST", "/stream", json={"prompt": "walk away"}) as response:
            conversation_id = response.headers["x-conversation-id"]
            for event in iter_events(response):
                if event.id == "3":
                    break  # closing the response drops the connection mid-stream
        stored = wait_until(
            lambda: (lambda c: c if c["status"] != "streaming" else None)(
                client.get(f"/history/{conversation_id}").json()
            )
        )
    assert stored["status"] == "completed"
    assert stored["chunks"] == 20
    assert stored["response"] == "".join(DemoProvider(None, 20, 0).answer("walk away"))


@pytest.mark.slow
def test_idle_stream_gets_ping_comments(base_settings: Settings) -> None:
    # 2 chunks a second, pings after 0.2 s of nothing: pings between the chunks, on both
    # streaming routes, and the data is untouched.
    server = start_server(
        base_settings.with_changes(demo_tokens=3, demo_tokens_per_second=2, ping_interval=0.2)
    )
    chat = {"messages": [{"role": "user", "content": "slow"}], "stream": True}
    try:
        with httpx.Client(base_url=server.url) as client:
            with client.stream("POST", "/stream", json={"prompt": "slow"}) as response:
                lines = list(response.iter_lines())
            with client.stream("POST", "/v1/chat/completions", json=chat) as response:
                chat_lines = list(response.iter_lines())
    finally:
        server.stop()
    assert ": ping" in lines
    assert lines[-3].startswith("event: done")
    assert ": ping" in chat_lines
    assert chat_lines[-2] == "data: [DONE]"


@pytest.mark.slow
def test_no_ping_while_chunks_flow(base_settings: Settings) -> None:
    # A chunk every 50 ms for two seconds, pings after 0.6 s of nothing: a ping is only
    # for a stream with nothing else to send (SPEC 2). A timer that pinged regardless
    # would ping three times; a gap of 0.6 s (a stalled disk, say) could ping once.
    server = start_server(
        base_settings.with_changes(demo_tokens=40, demo_tokens_per_second=20, ping_interval=0.6)
    )
    try:
        with (
            httpx.Client(base_url=server.url) as client,
            client.stream("POST", "/stream", json={"prompt": "steady"}) as response,
        ):
            lines = list(response.iter_lines())
    finally:
        server.stop()
    assert lines[-3].startswith("event: done")
    assert ": ping" not in lines, lines


async def test_hundred_concurrent_streams_are_stored_exactly(demo_server: RunningServer) -> None:
    prompts = [f"concurrent prompt number {n} about topic {n * 7}" for n in range(100)]
    limits = httpx.Limits(max_connections=100)

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[str, str, str]:
        async with client.stream("POST", "/stream", json={"prompt": prompt}) as response:
            assert response.status_code == 200
            events = [event async for event in aiter_events(response)]
        assert events[-1].event == "done"
        return prompt, response.headers["x-conversation-id"], chunk_text(events)

    async with httpx.AsyncClient(base_url=demo_server.url, limits=limits, timeout=60) as client:
        results = await asyncio.gather(*(one(client, p) for p in prompts))
        assert len({cid for _, cid, _ in results}) == 100
        for prompt, conversation_id, received in results:
            expected = "".join(DemoProvider(None, 12, 0).answer(prompt))
            assert received == expected, "a client got another stream's text"
            stored = (await client.get(f"/history/{conversation_id}")).json()
            assert stored["prompt"] == prompt
            assert stored["response"] == expected
            assert stored["chunks"] == 12
