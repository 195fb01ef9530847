"""Compact storage: ended conversations' chunk rows folded into `chunk_layouts`, replay exact."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import uuid
from collections.abc import Iterator, Sequence
from uuid import UUID

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from sse_llm import chunk_layout, compaction, store
from sse_llm.compaction import BatchResult, Compactor, compact_batch
from sse_llm.config import Settings
from sse_llm.contract import Status
from tests.conftest import RunningServer, start_server
from tests.processes import spawn_server
from tests.sse_client import iter_events
from tests.support import wait_until

TRICKY = [
    "😀",  # astral: two UTF-16 units, one code point
    "e\u0301",  # a combining mark, split from nothing
    "\u0301 after",  # a chunk that starts with a combining mark
    "\r\n",
    "",  # an empty chunk
    "line\rfeed\n",
    "𝄞𝄢 music",
    "a\u200db",  # a zero-width joiner
    "👩‍👩‍👧",  # a ZWJ sequence
    "\ufeffbom",
    " end",
]
LONG = [f"w{index % 97}{'é' if index % 3 else '🙂'} " for index in range(1000)]


def run_async(database_url: str, work: object) -> object:
    """Run `work(pool)` (a coroutine function) on a pool of its own, in a loop of its own;
    autocommit, as the service's main pool."""

    async def main() -> object:
        kwargs = {"autocommit": True}
        async with AsyncConnectionPool(database_url, min_size=1, max_size=2, kwargs=kwargs) as pool:
            return await work(pool)  # type: ignore[operator]

    return asyncio.run(main())


def compact(database_url: str, limit: int = 200) -> BatchResult:
    result = run_async(database_url, lambda pool: compact_batch(pool, limit))
    assert isinstance(result, BatchResult)
    return result


def counts(result: BatchResult) -> tuple[int, int, bool]:
    return result.compacted, result.kept, result.more


def compact_in_thread(
    database_url: str, limit: int = 200
) -> concurrent.futures.Future[BatchResult]:
    executor = concurrent.futures.ThreadPoolExecutor(1)
    future = executor.submit(compact, database_url, limit)
    executor.shutdown(wait=False)
    return future


def create_ended(
    database_url: str, texts: Sequence[str], status: Status = Status.COMPLETED
) -> UUID:
    """A conversation stored by the writer's own statements, with these chunks, ended."""
    owner = uuid.uuid4()
    conversation = store.NewConversation(uuid.uuid4(), "a prompt", "demo", "demo", owner)

    async def work(pool: AsyncConnectionPool) -> None:
        async with pool.connection() as conn:
            await store.insert_conversations(conn, [conversation])
            chunks = [store.Chunk(conversation.id, i + 1, t) for i, t in enumerate(texts)]
            for start in range(0, len(chunks), 100):  # the writer's batches
                await store.insert_chunks(conn, chunks[start : start + 100], owner)
            if status != Status.STREAMING:
                await store.finish_conversations(
                    conn, [store.Ending(conversation.id, status)], owner
                )

    run_async(database_url, work)
    return conversation.id


def replay(server: RunningServer, conversation_id: UUID, after: int = 0) -> list[tuple[int, str]]:
    """What a real client is sent on attaching after `after`: (id, text) of each chunk."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    url = f"/conversations/{conversation_id}/stream"
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        if response.status_code == 204:
            return []
        assert response.status_code == 200
        events = list(iter_events(response))
    assert events[-1].event == "done"
    return [(int(e.id or 0), e.json["text"]) for e in events if e.event == "message"]


def expected(texts: Sequence[str], after: int = 0) -> list[tuple[int, str]]:
    return [(seq, text) for seq, text in enumerate(texts, 1) if seq > after]


def stored_form(db: psycopg.Connection, conversation_id: UUID) -> tuple[int, bytes | None]:
    row = db.execute(
        "SELECT (SELECT count(*) FROM chunks WHERE conversation_id = %(id)s),"
        " (SELECT layout FROM chunk_layouts WHERE conversation_id = %(id)s)",
        {"id": conversation_id},
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.fixture
def own_server(own_database: str, base_settings: Settings) -> Iterator[RunningServer]:
    """A server on the test's own database, compaction off (the test compacts)."""
    running = start_server(base_settings.with_changes(database_url=own_database))
    yield running
    running.stop()


