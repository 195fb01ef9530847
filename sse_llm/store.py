"""The SQL of conversations and their chunks, as named async functions returning
dataclasses: the writer's inserts and ends, the reads of one conversation, instances and
the settling sweep of dead processes, cancels.

Beside it: delivery_store.py (deliveries), rollup_store.py (the rollups' folds),
session_store.py (sign-ins), review_store.py and the *_queries.py modules (the pages).
"""

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
    Status,
)

# The advisory-lock key space of instance locks (any constant unlikely to clash).
INSTANCE_LOCK_NAMESPACE = 0x55E11
# The key space of the fence (see lease.py): a writer's connection holds its owner's key
# shared for as long as it lives; a settler must take it exclusively.
FENCE_LOCK_NAMESPACE = 0x55E12

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
ASSEMBLED_END = """
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
    """).format(assembled=sql.SQL(ASSEMBLED_END.format(id="e.id")))
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
