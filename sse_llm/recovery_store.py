"""The SQL of recovery (lease.py): each process's instance row and lock, and the settling
sweep that ends what dead processes left: their streaming conversations marked
`interrupted`, their open deliveries `lost`, their instance rows forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from sse_llm.contract import CHUNKS_CHANNEL, INTERRUPTED_MESSAGE, ErrorCode, Status
from sse_llm.delivery_store import NONE_SENT_THE_END
from sse_llm.store import ASSEMBLED_END, FENCE_LOCK_NAMESPACE, INSTANCE_LOCK_NAMESPACE


async def lock_instance(conn: AsyncConnection, instance_id: UUID) -> datetime | None:
    """Take this process's instance lock on `conn`, held as long as the session lives.

    Records the start time of the server it was taken on (see lease.py) and returns it;
    None if another session holds the lock.
    """
    cursor = await conn.execute(
        """
        INSERT INTO instances AS i (id, server_started_at)
        SELECT %(id)s, pg_postmaster_start_time()
        WHERE pg_try_advisory_lock(%(namespace)s, hashtext(%(id)s::text))
        ON CONFLICT (id) DO UPDATE
            SET server_started_at = excluded.server_started_at, locked_at = now()
        RETURNING i.server_started_at
        """,
        {"id": instance_id, "namespace": INSTANCE_LOCK_NAMESPACE},
    )
    row = await cursor.fetchone()
    return row[0] if row else None


async def server_started_at(conn: AsyncConnection) -> datetime:
    """When the database server last started: it changes when PostgreSQL restarts."""
    cursor = await conn.execute("SELECT pg_postmaster_start_time()")
    row = await cursor.fetchone()
    assert row is not None
    started: datetime = row[0]
    return started


async def forget_instance(conn: AsyncConnection, instance_id: UUID) -> None:
    """Remove this process's instance record (it is stopping and owns no stream any more)."""
    await conn.execute("DELETE FROM instances WHERE id = %s", (instance_id,))


# Who is dead, for the settling sweep (see lease.py): the owner's lock is free, and either
# it was taken on this very server (so the session that held it ended), or this server has
# been up past the re-lock grace (`quiet_server` is its start time once the settler has
# seen it that long; NULL before). The CASE takes the owner's lock only for such owners:
# held by the settler's transaction, it keeps a live owner from re-locking meanwhile.
DEAD_OWNER = sql.SQL("""
    CASE WHEN i.server_started_at = pg_postmaster_start_time()
              OR pg_postmaster_start_time() = %(quiet_server)s::timestamptz
         THEN pg_try_advisory_xact_lock(%(namespace)s, hashtext({owner}::text))
         ELSE false END
""")


async def interrupt_conversations(
    pool: AsyncConnectionPool,
    *,
    owner_id: UUID,
    except_ids: Sequence[UUID] = (),
    created_before_seconds: float = 0,
) -> list[UUID]:
    """Mark `interrupted` the conversations of `owner_id` (this process) not in `except_ids`.

    At shutdown, or for streams this process owns but no longer runs;
    `created_before_seconds` spares rows so new that their generation may not be
    registered yet. `response` is assembled from every persisted chunk.
    """
    orphaned = sql.SQL("""
        c.owner_id = %(owner_id)s AND c.id <> ALL(%(except_ids)s)
        AND c.created_at < now() - make_interval(secs => %(age)s)
    """)
    params = {"owner_id": owner_id, "except_ids": list(except_ids), "age": created_before_seconds}
    async with pool.connection() as conn, conn.transaction():
        # This process's own writer holds its fence lock; the rows settled here have no
        # generation and no write left in the writer (see lease.py), so none is needed.
        return await _settle(conn, orphaned, params, fence=False)


async def interrupt_orphaned_conversations(
    pool: AsyncConnectionPool, *, settler_id: UUID, quiet_server: datetime | None
) -> list[UUID]:
    """Mark `interrupted` the conversations of dead processes, and forget those processes.

    Dead as lease.py defines it (see DEAD_OWNER); `settler_id` (this process) is never
    dead to itself. Returns the ids of the conversations settled.
    """
    orphaned = sql.SQL("c.owner_id <> %(settler_id)s AND {dead}").format(
        dead=DEAD_OWNER.format(owner=sql.SQL("c.owner_id"))
    )
    params = {
        "settler_id": settler_id,
        "quiet_server": quiet_server,
        "namespace": INSTANCE_LOCK_NAMESPACE,
    }
    async with pool.connection() as conn, conn.transaction():
        settled = await _settle(conn, orphaned, params, fence=True)
        await lose_deliveries(conn, params)  # before `forget`: the same dead processes
        # Dead processes that own no stream any more (the ones left this time, rows
        # another transaction had locked, go next time).
        forget = sql.SQL("""
            DELETE FROM instances AS i
            WHERE i.id <> %(settler_id)s
              AND NOT EXISTS (SELECT 1 FROM conversations c
                              WHERE c.owner_id = i.id AND c.status = 'streaming')
              AND {dead}
        """).format(dead=DEAD_OWNER.format(owner=sql.SQL("i.id")))
        await conn.execute(forget, params)
    return settled