@pytest.fixture
def own_db(own_database: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(own_database, autocommit=True) as conn:
        yield conn


def timeline(database_url: str, conversation_id: UUID) -> list[tuple[int, float, int]]:
    async def work(pool: AsyncConnectionPool) -> list[tuple[int, float, int]]:
        async with pool.connection() as conn:
            return await store.chunk_timeline(conn, conversation_id)

    result = run_async(database_url, work)
    assert isinstance(result, list)
    return result


def test_replay_and_resume_are_exact_before_and_after_compaction(
    own_database: str, own_server: RunningServer, own_db: psycopg.Connection
) -> None:
    tricky = create_ended(own_database, TRICKY)
    long = create_ended(own_database, LONG)
    resumes = {tricky: range(len(TRICKY) + 1), long: [0, 1, 499, 998, 999, 1000]}
    texts = {tricky: TRICKY, long: LONG}
    before = {
        (c, after): replay(own_server, c, after)
        for c, points in resumes.items()
        for after in points
    }
    timelines = {c: timeline(own_database, c) for c in texts}
    for (conversation_id, after), sent in before.items():
        assert sent == expected(texts[conversation_id], after)
    assert counts(compact(own_database)) == (2, 0, False)
    for conversation_id in texts:
        rows, layout = stored_form(own_db, conversation_id)
        assert rows == 0 and layout is not None and layout != chunk_layout.KEPT_AS_ROWS
    after_compaction = {key: replay(own_server, *key) for key in before}
    assert after_compaction == before
    for conversation_id, old in timelines.items():
        new = timeline(own_database, conversation_id)
        assert [(s, n) for s, _, n in new] == [(s, n) for s, _, n in old]
        assert all(abs(a - b) <= 0.5 for (_, a, _), (_, b, _) in zip(new, old, strict=True))
    # The live-response assembly and the count read the row: unchanged by compaction.
    page = httpx.get(f"{own_server.url}/history/{long}").json()
    assert page["response"] == "".join(LONG)


def test_a_streaming_conversation_is_never_compacted(
    own_database: str, own_db: psycopg.Connection
) -> None:
    streaming = create_ended(own_database, ["still ", "going"], Status.STREAMING)
    ended = create_ended(own_database, ["done ", "here"])
    assert compact(own_database).compacted == 1
    assert stored_form(own_db, streaming) == (2, None)
    assert stored_form(own_db, ended)[0] == 0


def test_chunks_that_do_not_make_up_the_response_are_kept_and_logged_once(
    own_database: str,
    own_server: RunningServer,
    own_db: psycopg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conversation_id = create_ended(own_database, ["one ", "two ", "three"])
    own_db.execute("DELETE FROM chunks WHERE conversation_id = %s AND seq = 2", (conversation_id,))
    edited = create_ended(own_database, ["same ", "count"])  # every row there, one changed
    own_db.execute(
        "UPDATE chunks SET text = 'other' WHERE conversation_id = %s AND seq = 2", (edited,)
    )
    with caplog.at_level(logging.WARNING, logger="sse_llm.compaction"):
        assert counts(compact(own_database)) == (0, 2, False)
        assert counts(compact(own_database)) == (0, 0, False)
    messages = [r.message for r in caplog.records]
    for kept in (conversation_id, edited):
        warning = f"conversation {kept}: its chunk rows do not make up its response; kept as rows"
        assert messages.count(warning) == 1
    assert stored_form(own_db, conversation_id) == (2, chunk_layout.KEPT_AS_ROWS)
    assert stored_form(own_db, edited) == (2, chunk_layout.KEPT_AS_ROWS)
    assert replay(own_server, conversation_id) == [(1, "one "), (3, "three")]


def wait_for_lock_wait(db: psycopg.Connection, statement_start: str) -> None:
    """Until a backend waits on a lock running a statement that starts so."""

    def waiting() -> bool:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND starts_with(ltrim(query, E' \\n'), %s)",
            (statement_start,),
        ).fetchone()
        return bool(row and row[0])

    wait_until(waiting, 20, 0.05, f"no {statement_start!r} waits on a lock")


@pytest.mark.parametrize(
    ("lock", "held_at"),
    [
        # Held after writing the layout, before deleting the rows and committing.
        ("LOCK TABLE chunks IN SHARE MODE", "DELETE FROM chunks"),
        # Held after reading the rows, before writing anything.
        ("LOCK TABLE chunk_layouts IN SHARE MODE", "INSERT INTO chunk_layouts"),
    ],
)
def test_a_replay_overlapping_the_compaction_of_its_conversation_is_exact(
    own_database: str,
    own_server: RunningServer,
    own_db: psycopg.Connection,
    lock: str,
    held_at: str,
) -> None:
    conversation_id = create_ended(own_database, LONG)
    with psycopg.connect(own_database) as holder:
        holder.execute(lock)
        compaction = compact_in_thread(own_database)
        wait_for_lock_wait(own_db, held_at)
        # The compaction's transaction is open at its critical point: a real client's
        # replay (and every resume point) sees the rows, exactly.
        for after in (0, 1, 500, 999):
            assert replay(own_server, conversation_id, after) == expected(LONG, after)
        assert not compaction.done()
        holder.rollback()  # lets the compaction go on and commit
    assert compaction.result(30).compacted == 1
    assert stored_form(own_db, conversation_id)[0] == 0
    for after in (0, 1, 500, 999):
        assert replay(own_server, conversation_id, after) == expected(LONG, after)


def test_reads_started_before_a_compaction_commits_see_one_form(
    own_database: str, own_db: psycopg.Connection
) -> None:
    conversation_id = create_ended(own_database, TRICKY)

    async def race(pool: AsyncConnectionPool) -> list[list[store.Chunk]]:
        # Replays and the compaction at once, many times: each read is one statement.
        reads = [store.read_chunks(pool, conversation_id) for _ in range(40)]
        results = await asyncio.gather(compact_batch(pool), *reads)
        return list(results[1:])

    outcome = run_async(own_database, race)
    assert isinstance(outcome, list)
    for chunks in outcome:
        assert [(c.seq, c.text) for c in chunks] == expected(TRICKY)
    assert stored_form(own_db, conversation_id)[0] == 0


def test_two_compactors_never_take_the_same_conversation_nor_wait_for_each_other(
    own_database: str, own_db: psycopg.Connection
) -> None:
    # Compactors walk the chunks table in the order of its key.
    ids = sorted(create_ended(own_database, [f"{n} ", "x", "y"]) for n in range(30))
    # Compactor A's batch (the first 10) held at its delete by a lock on one chunk row.
    with psycopg.connect(own_database) as holder:
        holder.execute("SELECT 1 FROM chunks WHERE conversation_id = %s FOR UPDATE", (ids[0],))
        first = compact_in_thread(own_database, 10)
        wait_for_lock_wait(own_db, "DELETE FROM chunks")
        # Compactor B skips A's locked rows and does the next 10, without waiting.
        second = compact(own_database, 10)
        assert second.compacted == 10
        compacted = own_db.execute(
            "SELECT array_agg(conversation_id) FROM chunk_layouts"
        ).fetchone()[0]  # type: ignore[index]
        assert set(compacted) == set(ids[10:20])
        holder.rollback()
    assert first.result(30).compacted == 10
    # Both at once on the rest: 10 in all, none twice (each batch would fail otherwise).
    results = list(
        concurrent.futures.ThreadPoolExecutor(2).map(lambda _: compact(own_database, 4), [0, 1])
    )
    while (result := compact(own_database, 4)).compacted:
        results.append(result)
    assert sum(r.compacted for r in results) == 10
    assert own_db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0  # type: ignore[index]


def test_a_compactor_killed_mid_batch_loses_nothing(
    own_database: str, own_db: psycopg.Connection
) -> None:
    ids = sorted(create_ended(own_database, TRICKY) for _ in range(5))
    with psycopg.connect(own_database) as holder:
        holder.execute("SELECT 1 FROM chunks WHERE conversation_id = %s FOR UPDATE", (ids[0],))
        server = spawn_server(own_database, SSE_LLM_COMPACTION_INTERVAL="0.2")
        try:
            wait_for_lock_wait(own_db, "DELETE FROM chunks")
            server.signal(signal.SIGKILL)
            server.wait(10)
        finally:
            server.stop()
        holder.rollback()  # the dead compactor's backend goes on, then finds no client

    def batch_gone() -> bool:
        row = own_db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE ltrim(query) LIKE 'DELETE FROM chunks%'"
            " AND state <> 'idle'"
        ).fetchone()
        return row is not None and row[0] == 0

    wait_until(batch_gone, 20)
    for conversation_id in ids:
        assert stored_form(own_db, conversation_id) == (len(TRICKY), None)
    assert compact(own_database).compacted == 5
    chunks = run_async(own_database, lambda pool: store.read_chunks(pool, ids[0]))
    assert [(c.seq, c.text) for c in chunks] == expected(TRICKY)  # type: ignore[attr-defined]


