"""The insights page, `GET /insights` (SPEC 5, 10): section 10's figures as charts and tables.

The figures are `stats_queries.stats`'s, the same as `GET /stats` answers; this module
reads the range and slice from the URL (forgivingly: a person typed it), turns the figures
into charts (charts.py) each with a table of the same numbers, and renders
templates/insights.html. The page needs no JavaScript.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from sse_llm import stats_queries
from sse_llm.charts import Chart, Series, format_number, lines, stacked_bars
from sse_llm.contract import Status, Verdict
from sse_llm.dashboard import html_errors, render
from sse_llm.history_filters import HistoryFilter, parse_filter
from sse_llm.service import service_of
from sse_llm.stats_queries import MAX_BUCKETS, BucketSize, Figures, bucket_count, stats_range

BUCKETS = {BucketSize.HOUR: timedelta(hours=1), BucketSize.DAY: timedelta(days=1)}
# A table has a row per bucket up to this many (a week of hours is 169); beyond, a row
# per run of buckets.
MAX_TABLE_ROWS = 192
# How many buckets a table row may sum: whole multiples of the bucket, the smallest that
# keeps the rows within MAX_TABLE_ROWS (2,000 hours: 12 a row; 2,000 days: 14).
ROW_SPANS = {BucketSize.HOUR: (2, 3, 4, 6, 12, 24, 48), BucketSize.DAY: (2, 7, 14, 28)}
MAX_CODE_SERIES = 8  # error codes drawn apart; the rarer ones are summed as "other"
# Error codes' colours, warm ones first: the commonest code is drawn in red.
ERROR_CLASSES = tuple(f"chart-c{n}" for n in (6, 2, 4, 8, 1, 5, 7, 3))
# Statuses bottom up: the usual end first, so the rarer ones sit on top where they show.
STATUS_ORDER = (
    Status.COMPLETED,
    Status.FAILED,
    Status.CANCELLED,
    Status.INTERRUPTED,
    Status.STREAMING,
)


@dataclass(frozen=True)
class InsightsRange:
    """The buckets the page shows: [start, end), hour or day buckets in UTC."""

    bucket: BucketSize
    start: datetime
    end: datetime
    shortened: bool  # the range asked had more than MAX_BUCKETS buckets: its end is kept
    rolling: bool  # no `from`/`to` asked: the default span up to now


@dataclass(frozen=True)
class Table:
    """A chart's figures as a table: a row per bucket, then the totals."""

    headers: list[str]
    rows: list[list[str]]
    totals: list[str]
    per_row: int = 1  # buckets summed in a row (a long range's runs of hours or days)


@dataclass(frozen=True)
class Panel:
    """One figure of the page: a chart, its legend, and its table."""

    panel_id: str
    title: str
    caption: str
    svg: Markup
    legend: list[tuple[str, str]]  # (series name, CSS classes)
    table: Table
    empty_note: str | None = None  # said instead of the chart when there is nothing to draw


def parse_range(params: Any, history_filter: HistoryFilter, now: datetime) -> InsightsRange:
    """`bucket` (hour unless "day"), and `from`/`to` from the filter, defaulted and widened
    to whole buckets as /stats does; more than MAX_BUCKETS buckets keep their last ones."""
    size = BucketSize.DAY if (params.get("bucket") or "").strip() == "day" else BucketSize.HOUR
    start, end = stats_range(size, history_filter.from_, history_filter.to, now)
    shortened = bucket_count(size, start, end) > MAX_BUCKETS
    if shortened:
        start = end - MAX_BUCKETS * BUCKETS[size]
    rolling = history_filter.from_ is None and history_filter.to is None
    return InsightsRange(size, start, end, shortened, rolling)


async def figures_of(
    request: Request, chosen: HistoryFilter, span: InsightsRange
) -> tuple[dict[str, Any], dict[datetime, Figures]]:
    """The /stats figures for this range and slice, and the summed figures by bucket
    (for the tables' coarser rows): the page's one read of them."""
    history_filter = replace(chosen, from_=span.start, to=span.end, before=None)
    pool = service_of(request).query_pool  # the cost grows with the history
    return await stats_queries.stats_with_figures(
        pool, history_filter, span.bucket, span.start, span.end
    )


