"""The review queue and agreement in a real browser (issue 14 points 4, 5 and 7): the keys
g/b/u/s/a, inactive in a field and switchable off; two colleagues on one slice; blind
mode over every response the page loads; the agreement page with two and three reviewers.

Every test fails on a console error, an uncaught exception or a CSP violation (the `tab`
fixture in conftest). With SSE_LLM_SCREENSHOTS=1 they retake the README's screenshots
of both pages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from playwright.sync_api import Browser, Page, Response, expect

from tests.browser import RECORD_CSP_VIOLATIONS, BrowserPage
from tests.conftest import RunningServer, word
from tests.test_agreement import seed_reviews
from tests.test_review_queue import insert, review

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parent / "screenshots"


def shoot(page: Page, name: str, *, full_page: bool = False) -> None:
    """Retake a README screenshot, with SSE_LLM_SCREENSHOTS=1 only: a plain run of the
    suite leaves the working tree as it found it."""
    if os.environ.get("SSE_LLM_SCREENSHOTS"):
        page.screenshot(path=SHOTS / name, full_page=full_page)


def name_tab(tab: BrowserPage, server: RunningServer, name: str) -> None:
    """Make the tab review as `name` (the open-mode reviewer cookie)."""
    tab.context.add_cookies([{"name": "sse_llm_reviewer", "value": name, "url": server.url}])


def verdict_of(db: psycopg.Connection, reviewer: str) -> list[tuple[str]]:
    return db.execute("SELECT verdict FROM reviews WHERE reviewer = %s", (reviewer,)).fetchall()


def served_id(tab: BrowserPage) -> str | None:
    item = tab.page.locator("#queue-item")
    return item.get_attribute("data-conversation") if item.count() else None


def test_keys_judge_skip_and_annotate(
    tab: BrowserPage, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, me = word(), word()
    ids = [str(insert(db, f"{tag} number {n}", age_seconds=n)) for n in range(5)]
    name_tab(tab, demo_server, me)
    page = tab.page
    page.goto(f"{demo_server.url}/review?q={tag}")
    expect(page.locator(".queue-keys")).to_be_visible()  # the switch shows with the script
    shoot(page, "review-1280-light.png", full_page=True)

    for key, verdict in (("g", "good"), ("b", "bad"), ("u", "unsure")):
        current = served_id(tab)
        page.keyboard.press(key)
        expect(page).to_have_url(re.compile(rf"done={current}"))
        row = db.execute(
            "SELECT verdict FROM reviews WHERE reviewer = %s AND conversation_id = %s",
            (me, current),
        )
        assert row.fetchone() == (verdict,)
    assert served_id(tab) == ids[3]

    page.keyboard.press("s")
    expect(page).to_have_url(re.compile(rf"after={ids[3]}"))
    assert served_id(tab) == ids[4]

    page.keyboard.press("a")  # annotate: the note field, without typing the "a"
    expect(page.locator("#queue-note")).to_be_focused()
    expect(page.locator("#queue-note")).to_have_value("")
    assert len(verdict_of(db, me)) == 3


def test_keys_are_inactive_while_typing_and_with_modifiers(
    tab: BrowserPage, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, me = word(), word()
    insert(db, f"{tag} only")
    name_tab(tab, demo_server, me)
    page = tab.page
    page.goto(f"{demo_server.url}/review?q={tag}")
    url = page.url

    page.locator("#queue-labels").click()
    page.keyboard.type("gbus")
    page.locator("#queue-note").click()
    page.keyboard.type("bug")
    page.locator("#queue-note").blur()
    page.keyboard.press("Control+g")
    page.keyboard.press("Shift+B")

    expect(page.locator("#queue-labels")).to_have_value("gbus")
    expect(page.locator("#queue-note")).to_have_value("bug")
    page.wait_for_timeout(300)
    assert page.url == url
    assert verdict_of(db, me) == []


def test_keys_can_be_turned_off_and_it_is_remembered(
    tab: BrowserPage, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, me = word(), word()
    insert(db, f"{tag} one", age_seconds=1)
    insert(db, f"{tag} two", age_seconds=2)
    name_tab(tab, demo_server, me)
    page = tab.page
    page.goto(f"{demo_server.url}/review?q={tag}")

    page.get_by_label(re.compile("Keyboard shortcuts")).uncheck()
    page.locator("h1").click()  # out of the checkbox: keys would act now if on
    page.keyboard.press("g")
    page.wait_for_timeout(300)
    assert verdict_of(db, me) == []

    page.reload()
    expect(page.get_by_label(re.compile("Keyboard shortcuts"))).not_to_be_checked()
    page.keyboard.press("g")
    page.wait_for_timeout(300)
    assert verdict_of(db, me) == []

    page.get_by_label(re.compile("Keyboard shortcuts")).check()
    page.locator("h1").click()
    page.keyboard.press("g")
    expect(page).to_have_url(re.compile("done="))
    assert verdict_of(db, me) == [("good",)]


def test_the_buttons_work_without_javascript(
    browser: Browser, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, me = word(), word()
    first = insert(db, f"{tag} one", age_seconds=1)
    context = browser.new_context(java_script_enabled=False)
    context.add_cookies([{"name": "sse_llm_reviewer", "value": me, "url": demo_server.url}])
    page = context.new_page()
    page.goto(f"{demo_server.url}/review?q={tag}")
    page.locator("#queue-labels").fill("Tone, facts")
    page.get_by_role("button", name="Bad").click()
    expect(page.locator(".queue-judged")).to_contain_text("Recorded your verdict")
    row = db.execute("SELECT verdict, labels FROM reviews WHERE reviewer = %s", (me,))
    assert row.fetchone() == ("bad", ["tone", "facts"])
    assert served_id(BrowserPage(page, context)) is None and first
    context.close()


@pytest.fixture
def colleagues(browser: Browser, demo_server: RunningServer) -> Iterator[list[BrowserPage]]:
    """Two browsers of two colleagues, each with their reviewer name."""
    tabs = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_init_script(RECORD_CSP_VIOLATIONS)
        context.add_cookies([{"name": "sse_llm_reviewer", "value": word(), "url": demo_server.url}])
        page = context.new_page()
        colleague = BrowserPage(page, context)
        page.on("console", colleague.on_console)
        page.on("pageerror", lambda error, c=colleague: c.problems.append(f"uncaught: {error}"))
        tabs.append(colleague)
    yield tabs
    for colleague in tabs:
        assert colleague.csp_violations() == []
        colleague.context.close()
        assert colleague.problems == []


def test_two_colleagues_on_one_slice_get_different_conversations(
    colleagues: list[BrowserPage], demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag = word()
    for n in range(4):
        insert(db, f"{tag} {n}", age_seconds=n)
    first, second = colleagues
    seen: list[set[str | None]] = [set(), set()]
    for colleague in colleagues:
        # Splitting the work: "not reviewed by anyone" (with "not yet reviewed by me" both
        # would judge all four, never the same one at the same time).
        colleague.page.goto(f"{demo_server.url}/review?q={tag}&mode=nobody")
    for _ in range(2):  # each judges two, alternating: never the one the other holds
        for index, colleague in enumerate(colleagues):
            other = colleagues[1 - index]
            current = served_id(colleague)
            assert current is not None and current != served_id(other)
            seen[index].add(current)
            colleague.page.keyboard.press("g")
            expect(colleague.page).to_have_url(re.compile(f"done={current}"))
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0] | seen[1]) == 4
    for colleague in (first, second):
        expect(colleague.page.get_by_text("Nothing left to review")).to_be_visible()


def test_blind_mode_in_the_browser_loads_no_model_or_colleague(
    tab: BrowserPage, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, me = word(), word()
    model, provider, colleague, note = (
        f"{kind}{word()}" for kind in ("model", "provider", "colleague", "note")
    )
    conversation_id = insert(db, f"{tag} judge me blind", model=model, provider=provider)
    review(db, conversation_id, colleague, "bad", note=note)
    name_tab(tab, demo_server, me)
    bodies: list[tuple[str, bytes]] = []

    def record(response: Response) -> None:
        if urlsplit(response.url).netloc == urlsplit(demo_server.url).netloc:
            bodies.append((response.url, response.body()))

    page = tab.page
    page.on("response", record)
    page.goto(f"{demo_server.url}/review?q={tag}&blind=1")
    page.wait_for_load_state("networkidle")
    shoot(page, "review-blind-1280-light.png")
    assert {urlsplit(url).path for url, _ in bodies} >= {"/review", "/static/review.js"}
    for url, body in bodies:
        for secret in (model, provider, colleague, note):
            assert secret.encode() not in body, f"{secret} in {url}"
    expect(page.locator("main")).not_to_contain_text(model)

    page.keyboard.press("g")
    expect(page.locator(".queue-judged")).to_contain_text(model)  # my verdict is in
    expect(page.locator(".queue-judged")).to_contain_text(colleague)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_review_page_at_phone_width(
    browser: Browser, demo_server: RunningServer, db: psycopg.Connection, scheme: str
) -> None:
    tag = word()
    insert(db, f"{tag} Why do clients resume with Last-Event-ID?")
    context = browser.new_context(viewport={"width": 375, "height": 800}, color_scheme=scheme)
    context.add_cookies([{"name": "sse_llm_reviewer", "value": word(), "url": demo_server.url}])
    page = context.new_page()
    page.goto(f"{demo_server.url}/review?q={tag}")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    shoot(page, f"review-375-{scheme}.png", full_page=True)
    context.close()


def test_agreement_page_with_two_and_three_reviewers(
    tab: BrowserPage, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, (r1, r2, r3), ids = seed_reviews(db)
    page = tab.page
    page.goto(f"{demo_server.url}/reviews/agreement?q={tag}")
    expect(page.locator("#agreement-method")).to_contain_text("Fleiss")
    expect(page.locator("#agreement-summary")).to_contain_text(r3)
    expect(page.locator("#disagreements li")).to_have_count(3)
    shoot(page, "agreement-1280-light.png", full_page=True)

    page.get_by_label(re.compile("Reviewers")).fill(f"{r1}, {r2}")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#agreement-method")).to_contain_text("Cohen")
    expect(page.locator("#agreement-table")).to_contain_text("0.273")  # 3/11
    expect(page.locator("#disagreements li")).to_have_count(2)

    page.locator("#disagreements a").first.click()  # settle it on its detail page
    expect(page).to_have_url(re.compile(f"/conversations/{ids['B']}$"))


def test_a_new_reviewer_gives_a_name_once_then_reviews(
    tab: BrowserPage, demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, me = word(), word()
    conversation_id = str(insert(db, f"{tag} first one"))
    page = tab.page
    page.goto(f"{demo_server.url}/review?q={tag}&order=sample")
    page.get_by_label("Your name").fill(me)
    page.get_by_role("button", name="Start reviewing").click()

    expect(page).to_have_url(re.compile(rf"/review\?q={tag}.*order=sample"))
    assert served_id(tab) == conversation_id
    page.keyboard.press("b")
    expect(page.locator(".queue-judged")).to_contain_text("Recorded your verdict")
    assert verdict_of(db, me) == [("bad",)]
