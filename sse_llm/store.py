"""Every SQL statement the service runs, as named async functions returning dataclasses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from sse_llm import chunk_layout
from sse_llm.contract import (
    CANCEL_CHANNEL,
    CHUNKS_CHANNEL,
    INTERRUPTED_MESSAGE,
    DeliveryEnd,
    DeliveryVia,
    ErrorCode,
    Status,
)

# The advisory-lock key space of instance locks (any constant unlikely to clash).
INSTANCE_LOCK_NAMESPACE = 0x55E11
# The key space of the fence (see lease.py): a writer's connection holds its owner's key
# shared for as long as it lives; a settler must take it exclusively.
FENCE_LOCK_NAMESPACE = 0x55E12
# The key space of the counts' fold (one process folds at a time).
COUNTS_LOCK_NAMESPACE = 0x55E13
# The counts' row of folded changes and of rows no process owns (migration 0010).
NO_WRITER = UUID(int=0)

# Why 'streaming' is spelled in the SQL below, not bound: the partial indexes' predicate
# (WHERE status = 'streaming') is matched only by a query that says it literally.


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of an answer, numbered from 1 within its conversation."""

    conversation_id: UUID
    seq: int
    text: str
    # When the provider produced it (monotonic clock), for the delivery-latency metric.
    received: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class Conversation:
    """A prompt, the answer so far or in full, and how its generation went."""

    id: UUID
    prompt: str
    response: str
    status: Status
    created_at: datetime
    first_chunk_at: datetime | None
    completed_at: datetime | None
    model: str
    provider: str
    chunks: int
    error_code: str | None
    error_message: str | None
    # Through /v1/chat/completions: the whole chat and the parameters sent upstream.
    messages: list[dict[str, Any]] | None
    parameters: dict[str, Any] | None
    # Set with the end: the model's counts, or an estimate (`tokens_estimated`).
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_estimated: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))  # read as text


@dataclass(frozen=True)
class NewConversation:
    """A conversation about to be created: what POST /stream or /v1 was asked."""

    id: UUID
    prompt: str
    model: str
    provider: str
    owner_id: UUID
    messages: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class Ending:
    """How a generation ended, to be recorded in its conversation."""

    conversation_id: UUID
    status: Status
    error_code: str | None = None
    error_message: str | None = None
    # The model's token counts, or the generation's estimate (`tokens_estimated`); None
    # when nothing was counted (an end the writer records after a storage failure).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False


@dataclass(frozen=True)
class Outcome:
    """Where a generation stands or how it ended: status, persisted chunks, error, and
    the token counts its end recorded (None where not known)."""

    status: Status
    chunks: int
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))  # read as text


# While a conversation streams, its `response` and `chunk_count` are not written yet (its
# end fills them, once): readers assemble what is persisted so far from its chunks. Each
# expression is written once, here. Scalar subqueries in a select list, so PostgreSQL
# evaluates them only for the rows a query returns; a view would have to change with
# storage compaction, and invites evaluating it for every row of a list.
LIVE_RESPONSE = sql.SQL("""
    CASE WHEN c.status = 'streaming'
        THEN coalesce((SELECT string_agg(k.text, '' ORDER BY k.seq)
                       FROM chunks k WHERE k.conversation_id = c.id), '')
        ELSE c.response END
""")
LIVE_CHUNK_COUNT = sql.SQL("""
    CASE WHEN c.status = 'streaming'
        THEN (SELECT count(*) FROM chunks k WHERE k.conversation_id = c.id)::int
        ELSE c.chunk_count END
""")
# What an end records of conversation `{id}`, assembled from its chunks: the response, the
# chunk count, and when the first chunk came (a lateral subquery of an UPDATE ... FROM).
_ASSEMBLED_END = """
    SELECT string_agg(text, '' ORDER BY seq) AS response,
           count(*)::int AS count, min(created_at) AS first_at
    FROM chunks WHERE conversation_id = {id}
"""

