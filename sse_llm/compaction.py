"""Compact storage: the chunk rows of ended conversations folded into `chunk_layouts`.

A chunk row costs ~127 bytes on disk for ~7 characters of text; once a conversation has
ended, its text is all in `response`, and its chunks need only their boundaries and
times (sse_llm/chunk_layout.py, ~2 bytes a chunk). So each process runs a `Compactor`:
every `SSE_LLM_COMPACTION_INTERVAL` seconds (5; 0: never) one batch, in ONE transaction,
  1. locks up to `SSE_LLM_COMPACTION_BATCH` (200) ended, uncompacted conversations
     (`FOR NO KEY UPDATE SKIP LOCKED`: replicas take disjoint batches and never wait
     for each other; the lock does not conflict with a review's foreign-key check),
  2. reads their chunk rows, checks they make up `response` exactly, and encodes them,
  3. inserts their `chunk_layouts` rows and deletes their chunk rows.
A crash anywhere rolls all of it back. Readers (store.read_chunks, store.chunk_timeline)
read both forms in one statement, so one snapshot shows either the rows or the layout of
a conversation, never neither nor both. Streaming conversations are never selected (their
chunks are the streaming path's), nor are rows the writer may still touch: its fence
admits chunks and ends only for `streaming` rows.

A conversation whose rows do not make up its response (deleted by hand, say) keeps its
rows: its layout says `KEPT_AS_ROWS`, so it is logged once and never examined again.

Off the streaming path: after a full batch the next starts only after as long again as it
took, so a backlog uses at most half of one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sse_llm import chunk_layout

log = logging.getLogger(__name__)

# A batch reads at most about this many chunk rows (at least one conversation's, however
# long): 200 conversations of 1,000 chunks would be 200,000 rows in memory at once.
MAX_BATCH_CHUNKS = 50_000


@dataclass(frozen=True)
class BatchResult:
    """What one batch did: conversations folded, and those kept as rows (mismatched)."""

    compacted: int
    kept: int
    more: bool = False  # the batch was full: more may be waiting


@dataclass(frozen=True)
class _Ended:
    id: UUID
    response: str
    chunk_count: int
    created_at: datetime


async def compact_batch(pool: AsyncConnectionPool, limit: int = 200) -> BatchResult:
    """Fold up to `limit` ended conversations' chunk rows into their layout, in one transaction."""
    async with pool.connection() as conn, conn.transaction():
        ended, more = await _lock_ended(conn, limit)
        if not ended:
            return BatchResult(0, 0)
        # A new snapshot, taken once the locks are held: a conversation another
        # compactor folded after this transaction's first snapshot (so it was locked
        # again on its commit) now shows no rows, and is skipped.
        chunks = await _read_chunks(conn, ended)
        layouts: dict[UUID, bytes] = {}
        kept = 0
        for conversation in ended:
            if conversation.id not in chunks:
                continue
            layout = _layout_of(conversation, chunks[conversation.id])
            if layout is None:
                kept += 1
                log.warning(
                    "conversation %s: its chunk rows do not make up its response; kept as rows",
                    conversation.id,
                )
                layout = chunk_layout.KEPT_AS_ROWS
            layouts[conversation.id] = layout
        await _write_layouts(conn, layouts)
        return BatchResult(len(layouts) - kept, kept, more)


