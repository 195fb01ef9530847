"""The writer against a real PostgreSQL: bad items fail alone, fenced writes, closing.

Most tests drive a Writer alone, with owner objects standing in for generations, each
scenario on an event loop of its own in a thread (it must not meet another test's).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import TypeVar
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from sse_llm.config import Settings
from sse_llm.errors import StorageRejected
from sse_llm.metrics import Metrics
from sse_llm.store import FENCE_LOCK_NAMESPACE, Chunk, Conversation, Ending, NewConversation
from sse_llm.writer import Writer
from tests.conftest import RunningServer, start_server
from tests.sse_client import Event, chunk_text, iter_events
from tests.support import run
from tests.tcp_proxy import TcpProxy
from tests.test_counts import hold_instance_lock

T = TypeVar("T")


class Owner:
    """What the writer reports to about its chunks (a Generation, in the service)."""

    def __init__(self) -> None:
        self.storage_failed = False
        self.failed_with: str | None = None
        self.fenced = False
        self.published: list[Chunk] = []

    def publish(self, chunk: Chunk) -> None:
        self.published.append(chunk)

    def fail_storage(self, code: str) -> None:
        assert not self.storage_failed, "told twice"
        self.storage_failed = True
        self.failed_with = code

    def fence(self) -> None:
        assert not self.storage_failed, "told twice"
        self.storage_failed = True
        self.fenced = True


def new_conversation(owner_id: UUID, prompt: str = "a prompt") -> NewConversation:
    return NewConversation(uuid4(), prompt, "demo", "demo", owner_id)


async def settle_as_another_process(database_url: str, conversation_id: UUID) -> None:
    """Mark a conversation `interrupted` the way a process settling another's streams does
    (recovery_store._settle): take its owner's fence lock exclusively, which a settler gets
    only once the owner's writer connection is gone (cut here, as a restart or an outage
    would), lock the row, then assemble its response from the chunks committed by then.

    Without the fence this would settle while the writer still inserts: a chunk committed
    after the settle's snapshot would reach the clients and not the stored response, an
    interleaving the real settler rules out (and that a slower UPDATE made common)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT owner_id::text FROM conversations WHERE id = %s", (conversation_id,)
        )
        owner = (await cursor.fetchone() or (None,))[0]
        fence = (FENCE_LOCK_NAMESPACE, owner)
        for _ in range(200):
            await conn.execute(
                """
                SELECT pg_terminate_backend(pid) FROM pg_locks
                WHERE locktype = 'advisory' AND classid = %s AND objid = hashtext(%s)::oid
                  AND objsubid = 2 AND pid <> pg_backend_pid()
                """,
                fence,
            )
            await conn.commit()
            cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", fence)
            if (await cursor.fetchone()) == (True,):
                break
            await conn.rollback()
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the owner's fence lock was never free")
        await conn.execute(
            "SELECT id FROM conversations WHERE id = %s AND status = 'streaming' FOR UPDATE",
            (conversation_id,),
        )
        await settle_locked(conn, conversation_id)


async def settle_locked(conn: psycopg.AsyncConnection, *ids: UUID) -> None:
    """The second statement of a settle, once the rows are locked; commits."""
    await conn.execute(
        """
        UPDATE conversations c
        SET status = 'interrupted', error_code = 'interrupted', completed_at = now(),
            error_message = 'The service stopped while this answer was streaming.',
            response = coalesce((SELECT string_agg(k.text, '' ORDER BY k.seq) FROM chunks k
                                 WHERE k.conversation_id = c.id), ''),
            chunk_count = (SELECT count(*) FROM chunks k WHERE k.conversation_id = c.id),
            owner_id = NULL
        WHERE c.id = ANY(%s) AND c.status = 'streaming'
        """,
        (list(ids),),
    )
    await conn.commit()


def stored_chunks(db: psycopg.Connection, ids: list[UUID]) -> dict[UUID, list[tuple[int, str]]]:
    rows = db.execute(
        "SELECT conversation_id, seq, text FROM chunks WHERE conversation_id = ANY(%s)"
        " ORDER BY conversation_id, seq",
        (ids,),
    ).fetchall()
    found: dict[UUID, list[tuple[int, str]]] = {i: [] for i in ids}
    for conversation_id, seq, text in rows:
        found[conversation_id].append((seq, text))
    return found


