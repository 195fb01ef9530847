"""Replicas on one PostgreSQL that restarts under them (issue 12, point 3).

A restart drops every advisory lock: no process may take a free lock for a dead owner
and settle the streams of a live one (see sse_llm/lease.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sse_llm.database import EmbeddedPostgres
from tests.processes import BackgroundStream, ServerProcess, spawn_server, stored
from tests.sse_client import Event, chunk_text, iter_events

STREAMS_PER_PROCESS = 8
TOKENS = 240  # 12 s at 20 per second: longer than two restarts and many lease intervals


@pytest.fixture
def replicas(
    restartable_postgres: EmbeddedPostgres,
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two `sse-llm serve` processes on that database, checking their lease twice a second."""
    servers: list[ServerProcess] = []
    try:
        for n in range(2):
            # Replicas start at different times, so their lease checks do not fall
            # together (today's code at its 5 s interval settles the other's streams then).
            time.sleep(2 * n)
            servers.append(
                spawn_server(
                    restartable_postgres.url,
                    DEMO_TOKENS=str(TOKENS),
                    DEMO_TOKENS_PER_SECOND="20",
                    SSE_LLM_LEASE_INTERVAL="0.5",
                )
            )
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


class HistoryReader:
    """Reads GET /history from every replica in a loop; remembers each status it saw."""

    def __init__(self, urls: list[str]) -> None:
        self.seen: dict[str, set[str]] = {}
        self.pages = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(urls,), daemon=True)
        self._thread.start()

    def _run(self, urls: list[str]) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                for url in urls:
                    try:
                        response = client.get(f"{url}/history", params={"limit": 50})
                    except httpx.HTTPError:
                        continue
                    if response.status_code == 200:  # 503 while the database is away
                        self.pages += 1
                        for item in response.json()["items"]:
                            self.seen.setdefault(item["id"], set()).add(item["status"])
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def restart(database: EmbeddedPostgres) -> None:
    database.stop()
    time.sleep(0.5)
    database.start()


def follow(url: str, conversation_id: str, after: int) -> list[Event]:
    """Attach to a conversation after chunk `after` and read it to its end."""
    headers = {"Last-Event-ID": str(after)}
    with httpx.stream(
        "GET", f"{url}/conversations/{conversation_id}/stream", headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        return list(iter_events(response))


@pytest.mark.slow
def test_a_database_restart_never_interrupts_a_live_replicas_streams(
    restartable_postgres: EmbeddedPostgres, replicas: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = replicas
    streams = [
        BackgroundStream(server.url, f"restart twice {server.url} {n}")
        for n in range(STREAMS_PER_PROCESS)
        for server in (a, b)
    ]
    reader = HistoryReader([a.url, b.url])
    try:
        for stream in streams:
            stream.wait_chunks(10)
        restart(restartable_postgres)
        for stream in streams:
            stream.wait_chunks(20)  # the writers are through the outage
        restart(restartable_postgres)
        for stream in streams:
            stream.wait_chunks(20)
        # A stream owned by A, resumed through B (after the restarts, past many lease checks).
        resumed = streams[0]
        after = len([e for e in resumed.events if e.event == "message"])
        followed = follow(b.url, resumed.conversation_id, after)
        ends = [stream.join() for stream in streams]
    finally:
        reader.stop()
    assert reader.pages > 0
    for stream, events in zip(streams, ends, strict=True):
        assert events[-1].event == "done", events[-1]
        assert [e.id for e in events if e.event == "message"] == [
            str(n) for n in range(1, TOKENS + 1)
        ]
        assert stored(restartable_postgres.url, stream.conversation_id) == (
            "completed",
            chunk_text(events),
            TOKENS,
        )
        # No reader of the history was ever told that a live stream had been interrupted.
        assert reader.seen.get(stream.conversation_id, set()) <= {"streaming", "completed"}
    assert followed[-1].event == "done"
    assert [e.id for e in followed if e.event == "message"] == [
        str(n) for n in range(after + 1, TOKENS + 1)
    ]
    assert chunk_text(followed) == chunk_text(ends[0][after + 1 :])
