"""The slice of the history the queue and agreement work on, and who is reviewing.

Both come from elsewhere once there: the history filters (history_filters.py) and the
reviewer's identity (access.py). This module is the one seam the queue and agreement
use, so they read the same conversations as the history page for the same URL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from psycopg import sql
from starlette.requests import Request

from sse_llm.contract import MAX_MODEL_CHARS, MAX_QUERY_CHARS, Status
from sse_llm.review_queries import Slice
from sse_llm.reviews import reviewer_name

# Open mode: the name a reviewer gave, kept in a cookie (a session carries it with a key).
REVIEWER_COOKIE = "sse_llm_reviewer"


@dataclass(frozen=True)
class HistorySlice:
    """The history filters of a URL: search, status, model and a time range."""

    q: str = ""
    status: str = ""
    model: str = ""
    start: datetime | None = None
    end: datetime | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    def query_string(self) -> str:
        """These filters as a URL query (empty ones left out)."""
        params = [
            ("q", self.q),
            ("status", self.status),
            ("model", self.model),
            ("from", self.start.isoformat() if self.start else ""),
            ("to", self.end.isoformat() if self.end else ""),
        ]
        return urlencode([(name, value) for name, value in params if value])

    def as_sql(self) -> Slice:
        """The condition on `conversations c` choosing these conversations."""
        conditions: list[sql.Composable] = [sql.SQL("TRUE")]
        if self.q:
            conditions.append(sql.SQL("c.search @@ websearch_to_tsquery('english', %(slice_q)s)"))
        if self.status:
            conditions.append(sql.SQL("c.status = %(slice_status)s"))
        if self.model:
            conditions.append(sql.SQL("c.model = %(slice_model)s"))
        if self.start:
            conditions.append(sql.SQL("c.created_at >= %(slice_from)s"))
        if self.end:
            conditions.append(sql.SQL("c.created_at < %(slice_to)s"))
        params: dict[str, Any] = {
            "slice_q": self.q,
            "slice_status": self.status,
            "slice_model": self.model,
            "slice_from": self.start,
            "slice_to": self.end,
        }
        return Slice(sql.SQL(" AND ").join(conditions), params)


def _query(raw: str) -> str:
    return raw.replace("\x00", "").strip()[:MAX_QUERY_CHARS]


def _time(raw: str) -> datetime:
    moment = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_slice(params: Mapping[str, str], *, strict: bool) -> HistorySlice:
    """The filters of a query string; `strict` raises ValueError on a bad value (the JSON
    routes answer 422), otherwise a bad value is dropped (a person typed the page's URL)."""
    values: dict[str, Any] = {}
    checks: dict[str, Callable[[str], Any]] = {
        "q": _query,
        "status": _status,
        "model": _model,
        "from": _time,
        "to": _time,
    }
    for name, check in checks.items():
        raw = params.get(name)
        if not raw:
            continue
        try:
            values[{"from": "start", "to": "end"}.get(name, name)] = check(raw)
        except ValueError as exc:
            if strict:
                raise ValueError(f"{name}: {exc}") from exc
    if values.get("start") and values.get("end") and values["start"] > values["end"]:
        if strict:
            raise ValueError("from must not be after to.")
        values.pop("end")
    return HistorySlice(**values)


def _status(raw: str) -> str:
    return Status(raw).value


def _model(raw: str) -> str:
    if len(raw) > MAX_MODEL_CHARS or "\x00" in raw:
        raise ValueError(f"model has at most {MAX_MODEL_CHARS} characters.")
    return raw


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
