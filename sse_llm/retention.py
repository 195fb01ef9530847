"""Retention (SPEC 10): deleting the conversations older than a number of days, in small batches.

The deliberate choices (read why before changing one):

- One pruner at a time, across replicas and CLI runs: a run holds a session advisory lock
  (PRUNE_LOCK_NAMESPACE) on a connection of its own for its whole length, so the lock goes
  with the connection if the process dies. A second pruner does not wait: `sse-llm prune`
  says that another pruner runs and exits with status 3 (a cron job's next turn will do),
  a service's background pruner skips its turn. A dry run takes no lock: it deletes nothing.
- What goes: conversations created before the cut-off (fixed when the run starts, on the
  database's clock, so a long run does not chase the present), never one still
  `streaming`, and unless `include_reviewed` never one with a review. With it goes
  everything attached: its chunks and deliveries (no foreign keys: deleted here), reviews,
  annotations and review claims (ON DELETE CASCADE), and its review summary rows.
- Small batches that never stall streams: BATCH_SIZE conversations per short transaction,
  oldest first along conversations_newest_idx, each batch continuing after the last row
  the previous one read (the rows it skipped, reviewed or streaming, are not read again);
  a statement and a lock timeout in every transaction; and after each batch a pause
  IDLE_PER_BUSY times as long as the batch took (at least MIN_PAUSE). So the pruner takes
  at most about a quarter of one database core, and less when the database is busy: its
  batches then take longer, and so do its pauses. (At half a core, a quiet 2-core machine
  pruned 8,036 rows/s and C=50 streams' chunk p99 went from ~10 ms to 17-58 ms:
  benchmarks/results/prune-20261201T192507Z.md. Retention is never urgent; streams are.)
  The streaming path's rows are never locked: a streaming row is
  never selected, and an ended one takes no more writes from the writer.
- Lock, then delete, in two statements: the rows are locked FOR UPDATE SKIP LOCKED, then
  deleted by a second statement, a new snapshot that sees any review committed after the
  first one began (a reviewer's insert waits on the row lock from then on, then finds its
  conversation gone). A row another transaction holds (a review being written) is
  skipped, left for the next run.
- Rollups keep the pruned periods' figures (SPEC 10): each prune transaction sets
  `sse_llm.keep_rollups`, which the rollups' delete triggers honour, and adds what it
  deleted to pruned_counts (migration 0016): the history page's counts subtract it, so
  they keep describing the conversations it can list.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from uuid import UUID

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import class_row

from sse_llm.contract import Status
from sse_llm.database import connection_options

log = logging.getLogger(__name__)

# The key space of the pruner's lock (store.py's are 0x55E11-0x55E13); key 0.
PRUNE_LOCK_NAMESPACE = 0x55E16
# 500 conversations (with their reviews and annotations) take ~20-60 ms to delete:
# short enough that a writer batch never queues behind one for long (benchmarks/prune.py).
BATCH_SIZE = 500
MIN_PAUSE = 0.02  # seconds between batches, at least
IDLE_PER_BUSY = 3.0  # a pause is this many times as long as the batch before it
# Per statement of a prune transaction: a batch that overruns is rolled back, not waited for.
STATEMENT_TIMEOUT = "5s"
LOCK_TIMEOUT = "2s"
SECONDS_PER_DAY = 86_400
# Before any conversation: where the first batch starts.
_BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)


class AnotherPruner(Exception):
    """Another pruner (a replica's background one, or an `sse-llm prune`) holds the lock."""


class NotMigrated(Exception):
    """The database lacks the migrations the pruner needs (run `sse-llm migrate`)."""


@dataclass(frozen=True)
class CensusRow:
    """How many conversations older than the cut-off have this status and review state."""

    status: Status
    reviewed: bool
    conversations: int

    def deleted(self, include_reviewed: bool) -> bool:
        """Whether a prune deletes these: never streaming ones; reviewed ones if asked."""
        return self.status != Status.STREAMING and (include_reviewed or not self.reviewed)


@dataclass(frozen=True)
class Census:
    """What a prune with this cut-off meets (a dry run)."""

    cutoff: datetime
    rows: list[CensusRow]

    def would_delete(self, include_reviewed: bool) -> int:
        """How many conversations a prune would delete now."""
        return sum(r.conversations for r in self.rows if r.deleted(include_reviewed))


@dataclass(frozen=True)
class PruneResult:
    """How a prune run went (so far, when handed to its progress callback)."""

    cutoff: datetime
    deleted: int = 0
    batches: int = 0
    seconds: float = 0.0
    longest_batch_seconds: float = 0.0
    last_batch_seconds: float = 0.0


async def census(database_url: str, older_than_days: float) -> Census:
    """Count the conversations older than the cut-off by status and reviewed (no lock)."""
    async with await _connect(database_url) as conn:
        await _require_migrated(conn)
        cutoff = await _cutoff(conn, older_than_days)
        # A whole-history count, fit for an operator's command, never for a request.
        cursor = conn.cursor(row_factory=class_row(CensusRow))
        await cursor.execute(
            """
            SELECT c.status,
                   EXISTS (SELECT 1 FROM reviews r WHERE r.conversation_id = c.id) AS reviewed,
                   count(*) AS conversations
            FROM conversations c WHERE c.created_at < %(cutoff)s
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            {"cutoff": cutoff},
        )
        return Census(cutoff, await cursor.fetchall())


async def prune(
    database_url: str,
    older_than_days: float,
    *,
    include_reviewed: bool = False,
    batch_size: int = BATCH_SIZE,
    min_pause: float = MIN_PAUSE,
    on_batch: Callable[[PruneResult], None] | None = None,
) -> PruneResult:
    """Delete what is older than the cut-off in batches; raise AnotherPruner if one runs."""
    async with await _connect(database_url) as conn:
        await _require_migrated(conn)
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s, 0)", (PRUNE_LOCK_NAMESPACE,))
        row = await cursor.fetchone()
        if row is None or not row[0]:
            raise AnotherPruner("another pruner is running")
        # Held until the connection closes, at the end of this block (or with the process).
        result = PruneResult(await _cutoff(conn, older_than_days))
        began = time.monotonic()
        after: tuple[datetime, UUID] | None = None
        while True:
            started = time.monotonic()
            deleted, after = await prune_batch(
                conn, result.cutoff, after, include_reviewed=include_reviewed, limit=batch_size
            )
            took = time.monotonic() - started
            if after is None:  # nothing left older than the cut-off
                return replace(result, seconds=time.monotonic() - began)
            result = replace(
                result,
                deleted=result.deleted + deleted,
                batches=result.batches + 1,
                seconds=time.monotonic() - began,
                longest_batch_seconds=max(result.longest_batch_seconds, took),
                last_batch_seconds=took,
            )
            if on_batch is not None:
                on_batch(result)
            await asyncio.sleep(max(min_pause, IDLE_PER_BUSY * took))


async def prune_batch(
    conn: AsyncConnection,
    cutoff: datetime,
    after: tuple[datetime, UUID] | None,
    *,
    include_reviewed: bool,
    limit: int,
) -> tuple[int, tuple[datetime, UUID] | None]:
    """Delete one batch in one transaction; return how many and the last row read (None: done)."""
    async with conn.transaction():
        await conn.execute(
            """
            SELECT set_config('sse_llm.keep_rollups', 'on', true),
                   set_config('statement_timeout', %s, true),
                   set_config('lock_timeout', %s, true)
            """,
            (STATEMENT_TIMEOUT, LOCK_TIMEOUT),
        )
        # Oldest first along conversations_newest_idx (read backwards), from where the
        # last batch stopped; `'streaming'` literal, as store.py spells it.
        statement = sql.SQL("""
            SELECT c.id, c.created_at FROM conversations c
            WHERE c.created_at < %(cutoff)s
              AND (c.created_at, c.id) > (%(after_at)s, %(after_id)s)
              AND c.status <> 'streaming' {unreviewed}
            ORDER BY c.created_at, c.id
            LIMIT %(limit)s
            FOR UPDATE OF c SKIP LOCKED
        """).format(unreviewed=_unreviewed(include_reviewed))
        cursor = await conn.execute(
            statement,
            {
                "cutoff": cutoff,
                "after_at": after[0] if after else _BEGINNING,
                "after_id": after[1] if after else UUID(int=0),
                "limit": limit,
            },
        )
        locked = await cursor.fetchall()
        if not locked:
            return 0, None
        deleted = await _delete(conn, [row[0] for row in locked], include_reviewed)
    return len(deleted), (locked[-1][1], locked[-1][0])


async def _delete(conn: AsyncConnection, ids: list[UUID], include_reviewed: bool) -> list[UUID]:
    """Delete the locked conversations that still qualify, with what is attached to them."""
    # A new snapshot: a review committed since the rows were chosen is seen here.
    statement = sql.SQL("""
        WITH removed AS (
            DELETE FROM conversations c
            WHERE c.id = ANY(%(ids)s) AND c.status <> 'streaming' {unreviewed}
            RETURNING c.id, c.created_at, c.model, c.provider, c.status
        ), counted AS (
            INSERT INTO pruned_counts AS p (bucket, model, provider, status, conversations)
            SELECT date_trunc('hour', created_at, 'UTC'), model, provider, status, count(*)
            FROM removed GROUP BY 1, 2, 3, 4
            ON CONFLICT (bucket, model, provider, status)
            DO UPDATE SET conversations = p.conversations + excluded.conversations
        )
        SELECT id FROM removed
    """).format(unreviewed=_unreviewed(include_reviewed))
    cursor = await conn.execute(statement, {"ids": ids})
    deleted = [row[0] for row in await cursor.fetchall()]
    if deleted:
        # By key, the ids as an array: each an index lookup (chunks' primary key,
        # deliveries_conversation_idx). Reviews, annotations and claims went by cascade.
        await conn.execute(
            """
            WITH chunks_gone AS (DELETE FROM chunks WHERE conversation_id = ANY(%(ids)s)),
                 deliveries_gone AS (
                     DELETE FROM deliveries WHERE conversation_id = ANY(%(ids)s)),
                 labels_gone AS (
                     DELETE FROM review_label_counts WHERE conversation_id = ANY(%(ids)s))
            DELETE FROM review_summaries WHERE conversation_id = ANY(%(ids)s)
            """,
            {"ids": deleted},
        )
    return deleted


def _unreviewed(include_reviewed: bool) -> sql.Composable:
    """The condition that spares reviewed conversations, unless they go too.

    Left out rather than `%s OR NOT EXISTS`: with the OR, PostgreSQL reads every review
    into a hash per statement (90-250 ms a batch at 100,000 reviews, EXPLAIN ANALYZE);
    alone, NOT EXISTS is an anti-join along the reviews' primary key."""
    if include_reviewed:
        return sql.SQL("")
    return sql.SQL("AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.conversation_id = c.id)")


async def prune_in_background(database_url: str, older_than_days: float) -> None:
    """A service's turn (lease.py): prune what SSE_LLM_RETENTION_DAYS makes due, unless
    another pruner runs; log the outcome. Failures wait for the next turn."""
    try:
        result = await prune(database_url, older_than_days)
    except AnotherPruner:
        log.debug("another pruner is running: this process skips its turn")
        return
    except (psycopg.Error, OSError, NotMigrated) as exc:
        log.warning("pruning failed, retried at the next turn: %r", exc)
        return
    if result.deleted:
        log.info(
            "pruned %d conversations created before %s in %d batches (%.1f s)",
            result.deleted,
            result.cutoff.isoformat(),
            result.batches,
            result.seconds,
        )


async def _connect(database_url: str) -> AsyncConnection:
    # A connection of its own: the session lock must not travel back into a pool.
    return await AsyncConnection.connect(
        database_url, autocommit=True, **connection_options(5.0, "sse-llm pruner")
    )


async def _cutoff(conn: AsyncConnection, older_than_days: float) -> datetime:
    cursor = await conn.execute(
        "SELECT now() - make_interval(secs => %s)", (older_than_days * SECONDS_PER_DAY,)
    )
    row = await cursor.fetchone()
    assert row is not None
    cutoff: datetime = row[0]
    return cutoff


async def _require_migrated(conn: AsyncConnection) -> None:
    cursor = await conn.execute("SELECT to_regclass('pruned_counts') IS NOT NULL")
    row = await cursor.fetchone()
    if row is None or not row[0]:
        raise NotMigrated("the database is not migrated: run `sse-llm migrate` first")
