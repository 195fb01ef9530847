"""The writer: every write of the streaming path goes through it, in batches.

Group commit: while one batch is being written, new conversations, chunks and ends
arrive and wait together; the next batch writes them all in one transaction. A lone
stream gets its chunk written at once (the batch holds one chunk); a thousand streams
cost one transaction per batch, not one per chunk, and never queue for the pool. Under
load the writer also lingers 3 ms before each batch, so that batches grow.
Only once a batch is committed are its chunks handed to their generations, which pass
them on to subscribers: no client ever sees a chunk that is not on disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import psycopg

from sse_llm import store
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk, Conversation, Ending, NewConversation

log = logging.getLogger(__name__)

# Under load, how long the writer waits for more chunks before it commits a batch: a
# commit costs about the same CPU whether it holds 1 chunk or 100 (~110 µs of psycopg
# and socket work). Only after a batch of BUSY_BATCH chunks or more, so a lone stream
# (batches of one chunk) never waits.
LINGER_SECONDS = 0.003
BUSY_BATCH = 4


class StorageUnavailable(Exception):
    """The database could not store a batch within the storage timeout."""


class ChunkOwner(Protocol):
    """What the writer tells about a chunk once its batch is settled (a Generation)."""

    storage_failed: bool

    def publish(self, chunk: Chunk) -> None:
        """The chunk is persisted: pass it on."""

    def fail_storage(self) -> None:
        """A batch holding this owner's chunks could not be stored."""


@dataclass
class _Batch:
    """What waits for the next transaction."""

    creates: list[tuple[NewConversation, asyncio.Future[Conversation]]] = field(
        default_factory=list
    )
    chunks: list[tuple[Chunk, ChunkOwner]] = field(default_factory=list)
    ends: list[tuple[Ending, asyncio.Future[bool]]] = field(default_factory=list)
    # One future for all the chunks of the batch: no allocation per chunk.
    chunks_done: asyncio.Future[bool] | None = None

    def __bool__(self) -> bool:
        return bool(self.creates or self.chunks or self.ends)


class Writer:
    """Writes batches on one dedicated connection, retrying through database outages."""

    def __init__(self, database_url: str, storage_timeout: float, metrics: Metrics) -> None:
        self._database_url = database_url
        self._storage_timeout = storage_timeout
        self._metrics = metrics
        self._pending = _Batch()
        self._writing: _Batch | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._connection: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background task that writes batches."""
        self._task = asyncio.create_task(self._run(), name="writer")

    async def close(self) -> None:
        """Write what is pending, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._connection is not None:
            await self._connection.close()

    def create(self, conversation: NewConversation) -> asyncio.Future[Conversation]:
        """Queue a new conversation; the future gives its row once committed."""
        future: asyncio.Future[Conversation] = asyncio.get_running_loop().create_future()
        self._pending.creates.append((conversation, future))
        self._wake.set()
        return future

    def write(self, chunk: Chunk, owner: ChunkOwner) -> asyncio.Future[bool]:
        """Queue a chunk; the future resolves True once its batch is committed and published,
        False if the batch could not be stored."""
        pending = self._pending
        if pending.chunks_done is None:
            pending.chunks_done = asyncio.get_running_loop().create_future()
        pending.chunks.append((chunk, owner))
        self._wake.set()
        return pending.chunks_done

    def finish(self, ending: Ending) -> asyncio.Future[bool]:
        """Queue the end of a generation; the future says whether it was stored."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.ends.append((ending, future))
        self._wake.set()
        return future

    def lag(self) -> float:
        """Seconds since the oldest chunk no client can see yet was produced (0: none)."""
        writing = self._writing
        batch = writing if writing is not None and writing.chunks else self._pending
        if not batch.chunks:
            return 0.0
        return asyncio.get_running_loop().time() - batch.chunks[0][0].received

    async def _run(self) -> None:
        busy = False  # the last batch held chunks of several streams
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            if busy and not self._closing:
                await asyncio.sleep(LINGER_SECONDS)
            batch, self._pending = self._pending, _Batch()
            self._writing = batch
            await self._write_batch(batch)
            self._writing = None
            busy = len(batch.chunks) >= BUSY_BATCH

    async def _write_batch(self, batch: _Batch) -> None:
        # An owner whose earlier batch failed must not get later chunks stored: that
        # would leave a gap in its sequence.
        batch.chunks = [(c, owner) for c, owner in batch.chunks if not owner.storage_failed]
        started = time.monotonic()
        try:
            rows = await self._persist(batch)
        except StorageUnavailable as exc:
            self._fail(batch, exc)
            return
        by_id = {row.id: row for row in rows}
        for conversation, future in batch.creates:
            if not future.done():
                future.set_result(by_id[conversation.id])
        for chunk, owner in batch.chunks:
            owner.publish(chunk)
        for _, future in batch.ends:
            future.set_result(True)
        if batch.chunks_done is not None:
            batch.chunks_done.set_result(True)
        if batch.chunks:
            self._metrics.observe_batch([c for c, _ in batch.chunks], time.monotonic() - started)

    def _fail(self, batch: _Batch, exc: StorageUnavailable) -> None:
        for _, future in batch.creates:
            if not future.done():
                future.set_exception(exc)
        for _, owner in batch.chunks:
            if not owner.storage_failed:
                owner.fail_storage()
        for _, future in batch.ends:
            future.set_result(False)
        if batch.chunks_done is not None:
            batch.chunks_done.set_result(False)

    async def _persist(self, batch: _Batch) -> list[Conversation]:
        """Write the batch in one transaction; on a connection problem retry with backoff.

        New conversations are not held through an outage: their requests get their
        error at once, since no client has seen anything of them yet.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._storage_timeout
        delay = 0.05
        while True:
            try:
                return await self._transaction(batch)
            except psycopg.OperationalError as exc:
                await self._disconnect()
                self._fail_creates(batch, exc)
                if not (batch.chunks or batch.ends) or loop.time() + delay > deadline:
                    log.error("giving up on a batch: %s", exc)
                    raise StorageUnavailable(str(exc)) from exc
                log.warning(
                    "database unavailable, retrying a batch of %d chunks", len(batch.chunks)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except psycopg.Error as exc:
                # Not a connection problem: retrying would fail the same way.
                log.error("could not store a batch: %s", exc)
                raise StorageUnavailable(str(exc)) from exc
            except Exception as exc:
                # Text that cannot be encoded, say: this batch fails, but the writer, which
                # every stream of the process depends on, must live on.
                log.exception("could not encode a batch")
                raise StorageUnavailable(str(exc)) from exc

    def _fail_creates(self, batch: _Batch, exc: Exception) -> None:
        for _, future in batch.creates:
            if not future.done():
                future.set_exception(StorageUnavailable(str(exc)))
        batch.creates = []

    async def _transaction(self, batch: _Batch) -> list[Conversation]:
        connection = await self._connect()
        chunks = [chunk for chunk, _ in batch.chunks]
        if not batch.creates and not batch.ends:
            await store.insert_chunks(connection, chunks)  # one statement: no BEGIN needed
            return []
        rows: list[Conversation] = []
        async with connection.transaction():
            if batch.creates:
                new = [conversation for conversation, _ in batch.creates]
                rows = await store.insert_conversations(connection, new)
            if chunks:
                await store.insert_chunks(connection, chunks)
            if batch.ends:
                await store.finish_conversations(connection, [e for e, _ in batch.ends])
        return rows

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self._database_url, autocommit=True, connect_timeout=5
            )
        return self._connection

    async def _disconnect(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