CONVERSATION_COLUMNS = sql.SQL("""
    c.id, c.prompt, {response} AS response,
    c.status, c.created_at, c.first_chunk_at, c.completed_at, c.model, c.provider,
    {chunks} AS chunks,
    c.error_code, c.error_message, c.messages, c.parameters,
    c.prompt_tokens, c.completion_tokens, c.tokens_estimated
""").format(response=LIVE_RESPONSE, chunks=LIVE_CHUNK_COUNT)


async def insert_conversations(
    conn: AsyncConnection, conversations: Sequence[NewConversation]
) -> list[Conversation]:
    """Insert new conversations in status `streaming`, in one statement; return their rows.

    A retry after a lost acknowledgement finds the rows there and returns them again.
    Only the creation time comes back from the database: the rest is what was sent.
    """
    cursor = await conn.execute(
        """
        INSERT INTO conversations AS c
            (id, prompt, model, provider, owner_id, messages, parameters)
        SELECT * FROM unnest(%(ids)s::uuid[], %(prompts)s::text[], %(models)s::text[],
                             %(providers)s::text[], %(owners)s::uuid[], %(messages)s::jsonb[],
                             %(parameters)s::jsonb[])
        ON CONFLICT (id) DO UPDATE SET id = excluded.id
        RETURNING c.id, c.created_at
        """,
        {
            "ids": [c.id for c in conversations],
            "prompts": [c.prompt for c in conversations],
            "models": [c.model for c in conversations],
            "providers": [c.provider for c in conversations],
            "owners": [c.owner_id for c in conversations],
            "messages": [_json_or_none(c.messages) for c in conversations],
            "parameters": [_json_or_none(c.parameters) for c in conversations],
        },
    )
    created: dict[UUID, datetime] = dict(await cursor.fetchall())
    return [_new_row(c, created[c.id]) for c in conversations]


def _new_row(new: NewConversation, created_at: datetime) -> Conversation:
    return Conversation(
        id=new.id,
        prompt=new.prompt,
        response="",
        status=Status.STREAMING,
        created_at=created_at,
        first_chunk_at=None,
        completed_at=None,
        model=new.model,
        provider=new.provider,
        chunks=0,
        error_code=None,
        error_message=None,
        messages=new.messages,
        parameters=new.parameters,
        prompt_tokens=None,
        completion_tokens=None,
        tokens_estimated=False,
    )


def _json_or_none(value: object) -> Jsonb | None:
    return None if value is None else Jsonb(value)


async def insert_chunks(
    conn: AsyncConnection, chunks: Sequence[Chunk], owner_id: UUID
) -> list[UUID]:
    """Append a batch of chunks of conversations `owner_id` still streams; return the others.

    The fence: only the chunks of conversations still `streaming` and still
    `owner_id`'s are inserted, on a connection that holds the owner's fence lock
    (`hold_fence`): a settler (lease.py) must take that lock exclusively, so it settles
    nothing of an owner whose writer is connected, and a writer that connects again waits
    for the settler's commit and then sees the row settled and inserts nothing: the
    settle and these chunks never both succeed. The ids of refused conversations come
    back. One statement for the whole batch however many streams it holds; the
    notification is sent only if the rows are committed.
    """
    # The rows travel as one JSON text: encoding it is one C call, where psycopg dumps
    # arrays element by element in Python (a batch of 30 cost 290 µs of CPU, now 150).
    rows = _json_rows.encode([(c.conversation_id.hex, c.seq, c.text) for c in chunks])
    # No row lock: the connection's advisory lock fences it. Row locks (the foreign key's,
    # once per chunk, or one per conversation and batch) write to the row and the WAL:
    # at 1,000 streams they cost PostgreSQL 0.05-0.10 ms per chunk, where the insert
    # alone costs 0.015 (benchmarks/run.py, C=1000). The lookup proves the row exists, so
    # chunks need no foreign key (migration 0005).
    # Each row is looked up by key, whatever the planner thinks of the batch's size (it
    # takes a JSON array for 100 rows): as a join it scanned the whole table or every
    # live stream's row per batch, 600 µs for a batch of one among 1,000 streams.
    # `IS NOT DISTINCT FROM` (the same as `=` here) keeps it off the partial index of
    # streaming rows, which it takes for small.
    # The notification lists each conversation once; a payload holds under 8000 bytes,
    # so about 200 ids each. A SELECT in WITH runs only if used: hence the UNION.
    cursor = await conn.execute(
        _INSERT_AND_NOTIFY,
        {"rows": rows, "owner_id": owner_id, "channel": CHUNKS_CHANNEL},
    )
    return [row[0] for row in await cursor.fetchall() if row[0] is not None]