def savepoints(sent: bytes) -> int:
    """How many savepoints a client opened, from the bytes it sent."""
    return len(re.findall(rb'SAVEPOINT "', sent))


def test_bad_chunks_fail_only_their_streams_at_a_cost_of_k_log_n_statements(
    database_url: str, db: psycopg.Connection
) -> None:
    # 100 chunks of 20 streams in one batch, 3 holding a NUL (which providers clean, and
    # PostgreSQL text cannot hold): every other chunk is stored and published.
    bad = {(2, 3), (7, 1), (15, 5)}  # (stream, seq)

    async def scenario(proxy: TcpProxy) -> tuple[list[Conversation], list[Owner], bytes]:
        writer = Writer(proxy.url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            creates = [writer.create(new_conversation(owner_id)) for _ in range(20)]
            rows = await asyncio.gather(*creates)
            owners = [Owner() for _ in rows]
            proxy.forget()
            for seq in range(1, 6):  # as a busy batch holds them: interleaved
                for n, row in enumerate(rows):
                    text = f"bad \x00 {n}" if (n, seq) in bad else f"{n}.{seq} "
                    done = writer.write(Chunk(row.id, seq, text), owners[n])
            assert await done is True
            sent = proxy.sent()
            while writer.unsettled_ids():  # noqa: ASYNC110 (the failed streams' ends)
                await asyncio.sleep(0.01)
            return rows, owners, sent
        finally:
            await writer.close()

    with TcpProxy(database_url) as proxy:
        rows, owners, sent = run(scenario(proxy))
    stored = stored_chunks(db, [row.id for row in rows])
    for n, (row, owner) in enumerate(zip(rows, owners, strict=True)):
        first_bad = min((seq for stream, seq in bad if stream == n), default=6)
        want = [(seq, f"{n}.{seq} ") for seq in range(1, first_bad)]
        assert [(c.seq, c.text) for c in owner.published] == want, n
        assert stored[row.id] == want, n
        assert owner.failed_with == ("storage_rejected" if first_bad < 6 else None)
        status = db.execute(
            "SELECT status, error_code, response FROM conversations WHERE id = %s", (row.id,)
        ).fetchone()
        if first_bad < 6:
            assert status == ("failed", "storage_rejected", "".join(t for _, t in want))
        else:
            assert status == ("streaming", None, "")
    # The whole batch once, then halves down to each bad chunk: at most 2 k log2(n) + 1.
    opened = savepoints(sent)
    print(f"savepoints for 3 bad chunks among 100: {opened}")
    assert 0 < opened <= 2 * 3 * 7 + 1


def test_a_create_the_database_refuses_fails_alone_with_a_4xx(
    database_url: str, db: psycopg.Connection
) -> None:
    async def scenario() -> list[Conversation | BaseException]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            prompts = ["fine", "not \x00 fine", "fine too"]
            creates = [writer.create(new_conversation(owner_id, p)) for p in prompts]
            return await asyncio.gather(*creates, return_exceptions=True)
        finally:
            await writer.close()

    first, refused, third = run(scenario())
    assert isinstance(refused, StorageRejected)
    assert (refused.status, refused.code) == (422, "storage_rejected")
    assert isinstance(first, Conversation) and isinstance(third, Conversation)
    ids = [first.id, third.id]
    count = db.execute("SELECT count(*) FROM conversations WHERE id = ANY(%s)", (ids,))
    assert count.fetchone() == (2,)


def test_an_end_the_database_refuses_is_recorded_as_a_plain_failed_end(
    database_url: str, db: psycopg.Connection
) -> None:
    async def scenario() -> tuple[list[Conversation], list[Ending | None]]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            rows = await asyncio.gather(*(writer.create(new_conversation(owner_id)) for _ in "ab"))
            owner = Owner()
            for row in rows:
                writer.write(Chunk(row.id, 1, "some text"), owner)
            ends = [
                writer.finish(Ending(rows[0].id, "completed")),
                writer.finish(Ending(rows[1].id, "failed", "upstream_error", "bad \x00 text")),
            ]
            return rows, list(await asyncio.gather(*ends))
        finally:
            await writer.close()

    rows, told = run(scenario())
    assert told[0] == Ending(rows[0].id, "completed")
    assert told[1] is not None and (told[1].status, told[1].error_code) == (
        "failed",
        "storage_rejected",
    )
    recorded = db.execute(
        "SELECT status, error_code, response FROM conversations WHERE id = ANY(%s) ORDER BY status",
        ([row.id for row in rows],),
    ).fetchall()
    assert recorded == [
        ("completed", None, "some text"),
        ("failed", "storage_rejected", "some text"),
    ]


def test_a_chunk_that_cannot_be_encoded_fails_only_its_stream(
    database_url: str, db: psycopg.Connection
) -> None:
    # A lone surrogate cannot even be sent to PostgreSQL (providers clean text, so this
    # is a bug's path): its stream fails, the other one in the same batch goes on.
    async def scenario() -> tuple[list[Conversation], Owner, Owner]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            rows = await asyncio.gather(*(writer.create(new_conversation(owner_id)) for _ in "ab"))
            broken, sound = Owner(), Owner()
            writer.write(Chunk(rows[0].id, 1, "bad \ud800"), broken)
            assert await writer.write(Chunk(rows[1].id, 1, "good"), sound) is True
            assert await writer.write(Chunk(rows[1].id, 2, " again"), sound) is True
            return rows, broken, sound
        finally:
            await writer.close()

    rows, broken, sound = run(scenario())
    assert broken.failed_with == "storage_rejected" and not broken.published
    assert [chunk.text for chunk in sound.published] == ["good", " again"]
    assert not sound.storage_failed
    stored = stored_chunks(db, [row.id for row in rows])
    assert stored == {rows[0].id: [], rows[1].id: [(1, "good"), (2, " again")]}


def test_writes_into_a_conversation_another_process_settled_are_refused(
    database_url: str, db: psycopg.Connection
) -> None:
    async def scenario() -> tuple[list[Conversation], list[Owner], list[Ending | None]]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        # A live process's instance lock: while the writer's connection is cut (below), its
        # fence is free, and a recovery sweep of the session's servers (same database)
        # would settle every stream of an owner without one, `kept`'s too.
        hold_instance_lock(db, owner_id)
        writer.start(owner_id)
        try:
            rows = await asyncio.gather(*(writer.create(new_conversation(owner_id)) for _ in "ab"))
            owners = [Owner(), Owner()]
            for row, owner in zip(rows, owners, strict=True):
                done = writer.write(Chunk(row.id, 1, "one "), owner)
            await done
            await settle_as_another_process(database_url, rows[0].id)
            for row, owner in zip(rows, owners, strict=True):
                done = writer.write(Chunk(row.id, 2, "two"), owner)
            await done
            ends = [writer.finish(Ending(row.id, "completed")) for row in rows]
            return rows, owners, list(await asyncio.gather(*ends))
        finally:
            await writer.close()

    rows, owners, told = run(scenario())
    settled, kept = owners
    assert settled.fenced and [c.text for c in settled.published] == ["one "]
    assert not kept.storage_failed and [c.text for c in kept.published] == ["one ", "two"]
    assert told == [None, Ending(rows[1].id, "completed")]  # None: the row says how it ended
    recorded = [
        db.execute("SELECT status, response FROM conversations WHERE id = %s", (row.id,)).fetchone()
        for row in rows
    ]
    assert recorded == [("interrupted", "one "), ("completed", "one two")]
    assert stored_chunks(db, [rows[0].id]) == {rows[0].id: [(1, "one ")]}


def test_a_connected_writer_is_never_settled_and_a_reconnecting_one_is_fenced(
    database_url: str, db: psycopg.Connection
) -> None:
    # While the owner's writer is connected it holds the fence lock: no settler may settle
    # its rows. Once the connection is lost (a restart, say) a settler may; the writer's
    # next connection then waits for the settler's commit and finds the row settled: the
    # settle and the chunk cannot both succeed.
    async def scenario() -> tuple[Conversation, Owner, bool, bool]:
        writer = Writer(database_url, storage_timeout=10, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            row = await writer.create(new_conversation(owner_id))
            owner = Owner()
            await writer.write(Chunk(row.id, 1, "one "), owner)
            fence = "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s::text))"
            async with await psycopg.AsyncConnection.connect(database_url) as settler:
                cursor = await settler.execute(fence, (FENCE_LOCK_NAMESPACE, owner_id))
                refused_while_connected = (await cursor.fetchone()) == (False,)
                await settler.rollback()
                pid = writer._connection.info.backend_pid  # type: ignore[union-attr]
                await settler.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await settler.commit()
                for _ in range(100):  # the lock is freed once the backend is gone
                    cursor = await settler.execute(fence, (FENCE_LOCK_NAMESPACE, owner_id))
                    if (await cursor.fetchone()) == (True,):
                        break
                    await settler.rollback()
                    await asyncio.sleep(0.05)
                done = writer.write(Chunk(row.id, 2, "two"), owner)
                await asyncio.sleep(0.5)
                waited = not done.done()
                await settle_locked(settler, row.id)
            await done
            return row, owner, refused_while_connected, waited
        finally:
            await writer.close()

    row, owner, refused_while_connected, waited = run(scenario())
    assert refused_while_connected, "a settler got the fence of a connected writer"
    assert waited, "the reconnecting writer did not wait for the settler"
    assert owner.fenced and [c.text for c in owner.published] == ["one "]
    recorded = db.execute(
        "SELECT status, response, chunk_count FROM conversations WHERE id = %s", (row.id,)
    ).fetchone()
    assert recorded == ("interrupted", "one ", 1)
    assert stored_chunks(db, [row.id]) == {row.id: [(1, "one ")]}


@pytest.fixture
def slow_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(base_settings.with_changes(demo_tokens=60, demo_tokens_per_second=20))
    yield running
    running.stop()


def test_a_stream_settled_by_another_process_ends_its_clients_as_recorded(
    slow_server: RunningServer, database_url: str, db: psycopg.Connection
) -> None:
    events: list[Event] = []
    with httpx.stream(
        "POST", f"{slow_server.url}/stream", json={"prompt": "taken away"}, timeout=30
    ) as response:
        conversation_id = UUID(response.headers["x-conversation-id"])
        for event in iter_events(response):
            events.append(event)
            if event.id == "3":
                run(settle_as_another_process(database_url, conversation_id))
    end = events[-1]
    assert (end.event, end.json["status"]) == ("error", "interrupted")
    status, response_text, chunks = db.execute(
        "SELECT status, response, chunk_count FROM conversations WHERE id = %s",
        (conversation_id,),
    ).fetchone()
    assert status == "interrupted"
    assert response_text == chunk_text(events)  # exactly what the client was sent
    assert end.json["chunks"] == chunks


def test_close_writes_what_arrived_in_the_same_tick_and_returns(database_url: str) -> None:
    async def scenario() -> tuple[Conversation, float]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        await asyncio.sleep(0.05)  # idle, waiting for work
        created = writer.create(new_conversation(owner_id))
        started = time.monotonic()
        async with asyncio.timeout(5):  # close() runs in this task: before the writer's turn
            await writer.close()
        return await created, time.monotonic() - started

    row, took = run(scenario())
    assert row.status == "streaming"
    assert took < 5


def test_a_write_after_close_fails_at_once(database_url: str) -> None:
    async def scenario() -> tuple[BaseException | None, bool, Owner]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        row = await writer.create(new_conversation(owner_id))
        await writer.close()
        owner = Owner()
        written = await asyncio.wait_for(writer.write(Chunk(row.id, 1, "late"), owner), 1)
        late = writer.create(new_conversation(owner_id))
        await asyncio.wait_for(asyncio.wait([late]), 1)
        return late.exception(), written, owner

    refused, written, owner = run(scenario())
    assert refused is not None and not written
    assert owner.failed_with == "storage_unavailable"
