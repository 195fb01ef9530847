"""The chunk writer: every stream of this process persists through it, in batches.

Group commit: while one batch is being written, the chunks that arrive wait together
and go in the next single INSERT. A lone stream gets its chunk written at once (the batch
holds one chunk); a thousand streams cost one transaction per batch, not per chunk.
Only once a batch is committed are its chunks handed to their generations, which pass
them on to subscribers: no client ever sees a chunk that is not on disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import psycopg

from sse_llm import store
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk

log = logging.getLogger(__name__)


class StorageUnavailable(Exception):
    """The database could not store a batch within the storage timeout."""


class ChunkOwner(Protocol):
    """What the writer tells about a chunk once its batch is settled (a Generation)."""

    storage_failed: bool

    def publish(self, chunk: Chunk) -> None:
        """The chunk is persisted: pass it on."""

    def fail_storage(self) -> None:
        """A batch holding this owner's chunks could not be stored."""


class ChunkWriter:
    """Persists chunks in batches on one dedicated connection, retrying through outages."""

    def __init__(self, database_url: str, storage_timeout: float, metrics: Metrics) -> None:
        self._database_url = database_url
        self._metrics = metrics
        self._storage_timeout = storage_timeout
        self._pending: list[tuple[Chunk, ChunkOwner]] = []
        self._pending_done: asyncio.Future[bool] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._connection: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background task that writes batches."""
        self._task = asyncio.create_task(self._run(), name="chunk-writer")

    async def close(self) -> None:
        """Write what is pending, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._connection is not None:
            await self._connection.close()

    def write(self, chunk: Chunk, owner: ChunkOwner) -> asyncio.Future[bool]:
        """Queue a chunk; the future resolves True once its batch is committed and published,
        False if the batch could not be stored."""
        if self._pending_done is None:
            self._pending_done = asyncio.get_running_loop().create_future()
        self._pending.append((chunk, owner))
        self._wake.set()
        return self._pending_done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            batch, self._pending = self._pending, []
            done, self._pending_done = self._pending_done, None
            assert done is not None
            await self._write_batch(batch)
            done.set_result(not all(owner.storage_failed for _, owner in batch))

    async def _write_batch(self, batch: list[tuple[Chunk, ChunkOwner]]) -> None:
        # An owner whose earlier batch failed must not get later chunks stored: that
        # would leave a gap in its sequence.
        batch = [(chunk, owner) for chunk, owner in batch if not owner.storage_failed]
        if not batch:
            return
        chunks = [chunk for chunk, _ in batch]
        started = time.monotonic()
        try:
            await self._persist(chunks)
        except StorageUnavailable:
            for _, owner in batch:
                if not owner.storage_failed:
                    owner.fail_storage()
            return
        for chunk, owner in batch:
            owner.publish(chunk)
        self._metrics.observe_batch(chunks, time.monotonic() - started)

    async def _persist(self, chunks: list[Chunk]) -> None:
        """Insert the chunks; on a connection problem reconnect and retry with backoff."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._storage_timeout
        delay = 0.05
        while True:
            try:
                connection = await self._connect()
                await store.insert_chunks(connection, chunks)
                return
            except psycopg.OperationalError as exc:
                await self._disconnect()
                if loop.time() + delay > deadline:
                    log.error("giving up on a batch of %d chunks: %s", len(chunks), exc)
                    raise StorageUnavailable(str(exc)) from exc
                log.warning("database unavailable, retrying a batch of %d chunks", len(chunks))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except psycopg.Error as exc:
                # Not a connection problem: retrying would fail the same way.
                log.error("could not store a batch of %d chunks: %s", len(chunks), exc)
                raise StorageUnavailable(str(exc)) from exc

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
