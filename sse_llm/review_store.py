"""The SQL of reviews, passage annotations and reviewers (SPEC 9), as named async functions.

Apart from store.py (the streaming path) and history_queries.py (the history's reads):
nothing here runs while a chunk is generated, written or sent. Every statement reads or
writes a handful of rows by primary key or by index, so they run on the main pool.

Decisions worth knowing:
- A conversation still streaming may be reviewed and annotated. Its answer only grows
  (chunks are appended, never rewritten, and every end keeps what was persisted), so a
  passage annotated now is the same passage once it ends; and a reviewer watching an
  answer go wrong live should be able to say so at once, not wait for the end (up to
  LLM_TOTAL_TIMEOUT). The review queue serves only ended ones; the page says when an
  answer was judged while streaming (its status is beside the review).
- A missing conversation is told apart from "no reviews" in the same statement (a LEFT
  JOIN from the conversation), so a read is one round trip and cannot race a delete.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import sql
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from sse_llm.contract import Verdict
from sse_llm.store import LIVE_RESPONSE

# labels_in_use reads the labels of this many reviews (the newest conversations' ones,
# by index), not every review: autocomplete must answer in milliseconds with 100,000
# reviews, and a label is a suggestion (any label may still be typed).
LABEL_SAMPLE_REVIEWS = 5000

_FIELD_TEXT = {
    "prompt": sql.SQL("c.prompt"),
    "response": LIVE_RESPONSE,  # a streaming answer: what is persisted so far
}


@dataclass(frozen=True)
class Review:
    """One reviewer's judgement of one conversation."""

    conversation_id: UUID
    reviewer: str
    verdict: Verdict
    labels: list[str]
    note: str
    created_at: datetime
    updated_at: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))  # read as text


@dataclass(frozen=True)
class Annotation:
    """A label and a note on one passage: code points [start, end) of the prompt or answer."""

    id: UUID
    conversation_id: UUID
    reviewer: str
    field: str
    start: int
    end: int
    label: str
    note: str
    created_at: datetime


@dataclass(frozen=True)
class ReviewerSummary:
    """A reviewer, how many reviews they hold, and when they last wrote one."""

    reviewer: str
    reviews: int
    last_review_at: datetime


_REVIEW_COLUMNS = sql.SQL(
    "r.conversation_id, r.reviewer, r.verdict, r.labels, r.note, r.created_at, r.updated_at"
)
_ANNOTATION_COLUMNS = sql.SQL(
    "a.id, a.conversation_id, a.reviewer, a.field, a.start_offset AS start, "
    'a.end_offset AS "end", a.label, a.note, a.created_at'
)


async def put_review(
    pool: AsyncConnectionPool,
    conversation_id: UUID,
    reviewer: str,
    verdict: Verdict,
    labels: list[str],
    note: str,
) -> Review | None:
    """Create or replace `reviewer`'s review (its created_at kept); None: no such conversation."""
    # The conversation's created_at is copied so the history's filters walk reviews in
    # the history's order by index (migration 0007).
    query = sql.SQL("""
        INSERT INTO reviews AS r
            (conversation_id, reviewer, verdict, labels, note, conversation_created_at)
        SELECT c.id, %(reviewer)s, %(verdict)s, %(labels)s::text[], %(note)s, c.created_at
        FROM conversations c WHERE c.id = %(id)s
        ON CONFLICT (conversation_id, reviewer) DO UPDATE
        SET verdict = EXCLUDED.verdict, labels = EXCLUDED.labels, note = EXCLUDED.note,
            updated_at = now()
        RETURNING {columns}
    """).format(columns=_REVIEW_COLUMNS)
    params = {
        "id": conversation_id,
        "reviewer": reviewer,
        "verdict": verdict,
        "labels": labels,
        "note": note,
    }
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Review))
        await cursor.execute(query, params)
        return await cursor.fetchone()


async def delete_review(pool: AsyncConnectionPool, conversation_id: UUID, reviewer: str) -> bool:
    """Delete `reviewer`'s review of a conversation; False if there was none."""
    query = "DELETE FROM reviews WHERE conversation_id = %s AND reviewer = %s"
    async with pool.connection() as conn:
        cursor = await conn.execute(query, (conversation_id, reviewer))
        return cursor.rowcount > 0


async def list_reviews(pool: AsyncConnectionPool, conversation_id: UUID) -> list[Review] | None:
    """Every review of a conversation, oldest first; None: no such conversation."""
    query = sql.SQL("""
        SELECT c.id AS found, {columns}
        FROM conversations c LEFT JOIN reviews r ON r.conversation_id = c.id
        WHERE c.id = %s
        ORDER BY r.created_at, r.reviewer
    """).format(columns=_REVIEW_COLUMNS)
    async with pool.connection() as conn:
        cursor = await conn.execute(query, (conversation_id,))
        rows = await cursor.fetchall()
    if not rows:
        return None
    return [Review(*row[1:]) for row in rows if row[1] is not None]


