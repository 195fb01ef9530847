"""The history's reads: lists, searches, counts and the detail page's row, as SQL.

Apart from store.py and recovery_store.py (the streaming path's and recovery's
statements) because they are another kind of query: their cost grows with the history
(a search, a deep page, the counts), so they run on the query pool under a statement
timeout (database.py), and they are where the history's filters, reviews and insights
grow. The expressions that assemble a streaming conversation from its chunks are shared
from store.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from sse_llm import history_filters, search_plan
from sse_llm.contract import Status, Verdict
from sse_llm.history_filters import HistoryFilter
from sse_llm.store import CONVERSATION_COLUMNS, LIVE_CHUNK_COUNT, LIVE_RESPONSE, Conversation


@dataclass(frozen=True)
class ReviewSummary:
    """One review as a history row shows it: who, the verdict, the labels (no note)."""

    reviewer: str
    verdict: Verdict
    labels: list[str]


@dataclass(frozen=True)
class HistoryPage:
    """One page of conversations, newest first, and the reviews of each (by id)."""

    items: list[Conversation]
    has_more: bool
    reviews: dict[UUID, list[ReviewSummary]] = field(default_factory=dict)


async def list_conversations(
    pool: AsyncConnectionPool,
    *,
    limit: int,
    offset: int,
    query: str | None = None,
    status: str | None = None,
    history_filter: HistoryFilter | None = None,
) -> HistoryPage:
    """A page of conversations, newest first, chosen by the history filters (SPEC 9).

    `query` and `status` are shorthands for a filter with only those; `query` uses web
    search syntax (words, "phrases", -excluded, or).
    """
    chosen = history_filter or HistoryFilter(q=query, status=Status(status) if status else None)
    async with pool.connection() as conn:
        page = await page_ids(conn, chosen, limit + 1, offset)
        # One extra row tells whether another page exists, without a count(*).
        ids = [row[0] for row in page[:limit]]
        statement = sql.SQL("""
            SELECT {columns}
            FROM unnest(%(ids)s::uuid[]) WITH ORDINALITY AS page(id, position)
            JOIN conversations c ON c.id = page.id
            ORDER BY page.position
        """).format(columns=CONVERSATION_COLUMNS)
        cursor = conn.cursor(row_factory=class_row(Conversation))
        await cursor.execute(statement, {"ids": ids})
        rows = await cursor.fetchall()
        reviews = await reviews_of(conn, ids)
    return HistoryPage(items=rows, has_more=len(page) > limit, reviews=reviews)


async def reviews_of(conn: AsyncConnection, ids: list[UUID]) -> dict[UUID, list[ReviewSummary]]:
    """The reviews of these conversations, in one query by the reviews' primary key."""
    cursor = await conn.execute(
        """
        SELECT r.conversation_id, r.reviewer, r.verdict, r.labels FROM reviews r
        WHERE r.conversation_id = ANY(%(ids)s::uuid[])
        ORDER BY r.conversation_id, r.reviewer
        """,
        {"ids": ids},
    )
    found: dict[UUID, list[ReviewSummary]] = {conversation_id: [] for conversation_id in ids}
    for conversation_id, reviewer, verdict, labels in await cursor.fetchall():
        found[conversation_id].append(ReviewSummary(reviewer, Verdict(verdict), labels))
    return found


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
# The newest window serves requests of a page or a few (PAGE_SIZE_MAX is 100). For more
# (an export's page of 500, a /stats sample of 1,000) its 10 rows tested per row wanted
# come up short for any condition rarer than 1 in 10, and the walks that follow find the
# rows anyway: at 1,000,000, verdict=bad's sample spent 41 ms of 122 in a 10,000-row
# window to find 195.
_WINDOW_MAX_WANTED = _SEARCH_WINDOW_ROWS // 10


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
    """One page of history rows, newest first, and the reviews of each (by id)."""

    items: list[HistoryRow]
    has_more: bool
    reviews: dict[UUID, list[ReviewSummary]] = field(default_factory=dict)


@dataclass(frozen=True)
class ConversationDetail(Conversation):
    """A conversation and its time to first chunk in seconds (None before the first chunk)."""

    first_chunk_seconds: float | None