# The fence and the insert of store.insert_chunks (benchmarks/pg_core_load.py measures
# them without the notification): CTEs that the statement's final SELECT must name.
INSERT_CHUNKS = """
    WITH batch AS (
        SELECT (r->>0)::uuid AS id, (r->>1)::int AS seq, r->>2 AS text
        FROM json_array_elements(%(rows)s::json) AS r
    ), owned AS (
        SELECT c.id FROM (SELECT DISTINCT id FROM batch) AS b
        CROSS JOIN LATERAL (
            SELECT c.id FROM conversations c
            WHERE c.id = b.id AND c.owner_id = %(owner_id)s
              AND c.status IS NOT DISTINCT FROM 'streaming'
        ) AS c
    ), inserted AS (
        INSERT INTO chunks (conversation_id, seq, text)
        SELECT b.id, b.seq, b.text FROM batch b JOIN owned USING (id)
        ON CONFLICT DO NOTHING  -- a retry after a lost acknowledgement
    )
"""
# The refused conversations: the batch's ids the fence did not let through.
REFUSED_CHUNKS = "(SELECT id FROM batch EXCEPT SELECT id FROM owned)"
_NOTIFY_AND_REFUSED = f"""
    , touched AS (
        SELECT id::text, (row_number() OVER () - 1) / 200 AS part FROM owned
    )
    SELECT NULL::uuid FROM (
        SELECT pg_notify(%(channel)s, string_agg(id, ',')) FROM touched GROUP BY part
    ) AS notified
    UNION ALL
    {REFUSED_CHUNKS}
"""

_INSERT_AND_NOTIFY = INSERT_CHUNKS + _NOTIFY_AND_REFUSED  # composed once, not per batch

# NUL never reaches here (providers clean it: PostgreSQL text cannot hold it), so every
# string survives json's \u escapes; should one slip through, the statement fails and
# the writer isolates the chunk that holds it.
_json_rows = json.JSONEncoder(ensure_ascii=False)


async def hold_fence(conn: AsyncConnection, owner_id: UUID) -> None:
    """Hold `owner_id`'s fence lock, shared, for as long as `conn` lives (see lease.py).

    Called before the connection's first write: it waits for a settler of this owner to
    commit, so every later statement's snapshot sees what that settler did.
    """
    await conn.execute(
        "SELECT pg_advisory_lock_shared(%s, hashtext(%s::text))",
        (FENCE_LOCK_NAMESPACE, owner_id),
    )


