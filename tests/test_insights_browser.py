"""The insights page in a real browser (issue 15 point 1): charts and tables of a slice,
the same figures as `GET /stats`, the range-and-slice form without JavaScript, light and
dark mode both readable, the estimate said, an empty state, and hostile text shown as text.

Every test fails on a console error, an uncaught exception or a CSP violation (the `tab`
fixture in conftest). With SSE_LLM_SCREENSHOTS=1 they retake the README's screenshots.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from sse_llm.charts import format_number
from tests.browser import RECORD_CSP_VIOLATIONS, BrowserPage
from tests.conftest import RunningServer, word

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parent / "screenshots"
HOSTILE_MODEL = "<img src=x onerror=alert(1)>\"'&amp;"
PANELS = (
    "chart-conversations",
    "chart-errors",
    "chart-ttfc",
    "chart-duration",
    "chart-chunks",
    "chart-tokens",
    "chart-verdicts",
    "chart-coverage",
)
# (hours ago, status, error code, ms to first chunk, ms in all, chunks, tokens, estimated)
HISTORY = [
    (3, "completed", None, 120, 900, 40, (30, 400), False),
    (3, "completed", None, 180, 1300, 55, (25, 520), False),
    (3, "failed", "upstream_timeout", None, 30_000, 0, None, False),
    (2, "completed", None, 90, 700, 38, (12, 300), True),
    (2, "cancelled", "cancelled", 150, 400, 7, (12, 40), True),
    (2, "failed", "upstream_error", 200, 350, 3, None, False),
    (1, "interrupted", "interrupted", 110, 2100, 21, None, False),
    (1, "completed", None, 100, 1000, 44, (40, 600), False),
]
VERDICTS = ["good", "bad", "unsure", "good"]  # on the first four, one reviewer each


def shoot(page: Page, name: str) -> None:
    """Retake a README screenshot, with SSE_LLM_SCREENSHOTS=1 only."""
    if os.environ.get("SSE_LLM_SCREENSHOTS"):
        page.screenshot(path=SHOTS / name, full_page=True)


@dataclass(frozen=True)
class Slice:
    """The seeded conversations: all of one model, so the page can be sliced to them."""

    model: str
    ids: list[uuid.UUID]


def seed(db: psycopg.Connection, model: str) -> Slice:
    """HISTORY as ended conversations of `model`, and VERDICTS on the first ones."""
    ids = []
    for hours, status, code, ttfc, total, chunks, tokens, estimated in HISTORY:
        conversation_id = uuid.uuid4()
        prompt_tokens, completion_tokens = tokens or (None, None)
        db.execute(
            """
            INSERT INTO conversations (id, prompt, response, status, created_at, first_chunk_at,
                completed_at, model, provider, chunk_count, error_code, error_message,
                prompt_tokens, completion_tokens, tokens_estimated)
            SELECT %(id)s, 'a question about insights', 'an answer', %(status)s, t.created,
                t.created + make_interval(secs => %(ttfc)s / 1000.0),
                t.created + make_interval(secs => %(total)s / 1000.0),
                %(model)s, 'demo', %(chunks)s, %(code)s, %(message)s,
                %(prompt_tokens)s, %(completion_tokens)s, %(estimated)s
            FROM (SELECT date_trunc('hour', now()) - make_interval(hours => %(hours)s)
                         + interval '10 minutes' AS created) AS t
            """,
            {
                "id": conversation_id,
                "status": status,
                "ttfc": ttfc,
                "total": total,
                "model": model,
                "chunks": chunks,
                "code": code,
                "message": code and f"it ended: {code}",
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "estimated": estimated,
                "hours": hours,
            },
        )
        ids.append(conversation_id)
    for conversation_id, verdict in zip(ids, VERDICTS, strict=False):
        db.execute(
            """
            INSERT INTO reviews (conversation_id, reviewer, verdict, conversation_created_at)
            SELECT id, %s, %s, created_at FROM conversations WHERE id = %s
            """,
            (word(), verdict, conversation_id),
        )
    return Slice(model, ids)


@pytest.fixture
def seeded(db: psycopg.Connection) -> Slice:
    return seed(db, f"insights-{word()}")


def stats_of(page: Page, server: RunningServer) -> dict[str, Any]:
    """The /stats figures the page links to as its own ("the figures as JSON")."""
    href = page.locator("#insights-summary a", has_text="JSON").get_attribute("href")
    assert href and href.startswith("/stats?")
    response = page.request.get(f"{server.url}{href}")
    assert response.ok, response.text()
    figures: dict[str, Any] = response.json()
    return figures


def cells(page: Page, selector: str) -> list[str]:
    return [text.strip() for text in page.locator(selector).all_inner_texts()]


def test_the_page_charts_a_slice_with_the_same_figures_as_stats(
    tab: BrowserPage, demo_server: RunningServer, seeded: Slice
) -> None:
    page = tab.page
    page.goto(f"{demo_server.url}/insights?model={seeded.model}")
    expect(page.locator("#insights-total")).to_have_text(str(len(HISTORY)))
    expect(page.get_by_role("link", name="Insights")).to_have_attribute("aria-current", "page")
    for panel in PANELS:
        figure = page.locator(f"figure#{panel}")
        expect(figure.locator("figcaption")).to_be_visible()
        expect(figure.locator("svg[role=img]")).to_be_visible()
        expect(figure.locator("svg title")).to_have_count(1 + figure.locator("svg path").count())
        expect(figure.locator("table caption")).to_be_visible()
    stats = stats_of(page, demo_server)
    totals = stats["totals"]
    assert totals["conversations"] == len(HISTORY)
    by_status = totals["by_status"]
    assert cells(page, "#chart-conversations tfoot td") == [
        format_number(totals["conversations"]),
        *(
            format_number(by_status.get(s, 0))
            for s in ("completed", "failed", "cancelled", "interrupted", "streaming")
        ),
    ]
    errors = totals["errors"]
    headers = cells(page, "#chart-errors thead th")[1:]
    assert sorted(headers) == sorted(errors)
    assert cells(page, "#chart-errors tfoot td") == [format_number(errors[h]) for h in headers]
    for panel, key in (("chart-ttfc", "ttfc_ms"), ("chart-duration", "duration_ms")):
        assert cells(page, f"#{panel} tfoot td") == [
            format_number(totals[key]["p50"]),
            format_number(totals[key]["p95"]),
        ]
    tokens = totals["tokens"]
    assert cells(page, "#chart-tokens tfoot td") == [
        format_number(tokens["prompt"]),
        format_number(tokens["completion"]),
        format_number(tokens["estimated"]),
    ]
    assert tokens["estimated"] == 2
    expect(page.locator("#chart-tokens figcaption")).to_contain_text("2 conversations counted")
    reviews = totals["reviews"]
    assert cells(page, "#chart-verdicts tfoot td") == [
        format_number(reviews[v]) for v in ("good", "bad", "unsure")
    ]
    assert cells(page, "#chart-coverage tfoot td")[:2] == [
        format_number(totals["conversations"]),
        format_number(reviews["reviewed"]),
    ]
    # A row per bucket, each as /stats has it.
    rows = page.locator("#chart-conversations tbody tr")
    counts = [b["conversations"] for b in stats["buckets"] if b["conversations"]]
    assert len(stats["buckets"]) == 7 * 24 + 1  # the range: a week up to this hour's end
    assert rows.count() == len(counts) == 3  # hours without conversations left out
    assert cells(page, "#chart-conversations tbody td:nth-of-type(1)") == [
        format_number(n) for n in counts
    ]
    assert sum(counts) == len(HISTORY)
    # Each bar of the status chart: the seeded buckets have bars, one path per status.
    assert page.locator("#chart-conversations path.chart-status-completed").count() == 1
    assert page.locator("#chart-conversations path.chart-status-streaming").count() == 0
    expect(page.locator("#insights-estimate")).to_have_count(1 if stats["estimate"] else 0)


def test_the_form_changes_range_and_slice_without_javascript(
    browser: Browser, demo_server: RunningServer, seeded: Slice
) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(f"{demo_server.url}/insights")
    page.get_by_label("Model", exact=True).fill(seeded.model)
    page.get_by_label("Buckets", exact=True).select_option("day")
    page.get_by_role("button", name="Show").click()
    query = parse_qs(urlsplit(page.url).query, keep_blank_values=True)
    assert query == {"bucket": ["day"], "model": [seeded.model]}  # the short URL: no empty fields
    expect(page.locator("#insights-total")).to_have_text(str(len(HISTORY)))
    expect(page.locator("#insights-summary")).to_contain_text("daily buckets")
    page.get_by_label("Status", exact=True).select_option("failed")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#insights-total")).to_have_text("2")
    assert cells(page, "#chart-errors thead th")[1:] == sorted(
        ["upstream_error", "upstream_timeout"]
    )
    # A range that holds none of them: the empty state, no chart.
    page.get_by_label("From (UTC)").fill("2020-01-01T00:00")
    page.get_by_label("Until (UTC, excluded)").fill("2020-01-02T00:00")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#insights-empty")).to_be_visible()
    expect(page.locator("figure")).to_have_count(0)
    context.close()


def luminance(colour: str) -> float:
    """WCAG's relative luminance of a computed `rgb(r, g, b)` colour."""
    red, green, blue = (int(v) / 255 for v in re.findall(r"\d+", colour)[:3])

    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * channel(red) + 0.7152 * channel(green) + 0.0722 * channel(blue)


