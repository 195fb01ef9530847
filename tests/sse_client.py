"""A small SSE parser for tests: what a browser's EventSource would see.

Why not httpx-sse: it dispatches events without data, so the stream's `retry:` hint, and
every `: ping` after a chunk (its issue #35, open), arrive as phantom messages (tried:
test_resume.py failed at once); it gives an event without `id:` the previous id; and it
splits lines only at CR and LF, while test_line_clients.py needs splitlines() underneath.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Event:
    """One server-sent event."""

    event: str
    id: str | None
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


class _Parser:
    def __init__(self) -> None:
        self.event: str | None = None
        self.id: str | None = None
        self.data: list[str] = []
        self.comments: list[str] = []

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self.data and self.event is None:
                return None
            event = Event(self.event or "message", self.id, "\n".join(self.data))
            self.event, self.id, self.data = None, None, []
            return event
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self.event = value
        elif field == "id":
            self.id = value
        elif field == "data":
            self.data.append(value)
        return None


def iter_events(response: httpx.Response) -> Iterator[Event]:
    """Yield events as they arrive on a streaming httpx response."""
    parser = _Parser()
    for line in response.iter_lines():
        event = parser.feed(line)
        if event is not None:
            yield event


async def aiter_events(response: httpx.Response) -> AsyncIterator[Event]:
    """Yield events as they arrive on a streaming httpx async response."""
    parser = _Parser()
    async for line in response.aiter_lines():
        event = parser.feed(line)
        if event is not None:
            yield event


def chunk_text(events: list[Event]) -> str:
    """The answer a client assembles from the chunk events."""
    return "".join(e.json["text"] for e in events if e.event == "message")


def stream_prompt(
    client: httpx.Client, prompt: str, **kwargs: Any
) -> tuple[httpx.Response, list[Event]]:
    """POST /stream and read every event to the end."""
    with client.stream("POST", "/stream", json={"prompt": prompt}, **kwargs) as response:
        if response.status_code == 200:
            events = list(iter_events(response))
        else:
            events = []
            response.read()
    return response, events
