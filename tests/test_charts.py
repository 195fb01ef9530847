"""The SVG charts (charts.py) and the insights page's figures (insights_pages.panels): pure
functions, so these tests parse what they draw and measure it.

Every chart must be well-formed XML, carry its title for assistive tech, escape every text,
have no style attribute or script (the CSP), and put each bar and point where its value says.
"""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sse_llm.charts import (
    BOTTOM,
    HEIGHT,
    LABEL_CHAR_WIDTH,
    LEFT,
    MAX_X_LABELS,
    RIGHT,
    TOP,
    WIDTH,
    Chart,
    Series,
    format_compact,
    format_number,
    lines,
    nice_ticks,
    stacked_bars,
)
from sse_llm.history_filters import HistoryFilter
from sse_llm.insights_pages import MAX_TABLE_ROWS, InsightsRange, panels, parse_range, table_rows
from sse_llm.stats_queries import MAX_BUCKETS, BucketSize, Figures

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert('x')</script> \"quoted\" & ]]> <!-- -->"
PLOT = HEIGHT - TOP - BOTTOM


def chart(labels: list[str], *series: Series, **changes: Any) -> Chart:
    return Chart(
        changes.pop("chart_id", "chart-test"),
        changes.pop("title", "A chart"),
        changes.pop("description", "What it shows."),
        labels,
        list(series),
        **changes,
    )


def parsed(markup: str) -> ET.Element:
    root = ET.fromstring(markup)
    assert root.tag == f"{SVG}svg"
    return root


def bars_of(root: ET.Element, css_class: str) -> list[tuple[float, float, float]]:
    """Each bar of a series as (x, bottom, top), read back from its path."""
    (path,) = [p for p in root.iter(f"{SVG}path") if css_class in p.get("class", "").split()]
    found = re.findall(r"M([\d.]+) ([\d.]+)V([\d.]+)h([\d.]+)V([\d.]+)z", path.get("d", ""))
    return [(float(x), float(bottom), float(top)) for x, bottom, top, _, _ in found]


def ticks_of(root: ET.Element) -> list[str]:
    grid = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-grid")
    return [text.text or "" for text in grid.iter(f"{SVG}text")]


def test_stacked_bars_are_well_formed_and_titled_for_assistive_tech() -> None:
    drawn = stacked_bars(chart(["a", "b"], Series("ok", [1, 2], "chart-c1")))
    root = parsed(drawn)
    assert root.get("role") == "img"
    assert root.get("aria-label") == "A chart"
    assert root.find(f"{SVG}title") is not None
    assert root.find(f"{SVG}title").text == "A chart"  # type: ignore[union-attr]
    assert root.find(f"{SVG}desc").text == "What it shows."  # type: ignore[union-attr]
    assert root.get("aria-describedby") == "chart-test-desc"


def test_stacked_bars_heights_follow_the_values_and_stack_in_order() -> None:
    first = Series("completed", [3, 0, 1], "chart-status-completed")
    second = Series("failed", [1, 2, None], "chart-status-failed")
    root = parsed(stacked_bars(chart(["h0", "h1", "h2"], first, second)))
    assert ticks_of(root) == ["0", "1", "2", "3", "4"]  # whole counts: whole steps to the top
    per_unit = PLOT / 4
    completed = bars_of(root, "chart-status-completed")
    failed = bars_of(root, "chart-status-failed")
    assert [round(bottom - top, 2) for _, bottom, top in completed] == [
        round(3 * per_unit, 2),
        round(1 * per_unit, 2),
    ]  # the zero is not drawn
    assert [round(bottom - top, 2) for _, bottom, top in failed] == [
        round(per_unit, 2),
        round(2 * per_unit, 2),
    ]
    # The failed bar of the first bucket sits on top of its completed one.
    assert failed[0][1] == completed[0][2]
    assert failed[0][0] == completed[0][0]
    # Bars go left to right in the order of the buckets.
    assert completed[0][0] < failed[1][0] < completed[1][0]


def test_the_axis_reaches_the_largest_stack_with_round_steps() -> None:
    root = parsed(stacked_bars(chart(["a", "b"], Series("x", [70, 10], "chart-c1"), unit="ms")))
    assert ticks_of(root) == ["0", "20", "40", "60", "80 ms"]
    (bar, _) = bars_of(root, "chart-c1")
    assert round(bar[1] - bar[2], 2) == round(PLOT * 70 / 80, 2)