async def _settle(
    conn: AsyncConnection, orphaned: sql.Composable, params: dict[str, Any], *, fence: bool
) -> list[UUID]:
    """Fence the owners of the orphaned streaming rows, then mark the rows `interrupted`.

    The first thing in its transaction; three statements, each its own snapshot (see
    lease.py): find the rows and their owners; take each owner's fence lock exclusively,
    which is granted only when no writer of that owner is connected (a live writer holds
    it shared: its owner is not settled, this sweep or any) and keeps a reconnecting one
    out until this commits; then settle, from a snapshot that sees every chunk the owner's
    writer committed. Without `fence` (a process settling its own rows, whose writer holds
    its lock) the second statement is skipped.
    """
    # Each statement its own snapshot, whatever the server's default isolation.
    await conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    select = sql.SQL("""
        SELECT c.id, c.owner_id FROM conversations c LEFT JOIN instances i ON i.id = c.owner_id
        WHERE c.status = 'streaming' AND {orphaned}
    """).format(orphaned=orphaned)
    cursor = await conn.execute(select, params)
    rows = await cursor.fetchall()
    if not rows:
        return []
    if fence:
        cursor = await conn.execute(
            """
            SELECT o.id FROM unnest(%(owners)s::uuid[]) AS o(id)
            WHERE pg_try_advisory_xact_lock(%(namespace)s, hashtext(o.id::text))
            """,
            {"namespace": FENCE_LOCK_NAMESPACE, "owners": list({owner for _, owner in rows})},
        )
        fenced = {row[0] for row in await cursor.fetchall()}
        rows = [(row_id, owner) for row_id, owner in rows if owner in fenced]
        if not rows:
            return []
    # The token counts stay NULL: the upstream's died with the owner, and an estimate
    # here would be a second method to keep in step with the generation's.
    statement = sql.SQL("""
        UPDATE conversations AS c
        SET status = %(status)s,
            completed_at = now(),
            error_code = %(code)s,
            error_message = %(message)s,
            response = coalesce(k.response, ''),
            chunk_count = k.count,
            first_chunk_at = k.first_at,
            owner_id = NULL
        FROM unnest(%(ids)s::uuid[], %(owners)s::uuid[]) AS o(id, owner_id)
        CROSS JOIN LATERAL ({assembled}) AS k
        -- Still the same owner's and streaming: its owner may have ended it meanwhile.
        WHERE c.id = o.id AND c.owner_id = o.owner_id AND c.status = 'streaming'
        RETURNING c.id, pg_notify(%(channel)s, c.id::text)
    """).format(assembled=sql.SQL(ASSEMBLED_END.format(id="o.id")))
    params = {
        "ids": [row_id for row_id, _ in rows],
        "owners": [owner for _, owner in rows],
        "status": Status.INTERRUPTED,
        "code": ErrorCode.INTERRUPTED,
        "message": INTERRUPTED_MESSAGE,
        "channel": CHUNKS_CHANNEL,
    }
    cursor = await conn.execute(statement, params)
    return [row[0] for row in await cursor.fetchall()]


async def lose_deliveries(conn: AsyncConnection, params: dict[str, Any]) -> int:
    """Mark `lost` the open deliveries of dead processes; return how many.

    Dead as the settling sweep says (`params`: its settler_id, quiet_server, namespace),
    or forgotten already (no instance row), and fenced like a settled owner: a process
    whose writer is connected keeps its rows open (it ends them itself). A live process
    taken for dead still corrects `lost` with the end it writes.
    """
    dead = DEAD_OWNER.format(owner=sql.SQL("o.instance_id"))
    find = sql.SQL("""
        SELECT o.instance_id FROM (
            SELECT DISTINCT d.instance_id FROM deliveries d
            WHERE d.ended IS NULL AND d.instance_id <> %(settler_id)s
        ) AS o LEFT JOIN instances i ON i.id = o.instance_id
        WHERE CASE WHEN i.id IS NULL OR {dead}
                   THEN pg_try_advisory_xact_lock(%(fence)s, hashtext(o.instance_id::text))
                   ELSE false END
    """).format(dead=dead)
    cursor = await conn.execute(find, params | {"fence": FENCE_LOCK_NAMESPACE})
    owners = [row[0] for row in await cursor.fetchall()]
    if not owners:
        return 0
    # A new snapshot (READ COMMITTED): every row the fenced writers committed is seen.
    mark = sql.SQL("""
        WITH lost AS (
            UPDATE deliveries SET ended = 'lost', ended_at = now()
            WHERE ended IS NULL AND instance_id = ANY(%(owners)s::uuid[])
            RETURNING conversation_id
        ), flagged AS (
            UPDATE conversations AS c SET delivery_cut = true
            WHERE c.id IN (SELECT conversation_id FROM lost) AND NOT c.delivery_cut
              AND {none_sent}
        )
        SELECT count(*) FROM lost
    """).format(none_sent=NONE_SENT_THE_END)
    cursor = await conn.execute(mark, {"owners": owners})
    row = await cursor.fetchone()
    return int(row[0]) if row else 0