def table_rows(summed: dict[datetime, Figures], span: InsightsRange) -> _Buckets | None:
    """The tables' rows when the range has more than MAX_TABLE_ROWS buckets: runs of whole
    hours or days, their figures merged (histograms added, so percentiles stay true);
    None when a row per bucket is few enough.

    Why: 2,000 rows in each of eight tables were 1.8 MB of HTML and ~200 ms of CPU to build
    and render for a 60-day page of hours; nobody reads them, the chart shows the shape.
    """
    width = BUCKETS[span.bucket]
    count = bucket_count(span.bucket, span.start, span.end)
    if count <= MAX_TABLE_ROWS:
        return None
    per_row = next(
        (n for n in ROW_SPANS[span.bucket] if count <= n * MAX_TABLE_ROWS),
        math.ceil(count / MAX_TABLE_ROWS),
    )
    items, names = [], []
    for first in range(0, count, per_row):
        moments = [span.start + k * width for k in range(first, min(first + per_row, count))]
        items.append(Figures.merged([summed[m] for m in moments if m in summed]).json())
        last = bucket_label(moments[-1], span.bucket, short=True)
        names.append(f"{bucket_label(moments[0], span.bucket)} to {last}")
    unit = "hours" if span.bucket is BucketSize.HOUR else "days"
    return _Buckets(items, [], names, f"{per_row} {unit} (UTC)", per_row=per_row)


async def insights_page(request: Request) -> Response:
    """GET /insights: charts and tables of the conversations of a range and slice."""
    params = request.query_params
    chosen = replace(parse_filter(params, strict=False), before=None)
    if any(value.strip() == "" for _, value in params.multi_items()):
        # A submitted form sends its empty fields too: answer with the short URL.
        return RedirectResponse(page_link(chosen, params.get("bucket", "")), status_code=303)
    span = parse_range(params, chosen, datetime.now(UTC))
    figures, summed = await figures_of(request, chosen, span)
    totals = figures.get("totals") or {}
    slice_query = _query(chosen, span)
    context = {
        "active": "insights",
        "filter": chosen,
        "span": span,
        "figures": figures,
        "conversations": int(totals.get("conversations") or 0),
        "estimate": bool(figures.get("estimate")),
        "panels": panels(figures, span.bucket, table_rows(summed, span)),
        "max_buckets": MAX_BUCKETS,
        "span_buckets": len(figures.get("buckets") or []),
        "statuses": list(Status),
        "verdicts": list(Verdict),
        "from_value": _local_input(chosen.from_),
        "to_value": _local_input(chosen.to),
        "stats_link": f"/stats?{slice_query}",
        "history_link": "/?" + urlencode(replace(chosen, from_=span.start, to=span.end).pairs()),
    }
    return render(request, "insights.html", context)


def page_link(chosen: HistoryFilter, bucket: str) -> str:
    """This page's URL for a slice and bucket, the parameters set only."""
    pairs = chosen.pairs()
    if bucket.strip() == "day":
        pairs.insert(0, ("bucket", "day"))
    return f"/insights?{urlencode(pairs)}" if pairs else "/insights"


def _query(chosen: HistoryFilter, span: InsightsRange) -> str:
    """The /stats query string for the same figures."""
    pairs = [("bucket", span.bucket), *replace(chosen, from_=span.start, to=span.end).pairs()]
    return urlencode(pairs)


