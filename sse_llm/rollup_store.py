"""The folds of the rollups (migrations 0010, 0013, 0021): the per-process rows and the
writers' pending deltas merged into the shared rows, one process at a time.

Every process runs them from its lease check (lease.py); the figures read the same before
and after a fold (the readers count unfolded rows too): folding keeps the tables small.
"""

from __future__ import annotations

from uuid import UUID

from psycopg_pool import AsyncConnectionPool

# The key space of the counts' fold (one process folds at a time).
COUNTS_LOCK_NAMESPACE = 0x55E13
# The counts' row of folded changes and of rows no process owns (migration 0010).
NO_WRITER = UUID(int=0)

# Deltas one fold moves at most: a lease check's worth at any load (~3 a conversation).
PENDING_FOLD_LIMIT = 50_000
# The pending fold's advisory lock, beside fold_counts' (COUNTS_LOCK_NAMESPACE, 0).
PENDING_FOLD_LOCK = 1


async def fold_pending_stats(pool: AsyncConnectionPool) -> int:
    """Move the rollups' pending deltas (migration 0021) into conversation_stats; return
    how many. Readers count them either way: this keeps the pending table small.

    One process at a time, under a lock of its own: every process tries at each lease
    check, and on fold_counts' lock it made that fold (every 5 minutes) skip its turn.
    A fold_counts beside it is safe: a delta is deleted by one of them, and both add in
    key order."""
    async with pool.connection() as conn, conn.transaction():
        cursor = await conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, %s)",
            (COUNTS_LOCK_NAMESPACE, PENDING_FOLD_LOCK),
        )
        row = await cursor.fetchone()
        if row is None or not row[0]:
            return 0  # another process folds
        cursor = await conn.execute(
            "SELECT fold_conversation_stats_pending(%s)", (PENDING_FOLD_LIMIT,)
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def fold_counts(pool: AsyncConnectionPool) -> int:
    """Merge the rollups' per-process rows into writer 0; return rows moved.

    Keeps the counts table about as small as hours x models x statuses however many
    processes ran. One process folds at a time (the others skip); a stream that ends
    late adds a fresh row to its old hour, which the next fold merges.
    """
    async with pool.connection() as conn, conn.transaction():
        cursor = await conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, 0)", (COUNTS_LOCK_NAMESPACE,)
        )
        row = await cursor.fetchone()
        if row is None or not row[0]:
            return 0
        cursor = await conn.execute(
            """
            WITH moved AS (
                DELETE FROM conversation_counts
                WHERE writer <> %(no_writer)s
                  AND bucket < date_trunc('hour', now(), 'UTC') - interval '1 hour'
                RETURNING bucket, model, provider, status, conversations
            )
            INSERT INTO conversation_counts AS n
                (bucket, model, provider, status, writer, conversations)
            SELECT bucket, model, provider, status, %(no_writer)s, sum(conversations)
            FROM moved GROUP BY bucket, model, provider, status
            ON CONFLICT (bucket, model, provider, status, writer)
            DO UPDATE SET conversations = n.conversations + excluded.conversations
            """,
            {"no_writer": NO_WRITER},
        )
        moved = cursor.rowcount
        # The /stats rollups (migration 0013): the pending deltas in (0021), then past
        # hours' rows into writer 0 and the daily table; the review counts' per-backend
        # rows into writer 0.
        cursor = await conn.execute(
            "SELECT fold_conversation_stats_pending(%s) + fold_conversation_stats()"
            " + fold_review_counts()",
            (PENDING_FOLD_LIMIT,),
        )
        row = await cursor.fetchone()
        return moved + (int(row[0]) if row else 0)
