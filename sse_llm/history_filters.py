"""The history filters (SPEC 9): read from a URL's query, and turned into SQL conditions.

One parsed `HistoryFilter` serves every route that takes "the history filters": the JSON
API parses strictly (an unknown value is a 422 naming its parameter), the pages forgive
(a person typed the URL: what cannot be read is dropped). `condition` turns a filter into
one SQL condition on conversations aliased `c`, bound parameters only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlencode
from uuid import UUID

from psycopg import sql
from starlette.datastructures import QueryParams

from sse_llm import reviews
from sse_llm.contract import (
    MAX_LABELS,
    MAX_MODEL_CHARS,
    MAX_QUERY_CHARS,
    ErrorCode,
    Status,
    Verdict,
)
from sse_llm.errors import ApiError

# A conversation's full-text vector, stored (migration 0001) and indexed by GIN. An
# expression index would save ~620 bytes a row, but a search tested against the newest
# rows would then recompute each row's vector (~1 s for a rare word at 1,000,000).
SEARCH_VECTOR = sql.SQL("c.search")

_Choice = TypeVar("_Choice", Status, Verdict)
_Value = TypeVar("_Value")

# The parameters this module reads, in the order query_string writes them.
FILTER_PARAMETERS = (
    "q",
    "status",
    "verdict",
    "consensus",
    "reviewer",
    "label",
    "reviewed",
    "model",
    "from",
    "to",
    "delivered",
    "before",
)
# `delivered=incomplete` (SPEC 10): ended conversations to which no client connection
# sent the final event. The one value there is.
DELIVERED_INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class HistoryFilter:
    """Which conversations a history route asks for; every field None/empty means all.

    `labels` is a tuple (the dataclass is frozen and hashable); all of them must match.
    `before` is a keyset cursor: only conversations after it in the history's order.
    """

    q: str | None = None
    status: Status | None = None
    verdict: Verdict | None = None
    consensus: Verdict | None = None
    reviewer: str | None = None
    labels: tuple[str, ...] = field(default=())
    reviewed: bool | None = None
    model: str | None = None
    from_: datetime | None = None
    to: datetime | None = None
    delivered: str | None = None  # DELIVERED_INCOMPLETE or None
    before: UUID | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """The filter as URL parameters (label repeated), the ones set only."""
        values: list[tuple[str, str]] = []
        for name, value in (
            ("q", self.q),
            ("status", self.status),
            ("verdict", self.verdict),
            ("consensus", self.consensus),
            ("reviewer", self.reviewer),
        ):
            if value:
                values.append((name, str(value)))
        values.extend(("label", label) for label in self.labels)
        if self.reviewed is not None:
            values.append(("reviewed", "true" if self.reviewed else "false"))
        if self.model:
            values.append(("model", self.model))
        if self.from_ is not None:
            values.append(("from", self.from_.isoformat()))
        if self.to is not None:
            values.append(("to", self.to.isoformat()))
        if self.delivered:
            values.append(("delivered", self.delivered))
        if self.before is not None:
            values.append(("before", str(self.before)))
        return values

    def query_string(self) -> str:
        """A bookmarkable query string (no leading `?`) that parses back to this filter."""
        return urlencode(self.pairs())

    def without_cursor(self) -> HistoryFilter:
        """The same filter from the newest conversation on (no `before`)."""
        return replace(self, before=None)

    @property
    def reviews_filtered(self) -> bool:
        """Whether any condition is on reviews (the others are on the conversation alone)."""
        return bool(
            self.verdict
            or self.consensus
            or self.reviewer
            or self.labels
            or self.reviewed is not None
        )


def parse_filter(params: Mapping[str, str] | QueryParams, *, strict: bool) -> HistoryFilter:
    """The filter a URL's query asks for; strict: ApiError 422 naming a bad parameter,
    else what cannot be read is dropped. An empty value is the same as none (forms send them)."""
    reader = _Reader(params, strict)
    q = reader.text("q", MAX_QUERY_CHARS)
    status = reader.one("status", Status)
    verdict = reader.one("verdict", Verdict)
    consensus = reader.one("consensus", Verdict)
    reviewer = reader.checked("reviewer", reviews.reviewer_name)
    labels = reader.labels()
    reviewed = reader.boolean("reviewed")
    model = reader.text("model", MAX_MODEL_CHARS)
    from_ = reader.time("from")
    to = reader.time("to")
    if from_ is not None and to is not None and from_ > to:
        if strict:
            raise _invalid("from", "from must not be later than to.")
        from_ = to = None
    delivered = reader.checked("delivered", _delivered)
    before = reader.checked("before", UUID)
    return HistoryFilter(
        q=q,
        status=status,
        verdict=verdict,
        consensus=consensus,
        reviewer=reviewer,
        labels=labels,
        reviewed=reviewed,
        model=model,
        from_=from_,
        to=to,
        delivered=delivered,
        before=before,
    )


def _delivered(value: str) -> str:
    if value != DELIVERED_INCOMPLETE:
        raise ValueError(f"delivered must be {DELIVERED_INCOMPLETE}.")
    return value


class _Reader:
    """Reads one parameter at a time, raising (strict) or dropping (forgiving)."""

    def __init__(self, params: Mapping[str, str] | QueryParams, strict: bool) -> None:
        self.params = params
        self.strict = strict

    def raw(self, name: str) -> str | None:
        value = self.params.get(name)
        if value is None or value.strip() == "":
            return None
        return value

    def fail(self, name: str, message: str) -> None:
        if self.strict:
            raise _invalid(name, message)

    def text(self, name: str, max_chars: int) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if len(value) > max_chars or "\x00" in value:
            self.fail(name, f"{name} must be at most {max_chars} characters without NUL.")
            return None
        return value.strip()

    def one(self, name: str, kind: type[_Choice]) -> _Choice | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            return kind(value.strip())
        except ValueError:
            self.fail(name, f"{name} must be one of: {', '.join(kind)}.")
            return None

    def checked(self, name: str, check: Callable[[str], _Value]) -> _Value | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            result = check(value.strip())
        except ValueError as error:
            message = str(error) if check is not UUID else f"{name} must be a conversation id."
            self.fail(name, message)
            return None
        return result

    def labels(self) -> tuple[str, ...]:
        if isinstance(self.params, QueryParams):
            values = self.params.getlist("label")
        else:
            single = self.params.get("label")
            values = [single] if single is not None else []
        found: list[str] = []
        # A comma separates labels (no label holds one), so label=a,b is label=a&label=b.
        for part in (piece for value in values for piece in value.split(",")):
            if part.strip() == "":
                continue
            try:
                found.append(reviews.label(part))
            except ValueError as error:
                self.fail("label", str(error))
        unique = tuple(dict.fromkeys(found))
        if len(unique) > MAX_LABELS:
            self.fail("label", f"At most {MAX_LABELS} labels.")
            unique = unique[:MAX_LABELS]
        return unique

    def boolean(self, name: str) -> bool | None:
        value = self.raw(name)
        if value is None:
            return None
        text = value.strip().lower()
        if text in ("true", "false"):
            return text == "true"
        self.fail(name, f"{name} must be true or false.")
        return None

    def time(self, name: str) -> datetime | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            self.fail(name, f"{name} must be an ISO 8601 time, like 2026-01-31T12:00:00Z.")
            return None
        # Zone-less means UTC (SPEC 9), whatever the server's or the database's zone.
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _invalid(name: str, message: str) -> ApiError:
    return ApiError(
        422, ErrorCode.VALIDATION_ERROR, message if name in message else f"{name}: {message}"
    )


def condition(history_filter: HistoryFilter) -> tuple[sql.Composable, dict[str, Any]]:
    """The filter as one SQL condition on conversations aliased `c`, and its parameters.

    Conditions on reviews are EXISTS probes of reviews' primary key (conversation_id,
    reviewer): cheap per conversation, so right when the planner walks the newest
    conversations and most match. For rare ones, history_queries walks reviews instead.
    Parameter names start with `filter_` so callers can add their own.
    """
    parts, params = conversation_conditions(history_filter)
    review_parts, review_params = review_conditions(history_filter)
    parts.extend(review_parts)
    params.update(review_params)
    if history_filter.before is not None:
        parts.append(
            sql.SQL(
                "(c.created_at, c.id) < ((SELECT b.created_at FROM conversations b"
                " WHERE b.id = %(filter_before)s), %(filter_before)s)"
            )
        )
        params["filter_before"] = history_filter.before
    return _joined(parts), params


def conversation_conditions(
    history_filter: HistoryFilter,
) -> tuple[list[sql.Composable], dict[str, Any]]:
    """The conditions on the conversation's own columns (q, status, model, from, to,
    delivered)."""
    parts: list[sql.Composable] = []
    params: dict[str, Any] = {}
    if history_filter.q:
        parts.append(
            sql.SQL("{vector} @@ websearch_to_tsquery('english', %(filter_q)s)").format(
                vector=SEARCH_VECTOR
            )
        )
        params["filter_q"] = history_filter.q
    if history_filter.status:
        parts.append(sql.SQL("c.status = %(filter_status)s"))
        params["filter_status"] = history_filter.status
        if history_filter.status != Status.COMPLETED:
            # Said literally, so that a generic plan (a statement psycopg has prepared)
            # can prove the predicate of the rare statuses' partial index (0018).
            parts.append(sql.SQL("c.status <> 'completed'"))
    if history_filter.model:
        parts.append(sql.SQL("c.model = %(filter_model)s"))
        params["filter_model"] = history_filter.model
    if history_filter.from_ is not None:
        parts.append(sql.SQL("c.created_at >= %(filter_from)s"))
        params["filter_from"] = history_filter.from_
    if history_filter.to is not None:
        parts.append(sql.SQL("c.created_at < %(filter_to)s"))
        params["filter_to"] = history_filter.to
    if history_filter.delivered:
        # The flag finds the few candidates by a partial index (migration 0014) and says
        # 'streaming' literally, as that index's predicate does; the probe of the
        # conversation's deliveries corrects a flag a race between replicas left set.
        # A scalar subquery, not NOT EXISTS: as an anti-join the planner takes almost
        # every flagged row for one with an end sent (as almost all conversations are)
        # and plans a parallel scan (25-45 ms at 1,000,000 under load, 0.3 ms this way).
        parts.append(
            sql.SQL(
                "c.delivery_cut AND c.status <> 'streaming' AND NOT coalesce((SELECT true"
                " FROM deliveries d WHERE d.conversation_id = c.id"
                " AND d.ended IN ('done', 'error') LIMIT 1), false)"
            )
        )
    return parts, params


def review_conditions(
    history_filter: HistoryFilter,
) -> tuple[list[sql.Composable], dict[str, Any]]:
    """The conditions on reviews, as EXISTS probes per conversation `c` (SPEC 9's meaning).

    With `reviewer`, `verdict` and `label` are R's own review's. `reviewed=false` with
    `reviewer` asks for conversations R has not reviewed: `verdict`/`label` then are
    anyone's (R's own review cannot have them), which is what a queue "bad according to
    someone, not yet seen by me" needs.
    """
    f = history_filter
    parts: list[sql.Composable] = []
    params: dict[str, Any] = {}
    probe = "EXISTS (SELECT 1 FROM reviews r WHERE r.conversation_id = c.id{})"
    by_reviewer = f.reviewer is not None and f.reviewed is not False
    if f.reviewer is not None:
        params["filter_reviewer"] = f.reviewer
    if f.verdict is not None:
        params["filter_verdict"] = f.verdict
    if f.labels:
        params["filter_labels"] = list(f.labels)
    if by_reviewer:
        own = " AND r.reviewer = %(filter_reviewer)s"
        if f.verdict is not None:
            own += " AND r.verdict = %(filter_verdict)s"
        if f.labels:
            own += " AND r.labels @> %(filter_labels)s::text[]"
        parts.append(sql.SQL(probe.format(own)))
    else:
        if f.verdict is not None:
            parts.append(sql.SQL(probe.format(" AND r.verdict = %(filter_verdict)s")))
        # Each label by some review, not necessarily the same one.
        for index, label in enumerate(f.labels):
            params[f"filter_label_{index}"] = [label]
            parts.append(
                sql.SQL(probe.format(f" AND r.labels @> %(filter_label_{index})s::text[]"))
            )
    if f.reviewed is True and not by_reviewer:
        parts.append(sql.SQL(probe.format("")))
    if f.reviewed is False:
        by = " AND r.reviewer = %(filter_reviewer)s" if f.reviewer is not None else ""
        parts.append(sql.SQL("NOT " + probe.format(by)))
    if f.consensus is not None:
        params["filter_consensus"] = f.consensus
        parts.append(sql.SQL(probe.format(" AND r.verdict = %(filter_consensus)s")))
        parts.append(sql.SQL("NOT " + probe.format(" AND r.verdict <> %(filter_consensus)s")))
    return parts, params


def _joined(parts: list[sql.Composable]) -> sql.Composable:
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("TRUE")
