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

from sse_llm.history_filters import (
    HistoryFilter,
    condition,
    conversation_conditions,
    parse_filter,
)
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
        on_conversations=_joined(conversation_conditions(history_filter)[0]),
        review_key=_review_key(history_filter),
    )


def _joined(parts: list[sql.Composable]) -> sql.Composable:
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")


def _review_key(history_filter: HistoryFilter) -> sql.Composable | None:
    """A condition on reviews `r` every conversation of the slice has a review meeting,
    by the most selective index there is (history_filters.review_conditions' meaning)."""
    f = history_filter
    if f.reviewer is not None and f.reviewed is not False:
        return sql.SQL("r.reviewer = %(filter_reviewer)s")  # reviews_reviewer_idx
    if f.verdict is not None:
        return sql.SQL("r.verdict = %(filter_verdict)s")  # reviews_verdict_idx
    if f.consensus is not None:
        return sql.SQL("r.verdict = %(filter_consensus)s")
    if f.labels:
        return sql.SQL("r.labels @> %(filter_labels)s::text[]")
    if f.reviewed is True:
        return sql.SQL("TRUE")
    return None


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