async def add_annotation(
    pool: AsyncConnectionPool,
    conversation_id: UUID,
    reviewer: str,
    field: str,
    start: int,
    end: int,
    label: str,
    note: str,
) -> Annotation | None:
    """Record a passage's label; None: no such conversation.

    Raises ValueError when `field` is neither text or the span is not inside it
    (`0 <= start < end <= ` its length in code points).
    """
    text = _FIELD_TEXT.get(field)
    if text is None:
        raise ValueError("field must be one of: prompt, response.")
    if not 0 <= start < end:
        raise ValueError("start and end must satisfy 0 <= start < end.")
    length_query = sql.SQL("SELECT char_length({text}) FROM conversations c WHERE c.id = %s")
    insert = sql.SQL("""
        INSERT INTO annotations AS a
            (conversation_id, reviewer, field, start_offset, end_offset, label, note)
        VALUES (%(id)s, %(reviewer)s, %(field)s, %(start)s, %(end)s, %(label)s, %(note)s)
        RETURNING {columns}
    """).format(columns=_ANNOTATION_COLUMNS)
    params = {
        "id": conversation_id,
        "reviewer": reviewer,
        "field": field,
        "start": start,
        "end": end,
        "label": label,
        "note": note,
    }
    async with pool.connection() as conn:
        # A prompt never changes and an answer only grows: a span checked inside the text
        # stays inside it, so the check and the insert need no lock between them.
        cursor = await conn.execute(length_query.format(text=text), (conversation_id,))
        row = await cursor.fetchone()
        if row is None:
            return None
        if end > row[0]:
            raise ValueError(f"end must be at most {row[0]}, the {field}'s length in code points.")
        annotation_cursor = conn.cursor(row_factory=class_row(Annotation))
        await annotation_cursor.execute(insert, params)
        return await annotation_cursor.fetchone()


async def list_annotations(
    pool: AsyncConnectionPool, conversation_id: UUID
) -> list[Annotation] | None:
    """A conversation's annotations ordered by start; None: no such conversation."""
    query = sql.SQL("""
        SELECT c.id AS found, {columns}
        FROM conversations c LEFT JOIN annotations a ON a.conversation_id = c.id
        WHERE c.id = %s
        ORDER BY a.start_offset, a.end_offset, a.created_at, a.id
    """).format(columns=_ANNOTATION_COLUMNS)
    async with pool.connection() as conn:
        cursor = await conn.execute(query, (conversation_id,))
        rows = await cursor.fetchall()
    if not rows:
        return None
    return [Annotation(*row[1:]) for row in rows if row[1] is not None]


async def find_annotation(
    pool: AsyncConnectionPool, conversation_id: UUID, annotation_id: UUID
) -> Annotation | None:
    """One annotation of a conversation (to check who wrote it), or None."""
    query = sql.SQL(
        "SELECT {columns} FROM annotations a WHERE a.id = %s AND a.conversation_id = %s"
    ).format(columns=_ANNOTATION_COLUMNS)
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Annotation))
        await cursor.execute(query, (annotation_id, conversation_id))
        return await cursor.fetchone()


async def delete_annotation(
    pool: AsyncConnectionPool, conversation_id: UUID, annotation_id: UUID
) -> bool:
    """Delete one annotation of a conversation; False if it has none with this id."""
    query = "DELETE FROM annotations WHERE id = %s AND conversation_id = %s"
    async with pool.connection() as conn:
        cursor = await conn.execute(query, (annotation_id, conversation_id))
        return cursor.rowcount > 0


async def conversation_exists(pool: AsyncConnectionPool, conversation_id: UUID) -> bool:
    """Whether a conversation has this id (one primary-key probe)."""
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT 1 FROM conversations WHERE id = %s", (conversation_id,))
        return await cursor.fetchone() is not None


async def list_reviewers(pool: AsyncConnectionPool) -> list[ReviewerSummary]:
    """Every reviewer with a review, by name, with their count and latest review time."""
    query = """
        SELECT reviewer, count(*)::int AS reviews, max(updated_at) AS last_review_at
        FROM reviews GROUP BY reviewer ORDER BY reviewer
    """
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(ReviewerSummary))
        await cursor.execute(query)
        return await cursor.fetchall()


async def labels_in_use(pool: AsyncConnectionPool, limit: int = 200) -> list[str]:
    """Labels in use, most used first (then by name), for autocomplete.

    Counted over the reviews of the newest conversations (LABEL_SAMPLE_REVIEWS of them,
    read by index), so the cost stays fixed however many reviews there are.
    """
    query = """
        SELECT label FROM (
            SELECT labels FROM reviews
            ORDER BY conversation_created_at DESC, conversation_id DESC
            LIMIT %(sample)s
        ) recent, unnest(recent.labels) AS label
        GROUP BY label ORDER BY count(*) DESC, label
        LIMIT %(limit)s
    """
    async with pool.connection() as conn:
        cursor = await conn.execute(query, {"sample": LABEL_SAMPLE_REVIEWS, "limit": limit})
        return [row[0] for row in await cursor.fetchall()]