def test_the_compact_form_of_a_60_chunk_answer_takes_about_two_bytes_a_chunk(
    own_database: str, own_db: psycopg.Connection
) -> None:
    words = ["[demo]"] + [f" word{n % 9}" for n in range(59)]  # ~430 characters
    conversation_id = create_ended(own_database, words)
    compact(own_database)
    size = own_db.execute(
        "SELECT pg_column_size(layout) FROM chunk_layouts WHERE conversation_id = %s",
        (conversation_id,),
    ).fetchone()[0]  # type: ignore[index]
    # Where the 60 chunk rows took ~7,600 bytes with their index.
    assert size <= 1 + 4 + 60 * 2 + 60


def test_a_server_compacts_in_the_background(own_database: str, base_settings: Settings) -> None:
    running = start_server(
        base_settings.with_changes(database_url=own_database, compaction_interval=0.1)
    )
    try:
        with (
            httpx.Client(base_url=running.url, timeout=30) as client,
            client.stream("POST", "/stream", json={"prompt": "fold me"}) as response,
        ):
            conversation_id = response.headers["x-conversation-id"]
            sent = [(int(e.id or 0), e.json["text"]) for e in iter_events(response) if e.id]
        with psycopg.connect(own_database, autocommit=True) as db:
            wait_until(lambda: stored_form(db, UUID(conversation_id))[0] == 0, 20)
        assert replay(running, UUID(conversation_id)) == sent
    finally:
        running.stop()


