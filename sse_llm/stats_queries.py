"""The figures of GET /stats (SPEC 10): read from the rollups of migration 0013, or from
a bounded sample of the newest matching conversations when the filter asks what the
rollups do not keep (a search, a condition on reviews...).

The rollups answer status, model and the time range: their rows are hour x model x
provider x status x error code (conversation_stats, conversation_stats_daily for whole
days) and hour x model x provider x status (review_counts), so a year by day sums a few
thousand rows whatever the number of conversations. Percentiles come from log-spaced
histograms (four bins per doubling): within 9.05% of the true nearest-rank value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from sse_llm import history_queries
from sse_llm.contract import Status
from sse_llm.history_filters import HistoryFilter

BINS = 90  # per histogram: migration 0013's t0..t89 and d0..d89
BINS_PER_DOUBLING = 4
MAX_BUCKETS = 2_000
# A filter the rollups cannot answer is computed over the newest this many matches.
SAMPLE_SIZE = 5_000
DEFAULT_SPAN = {"hour": timedelta(days=7), "day": timedelta(days=90)}
_FOLDED = "00000000-0000-0000-0000-000000000000"  # the writer of folded rollup rows


class BucketSize(StrEnum):
    """How wide a bucket of /stats is (UTC)."""

    HOUR = "hour"
    DAY = "day"


@dataclass
class Figures:
    """One bucket's figures while they are summed (a histogram is a list of bin counts)."""

    by_status: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    ended: int = 0
    chunks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: int = 0
    ttfc: list[int] = field(default_factory=lambda: [0] * BINS)
    duration: list[int] = field(default_factory=lambda: [0] * BINS)
    reviews: dict[str, int] = field(
        default_factory=lambda: {"reviewed": 0, "good": 0, "bad": 0, "unsure": 0}
    )

    def add(self, other: Figures) -> None:
        """Add `other`'s figures to these (histograms merge by adding bins)."""
        for mine, theirs in ((self.by_status, other.by_status), (self.errors, other.errors)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.ended += other.ended
        self.chunks += other.chunks
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.tokens_estimated += other.tokens_estimated
        self.ttfc = [a + b for a, b in zip(self.ttfc, other.ttfc, strict=True)]
        self.duration = [a + b for a, b in zip(self.duration, other.duration, strict=True)]
        for key, count in other.reviews.items():
            self.reviews[key] += count

    def json(self) -> dict[str, Any]:
        """SPEC 10's `<bucket>` without its start."""
        return {
            "conversations": sum(self.by_status.values()),
            "by_status": {status: self.by_status.get(status, 0) for status in Status},
            "errors": {code: n for code, n in sorted(self.errors.items()) if n},
            "ttfc_ms": _percentiles(self.ttfc),
            "duration_ms": _percentiles(self.duration),
            "chunks": {"mean": round(self.chunks / self.ended, 2) if self.ended else None},
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "estimated": self.tokens_estimated,
            },
            "reviews": dict(self.reviews),
        }


def stats_bin(milliseconds: float) -> int:
    """The histogram bin of a duration: migration 0013's stats_bin, in Python."""
    if milliseconds < 1:
        return 0
    return min(math.floor(BINS_PER_DOUBLING * math.log2(milliseconds)) + 1, BINS - 1)


def bin_value(index: int) -> float:
    """What a bin reads as: its geometric middle (0 under 1 ms; the lower edge at the top)."""
    if index == 0:
        return 0.0
    if index == BINS - 1:
        return float(2.0 ** ((BINS - 2) / BINS_PER_DOUBLING))
    return float(2.0 ** ((index - 0.5) / BINS_PER_DOUBLING))


def percentile(bins: Sequence[int], fraction: float) -> float | None:
    """The nearest-rank percentile of a histogram, None when it is empty."""
    total = sum(bins)
    if total <= 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for index, count in enumerate(bins):
        seen += count
        if seen >= rank:
            return round(bin_value(index), 1)
    return round(bin_value(BINS - 1), 1)


def _percentiles(bins: Sequence[int]) -> dict[str, float | None]:
    return {"p50": percentile(bins, 0.50), "p95": percentile(bins, 0.95)}


