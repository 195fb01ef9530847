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

Off the streaming path, and paced beside it:
- PostgreSQL checks the rows against `response` and computes lengths and times: no chunk
  text crosses to this process, whose event loop serves the streams (36 ms of its CPU
  per 200-conversation batch before, 8 ms now);
- after a batch that stopped short of the end of its walk (full, or at its step bound),
  the next waits as long as it took, so a backlog uses at most half of one connection
  (a quarter, with batches of 50 or 10, cost streaming as much in the A/B, and folded 56
  conversations/s beside 50 streams against 114/s like this);
- no batch starts while the writer lags (a chunk has waited 0.1 s for persistence).

`chunks` is a queue (rows live seconds), and the space of deleted rows is reused only once
VACUUM has passed. Autovacuum looks every 60 s, which leaves a minute of chunks on disk
(~70 MB at the benchmark's 152 conversations/s); looking every 10 s (the embedded server
did) passes over every young table, and cost the streams a third on their p99. So the
compactor vacuums `chunks` itself after a batch, at most every `VACUUM_SECONDS` however
many processes share the database (pg_stat_user_tables says when anyone last did), and
autovacuum keeps its default pace for the rest. Every 10 s left ~113 MiB of chunks at the
storage benchmark's 726 folded conversations/s (389 bytes of each of 304,119).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sse_llm import chunk_layout

log = logging.getLogger(__name__)

# A batch reads at most about this many chunk rows (at least one conversation's, however
# long): 200 conversations of 1,000 chunks would be 200,000 rows in memory at once.
MAX_BATCH_CHUNKS = 50_000
# After a batch that says `more`, this many times as long idle: a backlog takes at most half of one
# connection from the streams beside it.
IDLE_PER_BUSY = 1.0
# No batch while a chunk has waited this long for the writer: the database is behind
# the streams, and their persistence comes first.
WRITER_LAG_SECONDS = 0.1
# Conversations a batch's walk of the chunks table may step over beyond its batch
# (streaming ones, locked ones): a bound on one batch's statement.
WALK_STEPS = 20_000
# After each batch a process vacuums `chunks` if it has this many dead rows (~2.5 MB of
# heap: a pass of ~10 ms is worth it) and no process (nor autovacuum) vacuumed it in the
# last VACUUM_SECONDS: every 2 s while a backlog is folded, about every 10 s at C=100. At
# 1,000 rows a pass came after nearly every batch, and at C=1 chunk p99 rose by 19 %
# against 10 % (ab-20261202T043205Z, ab-20261202T034923Z).
VACUUM_SECONDS = 2.0
VACUUM_MIN_DEAD = 20_000


@dataclass(frozen=True)
class BatchResult:
    """What one batch did: conversations folded, and those kept as rows (mismatched)."""

    compacted: int
    kept: int
    more: bool = False  # the batch stopped before the end of the walk: more may be waiting
    last: UUID | None = None  # where the next batch's walk starts (None: from the first)


@dataclass(frozen=True)
class _Ended:
    id: UUID
    chunk_count: int


async def compact_batch(
    pool: AsyncConnectionPool, limit: int = 200, after: UUID | None = None
) -> BatchResult:
    """Fold up to `limit` ended conversations' chunk rows into their layout, in one
    transaction, walking from the conversation id `after` (None: from the first)."""
    async with pool.connection() as conn, conn.transaction():
        ended, resume = await _lock_ended(conn, limit, after)
        more = resume is not None
        if not ended:
            return BatchResult(0, 0, more, resume)
        layouts: dict[UUID, bytes] = {}
        kept = 0
        for conversation_id, exact, lengths, milliseconds in await _read_chunks(conn, ended):
            if not exact:
                kept += 1
                log.warning(
                    "conversation %s: its chunk rows do not make up its response; kept as rows",
                    conversation_id,
                )
                layouts[conversation_id] = chunk_layout.KEPT_AS_ROWS
                continue
            layouts[conversation_id] = chunk_layout.encode(lengths, milliseconds)
        await _write_layouts(conn, layouts)
        return BatchResult(len(layouts) - kept, kept, more, resume)


async def _lock_ended(
    conn: AsyncConnection, limit: int, after: UUID | None
) -> tuple[list[_Ended], UUID | None]:
    """Lock the next ended, uncompacted conversations past `after` that no other
    transaction has locked; and where the next batch's walk starts (None: at the start)."""
    # Found from the chunks table by a walk of its key, one conversation after another,
    # from where this compactor's last batch ended (rows behind it were just deleted: a
    # walk from the start would step over their index entries again and again until
    # vacuum) and at most WALK_STEPS of them (streaming ones are walked over too). The
    # table is small once compaction keeps up: no index over every conversation needed.
    # The walk's last step says whether it reached the end of the table (its id is NULL
    # then, or the walk is empty): the next batch starts over from the first, so each
    # batch folds what ended since the one before, not a backlog that waited for a wrap.
    cursor = await conn.execute(
        """
        WITH RECURSIVE walk(id, step) AS (
            (SELECT conversation_id, 1 FROM chunks
             WHERE %(after)s::uuid IS NULL OR conversation_id > %(after)s
             ORDER BY conversation_id LIMIT 1)
            UNION ALL
            SELECT (SELECT k.conversation_id FROM chunks k WHERE k.conversation_id > w.id
                    ORDER BY k.conversation_id LIMIT 1), w.step + 1
            FROM walk w WHERE w.id IS NOT NULL AND w.step < %(steps)s
        ),
        locked AS (
            SELECT c.id, c.chunk_count
            FROM walk JOIN conversations c ON c.id = walk.id
            WHERE c.status <> 'streaming'
              AND NOT EXISTS (SELECT 1 FROM chunk_layouts l WHERE l.conversation_id = c.id)
            ORDER BY c.id
            LIMIT %(limit)s
            FOR NO KEY UPDATE OF c SKIP LOCKED
        )
        SELECT locked.id, locked.chunk_count, walked.id
        FROM (SELECT id FROM walk ORDER BY step DESC LIMIT 1) walked
        LEFT JOIN locked ON true
        ORDER BY locked.id
        """,
        {"limit": limit, "after": after, "steps": limit + WALK_STEPS},
    )
    rows = await cursor.fetchall()
    walked_to = rows[0][2] if rows else None  # None: the walk reached the end
    ended: list[_Ended] = []
    total = 0
    for conversation_id, chunk_count, _ in rows:
        if conversation_id is None:
            break  # the walk's one row, with nothing to lock
        if ended and total + chunk_count > MAX_BATCH_CHUNKS:
            return ended, ended[-1].id  # the rest stay for the next batch (unlocked at commit)
        ended.append(_Ended(conversation_id, chunk_count))
        total += chunk_count
    if len(ended) == limit:
        return ended, ended[-1].id  # full: conversations past the last may be waiting
    return ended, walked_to


