"""The database goes away under a running service and comes back (issue 3, point 6)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from uuid import uuid4

import httpx
import psycopg
import pytest

from sse_llm.config import Settings
from sse_llm.database import EmbeddedPostgres, apply_migrations
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk, NewConversation
from sse_llm.writer import Writer
from tests.conftest import RunningServer, start_server
from tests.sse_client import Event, chunk_text, iter_events


@pytest.fixture
def own_database(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, so it can be stopped and started."""
    postgres = EmbeddedPostgres(tmp_path).start()
    apply_migrations(postgres.url)
    yield postgres
    postgres.stop()


@pytest.fixture
def server(own_database: EmbeddedPostgres, base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(
        base_settings.with_changes(
            database_url=own_database.url,
            demo_tokens=60,
            demo_tokens_per_second=20,
            storage_timeout=10,
        )
    )
    yield running
    running.stop()


def wait_ready(url: str, want: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/readyz", timeout=5).status_code != want:
        assert time.monotonic() < deadline, f"/readyz never answered {want}"
        time.sleep(0.2)


def test_readyz_and_new_requests_follow_the_database(
    own_database: EmbeddedPostgres, server: RunningServer
) -> None:
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    own_database.stop()
    try:
        wait_ready(server.url, 503)
        response = httpx.post(f"{server.url}/stream", json={"prompt": "hello"}, timeout=15)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        history = httpx.get(f"{server.url}/history", timeout=15)
        assert history.status_code == 503
        assert "psycopg" not in history.text and "Traceback" not in history.text
    finally:
        own_database.start()
    wait_ready(server.url, 200)
    with httpx.stream("POST", f"{server.url}/stream", json={"prompt": "back again"}) as response:
        assert response.status_code == 200


def test_stream_rides_out_a_short_outage_without_losing_a_chunk(
    own_database: EmbeddedPostgres, server: RunningServer
) -> None:
    events: list[Event] = []
    with httpx.stream(
        "POST", f"{server.url}/stream", json={"prompt": "through the storm"}, timeout=30
    ) as response:
        conversation_id = response.headers["x-conversation-id"]
        for event in iter_events(response):
            events.append(event)
            if event.id == "5":
                own_database.stop()
                time.sleep(1.5)  # chunks keep coming from the model meanwhile
                own_database.start()
    assert events[-1].event == "done"
    assert [e.id for e in events if e.event == "message"] == [str(n) for n in range(1, 61)]
    with psycopg.connect(own_database.url) as conn:
        row = conn.execute(
            "SELECT status, response FROM conversations WHERE id = %s", (conversation_id,)
        ).fetchone()
    assert row == ("completed", chunk_text(events))


def test_long_outage_ends_the_stream_with_storage_unavailable(
    own_database: EmbeddedPostgres, base_settings: Settings
) -> None:
    server = start_server(
        base_settings.with_changes(
            database_url=own_database.url,
            demo_tokens=200,
            demo_tokens_per_second=20,
            storage_timeout=1.0,
        )
    )
    try:
        events: list[Event] = []
        with httpx.stream(
            "POST", f"{server.url}/stream", json={"prompt": "lost storage"}, timeout=30
        ) as response:
            conversation_id = response.headers["x-conversation-id"]
            for event in iter_events(response):
                events.append(event)
                if event.id == "3":
                    own_database.stop()
        own_database.start()
        end = events[-1]
        assert end.event == "error"
        assert end.json["error"]["code"] == "storage_unavailable"
        with psycopg.connect(own_database.url) as conn:
            stored = "".join(
                row[0]
                for row in conn.execute(
                    "SELECT text FROM chunks WHERE conversation_id = %s ORDER BY seq",
                    (conversation_id,),
                )
            )
        # Nothing was sent that is not stored.
        assert stored.startswith(chunk_text(events))
    finally:
        server.stop()


class Owner:
    """What the writer reports to about its chunks (a Generation, in the service)."""

    def __init__(self) -> None:
        self.storage_failed = False
        self.published: list[Chunk] = []

    def publish(self, chunk: Chunk) -> None:
        self.published.append(chunk)

    def fail_storage(self) -> None:
        self.storage_failed = True


def test_a_batch_that_cannot_be_encoded_fails_alone(database_url: str) -> None:
    # A lone surrogate cannot be sent to PostgreSQL (providers clean text, so this is a
    # bug's path): that batch fails, and the writer goes on with the next one.
    async def scenario() -> tuple[Owner, Owner]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        writer.start()
        try:
            conversation = await writer.create(
                NewConversation(uuid4(), "encode me", "demo", "demo", uuid4())
            )
            broken, sound = Owner(), Owner()
            assert await writer.write(Chunk(conversation.id, 1, "bad \ud800"), broken) is False
            assert await writer.write(Chunk(conversation.id, 1, "good"), sound) is True
            return broken, sound
        finally:
            await writer.close()

    # In a thread of its own: its event loop must not meet another test's.
    with ThreadPoolExecutor(1) as pool:
        broken, sound = pool.submit(asyncio.run, asyncio.wait_for(scenario(), 30)).result()
    assert broken.storage_failed
    assert [chunk.text for chunk in sound.published] == ["good"]