def contrast(first: str, second: str) -> float:
    high, low = sorted((luminance(first), luminance(second)), reverse=True)
    return (high + 0.05) / (low + 0.05)


COLOURS = """
(selector) => {
  const figure = document.querySelector("#chart-conversations");
  const style = (el, prop) => getComputedStyle(el)[prop];
  return {
    surface: style(figure, "backgroundColor"),
    tick: style(figure.querySelector("svg text.chart-tick"), "fill"),
    grid: style(figure.querySelector("svg .chart-grid line"), "stroke"),
    bar: style(figure.querySelector("svg path.chart-status-completed"), "fill"),
    line: style(document.querySelector("#chart-ttfc path.chart-line"), "stroke"),
    cell: style(figure.querySelector("tbody td"), "color"),
  };
}
"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_light_and_dark_are_both_readable(
    browser: Browser, demo_server: RunningServer, seeded: Slice, scheme: str
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=scheme)
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    tab = BrowserPage(page, context)
    page.on("console", tab.on_console)
    # The last six hours: the README's screenshot shows the seeded hours' bars up close.
    since = (datetime.now(UTC) - timedelta(hours=5)).strftime("%Y-%m-%dT%H:00")
    page.goto(f"{demo_server.url}/insights?{urlencode({'model': seeded.model, 'from': since})}")
    expect(page.locator("#insights-total")).to_have_text(str(len(HISTORY)))
    colours = page.evaluate(COLOURS)
    surface = colours["surface"]
    assert luminance(surface) > 0.8 if scheme == "light" else luminance(surface) < 0.05
    assert contrast(colours["tick"], surface) >= 4.5  # axis figures are text
    assert contrast(colours["cell"], surface) >= 4.5
    assert contrast(colours["bar"], surface) >= 3  # WCAG's figure for graphics
    assert contrast(colours["line"], surface) >= 3
    shoot(page, f"insights-{scheme}.png")
    assert tab.csp_violations() == []
    context.close()
    assert tab.problems == []


def test_a_hostile_model_name_is_shown_as_text(
    tab: BrowserPage, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    model = f"{HOSTILE_MODEL} {word()}"
    seed(db, model)
    page = tab.page
    page.goto(f"{demo_server.url}/insights?{urlencode({'model': model})}")
    expect(page.locator("#insights-total")).to_have_text(str(len(HISTORY)))
    expect(page.locator(".insights-model")).to_have_text(model)
    expect(page.get_by_label("Model", exact=True)).to_have_value(model)
    assert page.locator("main img").count() == 0
    assert tab.csp_violations() == []


def test_an_empty_slice_says_so_and_a_sample_says_it_is_an_estimate(
    tab: BrowserPage, demo_server: RunningServer, seeded: Slice
) -> None:
    page = tab.page
    page.goto(f"{demo_server.url}/insights?model=nobody-{word()}")
    expect(page.locator("#insights-empty")).to_be_visible()
    expect(page.locator("#insights-total")).to_have_text("0")
    # A search is not in the rollups: /stats and the page say these figures are an estimate.
    page.goto(f"{demo_server.url}/insights?{urlencode({'model': seeded.model, 'q': 'insights'})}")
    stats = stats_of(page, demo_server)
    expect(page.locator("#insights-estimate")).to_have_count(1 if stats["estimate"] else 0)
    if stats["estimate"]:
        expect(page.locator("figcaption .insights-estimate-tag").first).to_be_visible()


def test_at_phone_width_nothing_scrolls_sideways(
    browser: Browser, demo_server: RunningServer, seeded: Slice
) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 800})
    page = context.new_page()
    page.goto(f"{demo_server.url}/insights?model={seeded.model}")
    expect(page.locator("#insights-total")).to_have_text(str(len(HISTORY)))
    # The wide tables scroll inside their own region, never the page.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    chart = page.locator("#chart-conversations svg").bounding_box()
    assert chart is not None and chart["width"] <= 375
    context.close()


def test_sixty_days_of_hours_are_tabled_by_runs_and_charted_by_hour(
    tab: BrowserPage, demo_server: RunningServer, seeded: Slice
) -> None:
    page = tab.page
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = end - timedelta(days=60)
    query = f"model={seeded.model}&from={start:%Y-%m-%dT%H:%M}&to={end:%Y-%m-%dT%H:%M}"
    page.goto(f"{demo_server.url}/insights?{query}")
    expect(page.locator("#insights-total")).to_have_text(str(len(HISTORY)))
    stats = stats_of(page, demo_server)
    assert len(stats["buckets"]) == 60 * 24  # the chart's buckets: every hour
    # 1,440 hours in 120 rows of 12, not 1,440 rows in each of eight tables.
    expect(page.locator("#chart-conversations th[scope=col]").first).to_have_text("12 hours (UTC)")
    expect(page.locator("#chart-conversations caption")).to_contain_text("a row per 12 hours")
    rows = page.locator("#chart-conversations tbody tr")
    assert 1 <= rows.count() <= 2  # the seeded 3 hours fall in one or two runs of 12
    counts = cells(page, "#chart-conversations tbody td:nth-of-type(1)")
    assert sum(int(n) for n in counts) == len(HISTORY)
    totals = stats["totals"]
    assert cells(page, "#chart-ttfc tfoot td") == [
        format_number(totals["ttfc_ms"]["p50"]),
        format_number(totals["ttfc_ms"]["p95"]),
    ]