def _local_input(moment: datetime | None) -> str:
    """A time as a datetime-local input's value, in UTC (the form says so)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M") if moment else ""


def panels(figures: dict[str, Any], bucket: str, rows: _Buckets | None = None) -> list[Panel]:
    """The page's figures, each as a chart and a table of the same numbers; `rows`: the
    tables' coarser rows (table_rows), else a row per bucket."""
    items: list[dict[str, Any]] = list(figures.get("buckets") or [])
    buckets = _Buckets(
        items,
        [bucket_label(item.get("start"), bucket, short=True) for item in items],
        [] if rows else [bucket_label(item.get("start"), bucket) for item in items],
        "Hour (UTC)" if bucket == "hour" else "Day (UTC)",
        rows,
    )
    totals: dict[str, Any] = figures.get("totals") or {}
    return [
        _status_panel(buckets, totals),
        _errors_panel(buckets, totals),
        _timing_panel("ttfc", "Time to first chunk", "ttfc_ms", buckets, totals),
        _timing_panel("duration", "Duration", "duration_ms", buckets, totals),
        _chunks_panel(buckets, totals),
        _tokens_panel(buckets, totals),
        _verdicts_panel(buckets, totals),
        _coverage_panel(buckets, totals),
    ]


@dataclass(frozen=True)
class _Buckets:
    """The buckets of /stats, with their names on an axis (labels) and in a table (names)."""

    items: list[dict[str, Any]]
    labels: list[str]
    names: list[str]
    heading: str  # the first column's header
    table: _Buckets | None = None  # the tables' own rows (runs of buckets), if not these
    per_row: int = 1  # how many buckets one of `items` sums


def bucket_label(start: Any, bucket: str, *, short: bool = False) -> str:
    """A bucket's start in UTC: "12-01 14:00" on an axis, "2026-12-01 14:00" in a table."""
    moment = start if isinstance(start, datetime) else datetime.fromisoformat(str(start))
    moment = moment.astimezone(UTC)
    if bucket == "day":
        return moment.strftime("%m-%d" if short else "%Y-%m-%d")
    return moment.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M")


def _panel(
    chart: Chart, caption: str, table: Table, *, bars: bool, empty_note: str | None = None
) -> Panel:
    """A panel from its chart (drawn as bars or lines) and its table."""
    legend = [(series.name, series.css_class) for series in chart.series]
    svg = stacked_bars(chart) if bars else lines(chart)
    return Panel(chart.chart_id, chart.title, caption, svg, legend, table, empty_note)


def _table(
    buckets: _Buckets,
    headers: list[str],
    extract: Callable[[list[dict[str, Any]]], list[list[Any]]],
    totals: list[Any],
    columns: list[list[Any]] | None = None,
) -> Table:
    """A table whose first column names the bucket (or run of buckets), the others the
    figures `extract` reads from the rows' items, formatted: a row per bucket with
    conversations, then the totals. `columns`: extract's result for the chart's buckets,
    reused when the table has a row per bucket."""
    source = buckets.table or buckets
    if columns is None or source is not buckets:
        columns = extract(source.items)
    # A bucket without conversations has no figure worth a row (the chart shows the gap).
    rows = [
        [name, *(format_number(column[i]) for column in columns)]
        for i, name in enumerate(source.names)
        if _number(source.items[i], "conversations")
    ]
    first = [source.heading, *headers]
    return Table(first, rows, ["All", *(format_number(v) for v in totals)], source.per_row)


def _number(mapping: Any, key: str) -> float | None:
    """`mapping[key]` as a number, or None when absent or not a number (a bool is not)."""
    # Called ~40,000 times for 2,000 buckets: a lookup and a type test, nothing more.
    try:
        value = mapping[key]
    except (KeyError, TypeError, IndexError):
        return None
    kind = type(value)
    return value if kind is int or kind is float else None