def test_lines_put_each_point_at_its_value_and_break_at_a_missing_one() -> None:
    values: list[float | None] = [10, 20, None, 40]
    root = parsed(lines(chart(["a", "b", "c", "d"], Series("p50", values, "chart-c1"))))
    (path,) = root.iter(f"{SVG}path")
    commands = re.findall(r"([ML])([\d.]+) ([\d.]+)", path.get("d", ""))
    assert [c for c, _, _ in commands] == ["M", "L", "M"]  # a gap before the last point
    ys = [float(y) for _, _, y in commands]
    assert ticks_of(root)[-1] == "40"
    bottom = HEIGHT - BOTTOM
    assert [round(bottom - y, 2) for y in ys] == [round(PLOT * v / 40, 2) for v in (10, 20, 40)]
    assert len(list(root.iter(f"{SVG}circle"))) == 3  # few buckets: a dot per point


def test_every_text_is_escaped() -> None:
    for draw in (stacked_bars, lines):
        drawn = draw(
            chart(
                [HOSTILE, "b"],
                Series(HOSTILE, [1, 2], "chart-c1"),
                title=HOSTILE,
                description=HOSTILE,
                unit=HOSTILE,
            )
        )
        assert "<script" not in drawn and "<!--" not in drawn
        root = parsed(drawn)  # well-formed despite the text
        assert root.get("aria-label") == HOSTILE
        texts = {element.text for element in root.iter()}
        assert HOSTILE in texts  # shown as the text it is, whole
        assert root.find(f"{SVG}desc").text == HOSTILE  # type: ignore[union-attr]
        assert all(not element.tag.endswith("script") for element in root.iter())


def test_no_style_attribute_script_or_handler_anywhere() -> None:
    series = [
        Series("a", [1, None, 3], "chart-c1"),
        Series("b", [2, 2, 2], "chart-c2 chart-dashed"),
    ]
    for drawn in (
        stacked_bars(chart(["1", "2", "3"], *series)),
        lines(chart(["1", "2", "3"], *series)),
        stacked_bars(chart([])),
    ):
        for element in parsed(drawn).iter():
            assert "style" not in element.attrib
            assert not any(name.startswith("on") for name in element.attrib)
            assert element.tag not in (f"{SVG}script", f"{SVG}style", f"{SVG}foreignObject")


@pytest.mark.parametrize("draw", [stacked_bars, lines])
def test_empty_figures_say_so(draw: Any) -> None:
    for empty in (
        chart([]),
        chart(["a", "b"], Series("x", [0, 0], "chart-c1")) if draw is stacked_bars else None,
        chart(["a", "b"], Series("x", [None, None], "chart-c1")),
    ):
        if empty is None:
            continue
        root = parsed(draw(empty))
        texts = [element.text for element in root.iter(f"{SVG}text")]
        assert texts == ["No figures in this range."]
        assert list(root.iter(f"{SVG}path")) == []


def test_one_bucket_is_one_bar_and_one_dot() -> None:
    only = Series("x", [5], "chart-c1")
    root = parsed(stacked_bars(chart(["12-01 14:00"], only)))
    assert len(bars_of(root, "chart-c1")) == 1
    labels = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-labels")
    assert [t.text for t in labels.iter(f"{SVG}text")] == ["12-01 14:00"]
    root = parsed(lines(chart(["12-01 14:00"], only)))
    assert len(list(root.iter(f"{SVG}circle"))) == 1  # a lone point still shows


def test_huge_and_broken_values_stay_finite_and_readable() -> None:
    huge = Series("tokens", [1e15, 3.5e14, float("nan"), float("inf")], "chart-c1")
    for draw in (stacked_bars, lines):
        drawn = draw(chart(["a", "b", "c", "d"], huge))
        root = parsed(drawn)
        assert not re.search(r"\b(nan|inf)", drawn, re.IGNORECASE)
        assert "e+" not in drawn  # no exponent in a coordinate or a figure
        assert ticks_of(root)[-1] == "1000T"
        for element in root.iter():
            for name in ("x", "y", "cx", "cy", "x1", "x2", "y1", "y2"):
                if name in element.attrib:
                    assert math.isfinite(float(element.attrib[name]))


def test_two_thousand_buckets_stay_small() -> None:
    count = 2000
    labels = [f"{i}" for i in range(count)]
    series = [
        Series(name, [i % 7 for i in range(count)], f"chart-c{n + 1}")
        for n, name in enumerate("abc")
    ]
    drawn = stacked_bars(chart(labels, *series))
    root = parsed(drawn)
    assert len(list(root.iter(f"{SVG}path"))) == 3  # a path per series, not per bar
    assert len(drawn) < 400_000
    labels_group = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-labels")
    assert len(list(labels_group)) <= MAX_X_LABELS  # a readable subset of the labels
    assert len(lines(chart(labels, *series))) < 200_000  # no dot per point at this size


