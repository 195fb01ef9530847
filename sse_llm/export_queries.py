"""The export's SQL (SPEC 10): the filtered history read page by page, on a connection of its own.

Why it looks like this (measured at 1,000,000 conversations; README "Export"):
- A connection of its own, opened for the export and closed with it: a download runs as
  long as its client reads, and holding a connection of the main pool (the streaming
  path's reads) or of the query pool (the history's pages) that long would starve them.
  settings.max_exports bounds how many such connections exist at once.
- Keyset pages, each a few short autocommit statements: no statement and no transaction
  lives longer than one page, so a slow download holds no snapshot between pages (VACUUM
  is not held back) and no statement runs past SSE_LLM_QUERY_TIMEOUT. A long single
  cursor would be simpler, but its snapshot would last as long as the slowest client.
- The page's ids are found by history_queries.page_ids, the same planner-aware walks the
  history uses (by the conversations' indexes, the reviews' side, or the search index),
  with the last row of the page before as the `before` cursor; then the page's rows, its
  reviews and its annotations are read in one statement each, by primary key or index.
- A row inserted after the export started, older than the cursor (created_at is set by
  the database at insert, so only a clock step back could do that), is exported if its
  page has not been read yet: the export is a walk, not a snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from uuid import UUID

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import class_row

from sse_llm import history_queries, store
from sse_llm.database import QueryTimeout, connection_options
from sse_llm.history_filters import HistoryFilter
from sse_llm.review_store import Annotation, Review
from sse_llm.store import CONVERSATION_COLUMNS, Conversation

# Rows per page: large enough that the per-page round trips cost little, small enough
# that a page of long answers with their reviews stays a few megabytes at most.
EXPORT_PAGE_ROWS = 500
APPLICATION_NAME = "sse-llm-export"


@dataclass(frozen=True)
class ExportPage:
    """One page of the export: conversations in the history's order, their reviews
    (notes included, oldest first) and annotations (by start), by conversation id."""

    conversations: list[Conversation]
    reviews: dict[UUID, list[Review]]
    annotations: dict[UUID, list[Annotation]]


async def open_export_connection(database_url: str, statement_timeout: float) -> AsyncConnection:
    """A new autocommit connection for one export, its statements under `statement_timeout`."""
    conn = await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, **connection_options(5.0, APPLICATION_NAME)
    )
    try:
        await store.set_statement_timeout(conn, statement_timeout)
    except BaseException:
        await conn.close()
        raise
    return conn


# The key space of the export slots' session advisory locks (store.py's are 0x55E11-0x55E13,
# the pruner's 0x55E16); the key is the slot's number.
EXPORT_SLOT_NAMESPACE = 0x55E17


async def claim_export_slot(conn: AsyncConnection, slots: int) -> bool:
    """Take one of `slots` slots shared by every process on this database, for as long as
    `conn` lives (a session advisory lock: the server frees it when the connection ends,
    however the export or its process ends). False when all are taken."""
    for slot in range(slots):
        cursor = await conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (EXPORT_SLOT_NAMESPACE, slot)
        )
        row = await cursor.fetchone()
        if row is not None and row[0]:
            return True
    return False


async def export_pages(
    conn: AsyncConnection, history_filter: HistoryFilter, page_rows: int = EXPORT_PAGE_ROWS
) -> AsyncIterator[ExportPage]:
    """Every conversation the filter chooses, newest first, a page at a time.

    The filter's own `before` (if any) is where the walk starts.
    """
    cursor = history_filter.before
    while True:
        page = await read_page(conn, replace(history_filter, before=cursor), page_rows)
        if page.conversations:
            yield page
        if len(page.conversations) < page_rows:
            return
        cursor = page.conversations[-1].id


async def read_page(
    conn: AsyncConnection, history_filter: HistoryFilter, page_rows: int
) -> ExportPage:
    """The first `page_rows` conversations the filter chooses (after its `before`), in full."""
    try:
        found = await history_queries.page_ids(conn, history_filter, page_rows, 0)
        ids = [row[0] for row in found]
        if not ids:
            return ExportPage([], {}, {})
        return ExportPage(
            await _conversations(conn, ids),
            await _reviews(conn, ids),
            await _annotations(conn, ids),
        )
    except psycopg.errors.QueryCanceled as exc:
        raise QueryTimeout(str(exc)) from exc


async def _conversations(conn: AsyncConnection, ids: list[UUID]) -> list[Conversation]:
    """The conversations of `ids`, in that order (a streaming one: what is persisted)."""
    statement = sql.SQL("""
        SELECT {columns}
        FROM unnest(%(ids)s::uuid[]) WITH ORDINALITY AS page(id, position)
        JOIN conversations c ON c.id = page.id
        ORDER BY page.position
    """).format(columns=CONVERSATION_COLUMNS)
    cursor = conn.cursor(row_factory=class_row(Conversation))
    await cursor.execute(statement, {"ids": ids})
    return await cursor.fetchall()


async def _reviews(conn: AsyncConnection, ids: list[UUID]) -> dict[UUID, list[Review]]:
    """Every review of `ids`, notes included, in one statement by the primary key."""
    cursor = conn.cursor(row_factory=class_row(Review))
    await cursor.execute(
        """
        SELECT r.conversation_id, r.reviewer, r.verdict, r.labels, r.note,
               r.created_at, r.updated_at
        FROM reviews r WHERE r.conversation_id = ANY(%(ids)s::uuid[])
        ORDER BY r.conversation_id, r.created_at, r.reviewer
        """,
        {"ids": ids},
    )
    found: dict[UUID, list[Review]] = {}
    for review in await cursor.fetchall():
        found.setdefault(review.conversation_id, []).append(review)
    return found


async def _annotations(conn: AsyncConnection, ids: list[UUID]) -> dict[UUID, list[Annotation]]:
    """Every annotation of `ids`, by start, in one statement by annotations_conversation_idx."""
    cursor = conn.cursor(row_factory=class_row(Annotation))
    await cursor.execute(
        """
        SELECT a.id, a.conversation_id, a.reviewer, a.field, a.start_offset AS start,
               a.end_offset AS "end", a.label, a.note, a.created_at
        FROM annotations a WHERE a.conversation_id = ANY(%(ids)s::uuid[])
        ORDER BY a.conversation_id, a.start_offset, a.end_offset, a.created_at, a.id
        """,
        {"ids": ids},
    )
    found: dict[UUID, list[Annotation]] = {}
    for annotation in await cursor.fetchall():
        found.setdefault(annotation.conversation_id, []).append(annotation)
    return found