def stats_range(
    size: BucketSize, start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """SPEC 10's range: `to` defaults to now, `from` to 7 (hour) or 90 (day) days before;
    widened to whole UTC buckets (the first holding `from`, the last starting before `to`)."""
    end = end or now
    start = start or end - DEFAULT_SPAN[size]
    first = _floor(start, size)
    last = _floor(end, size)
    if last < end:
        last += _width(size)
    return first, max(last, first + _width(size))


def bucket_count(size: BucketSize, start: datetime, end: datetime) -> int:
    """How many buckets [start, end) spans (both ends whole buckets)."""
    return int((end - start) / _width(size))


def _width(size: BucketSize) -> timedelta:
    return timedelta(hours=1) if size is BucketSize.HOUR else timedelta(days=1)


def _floor(moment: datetime, size: BucketSize) -> datetime:
    utc = moment.astimezone(UTC)
    if size is BucketSize.DAY:
        return utc.replace(hour=0, minute=0, second=0, microsecond=0)
    return utc.replace(minute=0, second=0, microsecond=0)


def answered_by_rollups(history_filter: HistoryFilter) -> bool:
    """Whether the rollups hold the answer: no condition but status, model and time."""
    rest = replace(history_filter, status=None, model=None, from_=None, to=None)
    return rest == HistoryFilter()


async def stats(
    pool: AsyncConnectionPool,
    history_filter: HistoryFilter,
    bucket: BucketSize | str,
    start: datetime,
    end: datetime,
) -> dict[str, Any]:
    """SPEC 10's /stats body for the conversations of `history_filter` in [start, end).

    `start`/`end` are widened to whole buckets (see stats_range); the range must hold
    at most MAX_BUCKETS buckets (ValueError). Each bucket of the range is listed.
    """
    size = BucketSize(bucket)
    start, end = stats_range(size, start, end, end)
    if bucket_count(size, start, end) > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} buckets")
    rollups = answered_by_rollups(history_filter)
    async with pool.connection() as conn:
        if rollups:
            figures = await _rollup_figures(conn, history_filter, size, start, end)
        else:
            figures = await _sample_figures(conn, history_filter, size, start, end)
    return _shaped(figures, size, start, end, estimate=not rollups)


def _shaped(
    figures: dict[datetime, Figures], size: BucketSize, start: datetime, end: datetime,
    *, estimate: bool,
) -> dict[str, Any]:  # fmt: skip
    totals = Figures()
    buckets = []
    moment = start
    while moment < end:
        found = figures.get(moment, Figures())
        totals.add(found)
        buckets.append({"start": moment.isoformat()} | found.json())
        moment += _width(size)
    return {"buckets": buckets, "totals": totals.json(), "estimate": estimate}


# --- from the rollups ---


def _bin_sums(prefix: str) -> sql.Composable:
    return sql.SQL("ARRAY[{}]").format(
        sql.SQL(", ").join(
            sql.SQL("coalesce(sum({}), 0)").format(sql.Identifier(f"{prefix}{k}"))
            for k in range(BINS)
        )
    )


_STATS_COLUMNS = sql.SQL(", ").join(
    sql.Identifier(name)
    for name in (
        "bucket", "status", "error_code", "conversations", "ended", "chunks", "prompt_tokens",
        "completion_tokens", "tokens_estimated",
        *(f"t{k}" for k in range(BINS)), *(f"d{k}" for k in range(BINS)),
    )
)  # fmt: skip


def _rollup_conditions(history_filter: HistoryFilter) -> sql.Composable:
    parts = [sql.SQL("bucket >= %(start)s AND bucket < %(end)s")]
    if history_filter.status is not None:
        parts.append(sql.SQL("status = %(status)s"))
    if history_filter.model is not None:
        parts.append(sql.SQL("model = %(model)s"))
    return sql.SQL(" AND ").join(parts)


def _stats_source(history_filter: HistoryFilter, size: BucketSize) -> sql.Composable:
    """The rows of conversation_stats to sum: by hour all of them; by day the daily table
    (what was folded) and the hourly rows not folded yet."""
    where = _rollup_conditions(history_filter)
    if size is BucketSize.HOUR:
        return sql.SQL("(SELECT {columns} FROM conversation_stats WHERE {where}) AS s").format(
            columns=_STATS_COLUMNS, where=where
        )
    return sql.SQL("""
        (SELECT {columns} FROM conversation_stats_daily WHERE {where}
         UNION ALL
         SELECT {columns} FROM conversation_stats
         WHERE writer <> {folded} AND {where}) AS s
    """).format(columns=_STATS_COLUMNS, where=where, folded=sql.Literal(_FOLDED))