@pytest.mark.parametrize("count", [2, 7, 169, 2000])
def test_axis_labels_stay_inside_the_frame_and_apart(count: int) -> None:
    labels = [f"12-{i % 30:02d} {i % 24:02d}:00" for i in range(count)]
    root = parsed(stacked_bars(chart(labels, Series("x", [1] * count, "chart-c1"))))
    group = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-labels")
    spans = []
    for text in group:
        x, half = float(text.get("x", "")), len(text.text or "") * LABEL_CHAR_WIDTH / 2
        assert text.get("text-anchor") == "middle"
        spans.append((x - half, x + half))
    assert spans[0][0] >= LEFT and spans[-1][1] <= WIDTH - RIGHT
    for left, right in itertools.pairwise(spans):
        assert left[1] < right[0], spans
    assert min(count, 2) <= len(spans) <= MAX_X_LABELS


def test_what_could_not_be_a_class_or_id_is_refused() -> None:
    with pytest.raises(ValueError, match="css_class"):
        stacked_bars(chart(["a"], Series("x", [1], 'c1" onload="alert(1)')))
    with pytest.raises(ValueError, match="chart_id"):
        lines(chart(["a"], chart_id='x"><script>'))
    with pytest.raises(ValueError, match="value per label"):
        lines(chart(["a", "b"], Series("x", [1], "chart-c1")))


def test_ticks_and_figures_read_well() -> None:
    assert nice_ticks(0) == [0.0, 1.0]
    assert nice_ticks(1, integer=True) == [0.0, 1.0]
    assert nice_ticks(0.3) == [0.0, 0.1, 0.2, 0.3]
    assert nice_ticks(123_456)[-1] == 150_000
    assert nice_ticks(9, integer=True) == [0, 3, 6, 9]
    assert [format_compact(v) for v in (0, 2.5, 950, 12_000, 3_400_000, 1.2e9)] == [
        "0",
        "2.5",
        "950",
        "12k",
        "3.4M",
        "1.2B",
    ]
    assert [format_number(v) for v in (None, 12345, 12.345, float("nan"))] == [
        "—",
        "12,345",
        "12.3",
        "—",
    ]


# The page's figures: insights_pages.panels turns /stats' shape into charts and tables.


def bucket(start: datetime, **figures: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "start": start.isoformat(),
        "conversations": 0,
        "by_status": {},
        "errors": {},
        "ttfc_ms": {"p50": None, "p95": None},
        "duration_ms": {"p50": None, "p95": None},
        "chunks": {"mean": None},
        "tokens": {"prompt": 0, "completion": 0, "estimated": 0},
        "reviews": {"reviewed": 0, "good": 0, "bad": 0, "unsure": 0},
    }
    base.update(figures)
    return base


def sample_stats() -> dict[str, Any]:
    hour = datetime(2026, 12, 1, 14, tzinfo=UTC)
    first = bucket(
        hour,
        conversations=5,
        by_status={"completed": 3, "failed": 2},
        errors={"upstream_timeout": 2},
        ttfc_ms={"p50": 120.0, "p95": 480.5},
        duration_ms={"p50": 900.0, "p95": 2400.0},
        chunks={"mean": 41.5},
        tokens={"prompt": 1500, "completion": 7000, "estimated": 1},
        reviews={"reviewed": 2, "good": 1, "bad": 1, "unsure": 0},
    )
    second = bucket(
        hour + timedelta(hours=1),
        conversations=1,
        by_status={"cancelled": 1},
        errors={"cancelled": 1},
    )
    empty = bucket(hour + timedelta(hours=2))  # no conversation: no table row
    totals = {k: v for k, v in first.items() if k != "start"}
    totals.update(
        conversations=6,
        by_status={"completed": 3, "failed": 2, "cancelled": 1},
        errors={"upstream_timeout": 2, "cancelled": 1},
    )
    return {"buckets": [first, second, empty], "totals": totals, "estimate": False}


def test_panels_tables_hold_the_same_figures_as_the_stats() -> None:
    found = {panel.panel_id: panel for panel in panels(sample_stats(), "hour")}
    status = found["chart-conversations"].table
    assert status.headers[:4] == ["Hour (UTC)", "Total", "completed", "failed"]
    assert status.rows[0][:4] == ["2026-12-01 14:00", "5", "3", "2"]
    assert status.totals[:3] == ["All", "6", "3"]
    errors = found["chart-errors"].table
    assert errors.headers == ["Hour (UTC)", "upstream_timeout", "cancelled"]  # most frequent first
    assert errors.rows == [["2026-12-01 14:00", "2", "0"], ["2026-12-01 15:00", "0", "1"]]
    assert found["chart-ttfc"].table.rows[0][1:] == ["120", "480.5"]
    assert found["chart-ttfc"].table.rows[1][1:] == ["—", "—"]
    tokens = found["chart-tokens"]
    assert tokens.table.rows[0][1:] == ["1,500", "7,000", "1"]
    assert "1 conversation counted by sse-llm's estimate" in tokens.caption
    coverage = found["chart-coverage"].table
    assert coverage.rows[0][1:] == ["5", "2", "40"]
    assert coverage.rows[1][1:] == ["1", "0", "0"]
    for panel in found.values():
        assert len(panel.table.rows) == 2  # the empty third hour is left out
        root = parsed(panel.svg)
        labels = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-labels")
        assert [t.text for t in labels] == ["12-01 14:00", "12-01 15:00", "12-01 16:00"]