def test_a_batch_walks_on_from_where_the_last_one_ended(
    own_database: str, own_db: psycopg.Connection
) -> None:
    ids = sorted(create_ended(own_database, ["a", "b"]) for _ in range(3))
    result = run_async(own_database, lambda pool: compact_batch(pool, 10, after=ids[0]))
    assert isinstance(result, BatchResult) and result.compacted == 2
    assert stored_form(own_db, ids[0]) == (2, None)  # behind the cursor: left for the wrap
    # It reached the end of the table: the next batch starts over at once, rather than
    # after a batch that finds nothing, so what ended meanwhile does not pile up.
    assert result.last is None and not result.more
    assert compact(own_database).compacted == 1


def test_a_full_batch_says_where_the_next_one_goes_on(
    own_database: str, own_db: psycopg.Connection
) -> None:
    ids = sorted(create_ended(own_database, ["a", "b"]) for _ in range(3))
    first = run_async(own_database, lambda pool: compact_batch(pool, 2))
    assert (first.compacted, first.more, first.last) == (2, True, ids[1])
    second = run_async(own_database, lambda pool: compact_batch(pool, 2, after=first.last))
    assert (second.compacted, second.more, second.last) == (1, False, None)
    assert all(stored_form(own_db, conversation_id)[0] == 0 for conversation_id in ids)