async def _lock_ended(conn: AsyncConnection, limit: int) -> tuple[list[_Ended], bool]:
    """Lock the next ended, uncompacted conversations no other transaction has locked;
    and whether more may be waiting."""
    # Found from the chunks table (by its primary key, one conversation after another),
    # which is small once compaction keeps up: no index over every conversation needed.
    cursor = await conn.execute(
        """
        WITH RECURSIVE walk(id) AS (
            (SELECT conversation_id FROM chunks ORDER BY conversation_id LIMIT 1)
            UNION ALL
            SELECT (SELECT k.conversation_id FROM chunks k WHERE k.conversation_id > w.id
                    ORDER BY k.conversation_id LIMIT 1)
            FROM walk w WHERE w.id IS NOT NULL
        )
        SELECT c.id, c.response, c.chunk_count, c.created_at
        FROM walk JOIN conversations c ON c.id = walk.id
        WHERE c.status <> 'streaming'
          AND NOT EXISTS (SELECT 1 FROM chunk_layouts l WHERE l.conversation_id = c.id)
        LIMIT %(limit)s
        FOR NO KEY UPDATE OF c SKIP LOCKED
        """,
        {"limit": limit},
    )
    rows = await cursor.fetchall()
    ended: list[_Ended] = []
    total = 0
    for row in rows:
        if ended and total + row[2] > MAX_BATCH_CHUNKS:
            return ended, True  # the rest stay for the next batch (unlocked at this commit)
        ended.append(_Ended(*row))
        total += row[2]
    return ended, len(rows) == limit


async def _read_chunks(
    conn: AsyncConnection, ended: list[_Ended]
) -> dict[UUID, list[tuple[int, str, float]]]:
    """The chunk rows of `ended`: (seq, text, ms after the conversation's created_at), in order."""
    cursor = await conn.execute(
        """
        SELECT conversation_id, seq, text, created_at FROM chunks
        WHERE conversation_id = ANY(%(ids)s)
        ORDER BY conversation_id, seq
        """,
        {"ids": [conversation.id for conversation in ended]},
    )
    created = {conversation.id: conversation.created_at for conversation in ended}
    chunks: dict[UUID, list[tuple[int, str, float]]] = defaultdict(list)
    for conversation_id, seq, text, at in await cursor.fetchall():
        milliseconds = (at - created[conversation_id]).total_seconds() * 1000
        chunks[conversation_id].append((seq, text, milliseconds))
    return chunks


def _layout_of(conversation: _Ended, chunks: list[tuple[int, str, float]]) -> bytes | None:
    """The layout of these chunk rows, or None if they are not exactly chunks 1..n of it."""
    seqs = [seq for seq, _, _ in chunks]
    texts = [text for _, text, _ in chunks]
    exact = (
        len(chunks) == conversation.chunk_count
        and seqs == list(range(1, len(chunks) + 1))
        and "".join(texts) == conversation.response
    )
    if not exact:
        return None
    return chunk_layout.encode(texts, [milliseconds for _, _, milliseconds in chunks])


async def _write_layouts(conn: AsyncConnection, layouts: dict[UUID, bytes]) -> None:
    """Store the layouts, and delete the chunk rows of those that are compact."""
    await conn.execute(
        """
        INSERT INTO chunk_layouts (conversation_id, layout)
        SELECT * FROM unnest(%(ids)s::uuid[], %(layouts)s::bytea[])
        """,
        {"ids": list(layouts), "layouts": list(layouts.values())},
    )
    compact = [key for key, layout in layouts.items() if layout != chunk_layout.KEPT_AS_ROWS]
    if compact:
        await conn.execute(
            "DELETE FROM chunks WHERE conversation_id = ANY(%(ids)s)", {"ids": compact}
        )


class Compactor:
    """Runs compact_batch in the background, one batch every `interval` seconds."""

    def __init__(self, pool: AsyncConnectionPool, interval: float, batch: int) -> None:
        self._pool = pool
        self._interval = interval
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self.compacted = 0  # conversations folded by this process since it started

    def start(self) -> None:
        """Start the batches (none if the interval is 0)."""
        if self._interval > 0:
            self._task = asyncio.create_task(self._run(), name="compaction")

    async def close(self) -> None:
        """Stop; a batch under way is rolled back (it is all one transaction)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = self._interval
        while True:
            await asyncio.sleep(pause)
            began = loop.time()
            try:
                result = await compact_batch(self._pool, self._batch)
            except Exception as exc:  # the database is away: the next batch retries
                log.warning("compaction batch failed: %r", exc)
                pause = self._interval
                continue
            self.compacted += result.compacted
            # A full batch says there is more: go on soon, at most half the time busy.
            pause = min(self._interval, loop.time() - began) if result.more else self._interval
