"""Attach, resume and cancel (SPEC 3) within one process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sse_llm.config import Settings
from sse_llm.providers.demo import DemoProvider
from tests.conftest import RunningServer, start_server
from tests.sse_client import Event, chunk_text, iter_events, stream_prompt

TOKENS = 20


@pytest.fixture(scope="module")
def slow_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(
        base_settings.with_changes(demo_tokens=TOKENS, demo_tokens_per_second=40)
    )
    yield running
    running.stop()


def expected(prompt: str) -> str:
    return "".join(DemoProvider(None, TOKENS, 0).answer(prompt))


def read_until(stream: Iterator[Event], last_id: int) -> list[Event]:
    """Read events until the chunk with id `last_id`."""
    events = []
    for event in stream:
        events.append(event)
        if event.id == str(last_id):
            break
    return events


def attach(
    client: httpx.Client, conversation_id: str, **kwargs
) -> tuple[httpx.Response, list[Event]]:  # type: ignore[no-untyped-def]
    with client.stream("GET", f"/conversations/{conversation_id}/stream", **kwargs) as response:
        events = list(iter_events(response)) if response.status_code == 200 else []
        if response.status_code != 200:
            response.read()
    return response, events


def test_reconnect_with_last_event_id_gets_exactly_the_rest(slow_server: RunningServer) -> None:
    prompt = "resume me please"
    with httpx.Client(base_url=slow_server.url) as client:
        with client.stream("POST", "/stream", json={"prompt": prompt}) as response:
            conversation_id = response.headers["x-conversation-id"]
            before = read_until(iter_events(response), 7)
        # The client dropped after chunk 7; it comes back with Last-Event-ID: 7.
        response, after = attach(client, conversation_id, headers={"Last-Event-ID": "7"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert [e.event for e in after][-1] == "done"
    assert "start" not in [e.event for e in after]
    assert [e.id for e in after if e.event == "message"] == [str(n) for n in range(8, TOKENS + 1)]
    assert chunk_text(before) + chunk_text(after) == expected(prompt)


def test_header_wins_over_query_parameter(slow_server: RunningServer) -> None:
    with httpx.Client(base_url=slow_server.url) as client:
        response, _ = stream_prompt(client, "header or query")
        conversation_id = response.headers["x-conversation-id"]
        _, by_query = attach(client, conversation_id, params={"last_event_id": "15"})
        _, both = attach(
            client, conversation_id, params={"last_event_id": "15"}, headers={"Last-Event-ID": "18"}
        )
    assert [e.id for e in by_query if e.event == "message"] == ["16", "17", "18", "19", "20"]
    assert [e.id for e in both if e.event == "message"] == ["19", "20"]


def test_replay_of_a_finished_conversation_from_the_start(slow_server: RunningServer) -> None:
    prompt = "replay all"
    with httpx.Client(base_url=slow_server.url) as client:
        response, original = stream_prompt(client, prompt)
        conversation_id = response.headers["x-conversation-id"]
        with client.stream("GET", f"/conversations/{conversation_id}/stream") as replay:
            lines = list(replay.iter_lines())
        _, events = attach(client, conversation_id)
    assert lines[0] == "retry: 1000"  # tells EventSource how soon to reconnect
    assert [(e.event, e.id, e.data) for e in events] == [(e.event, e.id, e.data) for e in original]


def test_finished_conversation_with_nothing_new_is_204(slow_server: RunningServer) -> None:
    with httpx.Client(base_url=slow_server.url) as client:
        response, _ = stream_prompt(client, "nothing more")
        conversation_id = response.headers["x-conversation-id"]
        response, _ = attach(client, conversation_id, headers={"Last-Event-ID": str(TOKENS)})
    assert response.status_code == 204


def test_second_client_attached_mid_stream_sees_every_chunk_once(
    slow_server: RunningServer,
) -> None:
    prompt = "two watchers"
    with (
        httpx.Client(base_url=slow_server.url) as client,
        client.stream("POST", "/stream", json={"prompt": prompt}) as response,
    ):
        conversation_id = response.headers["x-conversation-id"]
        stream = iter_events(response)
        read_until(stream, 4)
        _, watcher = attach(client, conversation_id)
        rest = list(stream)
    assert watcher[0].event == "start"
    assert [e.id for e in watcher if e.event == "message"] == [str(n) for n in range(1, 21)]
    assert chunk_text(watcher) == expected(prompt)
    assert rest[-1].event == "done"


def test_cancel_stops_the_generation_and_keeps_what_was_sent(slow_server: RunningServer) -> None:
    with httpx.Client(base_url=slow_server.url) as client:
        with client.stream("POST", "/stream", json={"prompt": "cancel me"}) as response:
            conversation_id = response.headers["x-conversation-id"]
            stream = iter_events(response)
            before = read_until(stream, 3)
            reply = client.post(f"/conversations/{conversation_id}/cancel")
            assert reply.status_code == 202
            rest = list(stream)
        stored = client.get(f"/history/{conversation_id}").json()
        again = client.post(f"/conversations/{conversation_id}/cancel")
    end = rest[-1]
    assert end.event == "error"
    assert end.json["status"] == "cancelled"
    assert end.json["error"]["code"] == "cancelled"
    received = chunk_text(before) + chunk_text(rest)
    assert stored["status"] == "cancelled"
    assert stored["response"] == received
    assert stored["chunks"] == end.json["chunks"] < TOKENS
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_ended"