def test_no_batch_runs_while_the_writer_lags(own_database: str, own_db: psycopg.Connection) -> None:
    conversation_id = create_ended(own_database, ["wait ", "for ", "the writer"])
    lag = [1.0]  # seconds a chunk has waited for persistence

    async def work(pool: AsyncConnectionPool) -> tuple[int, int]:
        compactor = Compactor(pool, 0.02, 50, writer_lag=lambda: lag[0])
        compactor.start()
        try:
            await asyncio.sleep(0.5)  # ~25 turns, each one skipped
            while_lagging = compactor.compacted
            lag[0] = 0.0
            for _ in range(250):
                if compactor.compacted:
                    break
                await asyncio.sleep(0.02)
            return while_lagging, compactor.compacted
        finally:
            await compactor.close()

    assert run_async(own_database, work) == (0, 1)
    assert stored_form(own_db, conversation_id)[0] == 0


def test_a_walk_cut_short_by_streaming_conversations_goes_on_past_them(
    own_database: str, own_db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch of 1 walks 1 + WALK_STEPS conversations: here the first 2, both streaming.
    # It folds none, and the next batch must start past them, not from the first again.
    monkeypatch.setattr(compaction, "WALK_STEPS", 1)
    ids = sorted(create_ended(own_database, ["a"], Status.STREAMING) for _ in range(3))
    own_db.execute(
        "UPDATE conversations SET status = 'completed', response = 'a', chunk_count = 1"
        " WHERE id = %s",
        (ids[2],),
    )
    first = run_async(own_database, lambda pool: compact_batch(pool, 1))
    assert (first.compacted, first.more, first.last) == (0, True, ids[1])
    second = run_async(own_database, lambda pool: compact_batch(pool, 2, after=first.last))
    assert (second.compacted, second.more, second.last) == (1, False, None)
    assert [stored_form(own_db, conversation_id)[0] for conversation_id in ids] == [1, 1, 0]


def chunk_vacuums(db: psycopg.Connection) -> tuple[int, int]:
    """(VACUUMs of `chunks` by hand so far, its dead rows), as the statistics say."""
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT vacuum_count, n_dead_tup FROM pg_stat_user_tables WHERE relid = 'chunks'::regclass"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.slow
def test_the_compactor_vacuums_chunks_so_their_space_is_reused(
    own_database: str, own_db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    own_db.execute("ALTER TABLE chunks SET (autovacuum_enabled = false)")  # ours alone
    monkeypatch.setattr(compaction, "VACUUM_MIN_DEAD", 1_000)
    for _ in range(20):  # 1,200 chunk rows, to be dead once folded
        create_ended(own_database, [f" word{n}" for n in range(60)])
    before, _ = chunk_vacuums(own_db)

    async def work(pool: AsyncConnectionPool) -> None:
        compactor = Compactor(pool, 0.05, 200)
        compactor.start()
        try:
            for _ in range(400):  # the deletes reach the statistics within a second or so
                if chunk_vacuums(own_db)[0] > before:
                    return
                await asyncio.sleep(0.05)
        finally:
            await compactor.close()

    run_async(own_database, work)
    vacuums, dead = chunk_vacuums(own_db)
    assert vacuums > before and dead < compaction.VACUUM_MIN_DEAD

    # Another process's VACUUM a moment ago counts as this one's: no second pass.
    for _ in range(20):
        create_ended(own_database, [f" word{n}" for n in range(60)])
    compact(own_database)
    wait_until(lambda: chunk_vacuums(own_db)[1] >= compaction.VACUUM_MIN_DEAD, 20)
    assert run_async(own_database, lambda pool: compaction.vacuum_chunks(pool, 60)) is False
    assert run_async(own_database, lambda pool: compaction.vacuum_chunks(pool, 0)) is True
    assert chunk_vacuums(own_db)[1] < compaction.VACUUM_MIN_DEAD
