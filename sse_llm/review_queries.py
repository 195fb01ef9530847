"""The review queue's and the agreement's SQL: the next conversation to judge, its soft
claim, a verdict from the queue, and the reviews agreement is computed from.

A slice of the history arrives as a condition on `conversations c` with its bound
parameters (the history filters build it), so the queue and agreement read exactly the
conversations the history page would list for the same URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from sse_llm.contract import CLAIM_SECONDS, Verdict
from sse_llm.store import CONVERSATION_COLUMNS, Conversation

# How many candidates one walk reads: a few more than the colleagues who may be claiming
# the same ones at once, so a lost race moves on to the next without a second query.
_CANDIDATES = 8


class QueueMode(StrEnum):
    """Which conversations the queue serves."""

    MINE = "mine"  # not yet reviewed by me
    NOBODY = "nobody"  # not reviewed by anyone


class QueueOrder(StrEnum):
    """In which order the queue serves them."""

    NEWEST = "newest"
    SAMPLE = "sample"  # a random sample that does not repeat (migration 0009)


@dataclass(frozen=True)
class Slice:
    """A condition on `conversations c` and its parameters (names must not clash with ours)."""

    condition: sql.Composable
    params: dict[str, Any]
    filtered: bool = True  # False: the condition is TRUE, the whole history
    # The same condition on review_summaries `s` when the slice is by time alone (its
    # copied conversation_created_at): agreement then never joins conversations.
    on_summaries: sql.Composable | None = None
    # The slice's conditions on the conversation's own columns only (the walk's window).
    on_conversations: sql.Composable = field(default_factory=lambda: sql.SQL("TRUE"))
    # A condition on reviews `r` that every conversation of the slice has a review meeting
    # (None: the slice needs no review): the queue then walks reviews, the small side.
    review_key: sql.Composable | None = None


@dataclass(frozen=True)
class OtherReview:
    """A review as the queue shows it once my own verdict is in."""

    reviewer: str
    verdict: Verdict
    labels: list[str]
    note: str
    updated_at: datetime


@dataclass(frozen=True)
class AgreementCounts:
    """Agreement's input, counted: each distinct profile with its number of conversations.

    `verdicts`: [ratings ("reviewer<sep>verdict", sorted), n]; `panels`: [reviewers, n];
    `labels`: [label, reviewers, reviewers who gave it, n]; then the disagreements.
    """

    verdicts: list[tuple[list[str], int]]
    panels: list[tuple[list[str], int]]
    labels: list[tuple[str, list[str], list[str], int]]
    disagreements: int
    ids: list[UUID]


# How many conversations (or reviews) one request examines at most, in the walk's order:
# a slice with nothing to serve for a long stretch answers "none in the next WALK_LIMIT;
# walk on" with the position reached, instead of reading the whole history.
WALK_LIMIT = 2000


@dataclass(frozen=True)
class Walk:
    """One order of the walk over one side (conversations `c` or reviews `r`): its key
    expressions, ascending in the walk's direction."""

    side: str  # "c": conversations, "r": reviews
    source: sql.Composable  # the table and alias
    keys: tuple[sql.Composable, sql.Composable]  # (time or hash, id)
    descending: bool