async def finish_conversations(
    conn: AsyncConnection, ends: Sequence[Ending], owner_id: UUID
) -> list[UUID]:
    """Record how generations ended and assemble each response from its chunks, once;
    return the ids whose row records exactly that end.

    Fenced like insert_chunks: only conversations still `streaming` and still
    `owner_id`'s change, so a late writer never overwrites an end already recorded (by
    another process's recovery, say). Followers in other processes are notified.
    """
    statement = sql.SQL("""
        WITH e AS (
            SELECT * FROM unnest(%(ids)s::uuid[], %(statuses)s::text[], %(codes)s::text[],
                                 %(messages)s::text[], %(prompt_tokens)s::int[],
                                 %(completion_tokens)s::int[], %(estimated)s::bool[])
                AS e(id, status, error_code, error_message, prompt_tokens, completion_tokens,
                     tokens_estimated)
        ), ended AS (
            UPDATE conversations AS c
            SET status = e.status,
                completed_at = now(),
                error_code = e.error_code,
                error_message = e.error_message,
                prompt_tokens = e.prompt_tokens,
                completion_tokens = e.completion_tokens,
                tokens_estimated = e.tokens_estimated,
                response = coalesce(k.response, ''),
                chunk_count = k.count,
                first_chunk_at = k.first_at,
                owner_id = NULL
            FROM e CROSS JOIN LATERAL ({assembled}) AS k
            WHERE c.id = e.id AND c.owner_id = %(owner_id)s
              AND c.status IS NOT DISTINCT FROM 'streaming'  -- by key: see insert_chunks
            RETURNING c.id, pg_notify(%(channel)s, c.id::text)
        )
        SELECT id FROM ended
        UNION ALL
        -- Already ended exactly so (the snapshot predates `ended`): this end, retried after
        -- the reply to its commit was lost. Its clients are told what the row says.
        SELECT c.id FROM e JOIN conversations c ON c.id = e.id
        WHERE c.owner_id IS NULL AND c.status = e.status
          AND c.error_code IS NOT DISTINCT FROM e.error_code
          AND c.error_message IS NOT DISTINCT FROM e.error_message
    """).format(assembled=sql.SQL(_ASSEMBLED_END.format(id="e.id")))
    cursor = await conn.execute(
        statement,
        {
            "channel": CHUNKS_CHANNEL,
            "ids": [e.conversation_id for e in ends],
            "statuses": [e.status for e in ends],
            "codes": [e.error_code for e in ends],
            "messages": [e.error_message for e in ends],
            "prompt_tokens": [e.prompt_tokens for e in ends],
            "completion_tokens": [e.completion_tokens for e in ends],
            "estimated": [e.tokens_estimated for e in ends],
            "owner_id": owner_id,
        },
    )
    return [row[0] for row in await cursor.fetchall()]


async def delete_unconfirmed_conversations(conn: AsyncConnection, ids: Sequence[UUID]) -> None:
    """Remove conversations whose creation no client was told of, with their chunks.

    A batch whose COMMIT reply was lost may have created rows whose requests got an
    error: nobody knows their ids, so no row of theirs may stay (whatever its status:
    another process may have settled it meanwhile). No generation ever ran for them,
    so they have no chunks; deleting those too keeps that true without a foreign key.
    """
    await conn.execute(
        """
        WITH removed AS (DELETE FROM conversations WHERE id = ANY(%(ids)s) RETURNING id)
        DELETE FROM chunks WHERE conversation_id IN (SELECT id FROM removed)
        """,
        {"ids": list(ids)},
    )


async def get_conversation(pool: AsyncConnectionPool, conversation_id: UUID) -> Conversation | None:
    """One conversation, with the response persisted so far if it is still streaming."""
    query = sql.SQL("SELECT {columns} FROM conversations c WHERE c.id = %(id)s").format(
        columns=CONVERSATION_COLUMNS
    )
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Conversation))
        await cursor.execute(query, {"id": conversation_id})
        return await cursor.fetchone()


# An ended conversation's chunks are rows, or its `chunk_layouts` row once compacted
# (compaction.py): each read below takes both in ONE statement, so its one snapshot sees
# a compaction either wholly committed or not at all: never neither form, nor both.
# (LIVE_RESPONSE and LIVE_CHUNK_COUNT read `response` and `chunk_count` of an ended
# conversation, which compaction leaves as they are.)


async def read_chunks(
    pool: AsyncConnectionPool, conversation_id: UUID, after_seq: int = 0
) -> list[Chunk]:
    """The persisted chunks of a conversation after `after_seq`, in order (rows or layout)."""
    query = """
        SELECT seq, text, NULL::text AS response, NULL::bytea AS layout FROM chunks
        WHERE conversation_id = %(id)s AND seq > %(after)s
        UNION ALL
        SELECT NULL, NULL, c.response, l.layout
        FROM chunk_layouts l JOIN conversations c ON c.id = l.conversation_id
        WHERE l.conversation_id = %(id)s
    """
    async with pool.connection() as conn:
        cursor = await conn.execute(query, {"id": conversation_id, "after": after_seq})
        rows = await cursor.fetchall()
    chunks = [Chunk(conversation_id, seq, text) for seq, text, _, layout in rows if layout is None]
    for _, _, response, layout in rows:
        if layout is not None:
            chunks.extend(
                Chunk(conversation_id, laid.seq, laid.text)
                for laid in chunk_layout.decode(layout, response)
                if laid.seq > after_seq
            )
    chunks.sort(key=lambda chunk: chunk.seq)
    return chunks