async def count_by_status(pool: AsyncConnectionPool) -> list[StatusCount]:
    """How many conversations there are of each status present.

    Summed from the counts the writer keeps by hour (migration 0010, store.py): the cost
    grows with the hours and models of the history, not its conversations. Pruned ones
    are taken away (the rollup keeps them for /stats; migration 0016, retention.py).
    """
    query = """
        SELECT status, sum(conversations)::bigint AS count FROM (
            SELECT status, conversations FROM conversation_counts
            UNION ALL
            SELECT status, -conversations FROM pruned_counts
        ) AS counts
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
    history_filter: HistoryFilter | None = None,
) -> HistoryRows:
    """A page of the history as excerpts, newest first; a search marks its hits (ts_headline).

    Chosen as list_conversations chooses. The page's ids are found first, then only
    those rows are read, so a deep page or a long answer costs no more than it must.
    """
    chosen = history_filter or HistoryFilter(q=query, status=Status(status) if status else None)
    async with pool.connection() as conn:
        page = await page_ids(conn, chosen, limit + 1, offset)
        # One extra row tells whether another page exists, without a count(*).
        ids = [row[0] for row in page[:limit]]
        rows = await _history_rows(conn, ids, chosen.q)
        reviews = await reviews_of(conn, ids)
    return HistoryRows(items=rows, has_more=len(page) > limit, reviews=reviews)


# Finding a page's ids. Each way is bounded by what it walks: the newest conversations
# (a window), the reviews that can match (at most the reviews table), or a search's hits.

_Ids = list[tuple[UUID, datetime]]


async def page_ids(
    conn: AsyncConnection, history_filter: HistoryFilter, limit: int, offset: int
) -> _Ids:
    """The (id, created_at) of one page of the filtered history, newest first.

    With no condition on reviews and no search, the conversations' own indexes find
    the page. Otherwise the newest conversations are tested first (a bounded window:
    quick for whatever is common among recent rows); when they hold too few matches,
    the page is walked from the reviews side (in the history's order, by the reviews'
    indexes: the cost grows with the reviews that can match, not the history), else
    from the search's index. A `before` that names no conversation gives an empty page.
    """
    try:
        keyset, params = await _keyset(conn, history_filter.before)
    except LookupError:
        return []
    chosen = history_filter.without_cursor()
    params.update(limit=limit, offset=offset)
    if not (chosen.q or chosen.reviews_filtered):
        return await _walk_conversations(conn, chosen, keyset, params)
    if search_plan.handles(chosen):
        return await search_plan.search_page(conn, chosen, keyset, params)
    if offset + limit <= _WINDOW_MAX_WANTED:
        window = {"window": _SEARCH_WINDOW_ROWS}
        page, complete = await _newest_window(conn, chosen, keyset, params | window)
        if len(page) == limit or complete:
            # The newest rows hold the whole page, or fewer than `window` rows pass the
            # cheap conditions at all (a day, `delivered`): either way, a full walk's page.
            return page
    shares = await _label_shares(conn, chosen.labels)
    # The walk from the reviews side starts from the rarest label.
    rarest_first = replace(chosen, labels=tuple(sorted(chosen.labels, key=shares.__getitem__)))
    gather = bool(shares) and min(shares.values()) < _RARE_LABEL_SHARE
    walk = _review_driver(rarest_first, one_per_conversation=not gather)
    if walk is not None:
        driver, driver_params, rest = walk
        return await _walk_reviews(conn, rest, driver, params | driver_params, gather=gather)
    if chosen.q:
        return await _walk_search_index(conn, chosen, keyset, params)
    return await _walk_conversations(conn, chosen, keyset, params)


async def _keyset(
    conn: AsyncConnection, before: UUID | None
) -> tuple[sql.Composable, dict[str, Any]]:
    """The condition "older than `before`" on conversations `c`, and its parameters."""
    if before is None:
        return sql.SQL("TRUE"), {"cursor_at": None, "cursor_id": None}
    cursor = await conn.execute(
        "SELECT c.created_at FROM conversations c WHERE c.id = %s", [before]
    )
    row = await cursor.fetchone()
    if row is None:
        # Empty, not an error: a cursor goes only when its conversation is deleted, and
        # retention deletes the oldest first, so what came after it is gone too.
        raise LookupError(before)
    # A row comparison matches the (created_at DESC, id DESC) indexes: an index range.
    keyset = sql.SQL("(c.created_at, c.id) < (%(cursor_at)s, %(cursor_id)s)")
    return keyset, {"cursor_at": row[0], "cursor_id": before}


async def _fetch(conn: AsyncConnection, statement: sql.Composed, params: dict[str, Any]) -> _Ids:
    cursor = await conn.execute(statement, params)
    return await cursor.fetchall()


async def _walk_conversations(
    conn: AsyncConnection, chosen: HistoryFilter, keyset: sql.Composable, params: dict[str, Any]
) -> _Ids:
    """The page from the conversations' (status | model, created_at, id) indexes."""
    if chosen.delivered:
        return await _walk_delivery_cuts(conn, chosen, keyset, params)
    condition, filter_params = history_filters.condition(chosen)
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM conversations c WHERE {condition} AND {keyset}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(condition=condition, keyset=keyset)
    return await _fetch(conn, statement, params | filter_params)