# Newest first: after the given conversation in the history's order. Sample: after a
# point of the hash order; that point is the reviewer's seed (a hash of their name) or,
# after a skip, the skipped conversation's own hash.
_WALKS = {
    (QueueOrder.NEWEST, "c"): Walk(
        "c", sql.SQL("conversations c"), (sql.SQL("c.created_at"), sql.SQL("c.id")), True
    ),
    (QueueOrder.SAMPLE, "c"): Walk(
        "c",
        sql.SQL("conversations c"),
        (sql.SQL("uuid_hash_extended(c.id, 0)"), sql.SQL("c.id")),  # the index's expression
        False,
    ),
    (QueueOrder.NEWEST, "r"): Walk(
        "r",
        sql.SQL("reviews r"),
        (sql.SQL("r.conversation_created_at"), sql.SQL("r.conversation_id")),
        True,
    ),
    (QueueOrder.SAMPLE, "r"): Walk(
        "r",
        sql.SQL("reviews r"),
        (sql.SQL("uuid_hash_extended(r.conversation_id, 0)"), sql.SQL("r.conversation_id")),
        False,
    ),
}
_AFTER_KEYS = {
    QueueOrder.NEWEST: sql.SQL(
        "SELECT a.created_at, a.id FROM conversations a WHERE a.id = %(after)s"
    ),
    QueueOrder.SAMPLE: sql.SQL(
        "SELECT uuid_hash_extended(a.id, 0), a.id FROM conversations a WHERE a.id = %(after)s"
    ),
}


def _order(walk: Walk) -> sql.Composable:
    direction = sql.SQL(" DESC" if walk.descending else "")
    return sql.SQL(", ").join(sql.Composed([key, direction]) for key in walk.keys)


def _start(walk: Walk, order: QueueOrder, after: UUID | None) -> sql.Composable | None:
    """Where the walk starts: past `after`, or the sample's seed; None: at the beginning."""
    if after is not None:
        return sql.SQL("({}, {}) {} ({})").format(
            *walk.keys, sql.SQL("<" if walk.descending else ">"), _AFTER_KEYS[order]
        )
    if order is QueueOrder.SAMPLE:
        return sql.SQL("{} >= hashtextextended(%(reviewer)s, 0)").format(walk.keys[0])
    return None


def _unreviewed(mode: QueueMode) -> sql.Composable:
    if mode is QueueMode.MINE:
        return sql.SQL(
            "NOT EXISTS (SELECT 1 FROM reviews r"
            " WHERE r.conversation_id = c.id AND r.reviewer = %(reviewer)s)"
        )
    return sql.SQL("NOT EXISTS (SELECT 1 FROM reviews r WHERE r.conversation_id = c.id)")


# Ended only (the sample's partial index says the same), and not held by a colleague.
_OPEN = sql.SQL(
    "c.status <> 'streaming' AND NOT EXISTS (SELECT 1 FROM review_claims k"
    " WHERE k.conversation_id = c.id AND k.reviewer <> %(reviewer)s AND k.expires_at > now())"
)


def _window(slice_: Slice, walk: Walk, start: sql.Composable | None) -> sql.Composable:
    """The next WALK_LIMIT rows of the walk's side from `start`, each as (k0, id): the
    conversations of the slice by their own columns, or the reviews every conversation of
    the slice has one of (`Slice.review_key`): 100,000 reviews, not 1,000,000 conversations."""
    if walk.side == "r" and slice_.review_key is not None:
        where = [slice_.review_key]
    else:
        where = [sql.SQL("c.status <> 'streaming'"), slice_.on_conversations]
    if start is not None:
        where.append(start)
    return sql.SQL(
        "SELECT {k0} AS k0, {k1} AS id FROM {source} WHERE {where} ORDER BY {order}"
    ).format(
        k0=walk.keys[0],
        k1=walk.keys[1],
        source=walk.source,
        where=sql.SQL(" AND ").join(where),
        order=_order(walk),
    )


async def _candidates(
    pool: AsyncConnectionPool,
    window: sql.Composable,
    where: list[sql.Composable],
    descending: bool,
    params: dict[str, Any],
) -> list[UUID]:
    """The first few of the window that pass the slice's every condition, in its order."""
    direction = sql.SQL(" DESC" if descending else "")
    statement = sql.SQL("""
        SELECT c.id FROM ({window} LIMIT {limit}) w JOIN conversations c ON c.id = w.id
        WHERE {where} ORDER BY w.k0{direction}, w.id{direction} LIMIT {n}
    """)
    query = statement.format(
        window=window,
        limit=sql.Literal(WALK_LIMIT),
        where=sql.SQL(" AND ").join(where),
        direction=direction,
        n=sql.Literal(_CANDIDATES),
    )
    async with pool.connection() as conn:
        cursor = await conn.execute(query, params)
        found = [row[0] for row in await cursor.fetchall()]
    return list(dict.fromkeys(found))  # a conversation reviewed twice comes once


