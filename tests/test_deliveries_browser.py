"""The detail page's deliveries timeline, and its live view recorded as `dashboard`, in a
real Chromium. Like every browser test, each fails on a console error or a CSP violation."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import BrowserPage
from tests.conftest import RunningServer
from tests.sse_client import iter_events
from tests.test_deliveries import TOKENS, deliveries, read_until, slow_client, slow_server

pytestmark = pytest.mark.browser
__all__ = ["slow_client", "slow_server"]  # fixtures used here, defined there


@pytest.fixture(scope="module")
def resumed(slow_client: httpx.Client) -> Iterator[str]:
    """A conversation whose first client left after chunk 5 and resumed from there."""
    with slow_client.stream("POST", "/stream", json={"prompt": "draw my timeline"}) as r:
        conversation_id = r.headers["x-conversation-id"]
        read_until(iter_events(r), 5)
    url = f"/conversations/{conversation_id}/stream"
    with slow_client.stream("GET", url, headers={"Last-Event-ID": "5"}) as rest:
        assert list(iter_events(rest))[-1].event == "done"
    deliveries(slow_client, conversation_id, 2)
    yield conversation_id


def test_the_timeline_draws_chunks_and_each_connection_with_its_resume(
    tab: BrowserPage, slow_server: RunningServer, resumed: str
) -> None:
    page = tab.page
    page.goto(f"{slow_server.url}/conversations/{resumed}")
    chart = page.locator("#timeline-chart")
    expect(chart).to_be_visible()
    expect(chart.locator(".timeline__chunks")).to_have_count(1)
    bars = chart.locator(".delivery")
    expect(bars).to_have_count(2)
    expect(chart.locator(".delivery--client_left")).to_have_count(1)
    expect(chart.locator(".delivery--done.delivery--resumed .delivery__resume")).to_have_count(1)
    expect(bars.nth(1)).to_contain_text("resumed after chunk 5")
    expect(bars.nth(1)).to_contain_text(f"6\N{EN DASH}{TOKENS}")
    # The line climbs from nothing to the whole answer: one point per chunk, plus the origin.
    points = chart.locator(".timeline__chunks").get_attribute("points") or ""
    assert len(points.split()) == TOKENS + 1
    # The second bar starts after the first one began.
    x = [float(bar.locator(".delivery__bar").get_attribute("x") or "0") for bar in bars.all()]
    assert x[0] <= x[1]
    table = page.locator("#deliveries-table tbody tr")
    expect(table).to_have_count(2)
    expect(table.nth(0)).to_contain_text("client left")
    expect(table.nth(1)).to_contain_text("sent the end (done)")
    assert tab.csp_violations() == []
    if os.environ.get("SSE_LLM_SCREENSHOTS"):
        page.locator("#timeline").screenshot(path="/tmp/timeline-light.png")


def test_the_timeline_follows_dark_mode(
    tab: BrowserPage, slow_server: RunningServer, resumed: str
) -> None:
    page = tab.page
    fills = {}
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        page.goto(f"{slow_server.url}/conversations/{resumed}")
        bar = page.locator(".delivery--done .delivery__bar")
        fills[scheme] = bar.evaluate("rect => getComputedStyle(rect).fill")
        if os.environ.get("SSE_LLM_SCREENSHOTS"):
            page.locator("#timeline").screenshot(path=f"/tmp/timeline-{scheme}.png")
    assert fills["light"] != fills["dark"]
    assert tab.csp_violations() == []


def test_the_live_view_is_recorded_as_a_dashboard_delivery(
    tab: BrowserPage, slow_server: RunningServer, slow_client: httpx.Client
) -> None:
    with slow_client.stream("POST", "/stream", json={"prompt": "watch me live"}) as r:
        conversation_id = r.headers["x-conversation-id"]
        events = iter_events(r)
        read_until(events, 2)
        page = tab.page
        page.goto(f"{slow_server.url}/conversations/{conversation_id}")
        rest = list(events)  # the page follows live meanwhile
    assert rest[-1].event == "done"
    expect(page.locator("#status")).to_have_text("completed", timeout=15_000)
    items = deliveries(slow_client, conversation_id, 2)
    watched = [item for item in items if item["via"] == "dashboard"]
    assert len(watched) == 1
    (live,) = watched
    assert live["ended"] == "done" and live["last_seq"] == TOKENS
    assert 1 < live["from_seq"] <= TOKENS  # it resumed after the chunks the page held
    assert tab.csp_violations() == []