async def chunk_timeline(
    conn: AsyncConnection, conversation_id: UUID
) -> list[tuple[int, float, int]]:
    """Each chunk of a conversation as (seq, ms since its created_at, characters), in order."""
    query = """
        SELECT k.seq, extract(epoch FROM k.created_at - c.created_at)::float8 * 1000,
               char_length(k.text), NULL::bytea AS layout
        FROM chunks k JOIN conversations c ON c.id = k.conversation_id
        WHERE k.conversation_id = %(id)s
        UNION ALL
        SELECT NULL, NULL, NULL, layout FROM chunk_layouts WHERE conversation_id = %(id)s
    """
    cursor = await conn.execute(query, {"id": conversation_id})
    timeline: list[tuple[int, float, int]] = []
    for seq, milliseconds, characters, layout in await cursor.fetchall():
        if layout is None:
            timeline.append((seq, milliseconds, characters))
        else:
            timeline.extend(chunk_layout.timeline(layout))
    timeline.sort()
    return timeline


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
_DEAD_OWNER = sql.SQL("""
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

    Dead as lease.py defines it (see _DEAD_OWNER); `settler_id` (this process) is never
    dead to itself. Returns the ids of the conversations settled.
    """
    orphaned = sql.SQL("c.owner_id <> %(settler_id)s AND {dead}").format(
        dead=_DEAD_OWNER.format(owner=sql.SQL("c.owner_id"))
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
        """).format(dead=_DEAD_OWNER.format(owner=sql.SQL("i.id")))
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
    """).format(assembled=sql.SQL(_ASSEMBLED_END.format(id="o.id")))
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


async def cancel_requested(pool: AsyncConnectionPool, owner_id: UUID) -> list[UUID]:
    """The streams of `owner_id` whose cancel is recorded but which still stream."""
    # The partial index on owner_id WHERE status = 'streaming' finds this process's rows.
    query = """
        SELECT id FROM conversations
        WHERE owner_id = %s AND status = 'streaming' AND cancel_requested_at IS NOT NULL
    """
    async with pool.connection() as conn:
        cursor = await conn.execute(query, (owner_id,))
        return [row[0] for row in await cursor.fetchall()]


async def get_status(pool: AsyncConnectionPool, conversation_id: UUID) -> Outcome | None:
    """How far a conversation got, without its text."""
    query = sql.SQL("""
        SELECT c.status, {chunks} AS chunks, c.error_code, c.error_message
        FROM conversations c WHERE c.id = %(id)s
    """).format(chunks=LIVE_CHUNK_COUNT)
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Outcome))
        await cursor.execute(query, {"id": conversation_id})
        return await cursor.fetchone()


async def request_cancel(pool: AsyncConnectionPool, conversation_id: UUID) -> Status | None:
    """Record a cancel and tell whichever process generates this conversation to stop it.

    Returns `streaming` if the cancel was recorded, else the status the conversation
    ended with, or None if there is no such conversation. Recorded in the row, a cancel
    whose notification is missed is still found by its owner (lease.py polls for it).
    """
    async with pool.connection() as conn:
        cursor = await conn.execute(
            """
            UPDATE conversations
            SET cancel_requested_at = coalesce(cancel_requested_at, now())
            WHERE id = %(id)s AND status = 'streaming'
            RETURNING pg_notify(%(channel)s, id::text)
            """,
            {"id": conversation_id, "channel": CANCEL_CHANNEL},
        )
        if await cursor.fetchone() is not None:
            return Status.STREAMING
        cursor = await conn.execute(
            "SELECT status FROM conversations WHERE id = %(id)s", {"id": conversation_id}
        )
        row = await cursor.fetchone()
        return Status(row[0]) if row else None


async def ping_database(pool: AsyncConnectionPool) -> None:
    """Raise if the database does not answer."""
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")