async def _window_end(
    pool: AsyncConnectionPool, window: sql.Composable, params: dict[str, Any]
) -> UUID | None:
    """The window's last row, if it is full (else the walk reached the end of its order)."""
    query = sql.SQL("{window} OFFSET {skip} LIMIT 1").format(
        window=window, skip=sql.Literal(WALK_LIMIT - 1)
    )
    async with pool.connection() as conn:
        cursor = await conn.execute(query, params)
        row = await cursor.fetchone()
    return row[1] if row else None


async def _held(
    pool: AsyncConnectionPool, where: list[sql.Composable], params: dict[str, Any]
) -> UUID | None:
    """The conversation I hold a live claim on, if it is still in the slice to judge."""
    statement = sql.SQL("""
        SELECT c.id FROM review_claims h JOIN conversations c ON c.id = h.conversation_id
        WHERE h.reviewer = %(reviewer)s AND h.expires_at > now() AND {where}
        LIMIT 1
    """).format(where=sql.SQL(" AND ").join(where))
    async with pool.connection() as conn:
        cursor = await conn.execute(statement, params)
        row = await cursor.fetchone()
    return row[0] if row else None


async def claim(pool: AsyncConnectionPool, conversation_id: UUID, reviewer: str) -> bool:
    """Claim a conversation for CLAIM_SECONDS unless a colleague's live claim holds it, and
    drop my other claims (a reviewer holds one at a time). Safe under concurrency: a second
    INSERT of the same key waits for the first, then sees its live claim and takes nothing."""
    async with pool.connection() as conn, conn.transaction():
        cursor = await conn.execute(
            """
            INSERT INTO review_claims AS k (conversation_id, reviewer, expires_at)
            VALUES (%(id)s, %(reviewer)s, now() + make_interval(secs => %(seconds)s))
            ON CONFLICT (conversation_id) DO UPDATE
                SET reviewer = excluded.reviewer, expires_at = excluded.expires_at
                WHERE k.expires_at <= now() OR k.reviewer = excluded.reviewer
            RETURNING conversation_id
            """,
            {"id": conversation_id, "reviewer": reviewer, "seconds": CLAIM_SECONDS},
        )
        if await cursor.fetchone() is None:
            return False
        await conn.execute(
            "DELETE FROM review_claims WHERE reviewer = %(reviewer)s AND conversation_id <> %(id)s",
            {"id": conversation_id, "reviewer": reviewer},
        )
    return True


async def release_claim(pool: AsyncConnectionPool, conversation_id: UUID, reviewer: str) -> None:
    """Give up my claim on a conversation (a skip)."""
    async with pool.connection() as conn:
        await conn.execute(
            "DELETE FROM review_claims WHERE conversation_id = %(id)s AND reviewer = %(reviewer)s",
            {"id": conversation_id, "reviewer": reviewer},
        )


@dataclass(frozen=True)
class WalkedOn:
    """The walk examined WALK_LIMIT rows and found nothing to serve: go on from `after`."""

    after: UUID


