"""The history's reads: lists, searches, counts and the detail page's row, as SQL.

Apart from store.py (the streaming path's and recovery's statements) because they are
another kind of query: their cost grows with the history (a search, a deep page, the
counts), so they run on the query pool under a statement timeout (database.py), and
they are where the history's filters, reviews and insights grow. The expressions that
assemble a streaming conversation from its chunks are shared from store.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from sse_llm.store import CONVERSATION_COLUMNS, LIVE_CHUNK_COUNT, LIVE_RESPONSE, Conversation


@dataclass(frozen=True)
class HistoryPage:
    """One page of conversations, newest first."""

    items: list[Conversation]
    has_more: bool


async def list_conversations(
    pool: AsyncConnectionPool,
    *,
    limit: int,
    offset: int,
    query: str | None = None,
    status: str | None = None,
) -> HistoryPage:
    """A page of conversations, newest first, optionally full-text searched and filtered.

    `query` uses web search syntax (words, "phrases", -excluded, or).
    """
    conditions = [sql.SQL("TRUE")]
    if query:
        conditions.append(sql.SQL("c.search @@ websearch_to_tsquery('english', %(query)s)"))
    if status:
        conditions.append(sql.SQL("c.status = %(status)s"))
    statement = sql.SQL("""
        SELECT {columns} FROM conversations c
        WHERE {conditions}
        ORDER BY c.created_at DESC, c.id DESC
        LIMIT %(limit)s OFFSET %(offset)s
    """).format(columns=CONVERSATION_COLUMNS, conditions=sql.SQL(" AND ").join(conditions))
    # One extra row tells whether another page exists, without a count(*).
    params = {"query": query, "status": status, "limit": limit + 1, "offset": offset}
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Conversation))
        await cursor.execute(statement, params)
        rows = await cursor.fetchall()
    return HistoryPage(items=rows[:limit], has_more=len(rows) > limit)


# The dashboard's rows: search hits come back wrapped in two private-use characters
# instead of HTML, so the templates can escape everything and still mark the hits; those
# characters are removed from the stored text first, so no prompt can forge a highlight.

HIT_START = "\ue000"
HIT_STOP = "\ue001"
# How much of a prompt and of a response a history row shows.
_PREVIEW_CHARS = 300
# ts_headline reads this much of a response looking for hits: its cost grows with the text.
_HEADLINE_SOURCE_CHARS = 20_000
_HEADLINE_MARKERS = f"StartSel={HIT_START}, StopSel={HIT_STOP}"
# A search first looks for its page among this many newest rows (see _search_page).
_SEARCH_WINDOW_ROWS = 2000


@dataclass(frozen=True)
class StatusCount:
    """How many conversations have one status."""

    status: str
    count: int


@dataclass(frozen=True)
class HistoryRow:
    """One row of the dashboard's history: excerpts of a conversation's prompt and response.

    With a search, the matched words in both are wrapped in HIT_START ... HIT_STOP.
    """

    id: UUID
    status: str
    created_at: datetime
    model: str
    chunks: int
    prompt: str
    response: str


@dataclass(frozen=True)
class HistoryRows:
    """One page of history rows, newest first."""

    items: list[HistoryRow]
    has_more: bool


@dataclass(frozen=True)
class ConversationDetail(Conversation):
    """A conversation and its time to first chunk in seconds (None before the first chunk)."""

    first_chunk_seconds: float | None


async def count_by_status(pool: AsyncConnectionPool) -> list[StatusCount]:
    """How many conversations there are of each status present.

    Summed from the counts the writer keeps by hour (migration 0010, store.py): the cost
    grows with the hours and models of the history, not its conversations.
    """
    query = """
        SELECT status, sum(conversations)::bigint AS count FROM conversation_counts
        GROUP BY status HAVING sum(conversations) <> 0
    """
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(StatusCount))
        await cursor.execute(query)
        return await cursor.fetchall()


async def list_history_rows(
    pool: AsyncConnectionPool,
    *,
    limit: int,
    offset: int,
    query: str | None = None,
    status: str | None = None,
) -> HistoryRows:
    """A page of the history as excerpts, newest first; a search marks its hits (ts_headline).

    `query` is the same web search as list_conversations. The page's ids are found first,
    then only those rows are read, so a deep offset or a long answer costs no more than it must.
    """
    async with pool.connection() as conn:
        if query:
            page = await _search_page(conn, query, status, limit + 1, offset)
        else:
            page = await _history_page(conn, status, limit + 1, offset)
        # One extra row tells whether another page exists, without a count(*).
        rows = await _history_rows(conn, [row[0] for row in page[:limit]], query)
    return HistoryRows(items=rows, has_more=len(page) > limit)


async def _history_page(
    conn: AsyncConnection, status: str | None, limit: int, offset: int
) -> list[tuple[UUID, datetime]]:
    """The ids of one page of the history, from the (status, created_at) indexes alone."""
    condition = sql.SQL("c.status = %(status)s" if status else "TRUE")
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM conversations c WHERE {condition}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(condition=condition)
    cursor = await conn.execute(statement, {"status": status, "limit": limit, "offset": offset})
    return await cursor.fetchall()


async def _search_page(
    conn: AsyncConnection, query: str, status: str | None, limit: int, offset: int
) -> list[tuple[UUID, datetime]]:
    """The ids of one page of search results, newest first, in bounded time.

    PostgreSQL would walk the newest-first index testing each row, which is quick for a
    word found everywhere but reads every row for a word that is only in old ones. So
    the walk is limited to the newest rows (each test costs a read of the row's tsvector);
    when they hold too few hits, the page comes from the full-text index instead, whose
    cost grows with the number of hits, not with the size of the history.
    """
    status_condition = sql.SQL("c.status = %(status)s" if status else "TRUE")
    params: dict[str, object] = {
        "query": query,
        "status": status,
        "limit": limit,
        "offset": offset,
    }
    newest = sql.SQL("""
        SELECT recent.id, recent.created_at FROM (
            SELECT c.id, c.created_at, c.search FROM conversations c WHERE {status}
            ORDER BY c.created_at DESC, c.id DESC LIMIT %(window)s
        ) AS recent
        WHERE recent.search @@ websearch_to_tsquery('english', %(query)s)
        ORDER BY recent.created_at DESC, recent.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(status=status_condition)
    # Deeper pages look further, up to a bound: past it the index is the cheaper way.
    window = min(max(_SEARCH_WINDOW_ROWS, 10 * (offset + limit)), 5 * _SEARCH_WINDOW_ROWS)
    params["window"] = window
    if offset + limit <= window:
        cursor = await conn.execute(newest, params)
        page = await cursor.fetchall()
        if len(page) == limit:
            return page  # the newest rows hold the whole page: the same as a full search
    everything = sql.SQL("""
        SELECT c.id, c.created_at FROM conversations c
        WHERE c.search @@ websearch_to_tsquery('english', %(query)s) AND {status}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(status=status_condition)
    async with conn.transaction():
        # Only the full-text index: the planner's other choices test every row.
        await conn.execute("SET LOCAL enable_indexscan = off")
        await conn.execute("SET LOCAL enable_seqscan = off")
        cursor = await conn.execute(everything, params)
        return await cursor.fetchall()


async def _history_rows(
    conn: AsyncConnection, ids: list[UUID], query: str | None
) -> list[HistoryRow]:
    """The history rows of `ids`, in that order; with a query, hits are marked."""
    # A cut-off excerpt ends with an ellipsis.
    prompt_start: sql.Composable = sql.SQL(
        "translate(left(c.prompt, %(preview)s), %(markers)s, '')"
    )
    response_start: sql.Composable = sql.SQL(
        "translate(left(r.response, %(preview)s), %(markers)s, '')"
    )
    if query:
        prompt_start = sql.SQL("""
            ts_headline('english', {prompt_start}, websearch_to_tsquery('english', %(query)s),
                        %(markers_option)s || ', HighlightAll=true')
        """).format(prompt_start=prompt_start)
        # The passages around the hits; the answer's start when the hits are in the prompt.
        response_start = sql.SQL("""
            (SELECT CASE WHEN strpos(h.excerpt, %(hit_start)s) > 0 THEN h.excerpt
                         ELSE {response_start} END
             FROM ts_headline('english', translate(left(r.response, %(source)s), %(markers)s, ''),
                              websearch_to_tsquery('english', %(query)s),
                              %(markers_option)s || ', MaxFragments=2, MaxWords=18, MinWords=8, '
                              || 'FragmentDelimiter=" … "') AS h(excerpt))
        """).format(response_start=response_start)
    excerpts = sql.SQL("""
        {prompt_start} || CASE WHEN length(c.prompt) > %(preview)s THEN '…' ELSE '' END AS prompt,
        {response_start} || CASE WHEN length(r.response) > %(preview)s THEN '…' ELSE '' END
            AS response
    """).format(prompt_start=prompt_start, response_start=response_start)
    statement = sql.SQL("""
        SELECT c.id, c.status, c.created_at, c.model, r.chunks, {excerpts}
        FROM unnest(%(ids)s::uuid[]) WITH ORDINALITY AS page(id, position)
        JOIN conversations c ON c.id = page.id
        CROSS JOIN LATERAL (SELECT {response} AS response, {chunks} AS chunks) AS r
        ORDER BY page.position
    """).format(excerpts=excerpts, response=LIVE_RESPONSE, chunks=LIVE_CHUNK_COUNT)
    params = {
        "ids": ids,
        "query": query,
        "preview": _PREVIEW_CHARS,
        "source": _HEADLINE_SOURCE_CHARS,
        "markers": HIT_START + HIT_STOP,
        "markers_option": _HEADLINE_MARKERS,
        "hit_start": HIT_START,
    }
    cursor = conn.cursor(row_factory=class_row(HistoryRow))
    await cursor.execute(statement, params)
    return await cursor.fetchall()


async def get_conversation_detail(
    pool: AsyncConnectionPool, conversation_id: UUID
) -> ConversationDetail | None:
    """One conversation as get_conversation reads it, with its time to first chunk."""
    query = sql.SQL("""
        SELECT {columns},
               extract(epoch FROM coalesce(
                   c.first_chunk_at,
                   (SELECT min(k.created_at) FROM chunks k WHERE k.conversation_id = c.id)
               ) - c.created_at)::float8 AS first_chunk_seconds
        FROM conversations c WHERE c.id = %(id)s
    """).format(columns=CONVERSATION_COLUMNS)
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(ConversationDetail))
        await cursor.execute(query, {"id": conversation_id})
        return await cursor.fetchone()