async def set_statement_timeout(conn: AsyncConnection, seconds: float) -> None:
    """Have PostgreSQL cancel any statement of this session that runs over `seconds`."""
    # At least 1 ms: 0 would mean no timeout at all.
    milliseconds = max(1, round(seconds * 1000))
    await conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{milliseconds}ms",))


# --- deliveries ---
# What each client connection to a conversation was sent (SPEC 10; sse_llm/deliveries.py).
# Written by the writer in its batches, read by GET /conversations/{id}/deliveries.

# At most this many deliveries of one conversation are listed (the first ones).
MAX_DELIVERIES_LISTED = 1000


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One client connection to a conversation, as its row records it."""

    id: UUID
    conversation_id: UUID
    via: DeliveryVia
    instance_id: UUID
    started_at: datetime
    ended_at: datetime | None
    from_seq: int
    last_seq: int | None
    ended: DeliveryEnd | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "via", DeliveryVia(self.via))  # read as text
        if self.ended is not None:
            object.__setattr__(self, "ended", DeliveryEnd(self.ended))


async def write_deliveries(conn: AsyncConnection, rows: Sequence[DeliveryRow]) -> list[UUID]:
    """Insert or end these deliveries, in one statement; return the conversations to
    refresh (`refresh_delivery_cut`): flagged cut, and now sent their end by one of them.

    A row comes as an open (ended NULL), an end, or both at once; an end never overwrites
    another, except `lost`: recovery's guess, which the process that served it corrects.
    """
    cursor = await conn.execute(
        """
        WITH d AS (
            SELECT * FROM unnest(%(ids)s::uuid[], %(conversations)s::uuid[], %(vias)s::text[],
                                 %(instances)s::uuid[], %(started)s::timestamptz[],
                                 %(ended_at)s::timestamptz[], %(from_seqs)s::int[],
                                 %(last_seqs)s::int[], %(ends)s::text[])
                AS d(id, conversation_id, via, instance_id, started_at, ended_at, from_seq,
                     last_seq, ended)
        ), written AS (
            INSERT INTO deliveries AS w
            SELECT * FROM d
            ON CONFLICT (id) DO UPDATE
                SET ended_at = excluded.ended_at, last_seq = excluded.last_seq,
                    ended = excluded.ended
                WHERE excluded.ended IS NOT NULL AND (w.ended IS NULL OR w.ended = 'lost')
        )
        -- Read, not updated here: an UPDATE of conversations in every batch would fire
        -- its triggers each time; the flag is set on the rare cut-off.
        SELECT c.id FROM conversations c
        WHERE c.id = ANY(%(sent_end)s::uuid[]) AND c.delivery_cut
        """,
        {
            "ids": [r.id for r in rows],
            "conversations": [r.conversation_id for r in rows],
            "vias": [r.via for r in rows],
            "instances": [r.instance_id for r in rows],
            "started": [r.started_at for r in rows],
            "ended_at": [r.ended_at for r in rows],
            "from_seqs": [r.from_seq for r in rows],
            "last_seqs": [r.last_seq for r in rows],
            "ends": [r.ended for r in rows],
            "sent_end": [r.conversation_id for r in rows if r.ended in _SENT_THE_END],
        },
    )
    return [row[0] for row in await cursor.fetchall()]


_SENT_THE_END = (DeliveryEnd.DONE, DeliveryEnd.ERROR)
CUT_OFF = (DeliveryEnd.CLIENT_LEFT, DeliveryEnd.DROPPED, DeliveryEnd.LOST)

# `delivery_cut` (migration 0014) made true again: some delivery was cut off (the caller
# knows) and none has sent the end, as this transaction sees the deliveries.
_NONE_SENT_THE_END = sql.SQL("""
    NOT EXISTS (SELECT 1 FROM deliveries d
                WHERE d.conversation_id = c.id AND d.ended IN ('done', 'error'))