async def next_to_review(
    pool: AsyncConnectionPool,
    query_pool: AsyncConnectionPool,
    *,
    reviewer: str,
    slice_: Slice,
    mode: QueueMode,
    order: QueueOrder,
    after: UUID | None = None,
) -> UUID | WalkedOn | None:
    """The conversation to serve `reviewer` next, claimed for them; None when the slice has
    none left; WalkedOn when WALK_LIMIT rows gave none (a request's work is bounded). My
    live claim comes first (a reload shows the same one); then the walk from `after` (or
    the start: the newest, or my seed in the sample), wrapping around once."""
    params = {**slice_.params, "reviewer": reviewer, "after": after}
    where = [_OPEN, _unreviewed(mode), slice_.condition]
    held = await _held(pool, where, params)
    if held is not None:
        return held
    walk = _WALKS[order, "r" if slice_.review_key is not None else "c"]
    start = _start(walk, order, after)
    for begin in [start, None] if start is not None else [None]:
        window = _window(slice_, walk, begin)
        # Each round reads a handful by index; a lost race reads the next handful.
        for _ in range(4):
            found = await _candidates(query_pool, window, where, walk.descending, params)
            for conversation_id in found:
                if await claim(pool, conversation_id, reviewer):
                    return conversation_id
            if len(found) < _CANDIDATES:
                break
        end = await _window_end(query_pool, window, params)
        if end is not None:
            return WalkedOn(end)
    return None


async def get_conversation(pool: AsyncConnectionPool, conversation_id: UUID) -> Conversation | None:
    """One conversation's row (the queue's page shows it)."""
    query = sql.SQL("SELECT {columns} FROM conversations c WHERE c.id = %(id)s").format(
        columns=CONVERSATION_COLUMNS
    )
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Conversation))
        await cursor.execute(query, {"id": conversation_id})
        return await cursor.fetchone()


async def reviews_of(pool: AsyncConnectionPool, conversation_id: UUID) -> list[OtherReview]:
    """Every review of a conversation, oldest first."""
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(OtherReview))
        await cursor.execute(
            "SELECT reviewer, verdict, labels, note, updated_at FROM reviews"
            " WHERE conversation_id = %(id)s ORDER BY updated_at, reviewer",
            {"id": conversation_id},
        )
        return await cursor.fetchall()


# Between a reviewer's name and their verdict in a rating (a name holds no control
# character, reviews.reviewer_name).
RATING_SEPARATOR = "\x1f"


async def agreement_counts(
    query_pool: AsyncConnectionPool,
    slice_: Slice,
    reviewers: list[str] | None,
    *,
    max_ids: int,
) -> AgreementCounts:
    """What agreement is computed from, counted in the database: the distinct rating
    profiles of the slice's conversations judged by 2+ counted reviewers, with how many
    conversations have each (a few hundred rows for a team, whatever the history).

    Reads each counted review of the slice once (joined to its conversation by primary
    key only when the slice has a condition).
    """
    statement = sql.SQL("""
        WITH counted AS (
            SELECT r.conversation_id, r.reviewer, r.verdict, r.labels,
                   r.conversation_created_at
            FROM reviews r {join}
            WHERE {condition}
              AND (%(counted)s::text[] IS NULL OR r.reviewer = ANY(%(counted)s::text[]))
        ), items AS MATERIALIZED (
            SELECT conversation_id, max(conversation_created_at) AS created_at,
                   array_agg(reviewer || %(separator)s || verdict ORDER BY reviewer) AS ratings,
                   array_agg(reviewer ORDER BY reviewer) AS reviewers,
                   min(verdict) <> max(verdict) AS disagree
            FROM counted GROUP BY conversation_id HAVING count(*) >= 2
        ), holders AS (
            SELECT k.conversation_id, l.label, array_agg(k.reviewer ORDER BY k.reviewer) AS who
            FROM counted k JOIN items i USING (conversation_id), unnest(k.labels) AS l(label)
            WHERE k.labels <> '{{}}'
            GROUP BY k.conversation_id, l.label
        )
        SELECT
            (SELECT coalesce(jsonb_agg(jsonb_build_array(ratings, n)), '[]')
             FROM (SELECT ratings, count(*) AS n FROM items GROUP BY ratings) v) AS verdicts,
            (SELECT coalesce(jsonb_agg(jsonb_build_array(reviewers, n)), '[]')
             FROM (SELECT reviewers, count(*) AS n FROM items GROUP BY reviewers) s) AS panels,
            (SELECT coalesce(jsonb_agg(jsonb_build_array(label, reviewers, who, n)), '[]')
             FROM (SELECT h.label, i.reviewers, h.who, count(*) AS n
                   FROM holders h JOIN items i USING (conversation_id)
                   GROUP BY h.label, i.reviewers, h.who) p) AS labels,
            (SELECT count(*) FROM items WHERE disagree) AS disagreements,
            (SELECT coalesce(array_agg(conversation_id), '{{}}')
             FROM (SELECT conversation_id FROM items WHERE disagree
                   ORDER BY created_at DESC, conversation_id DESC LIMIT %(max_ids)s) d) AS ids
    """).format(
        condition=slice_.condition,
        # The join only where the slice looks at conversations (or their reviews).
        join=sql.SQL("JOIN conversations c ON c.id = r.conversation_id")
        if slice_.filtered
        else sql.SQL(""),
    )
    params = {
        **slice_.params,
        "counted": reviewers,
        "separator": RATING_SEPARATOR,
        "max_ids": max_ids,
    }
    async with query_pool.connection() as conn, conn.transaction():
        # Its sorts hold every counted review of the slice (~10 MB per 100,000): in memory,
        # not spilled to disk as the default 4 MB would (twice as slow). This query only.
        await conn.execute("SET LOCAL work_mem = '64MB'")
        cursor = conn.cursor(row_factory=class_row(AgreementCounts))
        await cursor.execute(statement, params)
        row = await cursor.fetchone()
    assert row is not None  # an aggregate always answers one row
    return row


