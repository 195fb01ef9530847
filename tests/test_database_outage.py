"""The database goes away under a running service and comes back (issue 3 point 6, issue 12
point 4)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import TypeVar
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from sse_llm.config import Settings
from sse_llm.database import EmbeddedPostgres
from sse_llm.errors import StorageUnavailable
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk, Ending, NewConversation
from sse_llm.writer import Writer
from tests.conftest import RunningServer, start_server
from tests.sse_client import Event, chunk_text, iter_events
from tests.support import run, wait_until, wait_until_async
from tests.tcp_proxy import TcpProxy

T = TypeVar("T")


# Each stops and starts a PostgreSQL server: outages want the machine to themselves.
pytestmark = pytest.mark.slow


@pytest.fixture
def server(
    restartable_postgres: EmbeddedPostgres, base_settings: Settings
) -> Iterator[RunningServer]:
    running = start_server(
        base_settings.with_changes(
            database_url=restartable_postgres.url,
            demo_tokens=60,
            demo_tokens_per_second=20,
            storage_timeout=10,
        )
    )
    yield running
    running.stop()


def wait_ready(url: str, want: int, timeout: float = 20) -> None:
    """Return once /readyz answers `want`."""
    wait_until(
        lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == want,
        timeout,
        interval=0.2,
        message=f"/readyz never answered {want}",
    )


def test_readyz_and_new_requests_follow_the_database(
    restartable_postgres: EmbeddedPostgres, server: RunningServer
) -> None:
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    restartable_postgres.stop()
    try:
        wait_ready(server.url, 503)
        response = httpx.post(f"{server.url}/stream", json={"prompt": "hello"}, timeout=15)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        history = httpx.get(f"{server.url}/history", timeout=15)
        assert history.status_code == 503
        assert "psycopg" not in history.text and "Traceback" not in history.text
    finally:
        restartable_postgres.start()
    wait_ready(server.url, 200)
    with httpx.stream("POST", f"{server.url}/stream", json={"prompt": "back again"}) as response:
        assert response.status_code == 200


def test_stream_rides_out_a_short_outage_without_losing_a_chunk(
    restartable_postgres: EmbeddedPostgres, server: RunningServer
) -> None:
    events: list[Event] = []
    with httpx.stream(
        "POST", f"{server.url}/stream", json={"prompt": "through the storm"}, timeout=30
    ) as response:
        conversation_id = response.headers["x-conversation-id"]
        for event in iter_events(response):
            events.append(event)
            if event.id == "5":
                restartable_postgres.stop()
                time.sleep(1.5)  # chunks keep coming from the model meanwhile
                restartable_postgres.start()
    assert events[-1].event == "done"
    assert [e.id for e in events if e.event == "message"] == [str(n) for n in range(1, 61)]
    with psycopg.connect(restartable_postgres.url) as conn:
        row = conn.execute(
            "SELECT status, response FROM conversations WHERE id = %s", (conversation_id,)
        ).fetchone()
    assert row == ("completed", chunk_text(events))


def test_a_long_outage_ends_the_stream_storage_unavailable_and_the_history_says_so(
    restartable_postgres: EmbeddedPostgres, base_settings: Settings
) -> None:
    server = start_server(
        base_settings.with_changes(
            database_url=restartable_postgres.url,
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
                    restartable_postgres.stop()
        restartable_postgres.start()
        end = events[-1]
        assert end.event == "error"
        assert end.json["error"]["code"] == "storage_unavailable"
        with psycopg.connect(restartable_postgres.url) as conn:
            stored = "".join(
                row[0]
                for row in conn.execute(
                    "SELECT text FROM chunks WHERE conversation_id = %s ORDER BY seq",
                    (conversation_id,),
                )
            )
        # Nothing was sent that is not stored.
        assert stored.startswith(chunk_text(events))
        # Once the database is back, the row tells what the client was told (the process
        # still runs: nothing else would settle it).
        row = wait_for_end(restartable_postgres.url, conversation_id)
        assert row == ("failed", "storage_unavailable", stored)
    finally:
        server.stop()


def wait_for_end(database_url: str, conversation_id: str | UUID, timeout: float = 15) -> tuple:
    """(status, error code, response) of a conversation once it stops streaming."""
    with psycopg.connect(database_url, autocommit=True) as conn:

        def ended() -> tuple | None:
            row = conn.execute(
                "SELECT status, error_code, response FROM conversations WHERE id = %s",
                (conversation_id,),
            ).fetchone()
            assert row is not None
            return row if row[0] != "streaming" else None

        return wait_until(ended, timeout, 0.1, "the conversation is still streaming")


class Owner:
    """What the writer reports to about its chunks (a Generation, in the service)."""

    def __init__(self) -> None:
        self.storage_failed = False
        self.published: list[Chunk] = []

    def publish(self, chunk: Chunk) -> None:
        self.published.append(chunk)

    def fail_storage(self, code: str) -> None:
        self.storage_failed = True

    def fence(self) -> None:
        self.storage_failed = True


def test_an_end_that_could_not_be_stored_is_recorded_when_the_database_returns(
    restartable_postgres: EmbeddedPostgres,
) -> None:
    # The clients were told `storage_unavailable`; the row must not say anything else
    # (before, it stayed `streaming` until some sweep marked it `interrupted`).
    async def scenario() -> tuple[UUID, Ending | None, set[UUID], set[UUID]]:
        writer = Writer(restartable_postgres.url, storage_timeout=0.5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            row = await writer.create(NewConversation(uuid4(), "p", "demo", "demo", owner_id))
            assert await writer.write(Chunk(row.id, 1, "persisted"), Owner()) is True
            await asyncio.to_thread(restartable_postgres.stop)
            told = await writer.finish(Ending(row.id, "completed"))
            unsettled = writer.unsettled_ids()
            await asyncio.to_thread(restartable_postgres.start)
        finally:
            await writer.close()  # retries kept ends once more, whatever came before
        return row.id, told, unsettled, writer.unsettled_ids()

    conversation_id, told, unsettled, left = run(scenario())
    assert told is not None and (told.status, told.error_code) == ("failed", "storage_unavailable")
    assert unsettled == {conversation_id}  # the lease's own sweep must spare it
    assert left == set()
    with psycopg.connect(restartable_postgres.url) as conn:
        row = conn.execute(
            "SELECT status, error_code, response FROM conversations WHERE id = %s",
            (conversation_id,),
        ).fetchone()
    assert row == ("failed", "storage_unavailable", "persisted")


def test_a_create_whose_commit_reply_was_lost_leaves_no_row(
    database_url: str, db: psycopg.Connection
) -> None:
    # The COMMIT reaches PostgreSQL, the reply never reaches the writer: the request gets
    # an error, so nobody will ever know the conversation's id; its row must not stay.
    async def scenario(proxy: TcpProxy) -> tuple[UUID, BaseException | None]:
        writer = Writer(proxy.url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            await writer.create(NewConversation(uuid4(), "warm up", "demo", "demo", owner_id))
            proxy.drop_reply_to_next_commit()
            new = NewConversation(uuid4(), "lost reply", "demo", "demo", owner_id)
            created = writer.create(new)
            await asyncio.wait([created])
            # Up to 10 s for the writer to settle it; the row count below is the verdict.
            with contextlib.suppress(AssertionError):
                await wait_until_async(lambda: new.id not in writer.unsettled_ids(), 10)
            return new.id, created.exception()
        finally:
            await writer.close()

    with TcpProxy(database_url) as proxy:
        conversation_id, error = run(scenario(proxy))
        assert proxy.dropped.is_set(), "the proxy never saw the COMMIT"
    assert isinstance(error, StorageUnavailable)  # the API answers 503
    count = db.execute("SELECT count(*) FROM conversations WHERE id = %s", (conversation_id,))
    assert count.fetchone() == (0,)


def test_a_database_that_stops_answering_fails_the_batch_within_the_storage_timeout(
    database_url: str,
) -> None:
    # A half-open socket: no error ever comes. The writer, which every stream of the
    # process waits on, gives up within the storage timeout instead of hanging for ever.
    async def scenario(proxy: TcpProxy) -> tuple[bool, float, bool]:
        writer = Writer(proxy.url, storage_timeout=1, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        row = await writer.create(NewConversation(uuid4(), "p", "demo", "demo", owner_id))
        proxy.fall_silent()
        owner = Owner()
        started = time.monotonic()
        stored = await writer.write(Chunk(row.id, 1, "into the void"), owner)
        took = time.monotonic() - started
        async with asyncio.timeout(15):
            await writer.close()
        return stored, took, owner.storage_failed

    with TcpProxy(database_url) as proxy:
        stored, took, failed = run(scenario(proxy))
    assert not stored and failed
    # The storage timeout, then psycopg tries to cancel the query (5 s) and waits for it
    # to end (5 s) before it closes the connection: bounded, where it used to hang.
    assert took < 20
