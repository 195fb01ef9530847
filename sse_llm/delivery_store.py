"""The SQL of `deliveries`: what each client connection to a conversation was sent
(SPEC 10; sse_llm/deliveries.py). Written by the writer in its batches, read by
GET /conversations/{id}/deliveries; the settling sweep ends a dead process's open ones as
`lost` (recovery_store.lose_deliveries, beside the rest of that sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from sse_llm.contract import DeliveryEnd, DeliveryVia

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
            -- Only for a conversation that still exists: retention may have deleted it
            -- (and its deliveries) since the client connected, and an end written later
            -- would bring the row back, kept for ever. KEY SHARE is a foreign key's
            -- check: it waits for a prune deleting the row to commit, then skips it.
            WHERE EXISTS (SELECT 1 FROM conversations c WHERE c.id = d.conversation_id
                          FOR KEY SHARE)
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
NONE_SENT_THE_END = sql.SQL("""
    NOT EXISTS (SELECT 1 FROM deliveries d
                WHERE d.conversation_id = c.id AND d.ended IN ('done', 'error'))
""")


async def refresh_delivery_cut(conn: AsyncConnection, ids: Sequence[UUID]) -> None:
    """Set or clear `delivery_cut` of conversations a delivery was cut off from or has
    just sent the end to; only rows whose flag changes are written."""
    statement = sql.SQL("""
        UPDATE conversations AS c SET delivery_cut = {none_sent}
        WHERE c.id = ANY(%(ids)s::uuid[]) AND c.delivery_cut IS DISTINCT FROM {none_sent}
    """).format(none_sent=NONE_SENT_THE_END)
    await conn.execute(statement, {"ids": list(ids)})


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
