"""The history page's filters in a real browser: the form, chips, badges, bookmarks (SPEC 9).

Like every browser test, each fails on a console error or a CSP violation.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser import BrowserPage
from tests.conftest import RunningServer
from tests.test_history_filters import Judged, judged

pytestmark = pytest.mark.browser
__all__ = ["judged"]  # a fixture used here, defined there


def rows(tab: BrowserPage) -> list[str]:
    """The conversation ids the page lists, in order."""
    links = tab.page.locator(".conversation__prompt")
    return [href.rsplit("/", 1)[-1] for href in links.evaluate_all("l => l.map(a => a.href)")]


def test_filter_by_verdict_and_label_from_the_form_then_remove_a_chip(
    tab: BrowserPage, demo_server: RunningServer, judged: Judged
) -> None:
    page = tab.page
    page.goto(f"{demo_server.url}/?q={judged.tag}")
    expect(page.locator(".conversation")).to_have_count(6)

    page.locator(".history-filters summary").click()
    page.get_by_label("Some review says").select_option("bad")
    page.get_by_label("Labels").fill(judged.tone.upper())  # labels are case-folded
    page.get_by_role("button", name="Search").click()

    # The short URL (the form's empty fields dropped), with both filters: bookmarkable.
    expect(page).to_have_url(re.compile(rf"/\?q={judged.tag}&verdict=bad&label={judged.tone}$"))
    expect(page.locator(".conversation")).to_have_count(1)
    assert rows(tab) == [judged.ids[1]]
    badges = page.locator(".conversation .review-badge")
    expect(badges).to_have_count(2)
    expect(page.locator(".review-badge--bad .review-badge__verdict")).to_have_text("bad")
    expect(page.locator(".review-badge--good .review-badge__verdict")).to_have_text("good")
    expect(page.locator(".review-badge__label", has_text=judged.factual)).to_be_visible()
    expect(page.locator(".filter-chip")).to_have_count(3)  # search, verdict, label
    # The form shows what is chosen.
    expect(page.get_by_label("Some review says")).to_have_value("bad")
    expect(page.get_by_label("Labels")).to_have_value(judged.tone)

    page.get_by_role("link", name="Remove filter verdict: bad").click()
    expect(page).to_have_url(re.compile(rf"/\?q={judged.tag}&label={judged.tone}$"))
    expect(page.locator(".conversation")).to_have_count(2)
    assert rows(tab) == [judged.ids[1], judged.ids[0]]
    bookmark = page.url

    # A bookmark opens the same filtered page in a fresh tab.
    fresh = tab.context.new_page()
    fresh.goto(bookmark)
    expect(fresh.locator(".conversation")).to_have_count(2)
    expect(fresh.locator(".filter-chip", has_text=f"label: {judged.tone}")).to_be_visible()
    fresh.close()
    assert tab.csp_violations() == []


def test_a_label_badge_adds_that_label_and_the_pager_walks_by_keyset(
    tab: BrowserPage, demo_server: RunningServer, judged: Judged
) -> None:
    page = tab.page
    page.goto(f"{demo_server.url}/?q={judged.tag}&reviewed=true&limit=2")
    assert rows(tab) == [judged.ids[3], judged.ids[2]]
    page.get_by_role("link", name="Older →").click()
    expect(page).to_have_url(re.compile(r"before="))
    assert rows(tab) == [judged.ids[1], judged.ids[0]]
    expect(page.get_by_role("link", name="Older →")).to_have_count(0)

    page.locator(".review-badge__label", has_text=judged.factual).first.click()
    expect(page.locator(".filter-chip", has_text=f"label: {judged.factual}")).to_be_visible()
    assert "before=" not in page.url
    assert rows(tab) == [judged.ids[2], judged.ids[1]]
    assert tab.csp_violations() == []