@dataclass(frozen=True)
class SummaryCounts:
    """Agreement's input from review_summaries (everyone's reviews count), counted.

    `verdicts`: [reviews, good, bad, unsure, n]; `panels`: [reviews, n]; `labels`:
    [label, reviews, reviews giving it, n]; `reviewers`: who judged a conversation judged
    twice or more; then the disagreements.
    """

    verdicts: list[tuple[int, int, int, int, int]]
    panels: list[tuple[int, int]]
    labels: list[tuple[str, int, int, int]]
    reviewers: list[str]
    disagreements: int
    ids: list[UUID]


async def summary_counts(
    query_pool: AsyncConnectionPool, slice_: Slice, *, max_ids: int
) -> SummaryCounts:
    """Agreement's counts over a slice from the per-conversation summaries (migration 0011):
    one row per conversation judged 2+ times, never every review. The reviewers are found
    by a skip scan of reviews_reviewer_idx (a few names), each probed for one such review."""
    if slice_.on_summaries is not None or not slice_.filtered:
        join, condition = sql.SQL(""), slice_.on_summaries or sql.SQL("TRUE")
        # Read again, not from `items`: planned with the table's statistics, a hash join
        # (a merge join of the CTE's guessed size took twice as long).
        judged: sql.Composable = sql.SQL(
            "(SELECT s.conversation_id, s.reviews FROM review_summaries s"
            " WHERE s.reviews >= 2 AND {condition})"
        ).format(condition=condition)
    else:
        # The slice looks at conversations: each judged one joined once, by primary key.
        join = sql.SQL("JOIN conversations c ON c.id = s.conversation_id")
        condition = slice_.condition
        judged = sql.SQL("items")
    statement = sql.SQL("""
        WITH RECURSIVE names AS (
            SELECT min(reviewer) AS name FROM reviews
            UNION ALL
            SELECT (SELECT min(r.reviewer) FROM reviews r WHERE r.reviewer > names.name)
            FROM names WHERE names.name IS NOT NULL
        ), items AS MATERIALIZED (
            SELECT s.conversation_id, s.conversation_created_at, s.reviews, s.good, s.bad,
                   s.unsure
            FROM review_summaries s {join} WHERE s.reviews >= 2 AND {condition}
        )
        SELECT
            (SELECT coalesce(jsonb_agg(jsonb_build_array(reviews, good, bad, unsure, n)), '[]')
             FROM (SELECT reviews, good, bad, unsure, count(*) AS n FROM items
                   GROUP BY 1, 2, 3, 4) v) AS verdicts,
            (SELECT coalesce(jsonb_agg(jsonb_build_array(reviews, n)), '[]')
             FROM (SELECT reviews, count(*) AS n FROM items GROUP BY 1) p) AS panels,
            (SELECT coalesce(jsonb_agg(jsonb_build_array(label, reviews, present, n)), '[]')
             FROM (SELECT l.label, i.reviews, l.reviews AS present, count(*) AS n
                   FROM {judged} i JOIN review_label_counts l USING (conversation_id)
                   GROUP BY 1, 2, 3) x) AS labels,
            -- LATERAL ... LIMIT 1: one probe per name, stopping at its first such
            -- review (an EXISTS would be planned as a join of every review).
            (SELECT coalesce(array_agg(name ORDER BY name), '{{}}')
             FROM names, LATERAL (
                SELECT 1 FROM reviews r JOIN review_summaries s USING (conversation_id)
                {join}
                WHERE r.reviewer = names.name AND s.reviews >= 2 AND {condition}
                LIMIT 1) judged
             WHERE name IS NOT NULL) AS reviewers,
            (SELECT count(*) FROM items WHERE greatest(good, bad, unsure) < reviews)
                AS disagreements,
            (SELECT coalesce(array_agg(conversation_id), '{{}}')
             FROM (SELECT conversation_id FROM items
                   WHERE greatest(good, bad, unsure) < reviews
                   ORDER BY conversation_created_at DESC, conversation_id DESC
                   LIMIT %(max_ids)s) d) AS ids
    """).format(join=join, condition=condition, judged=judged)
    async with query_pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(SummaryCounts))
        await cursor.execute(statement, {**slice_.params, "max_ids": max_ids})
        row = await cursor.fetchone()
    assert row is not None  # an aggregate always answers one row
    return row


