"""store.py's statements of the streaming path against the real PostgreSQL, said directly:
writing conversations, chunks and ends, and reading them back (the sweeps, cancels and
sessions are in test_store_sweeps.py).

Each scenario runs on an event loop of its own in a thread (it must not meet another
test's), with a connection and a pool of its own. The database is shared by the
session, so every test makes its own ids, owners and search words and looks only at them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeVar
from uuid import UUID, uuid4

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sse_llm import history_queries, store
from sse_llm.store import Chunk, Conversation, Ending, NewConversation
from tests.conftest import word
from tests.support import run

T = TypeVar("T")


@asynccontextmanager
async def connected(
    database_url: str,
) -> AsyncIterator[tuple[AsyncConnection, AsyncConnectionPool]]:
    """A connection for the writer's statements and a pool for the readers', as the service has."""
    async with (
        await AsyncConnection.connect(database_url, autocommit=True) as conn,
        AsyncConnectionPool(
            database_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        ) as pool,
    ):
        yield conn, pool


def new(owner_id: UUID, prompt: str = "a prompt", **more: Any) -> NewConversation:
    return NewConversation(uuid4(), prompt, "a-model", "demo", owner_id, **more)


async def streaming(
    conn: AsyncConnection, owner_id: UUID, prompt: str = "a prompt", *, alive: bool = True
) -> UUID:
    """A new conversation `owner_id` streams. `alive`: `conn` holds the owner's instance
    lock, as a live process does, so the recovery sweeps of the session's servers (which
    share this database) leave its rows alone."""
    if alive:
        await conn.execute(
            "SELECT pg_advisory_lock(%s, hashtext(%s::text))",
            (store.INSTANCE_LOCK_NAMESPACE, str(owner_id)),
        )
    (row,) = await store.insert_conversations(conn, [new(owner_id, prompt)])
    return row.id


async def ended_by_hand(conn: AsyncConnection, owner_id: UUID) -> UUID:
    """A conversation ended with its owner kept: every end clears the owner, so only this
    shows the status condition of the fence on its own."""
    conversation_id = await streaming(conn, owner_id)
    await conn.execute(
        "UPDATE conversations SET status = 'cancelled' WHERE id = %s", (conversation_id,)
    )
    return conversation_id


async def stored(conn: AsyncConnection, conversation_id: UUID) -> list[tuple[int, str]]:
    cursor = await conn.execute(
        "SELECT seq, text FROM chunks WHERE conversation_id = %s ORDER BY seq", (conversation_id,)
    )
    return await cursor.fetchall()


async def notifications(
    conn: AsyncConnection, about: set[UUID], until: set[UUID]
) -> list[tuple[str, list[UUID]]]:
    """(channel, ids named) of the notifications `conn` (listening) hears that name any of
    `about` (other tests' servers notify on the same channels), until all of `until` are
    named (a loaded machine may be slow to deliver), and a moment more to hear a duplicate."""
    return await _heard(conn, about, 10, until) + await _heard(conn, about, 0.2, set())


async def _heard(
    conn: AsyncConnection, about: set[UUID], seconds: float, until: set[UUID]
) -> list[tuple[str, list[UUID]]]:
    heard = []
    missing = set(until)
    # Closed on leaving: a suspended notifies() holds the connection's lock.
    async with aclosing(conn.notifies(timeout=seconds)) as received:
        async for notification in received:
            named = [UUID(part) for part in notification.payload.split(",")]
            if about.intersection(named):
                heard.append((notification.channel, named))
            missing.difference_update(named)
            if until and not missing:
                break
    return heard


def test_inserted_conversations_stream_and_a_retry_returns_the_same_rows(
    database_url: str,
) -> None:
    async def scenario() -> tuple[list[Conversation], list[Conversation], list[tuple]]:
        async with connected(database_url) as (conn, _):
            owner_id = uuid4()
            chat = [{"role": "user", "content": "hi"}]
            batch = [new(owner_id, "first"), new(owner_id, "second", messages=chat, parameters={})]
            rows = await store.insert_conversations(conn, batch)
            # A retry after a lost acknowledgement: the same rows, not an error.
            again = await store.insert_conversations(conn, batch)
            cursor = await conn.execute(
                "SELECT prompt, status, owner_id, messages, parameters FROM conversations"
                " WHERE id = ANY(%s) ORDER BY prompt",
                ([c.id for c in batch],),
            )
            return rows, again, await cursor.fetchall()

    rows, again, recorded = run(scenario)
    assert [(r.prompt, r.status, r.response, r.chunks) for r in rows] == [
        ("first", "streaming", "", 0),
        ("second", "streaming", "", 0),
    ]
    assert again == rows  # created_at included: the first insert's
    owner_id = recorded[0][2]
    assert recorded == [
        ("first", "streaming", owner_id, None, None),
        ("second", "streaming", owner_id, [{"role": "user", "content": "hi"}], {}),
    ]


def test_chunks_are_stored_only_into_the_owners_streaming_rows_and_the_others_come_back(
    database_url: str,
) -> None:
    async def scenario() -> tuple[dict[str, UUID], list[UUID], dict[str, list[tuple[int, str]]]]:
        async with connected(database_url) as (conn, _):
            owner_id = uuid4()
            ids = {
                "owned": await streaming(conn, owner_id),
                "another's": await streaming(conn, uuid4()),
                "ended": await streaming(conn, owner_id),
                "ended, still owned": await ended_by_hand(conn, owner_id),
                "missing": uuid4(),
            }
            await store.finish_conversations(conn, [Ending(ids["ended"], "completed")], owner_id)
            batch = [Chunk(i, seq, f"{name} {seq}") for seq in (1, 2) for name, i in ids.items()]
            refused = await store.insert_chunks(conn, batch, owner_id)
            return ids, refused, {name: await stored(conn, i) for name, i in ids.items()}

    ids, refused, chunks = run(scenario)
    # Each refused conversation once, however many of its chunks the batch held.
    assert sorted(refused) == sorted(i for name, i in ids.items() if name != "owned")
    assert chunks == {name: [] for name in ids} | {"owned": [(1, "owned 1"), (2, "owned 2")]}


def test_a_chunk_written_again_keeps_its_first_text_and_is_not_refused(
    database_url: str,
) -> None:
    async def scenario() -> tuple[list[UUID], list[tuple[int, str]]]:
        async with connected(database_url) as (conn, _):
            owner_id = uuid4()
            conversation_id = await streaming(conn, owner_id)
            await store.insert_chunks(conn, [Chunk(conversation_id, 1, "first")], owner_id)
            # A retry after a lost acknowledgement sends the same chunk again.
            retry = [Chunk(conversation_id, 1, "again"), Chunk(conversation_id, 2, "next")]
            refused = await store.insert_chunks(conn, retry, owner_id)
            return refused, await stored(conn, conversation_id)

    refused, chunks = run(scenario)
    assert refused == []
    assert chunks == [(1, "first"), (2, "next")]


def test_chunks_read_back_in_seq_order_whatever_order_they_were_written_in(
    database_url: str,
) -> None:
    async def scenario() -> tuple[list[Chunk], list[Chunk], Conversation | None]:
        async with connected(database_url) as (conn, pool):
            owner_id = uuid4()
            conversation_id = await streaming(conn, owner_id)
            for seqs in ((3, 1), (4, 2)):
                batch = [Chunk(conversation_id, seq, f"<{seq}>") for seq in seqs]
                await store.insert_chunks(conn, batch, owner_id)
            return (
                await store.read_chunks(pool, conversation_id),
                await store.read_chunks(pool, conversation_id, after_seq=2),
                await store.get_conversation(pool, conversation_id),
            )

    everything, after_two, conversation = run(scenario)
    assert [(c.seq, c.text) for c in everything] == [(1, "<1>"), (2, "<2>"), (3, "<3>"), (4, "<4>")]
    assert [c.seq for c in after_two] == [3, 4]
    assert conversation is not None and conversation.response == "<1><2><3><4>"


def test_stored_chunks_notify_each_conversation_once_and_only_once_committed(
    database_url: str,
) -> None:
    async def scenario() -> tuple[list[UUID], list[tuple[str, list[UUID]]]]:
        async with (
            connected(database_url) as (conn, _),
            await AsyncConnection.connect(database_url, autocommit=True) as listener,
        ):
            await listener.execute("LISTEN sse_llm_chunks")
            owner_id = uuid4()
            ids = [await streaming(conn, owner_id) for _ in range(201)]
            refused_id = await streaming(conn, uuid4())
            rolled_back = await streaming(conn, owner_id)
            async with conn.transaction(force_rollback=True):
                await store.insert_chunks(conn, [Chunk(rolled_back, 1, "never")], owner_id)
            # Two chunks of every conversation, and one of a conversation not the owner's.
            batch = [Chunk(i, seq, "x") for seq in (1, 2) for i in ids]
            await store.insert_chunks(conn, [*batch, Chunk(refused_id, 1, "x")], owner_id)
            # Delivered in commit order: a notification of the rolled back chunk would come first.
            mine = {*ids, refused_id, rolled_back}
            return ids, await notifications(listener, about=mine, until=set(ids))

    ids, heard = run(scenario)
    assert {channel for channel, _ in heard} == {"sse_llm_chunks"}
    named = [conversation_id for _, payload in heard for conversation_id in payload]
    assert sorted(named) == sorted(ids)  # once each; never the refused one
    # A payload must stay under PostgreSQL's 8000 bytes: 201 ids take two.
    assert len(heard) == 2


def test_an_end_is_recorded_once_by_its_owner_with_the_response_assembled_from_chunks(
    database_url: str,
) -> None:
    async def scenario() -> tuple[list[UUID], list[UUID], list[UUID], tuple]:
        async with connected(database_url) as (conn, _):
            owner_id = uuid4()
            conversation_id = await streaming(conn, owner_id)
            chunks = [Chunk(conversation_id, 2, "world"), Chunk(conversation_id, 1, "hello ")]
            await store.insert_chunks(conn, chunks, owner_id)
            failed = Ending(conversation_id, "failed", "upstream_error", "it broke")
            by_another = await store.finish_conversations(conn, [failed], uuid4())
            recorded = await store.finish_conversations(conn, [failed], owner_id)
            # A late end (another process settled it meanwhile, say) changes nothing.
            late = [Ending(conversation_id, "completed")]
            again = await store.finish_conversations(conn, late, owner_id)
            cancelled = await ended_by_hand(conn, owner_id)
            again += await store.finish_conversations(conn, [Ending(cancelled, "failed")], owner_id)
            cursor = await conn.execute(
                "SELECT status, error_code, error_message, response, chunk_count, owner_id,"
                " completed_at IS NOT NULL, first_chunk_at IS NOT NULL"
                " FROM conversations WHERE id = %s",
                (conversation_id,),
            )
            row = await cursor.fetchone()
            assert row is not None
            return [conversation_id], by_another, recorded, (again, row)

    ids, by_another, recorded, (again, row) = run(scenario)
    assert by_another == [] and recorded == ids and again == []
    assert row == ("failed", "upstream_error", "it broke", "hello world", 2, None, True, True)


def test_a_streaming_conversation_reads_as_its_chunks_and_an_ended_one_as_recorded(
    database_url: str,
) -> None:
    async def scenario() -> list[Any]:
        async with connected(database_url) as (conn, pool):
            owner_id = uuid4()
            conversation_id = await streaming(conn, owner_id)
            chunks = [Chunk(conversation_id, 1, "so "), Chunk(conversation_id, 2, "far")]
            await store.insert_chunks(conn, chunks, owner_id)
            live = await store.get_conversation(pool, conversation_id)
            live_status = await store.get_status(pool, conversation_id)
            await store.finish_conversations(conn, [Ending(conversation_id, "completed")], owner_id)
            # A chunk slipped in past the end (only by hand): the recorded end still rules.
            await conn.execute(
                "INSERT INTO chunks (conversation_id, seq, text) VALUES (%s, 3, ' more')",
                (conversation_id,),
            )
            ended = await store.get_conversation(pool, conversation_id)
            ended_status = await store.get_status(pool, conversation_id)
            unknown = await store.get_conversation(pool, uuid4())
            return [live, live_status, ended, ended_status, unknown]

    live, live_status, ended, ended_status, unknown = run(scenario)
    assert (live.status, live.response, live.chunks) == ("streaming", "so far", 2)
    assert live_status == store.Outcome("streaming", 2)
    assert (ended.status, ended.response, ended.chunks) == ("completed", "so far", 2)
    assert ended.first_chunk_at is not None and ended.completed_at is not None
    assert ended_status == store.Outcome("completed", 2)
    assert unknown is None


def test_history_lists_newest_first_in_pages_filtered_by_status_and_words(
    database_url: str,
) -> None:
    tag, answer_word = word(), word()

    async def scenario() -> tuple[list[UUID], dict[str, history_queries.HistoryPage]]:
        async with connected(database_url) as (conn, pool):
            owner_id = uuid4()
            # One statement each: each its own creation time.
            ids = [await streaming(conn, owner_id, f"{tag} number {n}") for n in range(3)]
            await store.insert_chunks(conn, [Chunk(ids[1], 1, answer_word)], owner_id)
            await store.finish_conversations(conn, [Ending(ids[1], "completed")], owner_id)

            async def page(**options: Any) -> history_queries.HistoryPage:
                return await history_queries.list_conversations(
                    pool, **{"limit": 2, "offset": 0, **options}
                )

            return ids, {
                "first": await page(query=tag),
                "second": await page(query=tag, offset=2),
                "completed": await page(query=tag, status="completed"),
                "streaming": await page(query=tag, status="streaming", limit=5),
                "answer": await page(query=answer_word),
                "excluding": await page(query=f"{tag} -{answer_word}", limit=5),
            }

    ids, pages = run(scenario)

    def listed(name: str) -> tuple[list[UUID], bool]:
        return [c.id for c in pages[name].items], pages[name].has_more

    assert listed("first") == ([ids[2], ids[1]], True)
    assert listed("second") == ([ids[0]], False)
    assert listed("completed") == ([ids[1]], False)
    assert listed("streaming") == ([ids[2], ids[0]], False)
    assert listed("answer") == ([ids[1]], False)  # an ended answer is searched too
    assert listed("excluding") == ([ids[2], ids[0]], False)
    assert pages["completed"].items[0].response == answer_word


def test_deleting_an_unconfirmed_conversation_deletes_its_chunks_too(database_url: str) -> None:
    async def scenario() -> tuple[int, list[tuple[int, str]], int]:
        async with connected(database_url) as (conn, _):
            owner_id = uuid4()
            gone, kept = await streaming(conn, owner_id), await streaming(conn, owner_id)
            chunks = [Chunk(gone, 1, "x"), Chunk(kept, 1, "y")]
            await store.insert_chunks(conn, chunks, owner_id)
            await store.delete_unconfirmed_conversations(conn, [gone])
            cursor = await conn.execute(
                "SELECT count(*) FROM conversations WHERE id = ANY(%s)", ([gone, kept],)
            )
            (rows,) = await cursor.fetchone() or (0,)
            return rows, await stored(conn, gone), len(await stored(conn, kept))

    rows, orphans, kept_chunks = run(scenario)
    assert (rows, orphans, kept_chunks) == (1, [], 1)