def _status_panel(buckets: _Buckets, totals: dict[str, Any]) -> Panel:
    def extract(items: list[dict[str, Any]]) -> list[list[Any]]:
        by_status = [
            [_number(b.get("by_status"), status) or 0 for b in items] for status in STATUS_ORDER
        ]
        return [[_number(b, "conversations") or 0 for b in items], *by_status]

    every = extract(buckets.items)
    columns = every[1:]
    series = [
        Series(status, column, f"chart-status-{status}")
        for status, column in zip(STATUS_ORDER, columns, strict=True)
    ]
    chart = Chart(
        "chart-conversations",
        "Conversations by status",
        "Conversations started in each bucket, stacked by their status.",
        buckets.labels,
        series,
    )
    table = _table(
        buckets,
        ["Total", *STATUS_ORDER],
        extract,
        [
            _number(totals, "conversations") or 0,
            *(_number(totals.get("by_status"), s) or 0 for s in STATUS_ORDER),
        ],
        every,
    )
    caption = "Per bucket, stacked by status (streaming: not ended yet)."
    return _panel(chart, caption, table, bars=True)


def _errors_panel(buckets: _Buckets, totals: dict[str, Any]) -> Panel:
    counts: dict[str, Any] = totals.get("errors") or {}
    codes = sorted(counts, key=lambda code: (-(_number(counts, code) or 0), code))
    drawn, rest = codes[: MAX_CODE_SERIES - 1], codes[MAX_CODE_SERIES - 1 :]
    if len(rest) == 1:
        drawn, rest = codes, []

    def extract(items: list[dict[str, Any]]) -> list[list[Any]]:
        found = [[_number(b.get("errors"), code) or 0 for b in items] for code in drawn]
        if rest:
            found.append([sum(_number(b.get("errors"), c) or 0 for c in rest) for b in items])
        return found

    columns = extract(buckets.items)
    headers = [*drawn, *(["other codes"] if rest else [])]
    series = [
        Series(name, column, css_class)
        for name, column, css_class in zip(headers, columns, ERROR_CLASSES, strict=False)
    ]
    chart = Chart(
        "chart-errors",
        "Error codes",
        "Conversations that ended with an error, per bucket, stacked by error code.",
        buckets.labels,
        series,
    )
    total_row = [_number(counts, code) or 0 for code in drawn]
    if rest:
        total_row.append(sum(_number(counts, code) or 0 for code in rest))
    table = _table(buckets, headers, extract, total_row, columns)
    note = None if codes else "No conversation ended with an error in this range."
    caption = "How each failed, cancelled or interrupted conversation ended, per bucket."
    return _panel(chart, caption, table, bars=True, empty_note=note)


def _timing_panel(
    panel_id: str,
    title: str,
    key: str,
    buckets: _Buckets,
    totals: dict[str, Any],
) -> Panel:
    def extract(items: list[dict[str, Any]]) -> list[list[Any]]:
        return [[_number(b.get(key), p) for b in items] for p in ("p50", "p95")]

    p50, p95 = extract(buckets.items)
    series = [Series("p50", p50, "chart-c1"), Series("p95", p95, "chart-c2 chart-dashed")]
    chart = Chart(
        f"chart-{panel_id}",
        title,
        f"{title} in milliseconds per bucket: the median (p50) and the 95th percentile (p95).",
        buckets.labels,
        series,
        unit="ms",
    )
    whole = totals.get(key)
    table = _table(
        buckets,
        ["p50 (ms)", "p95 (ms)"],
        extract,
        [_number(whole, "p50"), _number(whole, "p95")],
        [p50, p95],
    )
    note = None if any(v is not None for v in p50 + p95) else "No timings in this range."
    caption = "The median (p50) and the 95th percentile (p95), in milliseconds."
    return _panel(chart, caption, table, bars=False, empty_note=note)


def _chunks_panel(buckets: _Buckets, totals: dict[str, Any]) -> Panel:
    def extract(items: list[dict[str, Any]]) -> list[list[Any]]:
        return [[_number(b.get("chunks"), "mean") for b in items]]

    (means,) = extract(buckets.items)
    chart = Chart(
        "chart-chunks",
        "Chunks per answer",
        "The mean number of chunks of the answers in each bucket.",
        buckets.labels,
        [Series("mean chunks", means, "chart-c3")],
    )
    whole = [_number(totals.get("chunks"), "mean")]
    table = _table(buckets, ["Mean chunks"], extract, whole, [means])
    note = None if any(v is not None for v in means) else "No answers in this range."
    return _panel(chart, "The mean number of chunks per answer.", table, bars=True, empty_note=note)