def test_panels_of_an_empty_range_say_there_is_nothing() -> None:
    empty = {"buckets": [], "totals": bucket(datetime.now(UTC)), "estimate": False}
    found = {panel.panel_id: panel for panel in panels(empty, "day")}
    assert found["chart-errors"].empty_note
    assert found["chart-verdicts"].empty_note
    assert all(panel.table.rows == [] for panel in found.values())


def test_many_error_codes_keep_the_rarer_ones_as_other() -> None:
    codes = {f"code_{n}": 20 - n for n in range(10)}
    stats = sample_stats()
    stats["totals"]["errors"] = codes
    stats["buckets"][0]["errors"] = codes
    (errors,) = [p for p in panels(stats, "hour") if p.panel_id == "chart-errors"]
    assert errors.table.headers[-1] == "other codes"
    assert len(errors.legend) == 8
    assert errors.table.totals[-1] == format_number(sum(20 - n for n in range(7, 10)))


def test_the_range_defaults_widens_and_shortens_as_stats_does() -> None:
    now = datetime(2026, 12, 1, 15, 30, tzinfo=UTC)
    hour = datetime(2026, 12, 1, 16, tzinfo=UTC)  # the bucket holding now ends then
    span = parse_range({}, HistoryFilter(), now)
    assert (span.bucket, span.end, span.start) == ("hour", hour, hour - timedelta(days=7, hours=1))
    assert span.rolling and not span.shortened
    span = parse_range({"bucket": "day"}, HistoryFilter(), now)
    assert span.end == datetime(2026, 12, 2, tzinfo=UTC)
    assert span.start == datetime(2026, 9, 2, tzinfo=UTC)
    far = HistoryFilter(from_=now - timedelta(days=365), to=now)
    span = parse_range({"bucket": "nonsense"}, far, now)
    assert span.shortened and not span.rolling and span.bucket == "hour"
    assert (span.end, span.end - span.start) == (hour, timedelta(hours=MAX_BUCKETS))
    assert not parse_range({"bucket": "day"}, far, now).shortened


def test_a_long_range_of_hours_is_tabled_by_runs_with_merged_histograms() -> None:
    start = datetime(2026, 6, 1, tzinfo=UTC)
    span = InsightsRange(BucketSize.HOUR, start, start + timedelta(hours=MAX_BUCKETS), False, False)
    summed: dict[datetime, Figures] = {}
    for hour in range(0, MAX_BUCKETS, 5):  # every fifth hour has two conversations
        figures = Figures(by_status={"completed": 2}, ended=2, chunks=2 * (hour % 7 + 1))
        figures.ttfc[10 + hour % 30] = 1
        figures.ttfc[40] = 1
        summed[start + timedelta(hours=hour)] = figures
    body = {
        "buckets": [
            {"start": (start + timedelta(hours=h)).isoformat()}
            | (summed[start + timedelta(hours=h)].json() if h % 5 == 0 else Figures().json())
            for h in range(MAX_BUCKETS)
        ],
        "totals": Figures.merged(list(summed.values())).json(),
        "estimate": False,
    }
    rows = table_rows(summed, span)
    assert rows is not None and len(rows.items) <= MAX_TABLE_ROWS
    found = {panel.panel_id: panel for panel in panels(body, "hour", rows)}
    status = found["chart-conversations"].table
    assert status.headers[0] == "12 hours (UTC)"  # 2,000 hours in 167 rows, not 2,000
    assert status.rows[0][:2] == ["2026-06-01 00:00 to 06-01 11:00", "6"]  # 3 hours x 2
    assert sum(int(row[1]) for row in status.rows) == 2 * len(summed)
    assert status.totals[1] == format_number(2 * len(summed))
    # A row's percentiles are its merged histogram's, not a figure of one of its hours.
    first = [summed[m] for m in summed if m < start + timedelta(hours=12)]
    merged = Figures.merged(first).json()["ttfc_ms"]
    ttfc = found["chart-ttfc"].table.rows[0]
    assert ttfc[1:] == [format_number(merged["p50"]), format_number(merged["p95"])]
    # The charts still draw every hour.
    assert len(bars_of(parsed(found["chart-conversations"].svg), "chart-status-completed")) == 400
    short = replace(span, start=span.end - timedelta(hours=MAX_TABLE_ROWS))
    assert table_rows(summed, short) is None  # few enough: a row per hour