async def _walk_delivery_cuts(
    conn: AsyncConnection, chosen: HistoryFilter, keyset: sql.Composable, params: dict[str, Any]
) -> _Ids:
    """`delivered=incomplete` with other conditions: the page walked from the small partial
    index of cut-off conversations (migration 0014), the rest tested per row.

    OFFSET 0 keeps the planner from walking the model's or status's index instead: at
    5,000,000 with the flag's statistics stale (a new column) it took every row for a
    candidate and read all 100,000 of a model's rows (0.3-4 s) to find none. This way the
    cost is bounded by the cut-off conversations, the few that migration 0014 indexes.
    """
    delivered, delivered_params = history_filters.condition(HistoryFilter(delivered="incomplete"))
    rest, rest_params = history_filters.condition(replace(chosen, delivered=None))
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM (
            SELECT c.* FROM conversations c
            WHERE c.delivery_cut AND c.status <> 'streaming' AND {keyset}
            ORDER BY c.created_at DESC, c.id DESC OFFSET 0
        ) AS c
        WHERE {delivered} AND {rest}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(keyset=keyset, delivered=delivered, rest=rest)
    return await _fetch(conn, statement, params | delivered_params | rest_params)


async def _newest_window(
    conn: AsyncConnection, chosen: HistoryFilter, keyset: sql.Composable, params: dict[str, Any]
) -> tuple[_Ids, bool]:
    """The page among the newest `window` conversations that match the cheap conditions,
    and whether those were all of them (fewer than `window`: nothing older to look at)."""
    plain = HistoryFilter(
        status=chosen.status,
        model=chosen.model,
        from_=chosen.from_,
        to=chosen.to,
        delivered=chosen.delivered,
    )
    inner, inner_params = history_filters.condition(plain)
    outer, outer_params = history_filters.condition(
        replace(chosen, status=None, model=None, from_=None, to=None, delivered=None)
    )
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM (
            SELECT c.id, c.created_at, c.search FROM conversations c WHERE {inner} AND {keyset}
            ORDER BY c.created_at DESC, c.id DESC LIMIT %(window)s
        ) AS c
        WHERE {outer}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(inner=inner, keyset=keyset, outer=outer)
    page = await _fetch(conn, statement, params | inner_params | outer_params)
    if len(page) == params["limit"]:
        return page, True
    # Short: counted only now (the window's rows, by the same index), as the walks that
    # would follow cost far more: at 5,000,000 `delivered=incomplete&reviewed=true` with no
    # flagged row walked all 500,000 reviews (1.3 s) to find what the window had shown.
    count = sql.SQL("""
        SELECT count(*) FROM (
            SELECT 1 FROM conversations c WHERE {inner} AND {keyset} LIMIT %(window)s
        ) AS c
    """).format(inner=inner, keyset=keyset)
    cursor = await conn.execute(count, params | inner_params)
    row = await cursor.fetchone()
    return page, row is not None and row[0] < params["window"]


def _review_driver(
    chosen: HistoryFilter, *, one_per_conversation: bool = True
) -> tuple[sql.Composable, dict[str, Any], HistoryFilter] | None:
    """A condition on one review `d` per matching conversation, for walking reviews, its
    parameters, and what the filter asks beyond it (checked per conversation).

    One review per conversation: R's own (the primary key makes it unique), else the
    matching review with the first reviewer name (the rest are skipped by a probe of the
    primary key), so the walk stays in the index's order and needs no DISTINCT. Without
    `one_per_conversation`, every matching review (a gathering walk uses DISTINCT).
    """
    first = sql.SQL(
        "NOT EXISTS (SELECT 1 FROM reviews e WHERE e.conversation_id = d.conversation_id"
        " AND e.reviewer < d.reviewer AND {same})"
        if one_per_conversation
        else "TRUE"
    )
    if chosen.reviewer is not None and chosen.reviewed is not False:
        parts = ["d.reviewer = %(driver_reviewer)s"]
        if chosen.verdict is not None:
            parts.append("d.verdict = %(driver_verdict)s")
        if chosen.labels:
            parts.append("d.labels @> %(driver_labels)s::text[]")
        params = {
            "driver_reviewer": chosen.reviewer,
            "driver_verdict": chosen.verdict,
            "driver_labels": list(chosen.labels),
        }
        rest = replace(chosen, reviewer=None, verdict=None, labels=(), reviewed=None)
        return sql.SQL(" AND ".join(parts)), params, rest
    if chosen.labels:
        same = sql.SQL("e.labels @> %(driver_labels)s::text[]")
        driver = sql.SQL("d.labels @> %(driver_labels)s::text[] AND {}").format(
            first.format(same=same)
        )
        rest = replace(chosen, labels=chosen.labels[1:])
        return driver, {"driver_labels": [chosen.labels[0]]}, rest
    if chosen.verdict is not None or chosen.consensus is not None:
        same = sql.SQL("e.verdict = d.verdict")
        driver = sql.SQL("d.verdict = %(driver_verdict)s AND {}").format(first.format(same=same))
        # consensus stays in the rest: no review may have another verdict.
        return (
            driver,
            {"driver_verdict": chosen.verdict or chosen.consensus},
            replace(chosen, verdict=None),
        )
    if chosen.reviewed is True:
        return first.format(same=sql.SQL("TRUE")), {}, replace(chosen, reviewed=None)
    return None  # only "not reviewed (by R)": no review to walk


