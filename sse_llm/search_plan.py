"""How a search finds its page: walking the newest rows, or gathering the index's hits.

A search (`q`, with any of status, model, from, to) has two ways to its newest matches:

- **walk**: read the conversations newest first (by a (status | model, created_at, id)
  index) and test each against the query. It costs the rows it reads: the page's matches
  divided by the share of rows that match. A few dozen rows for a common word, the whole
  history for an absent one.
- **gather**: take every hit from the full-text (GIN) index, then sort. It costs the hits
  over the whole history: nothing for an absent word, millions for a common one. A
  phrase's hits are the rows with all its words, each then tested for the positions.

Neither is right at every frequency, and PostgreSQL's planner, which prices both, takes
the walk's cost as if matches were spread evenly and the page were found at once. So the
choice is made here, from the planner's own row estimates (the search vector's most
common lexemes and their frequencies, kept fine by migration 0002's statistics target),
and forced by the query's shape: the walk is a bounded newest-first subquery tested
outside (it can only walk), the gather turns the ordered index scans off (it can only
use the bitmap). A phrase is estimated as all its words (PostgreSQL prices `<->` as AND),
which overstates how often the words stand side by side: so a walk that does not fill
the page measures the true share on what it read, and the choice is made again from that.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from psycopg import AsyncConnection, sql

from sse_llm import history_filters
from sse_llm.history_filters import HistoryFilter

# Costs per row in µs, from EXPLAIN ANALYZE at 1,000,000 conversations (the 2-core VM):
# walking reads an index entry, the row and its stored vector and tests the query (955
# rows in 2.0 ms for a word, 2,134 in 10.5 ms for a phrase); gathering fetches a hit's
# row by a bitmap heap scan and sorts it (12,158 hits in 91.8 ms); a phrase's candidate
# is tested again for the positions.
WALK_ROW_US = 4.0
GATHER_ROW_US = 7.0
RECHECK_ROW_US = 4.0
# A walk reads this many times the rows its estimate needs (estimates err both ways),
# at least MIN_WALK_ROWS, and at most MAX_WALK_ROWS in one round; MAX_ROUNDS rounds.
WALK_SLACK = 3.0
MIN_WALK_ROWS = 200
MAX_WALK_ROWS = 200_000
MAX_ROUNDS = 4
# A walk of this many rows or more, for a query whose index hits are fewer than
# WINDOWED_HITS_PER_ROW per row it would read, takes its matches from the full-text index
# within the rows' window (the GIN bitmap ANDed with the window's `created_at` range)
# rather than testing each row: the same matches, at the cost of the query's index hits
# and the window's index entries. At 10,000,000 two words of middling frequency (10% and
# 1.2% of rows) that meet in 0.1% walked 19,511 rows (heap and stored vector, cold:
# 230-250 ms) where the window's bitmap took 19-33 ms. For one common word (1,022,407
# hits) the bitmap outgrows work_mem and costs more than the walk (740 ms against 150-270).
WINDOWED_WALK_ROWS = 10_000
WINDOWED_HITS_PER_ROW = 1.0

_Ids = list[tuple[Any, Any]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Estimate:
    """What the planner expects of a search: the share of rows matching `q`, the rows
    the gather would take from the index, and the rows the other conditions allow."""

    share: float
    index_rows: float
    scope_rows: float
    phrase: bool

    def walk_cost(self, wanted: int, share: float | None = None) -> float:
        """µs to walk until `wanted` matches are read, at `share` (default: estimated)."""
        return wanted / max(share if share is not None else self.share, 1e-9) * WALK_ROW_US

    def walks_first(self, wanted: int) -> bool:
        """Whether walking for `wanted` matches is estimated cheaper than gathering."""
        return self.walk_cost(wanted) < self.gather_cost()

    def gather_cost(self) -> float:
        """µs to gather every hit (a phrase's candidates tested again) and sort them."""
        per_row = GATHER_ROW_US + (RECHECK_ROW_US if self.phrase else 0.0)
        return self.index_rows * per_row


def handles(chosen: HistoryFilter) -> bool:
    """Whether this module plans the filter's page: a search with conditions on the
    conversation's own columns only (reviews and `delivered` are walked elsewhere)."""
    return bool(chosen.q) and not chosen.reviews_filtered and not chosen.delivered


async def search_page(
    conn: AsyncConnection,
    chosen: HistoryFilter,
    keyset: sql.Composable,
    params: dict[str, Any],
) -> _Ids:
    """The (id, created_at) of one page of a search, newest first, by the cheaper way.

    `keyset` ("older than the cursor") and `params` (cursor_at, cursor_id, limit, offset)
    are history_queries.page_ids'.
    """
    limit, offset = int(params["limit"]), int(params["offset"])
    wanted = offset + limit
    estimate = await estimate_search(conn, chosen)
    if not estimate.walks_first(wanted):
        log.debug("search: gather (estimated share %.6f)", estimate.share)
        return await gather(conn, chosen, keyset, params)
    found: _Ids = []
    seen: set[Any] = set()
    walked = 0
    cursor: tuple[Any, Any] | None = None
    share: float | None = None
    for _ in range(MAX_ROUNDS):
        rows = math.ceil((wanted - len(found)) / max(share or estimate.share, 1e-9) * WALK_SLACK)
        rows = min(max(rows, MIN_WALK_ROWS), MAX_WALK_ROWS)
        hits, boundary = await walk(
            conn, chosen, keyset, params, cursor, rows, wanted - len(found),
            windowed=windows(estimate, rows),
        )  # fmt: skip
        # Each statement has its own snapshot: a conversation started between a walk and
        # its boundary moves the boundary one row up, so the next round reads a row again.
        found.extend(hit for hit in hits if hit[0] not in seen)
        seen.update(hit[0] for hit in hits)
        log.debug("search: walked %d rows, %d matches", rows, len(hits))
        if len(found) >= wanted or boundary is None:
            return found[offset:wanted]  # the page, or the history ended
        walked += rows
        cursor = boundary
        # The share the walk saw (one more hit than seen: never zero), for what is left.
        share = (len(found) + 1) / walked
        if estimate.gather_cost() < estimate.walk_cost(wanted - len(found), share):
            break
    log.debug("search: gather after the walk (seen share %.6f)", share or 0.0)
    return await gather(conn, chosen, keyset, params)


def windows(estimate: Estimate, rows: int) -> bool:
    """Whether a walk of `rows` rows takes its matches from the index (see
    WINDOWED_WALK_ROWS): a long walk, for a query with fewer index hits than rows."""
    return rows >= WINDOWED_WALK_ROWS and estimate.index_rows < rows * WINDOWED_HITS_PER_ROW


async def estimate_search(conn: AsyncConnection, chosen: HistoryFilter) -> Estimate:
    """The planner's estimates for a search (three plans, not run: ~1 ms)."""
    search, search_params = history_filters.condition(HistoryFilter(q=chosen.q))
    scope, scope_params = history_filters.condition(replace(chosen, q=None, before=None))
    index_rows = await _planned_rows(conn, search, search_params)
    scope_rows = await _planned_rows(conn, scope, scope_params)
    cursor = await conn.execute(
        "SELECT greatest(reltuples, 1) FROM pg_class WHERE oid = 'conversations'::regclass"
    )
    row = await cursor.fetchone()
    total = float(row[0]) if row else 1.0
    return Estimate(
        share=min(1.0, index_rows / total),
        index_rows=index_rows,
        scope_rows=scope_rows,
        phrase='"' in (chosen.q or ""),
    )


async def _planned_rows(
    conn: AsyncConnection, condition: sql.Composable, params: dict[str, Any]
) -> float:
    statement = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM conversations c WHERE {}").format(
        condition
    )
    cursor = await conn.execute(statement, params, prepare=False)
    row = await cursor.fetchone()
    plan = row[0] if row else [{"Plan": {"Plan Rows": 1}}]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def walk_statement(
    chosen: HistoryFilter, keyset: sql.Composable, resume: bool
) -> tuple[sql.Composed, sql.Composed, dict[str, Any]]:
    """The walk's statement, the statement finding where it stopped, and their filter
    parameters. The subquery's LIMIT bounds the walk, the outer LIMIT ends it at the page;
    the search is tested outside the subquery, so the planner cannot make it a gather."""
    scope, scope_params = history_filters.condition(replace(chosen, q=None))
    search, search_params = history_filters.condition(HistoryFilter(q=chosen.q))
    after = sql.SQL("(c.created_at, c.id) < (%(walk_at)s, %(walk_id)s)" if resume else "TRUE")
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM (
            SELECT c.* FROM conversations c WHERE {scope} AND {keyset} AND {after}
            ORDER BY c.created_at DESC, c.id DESC LIMIT %(walk_rows)s
        ) AS c
        WHERE {search}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(walk_wanted)s
    """).format(scope=scope, keyset=keyset, after=after, search=search)
    # Where a walk stopped: its last row, by the same index (its entries only).
    boundary = sql.SQL("""
        SELECT c.created_at, c.id FROM conversations c WHERE {scope} AND {keyset} AND {after}
        ORDER BY c.created_at DESC, c.id DESC OFFSET %(walk_rows)s - 1 LIMIT 1
    """).format(scope=scope, keyset=keyset, after=after)
    return statement, boundary, scope_params | search_params


async def walk(
    conn: AsyncConnection,
    chosen: HistoryFilter,
    keyset: sql.Composable,
    params: dict[str, Any],
    after: tuple[Any, Any] | None,
    rows: int,
    wanted: int,
    *,
    windowed: bool = False,
) -> tuple[_Ids, tuple[Any, Any] | None]:
    """Up to `wanted` matches among the next `rows` newest conversations (older than
    `after`, if given) that meet the other conditions; and the (created_at, id) to go on
    from: the last match when all were found, else the last row read (None: the history
    ended before). `windowed`: found by the index within those rows (_windowed_walk)."""
    statement, boundary, filter_params = walk_statement(chosen, keyset, after is not None)
    values = params | filter_params | {"walk_rows": rows, "walk_wanted": wanted}
    if after is not None:
        values |= {"walk_at": after[0], "walk_id": after[1]}
    if windowed:
        return await _windowed_walk(conn, chosen, keyset, boundary, values)
    cursor = await conn.execute(statement, values, prepare=False)
    hits: _Ids = await cursor.fetchall()
    if len(hits) >= wanted:
        return hits, (hits[-1][1], hits[-1][0])  # the next round, if any, goes on from here
    cursor = await conn.execute(boundary, values, prepare=False)
    last = await cursor.fetchone()
    return hits, (last[0], last[1]) if last else None


async def _windowed_walk(
    conn: AsyncConnection,
    chosen: HistoryFilter,
    keyset: sql.Composable,
    boundary: sql.Composed,
    values: dict[str, Any],
) -> tuple[_Ids, tuple[Any, Any] | None]:
    """`walk`'s answer, found by the index: where the walk would stop first (by the scope's
    index, its entries only), then the hits from there up, by the bitmaps."""
    cursor = await conn.execute(boundary, values, prepare=False)
    last = await cursor.fetchone()  # None: the history ends within the walk
    statement, filter_params = windowed_statement(
        chosen, keyset, "walk_at" in values, last is not None
    )
    values = values | filter_params
    if last is not None:
        values = values | {"window_at": last[0], "window_id": last[1]}
    async with conn.transaction():
        for setting in GATHER_SETTINGS:
            await conn.execute(setting)
        cursor = await conn.execute(statement, values, prepare=False)
        hits: _Ids = await cursor.fetchall()
    if len(hits) >= values["walk_wanted"]:
        return hits, (hits[-1][1], hits[-1][0])
    return hits, (last[0], last[1]) if last else None


def windowed_statement(
    chosen: HistoryFilter, keyset: sql.Composable, resume: bool, bounded: bool
) -> tuple[sql.Composed, dict[str, Any]]:
    """The walk's matches by the bitmaps: the conversations from the window's last row
    (`window_at`, `window_id`; none when not `bounded`) up to the cursor and `walk_at`.
    The plain range is what the `created_at` index's bitmap can bound; the row comparison
    makes the window exact."""
    condition, filter_params = history_filters.condition(replace(chosen, before=None))
    after = sql.SQL("(c.created_at, c.id) < (%(walk_at)s, %(walk_id)s)" if resume else "TRUE")
    window = sql.SQL(
        "c.created_at >= %(window_at)s AND (c.created_at, c.id) >= (%(window_at)s, %(window_id)s)"
        if bounded
        else "TRUE"
    )
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM conversations c
        WHERE {condition} AND {keyset} AND {after} AND {window}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(walk_wanted)s
    """).format(condition=condition, keyset=keyset, after=after, window=window)
    return statement, filter_params


