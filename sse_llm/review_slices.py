"""The slice of the history the queue and agreement work on, and who is reviewing.

The slice is the history filters' (history_filters.py), so the queue and agreement read
exactly the conversations the history page lists for the same URL; only the keyset
cursor `before` is dropped (the queue walks on by its own `after`).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import QueryParams
from starlette.requests import Request

from sse_llm.history_filters import HistoryFilter, condition, parse_filter
from sse_llm.review_queries import Slice
from sse_llm.reviews import reviewer_name

# Open mode: the name a reviewer gave, kept in a cookie (a session carries it with a key).
REVIEWER_COOKIE = "sse_llm_reviewer"


def parse_slice(params: Mapping[str, str] | QueryParams, *, strict: bool) -> HistoryFilter:
    """The history filters of a query; `strict` raises ApiError 422 on a bad value."""
    return parse_filter(params, strict=strict).without_cursor()


def slice_sql(history_filter: HistoryFilter) -> Slice:
    """The filter as the condition on `conversations c` the queue's queries take."""
    where, params = condition(history_filter)
    return Slice(where, params, filtered=bool(history_filter.pairs()))


def current_reviewer(request: Request) -> str | None:
    """Who is reviewing: the session's name with a key, else the open-mode cookie's."""
    session = request.scope.get("state", {}).get("session")
    if session is not None:
        return str(session.reviewer)
    raw = request.cookies.get(REVIEWER_COOKIE)
    if not raw:
        return None
    try:
        return reviewer_name(raw)
    except ValueError:
        return None