async def agreement_input(
    query_pool: AsyncConnectionPool, slice_: Slice, reviewers: list[str] | None, *, max_ids: int
) -> AgreementCounts | SummaryCounts:
    """What agreement over a slice is computed from: the summaries when everyone's reviews
    count, unless exactly two reviewers judged alike items (Cohen's kappa pairs their
    ratings: their own reviews, by reviews_reviewer_idx, bounded by their counts)."""
    if reviewers is None:
        summary = await summary_counts(query_pool, slice_, max_ids=max_ids)
        if len(summary.reviewers) != 2:
            return summary
        reviewers = summary.reviewers
    return await agreement_counts(query_pool, slice_, reviewers, max_ids=max_ids)


@dataclass(frozen=True)
class Disagreement:
    """A conversation reviewers disagree on, as the agreement page lists it."""

    id: UUID
    created_at: datetime
    prompt: str  # its start
    reviewers: list[str]
    verdicts: list[str]


async def disagreements(
    pool: AsyncConnectionPool, ids: list[UUID], reviewers: list[str] | None
) -> list[Disagreement]:
    """The counted verdicts on a few conversations (at most 100, by primary key)."""
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Disagreement))
        await cursor.execute(
            """
            SELECT c.id, c.created_at, left(c.prompt, 120) AS prompt,
                   array_agg(r.reviewer ORDER BY r.reviewer) AS reviewers,
                   array_agg(r.verdict ORDER BY r.reviewer) AS verdicts
            FROM conversations c JOIN reviews r ON r.conversation_id = c.id
            WHERE c.id = ANY(%(ids)s)
              AND (%(counted)s::text[] IS NULL OR r.reviewer = ANY(%(counted)s::text[]))
            GROUP BY c.id
            ORDER BY c.created_at DESC, c.id DESC
            """,
            {"ids": ids, "counted": reviewers},
        )
        return await cursor.fetchall()
