"""The writer's contract at its own API: group commit, order, persist-then-confirm, outages.

The HTTP-level outage tests (test_database_outage.py) show what a client sees; these
pin what the writer promises its callers (generations, the API), with owner objects
standing in for generations, each scenario on an event loop of its own.
"""

from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import psycopg

from sse_llm import store
from sse_llm.database import EmbeddedPostgres
from sse_llm.errors import StorageUnavailable
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk, Conversation, Ending
from sse_llm.writer import Writer
from tests.support import run
from tests.tcp_proxy import TcpProxy
from tests.test_writer import Owner, new_conversation, stored_chunks

# A Sync message ends every statement psycopg sends (prepared or not): one per statement.
SYNC = b"S\x00\x00\x00\x04"


async def stream(writer: Writer, row: Conversation, owner: Owner, chunks: int) -> bool:
    """Write a stream's chunks at a generation's pace (a turn of the loop between them)."""
    done = None
    for seq in range(1, chunks + 1):
        done = writer.write(Chunk(row.id, seq, f"{seq} "), owner)
        await asyncio.sleep(0)
    assert done is not None
    return await done


def test_chunks_of_many_streams_are_group_committed_and_published_in_seq_order(
    database_url: str, db: psycopg.Connection
) -> None:
    streams, chunks = 40, 10

    async def scenario(proxy: TcpProxy) -> tuple[list[Conversation], list[Owner], int]:
        writer = Writer(proxy.url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            creates = [writer.create(new_conversation(owner_id)) for _ in range(streams)]
            rows = await asyncio.gather(*creates)
            owners = [Owner() for _ in rows]
            proxy.forget()
            writes = [stream(writer, r, o, chunks) for r, o in zip(rows, owners, strict=True)]
            assert all(await asyncio.gather(*writes))
            return rows, owners, proxy.sent().count(SYNC)
        finally:
            await writer.close()

    with TcpProxy(database_url) as proxy:
        rows, owners, statements = run(scenario(proxy))
    want = [(seq, f"{seq} ") for seq in range(1, chunks + 1)]
    for owner in owners:
        assert [(c.seq, c.text) for c in owner.published] == want
    assert stored_chunks(db, [row.id for row in rows]) == {row.id: want for row in rows}
    # One statement per chunk would be 400; a batch per round of the streams is about 10.
    print(f"statements for {streams * chunks} chunks of {streams} streams: {statements}")
    assert 0 < statements <= streams * chunks // 10


def test_a_batchs_chunks_are_published_and_its_creates_confirmed_only_once_it_commits(
    database_url: str,
) -> None:
    # A row lock held elsewhere stalls the batch inside its transaction, after its
    # create and its chunk are written and before its COMMIT: nothing may be told yet.
    async def scenario() -> dict[str, object]:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            rows = await asyncio.gather(*(writer.create(new_conversation(owner_id)) for _ in "ab"))
            owner = Owner()
            async with await psycopg.AsyncConnection.connect(database_url) as blocker:
                await blocker.execute(
                    "SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (rows[1].id,)
                )
                created = writer.create(new_conversation(owner_id))
                done = writer.write(Chunk(rows[0].id, 1, "held"), owner)
                ended = writer.finish(Ending(rows[1].id, "completed"))  # waits for the lock
                await asyncio.sleep(0.3)
                stalled = {
                    "create confirmed": created.done(),
                    "chunk settled": done.done(),
                    "published": list(owner.published),
                }
                await blocker.rollback()
            row = await created
            assert await done is True
            await ended
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                cursor = await conn.execute("SELECT 1 FROM conversations WHERE id = %s", (row.id,))
                visible = await cursor.fetchone() is not None
            return {"stalled": stalled, "visible": visible, "owner": owner}
        finally:
            await writer.close()

    result = run(scenario())
    assert result["stalled"] == {"create confirmed": False, "chunk settled": False, "published": []}
    assert result["visible"]
    owner = result["owner"]
    assert isinstance(owner, Owner) and [c.text for c in owner.published] == ["held"]


def test_a_batch_cut_off_by_an_outage_is_retried_and_nothing_is_lost_or_duplicated(
    restartable_postgres: EmbeddedPostgres,
) -> None:
    async def scenario() -> tuple[list[Conversation], list[Owner], bool, Ending | None]:
        writer = Writer(restartable_postgres.url, storage_timeout=10, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            rows = await asyncio.gather(*(writer.create(new_conversation(owner_id)) for _ in "ab"))
            owners = [Owner(), Owner()]
            for row, owner in zip(rows, owners, strict=True):
                assert await writer.write(Chunk(row.id, 1, "before "), owner)
            await asyncio.to_thread(restartable_postgres.stop)
            for seq in (2, 3):
                for row, owner in zip(rows, owners, strict=True):
                    done = writer.write(Chunk(row.id, seq, f"during{seq} "), owner)
            await asyncio.sleep(0.5)  # a few failed attempts
            held = not done.done() and all(len(owner.published) == 1 for owner in owners)
            await asyncio.to_thread(restartable_postgres.start)
            assert await done is True
            told = await writer.finish(Ending(rows[0].id, "completed"))
            return rows, owners, held, told
        finally:
            await writer.close()

    rows, owners, held, told = run(scenario())
    assert held, "chunks were published (or given up on) while the database was away"
    want = [(1, "before "), (2, "during2 "), (3, "during3 ")]
    for owner in owners:
        assert [(c.seq, c.text) for c in owner.published] == want
        assert not owner.storage_failed
    assert told == Ending(rows[0].id, "completed")
    with psycopg.connect(restartable_postgres.url) as db:
        assert stored_chunks(db, [row.id for row in rows]) == {row.id: want for row in rows}
        recorded = db.execute(
            "SELECT status, response FROM conversations WHERE id = %s", (rows[0].id,)
        ).fetchone()
    assert recorded == ("completed", "before during2 during3 ")


async def lose_a_commit_reply(
    proxy: TcpProxy, database_url: str
) -> tuple[list[Conversation], Owner, bool, object]:
    """Write a chunk of one stream and the end of another in one batch whose COMMIT reaches
    PostgreSQL and whose reply is lost; return the rows, the owner, the chunk's result and
    what the end's caller was told."""
    writer = Writer(proxy.url, storage_timeout=5, metrics=Metrics())
    owner_id = uuid4()
    # Held as a live process's lease holds it: while the writer reconnects (its fence
    # lock went with the cut connection), the session servers' recovery sweeps, which
    # share this database, must not take the owner for dead and settle its rows.
    lease = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await lease.execute(
        "SELECT pg_advisory_lock(%s, hashtext(%s::text))",
        (store.INSTANCE_LOCK_NAMESPACE, str(owner_id)),
    )
    writer.start(owner_id)
    try:
        rows = await asyncio.gather(*(writer.create(new_conversation(owner_id)) for _ in "ab"))
        owner = Owner()
        assert await writer.write(Chunk(rows[0].id, 1, "one "), owner)
        proxy.drop_reply_to_next_commit()
        # The same tick: one batch, a transaction (an end is in it), so a COMMIT.
        done = writer.write(Chunk(rows[0].id, 2, "two"), owner)
        ended = writer.finish(Ending(rows[1].id, "completed"))
        return rows, owner, await done, await ended
    finally:
        await writer.close()
        await lease.close()


def test_a_batch_retried_after_its_commit_reply_was_lost_stores_each_chunk_once(
    database_url: str, db: psycopg.Connection
) -> None:
    # The writer cannot know the batch committed, so writes it again: each chunk must
    # still be there once, and published once.
    with TcpProxy(database_url) as proxy:
        rows, owner, stored, _ = run(lose_a_commit_reply(proxy, database_url))
        assert proxy.dropped.is_set(), "the proxy never saw the COMMIT"
    assert stored and not owner.storage_failed
    assert [(c.seq, c.text) for c in owner.published] == [(1, "one "), (2, "two")]
    assert stored_chunks(db, [rows[0].id]) == {rows[0].id: [(1, "one "), (2, "two")]}
    status = db.execute("SELECT status FROM conversations WHERE id = %s", (rows[1].id,))
    assert status.fetchone() == ("completed",)


def test_an_end_retried_after_its_commit_reply_was_lost_is_told_as_recorded(
    database_url: str,
) -> None:
    with TcpProxy(database_url) as proxy:
        rows, _, _, told = run(lose_a_commit_reply(proxy, database_url))
        assert proxy.dropped.is_set(), "the proxy never saw the COMMIT"
    assert told == Ending(rows[1].id, "completed")


def test_past_the_storage_timeout_writes_fail_unavailable_and_their_end_is_stored_later(
    restartable_postgres: EmbeddedPostgres,
) -> None:
    # New conversations fail at once (no client has seen them); chunks are held for the
    # storage timeout, then fail; the end their clients are told is kept and retried
    # while the writer is idle, until the database is back.
    timeout = 1.0

    async def scenario() -> dict[str, object]:
        writer = Writer(restartable_postgres.url, storage_timeout=timeout, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            row = await writer.create(new_conversation(owner_id))
            owner = Owner()
            assert await writer.write(Chunk(row.id, 1, "kept"), owner)
            await asyncio.to_thread(restartable_postgres.stop)
            started = time.monotonic()
            created = writer.create(new_conversation(owner_id))  # the same batch
            done = writer.write(Chunk(row.id, 2, "lost"), owner)
            await asyncio.wait([created])
            create_took = time.monotonic() - started
            stored = await done
            write_took = time.monotonic() - started
            unsettled = writer.unsettled_ids()
            await asyncio.to_thread(restartable_postgres.start)
            deadline = time.monotonic() + 10
            while writer.unsettled_ids() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            return {
                "id": row.id,
                "create error": created.exception(),
                "create took": create_took,
                "stored": stored,
                "write took": write_took,
                "owner": owner,
                "unsettled": unsettled,
                "left": writer.unsettled_ids(),
            }
        finally:
            await writer.close()

    result = run(scenario())
    assert isinstance(result["create error"], StorageUnavailable)
    assert result["create took"] < timeout / 2
    assert result["stored"] is False
    # Retried with backoff until the next wait would pass the timeout: held, not failed at once.
    assert timeout / 2 <= result["write took"] < timeout + 5  # type: ignore[operator]
    owner = result["owner"]
    assert isinstance(owner, Owner) and owner.failed_with == "storage_unavailable"
    assert [c.seq for c in owner.published] == [1]
    assert result["unsettled"] == {result["id"]}  # the lease's own sweep must spare it
    assert result["left"] == set()  # recorded without waiting for close()
    with psycopg.connect(restartable_postgres.url) as db:
        recorded = db.execute(
            "SELECT status, error_code, response FROM conversations WHERE id = %s",
            (result["id"],),
        ).fetchone()
    assert recorded == ("failed", "storage_unavailable", "kept")
