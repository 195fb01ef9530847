"""The loads of pg_core.py: fake generations through the real writer, single-row commits,
batch inserts with and without NOTIFY, and LISTENing connections."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID, uuid4

import psycopg

from sse_llm import store
from sse_llm.contract import CHUNKS_CHANNEL, Status
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk, Ending, NewConversation
from sse_llm.writer import Writer

TEXT = "a token"  # ~ one model token: 7 characters, the measured average
CHUNKS_PER_ANSWER = 50

# store.insert_chunks's statement without its pg_notify: the same fence and insert.
WITHOUT_NOTIFY = store.INSERT_CHUNKS + store.REFUSED_CHUNKS


@dataclass
class Counter:
    """What a load did: chunk rows stored, commits, conversations begun and ended."""

    counts: dict[str, int] = field(default_factory=lambda: {"rows": 0, "commits": 0})

    def add(self, key: str, value: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + value

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class CountingMetrics(Metrics):
    """The writer's own metrics, counting each committed batch of chunks."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def observe_batch(self, chunks: Sequence[Chunk], seconds: float) -> None:
        self.counter.add("commits")
        self.counter.add("rows", len(chunks))
        super().observe_batch(chunks, seconds)


class Owner:
    """What the writer reports to about a stream's chunks (a Generation, in the service)."""

    def __init__(self) -> None:
        self.storage_failed = False

    def publish(self, chunk: Chunk) -> None:
        pass

    def fail_storage(self, code: str) -> None:
        self.storage_failed = True

    def fence(self) -> None:
        self.storage_failed = True


async def streams(
    url: str, count: int, interval: float, counter: Counter, stop: asyncio.Event
) -> None:
    """`count` fake generations through one Writer until `stop`: create, 50 chunks (one
    every `interval` s, or each once the last is committed when 0), finish, again."""
    writer = Writer(url, storage_timeout=10, metrics=CountingMetrics(counter))
    owner_id = uuid4()
    writer.start(owner_id)
    loop = asyncio.get_running_loop()

    async def one() -> None:
        # Spread over one answer's duration, as independent users' streams are.
        await asyncio.sleep(random.random() * interval * CHUNKS_PER_ANSWER)
        while not stop.is_set():
            row = await writer.create(
                NewConversation(uuid4(), "a prompt", "bench", "bench", owner_id)
            )
            counter.add("creates")
            owner, due = Owner(), loop.time()
            for seq in range(1, CHUNKS_PER_ANSWER + 1):
                if stop.is_set() or owner.storage_failed:
                    return
                await writer.write(Chunk(row.id, seq, TEXT, received=loop.time()), owner)
                if interval:
                    due += interval
                    await asyncio.sleep(max(0.0, due - loop.time()))
            await writer.finish(Ending(row.id, Status.COMPLETED))
            counter.add("ends")

    try:
        await asyncio.gather(*(one() for _ in range(count)))
    finally:
        await writer.close()


async def single_rows(url: str, connections: int, counter: Counter, stop: asyncio.Event) -> None:
    """Each connection commits one chunk row per transaction until `stop`."""

    async def one() -> None:
        conversation_id = uuid4()  # chunks has no foreign key (migration 0005)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            seq = 0
            while not stop.is_set():
                seq += 1
                await conn.execute(
                    "INSERT INTO chunks (conversation_id, seq, text) VALUES (%s, %s, %s)",
                    (conversation_id, seq, TEXT),
                )
                counter.add("commits")
                counter.add("rows")

    await asyncio.gather(*(one() for _ in range(connections)))


async def batch_insert(
    url: str,
    owner: UUID,
    ids: list[UUID],
    batch: int,
    connections: int,
    notify: bool,
    counter: Counter,
    stop: asyncio.Event,
) -> None:
    """Each connection commits batches of `batch` chunks (one per conversation of its own
    slice of `ids`) through store.insert_chunks, or the same statement without NOTIFY."""

    async def one(mine: list[UUID]) -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            seq = (await (await conn.execute(
                "SELECT coalesce(max(seq), 0) FROM chunks WHERE conversation_id = %s", (mine[0],)
            )).fetchone() or (0,))[0]  # fmt: skip
            while not stop.is_set():
                seq += 1
                chunks = [Chunk(i, seq, TEXT) for i in mine]
                if notify:
                    refused = await store.insert_chunks(conn, chunks, owner)
                else:
                    rows = store._json_rows.encode(
                        [(c.conversation_id.hex, c.seq, c.text) for c in chunks]
                    )
                    cursor = await conn.execute(WITHOUT_NOTIFY, {"rows": rows, "owner_id": owner})
                    refused = [row[0] for row in await cursor.fetchall()]
                assert not refused, "the batch's conversations must be streaming"
                counter.add("commits")
                counter.add("rows", len(chunks))

    await asyncio.gather(*(one(ids[n * batch : (n + 1) * batch]) for n in range(connections)))


async def listen(url: str, count: int) -> list[asyncio.Task[None]]:
    """`count` connections LISTENing on the chunks channel, reading what arrives."""
    tasks = []
    for _ in range(count):
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await conn.execute(f"LISTEN {CHUNKS_CHANNEL}")

        async def drain(conn: psycopg.AsyncConnection = conn) -> None:
            try:
                async for _ in conn.notifies():
                    pass
            finally:
                await conn.close()

        tasks.append(asyncio.create_task(drain()))
    return tasks