async def _rollup_figures(
    conn: AsyncConnection, history_filter: HistoryFilter, size: BucketSize,
    start: datetime, end: datetime,
) -> dict[datetime, Figures]:  # fmt: skip
    params = {
        "unit": str(size),
        "start": start,
        "end": end,
        "status": history_filter.status,
        "model": history_filter.model,
    }
    source = _stats_source(history_filter, size)
    figures: dict[datetime, Figures] = {}
    counts = sql.SQL("""
        SELECT date_trunc(%(unit)s, bucket, 'UTC'), status, error_code, sum(conversations)
        FROM {source} GROUP BY 1, 2, 3
    """).format(source=source)
    cursor = await conn.execute(counts, params)
    for moment, status, error_code, conversations in await cursor.fetchall():
        found = figures.setdefault(moment, Figures())
        found.by_status[status] = found.by_status.get(status, 0) + int(conversations)
        if error_code:
            found.errors[error_code] = found.errors.get(error_code, 0) + int(conversations)
    sums = sql.SQL("""
        SELECT date_trunc(%(unit)s, bucket, 'UTC'), sum(ended), sum(chunks),
               sum(prompt_tokens), sum(completion_tokens), sum(tokens_estimated),
               {ttfc}, {duration}
        FROM {source} GROUP BY 1
    """).format(source=source, ttfc=_bin_sums("t"), duration=_bin_sums("d"))
    cursor = await conn.execute(sums, params)
    for (
        moment,
        ended,
        chunks,
        prompt,
        completion,
        estimated,
        ttfc,
        duration,
    ) in await cursor.fetchall():
        found = figures.setdefault(moment, Figures())
        found.ended, found.chunks = int(ended), int(chunks)
        found.prompt_tokens, found.completion_tokens = int(prompt), int(completion)
        found.tokens_estimated = int(estimated)
        found.ttfc, found.duration = [int(n) for n in ttfc], [int(n) for n in duration]
    reviews = sql.SQL("""
        SELECT date_trunc(%(unit)s, bucket, 'UTC'), sum(reviewed), sum(good), sum(bad),
               sum(unsure)
        FROM review_counts WHERE {where} GROUP BY 1
    """).format(where=_rollup_conditions(history_filter))
    cursor = await conn.execute(reviews, params)
    for moment, reviewed, good, bad, unsure in await cursor.fetchall():
        found = figures.setdefault(moment, Figures())
        found.reviews = {
            "reviewed": int(reviewed), "good": int(good), "bad": int(bad),
            "unsure": int(unsure),
        }  # fmt: skip
    return figures


# --- from a sample ---


async def _sample_figures(
    conn: AsyncConnection, history_filter: HistoryFilter, size: BucketSize,
    start: datetime, end: datetime,
) -> dict[datetime, Figures]:  # fmt: skip
    """The figures of the newest SAMPLE_SIZE matching conversations of the range."""
    chosen = replace(
        history_filter,
        from_=max(start, history_filter.from_) if history_filter.from_ else start,
        to=min(end, history_filter.to) if history_filter.to else end,
    )
    ids = [row[0] for row in await history_queries.page_ids(conn, chosen, SAMPLE_SIZE, 0)]
    if not ids:
        return {}
    cursor = await conn.execute(
        """
        SELECT date_trunc(%(unit)s, c.created_at, 'UTC'), c.status, c.error_code,
               c.chunk_count, c.prompt_tokens, c.completion_tokens, c.tokens_estimated,
               extract(epoch FROM c.first_chunk_at - c.created_at)::float8 * 1000,
               extract(epoch FROM c.completed_at - c.created_at)::float8 * 1000,
               s.reviews, s.good, s.bad, s.unsure
        FROM conversations c LEFT JOIN review_summaries s ON s.conversation_id = c.id
        WHERE c.id = ANY(%(ids)s::uuid[])
        """,
        {"unit": str(size), "ids": ids},
    )
    return _figures_of_rows(await cursor.fetchall())


def _figures_of_rows(rows: Iterable[tuple[Any, ...]]) -> dict[datetime, Figures]:
    """Per bucket, the figures of single conversations, as the rollups would hold them."""
    figures: dict[datetime, Figures] = {}
    for row in rows:
        moment, status, error_code, chunks, prompt, completion, estimated = row[:7]
        ttfc, duration, reviews, good, bad, unsure = row[7:]
        found = figures.setdefault(moment, Figures())
        found.by_status[status] = found.by_status.get(status, 0) + 1
        if error_code:
            found.errors[error_code] = found.errors.get(error_code, 0) + 1
        if reviews:
            found.reviews["reviewed"] += 1
            found.reviews["good"] += good
            found.reviews["bad"] += bad
            found.reviews["unsure"] += unsure
        if status == Status.STREAMING:
            continue  # only ended conversations count in the other figures
        found.ended += 1
        found.chunks += chunks
        found.prompt_tokens += prompt or 0
        found.completion_tokens += completion or 0
        found.tokens_estimated += 1 if estimated else 0
        if ttfc is not None:
            found.ttfc[stats_bin(ttfc)] += 1
        if duration is not None:
            found.duration[stats_bin(duration)] += 1
    return figures