def _tokens_panel(buckets: _Buckets, totals: dict[str, Any]) -> Panel:
    def extract(items: list[dict[str, Any]]) -> list[list[Any]]:
        names = ("prompt", "completion", "estimated")
        return [[_number(b.get("tokens"), name) or 0 for b in items] for name in names]

    prompt, completion, estimated = extract(buckets.items)
    series = [Series("prompt", prompt, "chart-c1"), Series("completion", completion, "chart-c4")]
    chart = Chart(
        "chart-tokens",
        "Token usage",
        "Prompt and completion tokens per bucket, stacked.",
        buckets.labels,
        series,
    )
    whole = totals.get("tokens")
    table = _table(
        buckets,
        ["Prompt tokens", "Completion tokens", "Estimated counts"],
        extract,
        [_number(whole, "prompt"), _number(whole, "completion"), _number(whole, "estimated")],
        [prompt, completion, estimated],
    )
    count = int(_number(whole, "estimated") or 0)
    said = format_number(count)
    caption = (
        f"Prompt and completion tokens. {said} conversation"
        f"{'' if count == 1 else 's'} counted by sse-llm's estimate: the model reported none."
    )
    note = None if any(prompt) or any(completion) else "No token counts in this range."
    return _panel(chart, caption, table, bars=True, empty_note=note)


def _verdicts_panel(buckets: _Buckets, totals: dict[str, Any]) -> Panel:
    def extract(items: list[dict[str, Any]]) -> list[list[Any]]:
        return [[_number(b.get("reviews"), v) or 0 for b in items] for v in Verdict]

    columns = extract(buckets.items)
    series = [
        Series(verdict, column, f"chart-verdict-{verdict}")
        for verdict, column in zip(Verdict, columns, strict=True)
    ]
    chart = Chart(
        "chart-verdicts",
        "Verdict mix",
        "The reviews' verdicts on the conversations of each bucket, stacked.",
        buckets.labels,
        series,
    )
    whole = totals.get("reviews")
    whole_row = [_number(whole, v) or 0 for v in Verdict]
    table = _table(buckets, list(Verdict), extract, whole_row, columns)
    note = None if any(any(column) for column in columns) else "No reviews in this range."
    return _panel(
        chart,
        "The reviews' verdicts, by the bucket of the conversation they judge.",
        table,
        bars=True,
        empty_note=note,
    )


def _coverage_panel(buckets: _Buckets, totals: dict[str, Any]) -> Panel:
    def share(item: dict[str, Any]) -> float | None:
        conversations = _number(item, "conversations") or 0
        reviewed = _number(item.get("reviews"), "reviewed") or 0
        return round(100 * reviewed / conversations, 1) if conversations else None

    def extract(items: list[dict[str, Any]]) -> list[list[Any]]:
        return [
            [_number(b, "conversations") or 0 for b in items],
            [_number(b.get("reviews"), "reviewed") or 0 for b in items],
            [share(b) for b in items],
        ]

    every = extract(buckets.items)
    shares = every[2]
    chart = Chart(
        "chart-coverage",
        "Review coverage",
        "The share of each bucket's conversations with at least one review, in percent.",
        buckets.labels,
        [Series("reviewed (%)", shares, "chart-c5")],
        unit="%",
    )
    table = _table(
        buckets,
        ["Conversations", "Reviewed", "Coverage (%)"],
        extract,
        [
            _number(totals, "conversations"),
            _number(totals.get("reviews"), "reviewed"),
            share(totals),
        ],
        every,
    )
    note = None if any(v is not None for v in shares) else "No conversations in this range."
    caption = "The share of conversations with at least one review, in percent."
    return _panel(chart, caption, table, bars=False, empty_note=note)


routes: list[BaseRoute] = [
    Route("/insights", html_errors(insights_page), methods=["GET"], name="insights"),
]
