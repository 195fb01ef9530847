"""The slice of the history the queue and agreement work on.

The slice is the history filters' (history_filters.py), so the queue and agreement read
exactly the conversations the history page lists for the same URL; only the keyset
cursor `before` is dropped (the queue walks on by its own `after`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from psycopg import sql
from starlette.datastructures import QueryParams

from sse_llm.history_filters import HistoryFilter, condition, parse_filter
from sse_llm.review_queries import Slice


def parse_slice(params: Mapping[str, str] | QueryParams, *, strict: bool) -> HistoryFilter:
    """The history filters of a query; `strict` raises ApiError 422 on a bad value."""
    return parse_filter(params, strict=strict).without_cursor()


def slice_sql(history_filter: HistoryFilter) -> Slice:
    """The filter as the condition on `conversations c` the queue's queries take."""
    where, params = condition(history_filter)
    return Slice(
        where,
        params,
        filtered=bool(history_filter.pairs()),
        on_summaries=_on_summaries(history_filter),
    )


def _on_summaries(history_filter: HistoryFilter) -> sql.Composable | None:
    """A slice by time alone as a condition on review_summaries `s` (same parameters)."""
    f = history_filter
    if not f.pairs() or replace(f, from_=None, to=None).pairs():
        return None
    parts = []
    if f.from_ is not None:
        parts.append(sql.SQL("s.conversation_created_at >= %(filter_from)s"))
    if f.to is not None:
        parts.append(sql.SQL("s.conversation_created_at < %(filter_to)s"))
    return sql.SQL(" AND ").join(parts)