async def _read_chunks(
    conn: AsyncConnection, ended: list[_Ended]
) -> list[tuple[UUID, bool, list[int], list[int]]]:
    """Per conversation of `ended` that still has chunk rows: whether they are exactly
    chunks 1..n of its response, their lengths and their whole ms after created_at."""
    # The check and the arithmetic run in PostgreSQL, next to the rows: the text never
    # crosses to this process, whose event loop serves the streams. A new snapshot, taken
    # once the locks are held: a conversation another compactor folded after this
    # transaction's first snapshot (so it was locked again on its commit) now shows no
    # rows, and is skipped. seq is unique and > 0, so n rows up to seq n are 1..n.
    # Each conversation's rows are aggregated on their own, found by the primary key: a
    # join first would carry `response` on every chunk row into one sort (5 MB for a
    # batch of 200, past work_mem: written to temporary files, twice the time).
    cursor = await conn.execute(
        """
        SELECT c.id,
               coalesce(k.n = c.chunk_count AND k.last = c.chunk_count
                        AND k.text = c.response, false),
               k.lengths, k.milliseconds
        FROM conversations c
        CROSS JOIN LATERAL (
            SELECT count(*) AS n, max(seq) AS last, string_agg(text, '' ORDER BY seq) AS text,
                   array_agg(char_length(text) ORDER BY seq) AS lengths,
                   array_agg(round(extract(epoch FROM created_at - c.created_at) * 1000)::bigint
                             ORDER BY seq) AS milliseconds
            FROM chunks WHERE conversation_id = c.id
        ) k
        WHERE c.id = ANY(%(ids)s) AND k.n > 0
        ORDER BY c.id
        """,
        {"ids": [conversation.id for conversation in ended]},
    )
    return await cursor.fetchall()


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


async def vacuum_chunks(pool: AsyncConnectionPool, recent: float = VACUUM_SECONDS) -> bool:
    """VACUUM `chunks` if it has dead rows and no process vacuumed it in the last `recent`
    seconds; True if this call did."""
    async with pool.connection() as conn:  # autocommit: VACUUM runs outside a transaction
        cursor = await conn.execute(
            """
            SELECT n_dead_tup >= %(dead)s
               AND coalesce(greatest(last_vacuum, last_autovacuum)
                            < now() - make_interval(secs => %(recent)s), true)
              FROM pg_stat_user_tables WHERE relid = 'chunks'::regclass
            """,
            {"dead": VACUUM_MIN_DEAD, "recent": recent},
        )
        row = await cursor.fetchone()
        if row is None or not row[0]:
            return False
        # SKIP_LOCKED: another process's VACUUM (or autovacuum's) is doing it. No
        # TRUNCATE: its lock would stop the writer's inserts, and a queue's empty pages at
        # the end of the file are refilled within seconds.
        await conn.execute("VACUUM (SKIP_LOCKED, TRUNCATE false) chunks")
        return True


class Compactor:
    """Runs compact_batch in the background, one batch every `interval` seconds."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        interval: float,
        batch: int,
        writer_lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._pool = pool
        self._interval = interval
        self._batch = batch
        self._writer_lag = writer_lag
        self._task: asyncio.Task[None] | None = None
        self._after: UUID | None = None
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

    async def _vacuum(self) -> None:
        try:
            await vacuum_chunks(self._pool)
        except Exception as exc:  # the database is away: the next check retries
            log.warning("vacuum of chunks failed: %r", exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = self._interval
        while True:
            await asyncio.sleep(pause)
            if self._writer_lag() > WRITER_LAG_SECONDS:
                pause = self._interval  # the database is behind the streams: not now
                continue
            began = loop.time()
            try:
                result = await compact_batch(self._pool, self._batch, self._after)
            except Exception as exc:  # the database is away: the next batch retries
                log.warning("compaction batch failed: %r", exc)
                pause = self._interval
                continue
            self.compacted += result.compacted
            self._after = result.last
            took = loop.time() - began
            await self._vacuum()
            # A batch that stopped short of the end says there is more: go on soon, but
            # busy at most 1/(1+IDLE) of the time, so a backlog is worked off beside the
            # streams.
            pause = min(self._interval, IDLE_PER_BUSY * took) if result.more else self._interval