# A label on fewer reviews than this share is gathered whole (by the GIN index) and
# sorted, rather than walked for in the history's order: the walk would pass every
# review newer than its newest use (say, a label only old conversations have).
_RARE_LABEL_SHARE = 0.02


async def _label_shares(conn: AsyncConnection, labels: tuple[str, ...]) -> dict[str, float]:
    """The share of reviews with each label, from the planner's statistics of
    reviews.labels; a label too rare to be listed there has share 0."""
    if not labels:
        return {}
    cursor = await conn.execute(
        """
        SELECT found.label, found.share
        FROM pg_stats s, unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs)
            AS found(label, share)
        WHERE s.schemaname = current_schema() AND s.tablename = 'reviews'
          AND s.attname = 'labels' AND found.label = ANY(%(labels)s::text[])
        """,
        {"labels": list(labels)},
    )
    shares = {label: float(share) for label, share in await cursor.fetchall()}
    return {label: shares.get(label, 0.0) for label in labels}


async def _walk_reviews(
    conn: AsyncConnection,
    chosen: HistoryFilter,
    driver: sql.Composable,
    params: dict[str, Any],
    *,
    gather: bool,
) -> _Ids:
    """The page walked from the reviews that can match, newest conversation first;
    `gather`: all of them first (few: a rare label's), then sorted.

    The cursor and the time range apply to the review's copy of its conversation's
    created_at, so they narrow the reviews' index range; the planner may still start
    from the conversations' side when a condition there is rarer (a model, a search).
    """
    condition, filter_params = history_filters.condition(chosen)
    ranges = [sql.SQL("TRUE")]
    if params["cursor_id"] is not None:
        ranges.append(
            sql.SQL(
                "(d.conversation_created_at, d.conversation_id) < (%(cursor_at)s, %(cursor_id)s)"
            )
        )
    if chosen.from_ is not None:
        ranges.append(sql.SQL("d.conversation_created_at >= %(filter_from)s"))
    if chosen.to is not None:
        ranges.append(sql.SQL("d.conversation_created_at < %(filter_to)s"))
    walked = sql.SQL("""
        WITH d AS NOT MATERIALIZED (SELECT d.* FROM reviews d WHERE {driver} AND {ranges})
        SELECT c.id, c.created_at FROM d JOIN conversations c ON c.id = d.conversation_id
        WHERE {condition}
        ORDER BY d.conversation_created_at DESC, d.conversation_id DESC
        LIMIT %(limit)s OFFSET %(offset)s
    """)
    # Gathered: the matching conversations sorted first (OFFSET 0 keeps that apart), then
    # joined in that order until the page is full. Joined before sorting, a label on
    # 10,000 reviews read 6,700 conversations for a page of 21 (200-600 ms at 5,000,000).
    gathered = sql.SQL("""
        SELECT c.id, c.created_at FROM (
            SELECT DISTINCT d.conversation_id, d.conversation_created_at
            FROM reviews d WHERE {driver} AND {ranges}
            ORDER BY d.conversation_created_at DESC, d.conversation_id DESC OFFSET 0
        ) AS d
        CROSS JOIN LATERAL (
            SELECT c.id, c.created_at FROM conversations c
            WHERE c.id = d.conversation_id AND {condition}
        ) AS c
        ORDER BY d.conversation_created_at DESC, d.conversation_id DESC
        LIMIT %(limit)s OFFSET %(offset)s
    """)
    statement = (gathered if gather else walked).format(
        driver=driver, ranges=sql.SQL(" AND ").join(ranges), condition=condition
    )
    return await _fetch(conn, statement, params | filter_params)


async def _walk_search_index(
    conn: AsyncConnection, chosen: HistoryFilter, keyset: sql.Composable, params: dict[str, Any]
) -> _Ids:
    """The page from the full-text index: its cost grows with the hits, not the history."""
    condition, filter_params = history_filters.condition(chosen)
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM conversations c WHERE {condition} AND {keyset}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(condition=condition, keyset=keyset)
    async with conn.transaction():
        # Only the full-text index: the planner's other choices test every row.
        await conn.execute("SET LOCAL enable_indexscan = off")
        await conn.execute("SET LOCAL enable_seqscan = off")
        return await _fetch(conn, statement, params | filter_params)


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