""")


async def refresh_delivery_cut(conn: AsyncConnection, ids: Sequence[UUID]) -> None:
    """Set or clear `delivery_cut` of conversations a delivery was cut off from or has
    just sent the end to; only rows whose flag changes are written."""
    statement = sql.SQL("""
        UPDATE conversations AS c SET delivery_cut = {none_sent}
        WHERE c.id = ANY(%(ids)s::uuid[]) AND c.delivery_cut IS DISTINCT FROM {none_sent}
    """).format(none_sent=_NONE_SENT_THE_END)
    await conn.execute(statement, {"ids": list(ids)})


async def lose_deliveries(conn: AsyncConnection, params: dict[str, Any]) -> int:
    """Mark `lost` the open deliveries of dead processes; return how many.

    Dead as the settling sweep says (`params`: its settler_id, quiet_server, namespace),
    or forgotten already (no instance row), and fenced like a settled owner: a process
    whose writer is connected keeps its rows open (it ends them itself). A live process
    taken for dead still corrects `lost` with the end it writes.
    """
    dead = _DEAD_OWNER.format(owner=sql.SQL("o.instance_id"))
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
    """).format(none_sent=_NONE_SENT_THE_END)
    cursor = await conn.execute(mark, {"owners": owners})
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def list_deliveries(
    pool: AsyncConnectionPool, conversation_id: UUID
) -> list[DeliveryRow] | None:
    """The deliveries of a conversation, oldest first; None if there is no such conversation."""
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT 1 FROM conversations WHERE id = %s", (conversation_id,))
        if await cursor.fetchone() is None:
            return None
        rows = conn.cursor(row_factory=class_row(DeliveryRow))
        await rows.execute(
            """
            SELECT id, conversation_id, via, instance_id, started_at, ended_at, from_seq,
                   last_seq, ended
            FROM deliveries WHERE conversation_id = %s
            ORDER BY started_at, id LIMIT %s
            """,
            (conversation_id, MAX_DELIVERIES_LISTED),
        )
        return await rows.fetchall()


# --- sessions ---
# Browser sessions (SPEC 8; sse_llm/access.py): a row per sign-in, keyed by a hash of the
# cookie's token. Times come from the database's clock, the one every replica shares.


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who, and until when."""

    token_hash: bytes
    reviewer: str
    created_at: datetime
    expires_at: datetime


async def create_session(
    pool: AsyncConnectionPool, token_hash: bytes, reviewer: str, seconds: int
) -> Session:
    """Record a new session that lasts `seconds` from now."""
    query = """
        INSERT INTO sessions (token_hash, reviewer, expires_at)
        VALUES (%(hash)s, %(reviewer)s, now() + make_interval(secs => %(seconds)s))
        RETURNING token_hash, reviewer, created_at, expires_at
    """
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Session))
        await cursor.execute(query, {"hash": token_hash, "reviewer": reviewer, "seconds": seconds})
        session = await cursor.fetchone()
        assert session is not None
        return session


async def find_session(pool: AsyncConnectionPool, token_hash: bytes) -> Session | None:
    """The session with this hash, unless it has expired or been revoked."""
    query = """
        SELECT token_hash, reviewer, created_at, expires_at FROM sessions
        WHERE token_hash = %s AND revoked_at IS NULL AND expires_at > now()
    """
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Session))
        await cursor.execute(query, (token_hash,))
        return await cursor.fetchone()


async def revoke_session(pool: AsyncConnectionPool, token_hash: bytes) -> None:
    """End a session (sign-out): from now on no replica accepts its cookie."""
    query = "UPDATE sessions SET revoked_at = now() WHERE token_hash = %s AND revoked_at IS NULL"
    async with pool.connection() as conn:
        await conn.execute(query, (token_hash,))


async def delete_expired_sessions(pool: AsyncConnectionPool, limit: int = 100) -> int:
    """Delete up to `limit` expired sessions, oldest first; return how many."""
    query = """
        DELETE FROM sessions WHERE token_hash IN (
            SELECT token_hash FROM sessions WHERE expires_at <= now()
            ORDER BY expires_at LIMIT %s
        )
    """
    async with pool.connection() as conn:
        cursor = await conn.execute(query, (limit,))
        return cursor.rowcount