def gather_statement(
    chosen: HistoryFilter, keyset: sql.Composable
) -> tuple[sql.Composed, dict[str, Any]]:
    """The gather's statement and its filter parameters (run with GATHER_SETTINGS)."""
    condition, filter_params = history_filters.condition(replace(chosen, before=None))
    statement = sql.SQL("""
        SELECT c.id, c.created_at FROM conversations c WHERE {condition} AND {keyset}
        ORDER BY c.created_at DESC, c.id DESC LIMIT %(limit)s OFFSET %(offset)s
    """).format(condition=condition, keyset=keyset)
    return statement, filter_params


# Only the bitmap scans (the full-text index, ANDed with a time range's): the ordered
# index scans would walk, which the estimate said costs more.
GATHER_SETTINGS = ("SET LOCAL enable_indexscan = off", "SET LOCAL enable_seqscan = off")


async def gather(
    conn: AsyncConnection, chosen: HistoryFilter, keyset: sql.Composable, params: dict[str, Any]
) -> _Ids:
    """The page from the full-text index's hits, sorted: its cost grows with the hits."""
    statement, filter_params = gather_statement(chosen, keyset)
    async with conn.transaction():
        for setting in GATHER_SETTINGS:
            await conn.execute(setting)
        cursor = await conn.execute(statement, params | filter_params, prepare=False)
        return await cursor.fetchall()
