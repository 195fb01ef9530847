"""The detail page's reviews (issue 14, point 1): every review shown, and my review saved,
edited and deleted through plain HTML forms, without JavaScript; then once in Chromium."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import httpx
import psycopg
import pytest
from playwright.sync_api import expect

from sse_llm.access import COOKIE_NAME, REVIEWER_COOKIE
from sse_llm.config import Settings
from tests.conftest import RunningServer, start_server, word
from tests.test_dashboard_browser import BrowserPage, browser, tab  # noqa: F401 (fixtures)
from tests.test_reviews_api import HOSTILE, conversation, review_count

KEY = "review forms key"


@contextmanager
def browser_client(url: str, name: str | None = None) -> Iterator[httpx.Client]:
    """A browser without JavaScript: it sends its Origin, keeps cookies, follows nothing."""
    with httpx.Client(base_url=url, headers={"Origin": url}) as client:
        if name is not None:
            named = client.post("/reviewer", data={"reviewer": name, "next": "/"})
            assert named.status_code == 303
        yield client


def stored_review(db: psycopg.Connection, conversation_id: str) -> tuple[object, ...] | None:
    return db.execute(
        "SELECT reviewer, verdict, labels, note, created_at, updated_at FROM reviews"
        " WHERE conversation_id = %s",
        (conversation_id,),
    ).fetchone()


def test_a_browser_without_a_name_is_asked_once_then_returns_to_the_page(
    demo_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    page_path = f"/conversations/{conversation_id}"
    with browser_client(demo_server.url) as client:
        page = client.get(page_path).text
        assert 'id="reviewer-form"' in page and 'id="review-form"' not in page
        # Posting a review before giving a name leads to the question, not to an error.
        early = client.post(f"{page_path}/review", data={"verdict": "good"})
        assert early.status_code == 303
        assert early.headers["location"] == "/reviewer?next=" + quote(
            f"{page_path}#reviews", safe=""
        )
        answered = client.post("/reviewer", data={"reviewer": " Zoe\u0308 ", "next": page_path})
        assert answered.status_code == 303 and answered.headers["location"] == page_path
        page = client.get(page_path).text
        assert 'id="review-form"' in page and 'id="reviewer-form"' not in page
        assert "Zo\u00eb" in page
    assert review_count(db, conversation_id) == 0


def test_save_edit_and_delete_a_review_with_plain_forms(
    demo_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    page_path = f"/conversations/{conversation_id}"
    with browser_client(demo_server.url, "ada") as client:
        form = {"verdict": "bad", "labels": " Tone, FACTUAL ,, tone", "note": "Wrong sum."}
        saved = client.post(f"{page_path}/review", data=form)
        assert saved.status_code == 303
        assert saved.headers["location"] == f"{page_path}#reviews"
        first = stored_review(db, conversation_id)
        assert first is not None and first[:4] == ("ada", "bad", ["tone", "factual"], "Wrong sum.")
        page = client.get(page_path).text
        assert 'value="bad" required checked' in page
        assert 'value="tone, factual"' in page  # the form shows my review to edit
        assert "Save changes" in page and 'id="review-delete-form"' in page

        edited = client.post(f"{page_path}/review", data={"verdict": "good", "labels": ""})
        assert edited.status_code == 303
        second = stored_review(db, conversation_id)
        assert second is not None and second[:4] == ("ada", "good", [], "")
        assert second[4] == first[4] and second[5] > first[5]  # created_at kept
        assert "edited" in client.get(page_path).text

        deleted = client.post(f"{page_path}/review/delete")
        assert deleted.status_code == 303 and deleted.headers["location"] == f"{page_path}#reviews"
        assert stored_review(db, conversation_id) is None
        page = client.get(page_path).text
        assert 'id="no-reviews"' in page and 'id="review-delete-form"' not in page


def test_every_review_is_shown_with_hostile_text_escaped(
    demo_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    name = "<img src=x onerror=alert(1)>"
    label = "<script>alert(2)</script>"
    with browser_client(demo_server.url, name) as client:
        form = {"verdict": "unsure", "labels": f"{label}, javascript:alert(3)", "note": HOSTILE}
        assert client.post(f"/conversations/{conversation_id}/review", data=form).is_redirect
    with browser_client(demo_server.url, "grace") as client:
        client.post(f"/conversations/{conversation_id}/review", data={"verdict": "good"})
        page = client.get(f"/conversations/{conversation_id}").text
    reviews = page[page.index('id="reviews"') :]
    assert "<script>alert" not in reviews and "<img src=x" not in reviews
    assert html.escape(name, quote=False) in reviews
    assert html.escape(HOSTILE, quote=False) in reviews
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in reviews
    assert 'href="javascript' not in reviews
    listed = re.findall(r'class="review__reviewer"><bdi>(.*?)</bdi>', reviews)
    assert listed == [html.escape(name), "grace"]
    # The labels in use are offered to every reviewer (escaped in the option too).
    assert '<option value="&lt;script&gt;alert(2)&lt;/script&gt;">' in reviews


def test_a_refused_form_shows_the_error_and_keeps_what_was_typed(
    demo_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    page_path = f"/conversations/{conversation_id}"
    with browser_client(demo_server.url, "ada") as client:
        typed = {"verdict": "bad", "labels": "x" * 41, "note": "keep <this> note"}
        refused = client.post(f"{page_path}/review", data=typed)
        assert refused.status_code == 422
        assert 'id="review-error"' in refused.text and "40 characters" in refused.text
        assert "keep &lt;this&gt; note</textarea>" in refused.text
        assert 'value="bad" required checked' in refused.text
        assert refused.headers["content-security-policy"].startswith("default-src 'self'")
        no_verdict = client.post(f"{page_path}/review", data={"note": "n"})
        assert no_verdict.status_code == 422 and "verdict" in no_verdict.text
        nul = client.post(f"{page_path}/review", data={"verdict": "good", "note": "a\x00b"})
        assert nul.status_code == 422 and "NUL" in nul.text
        long_note = client.post(f"{page_path}/review", data={"verdict": "good", "note": "x" * 4001})
        assert long_note.status_code == 422
        huge = client.post(f"{page_path}/review", data={"verdict": "good", "note": "x" * 200_000})
        assert huge.status_code == 413
        too_many = ",".join(f"l{n}" for n in range(21))
        many = client.post(f"{page_path}/review", data={"verdict": "good", "labels": too_many})
        assert many.status_code == 422 and "20 labels" in many.text
    assert review_count(db, conversation_id) == 0


def test_forms_from_another_site_change_nothing(demo_server: RunningServer, db: psycopg.Connection):
    conversation_id = conversation(db)
    page_path = f"/conversations/{conversation_id}"
    with browser_client(demo_server.url, "ada") as client:
        client.post(f"{page_path}/review", data={"verdict": "good"})
        evil = {"Origin": "https://evil.example"}
        forged = client.post(f"{page_path}/review", data={"verdict": "bad"}, headers=evil)
        assert forged.status_code == 403
        wiped = client.post(f"{page_path}/review/delete", headers=evil)
        assert wiped.status_code == 403
        renamed = client.post("/reviewer", data={"reviewer": "mallory"}, headers=evil)
        assert renamed.status_code == 403
    review = stored_review(db, conversation_id)
    assert review is not None and review[:2] == ("ada", "good")


def test_unknown_conversations_are_404_pages(demo_server: RunningServer):
    with browser_client(demo_server.url, "ada") as client:
        for target in (str(uuid.uuid4()), "not-an-id"):
            for action in ("review", "review/delete"):
                response = client.post(
                    f"/conversations/{target}/{action}", data={"verdict": "good"}
                )
                assert response.status_code == 404
                assert "text/html" in response.headers["content-type"]


@pytest.fixture(scope="module")
def locked_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(base_settings.with_changes(api_key=KEY))
    yield running
    running.stop()


def test_with_a_key_the_form_writes_as_the_sign_in_name(
    locked_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    url = locked_server.url
    login = httpx.post(
        f"{url}/login", data={"key": KEY, "reviewer": "grace", "next": "/"}, headers={"Origin": url}
    )
    cookies = {COOKIE_NAME: login.cookies[COOKIE_NAME], REVIEWER_COOKIE: "mallory"}
    with httpx.Client(base_url=url, headers={"Origin": url}, cookies=cookies) as client:
        page = client.get(f"/conversations/{conversation_id}").text
        assert 'id="review-form"' in page and "not you?" not in page
        saved = client.post(f"/conversations/{conversation_id}/review", data={"verdict": "bad"})
        assert saved.status_code == 303
    review = stored_review(db, conversation_id)
    assert review is not None and review[:2] == ("grace", "bad")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as program:
        page = program.get(f"/conversations/{conversation_id}").text
        assert "Sign in in a browser to review" in page and 'id="review-form"' not in page


@pytest.mark.browser
def test_reviewing_in_chromium_with_hostile_text(
    tab: BrowserPage,  # noqa: F811
    demo_server: RunningServer,
    db: psycopg.Connection,
):
    conversation_id = conversation(db, prompt=f"Review me {word()}")
    page = tab.page
    page.goto(f"{demo_server.url}/conversations/{conversation_id}")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    page.get_by_label("Your name").fill("<img src=x onerror=alert(1)>")
    page.get_by_role("button", name="Continue").click()
    expect(page).to_have_url(re.compile(rf"/conversations/{conversation_id}#reviews$"))

    page.get_by_label("bad", exact=True).check()
    page.get_by_label("Labels").fill("<script>alert(2)</script>, Tone")
    page.get_by_label("Note").fill(HOSTILE)
    page.get_by_role("button", name="Save review").click()

    review = page.locator(".review")
    expect(review).to_have_count(1)
    expect(review.locator(".review__reviewer")).to_have_text("<img src=x onerror=alert(1)>")
    expect(review.locator(".review__verdict")).to_have_text("bad")
    expect(review.locator(".review__label")).to_have_text(["<script>alert(2)</script>", "tone"])
    expect(review.locator(".review__note")).to_have_text(HOSTILE)
    expect(page.get_by_label("Labels")).to_have_value("<script>alert(2)</script>, tone")

    page.get_by_label("good", exact=True).check()
    page.get_by_label("Note").fill("On second thought, fine.")
    page.get_by_role("button", name="Save changes").click()
    expect(review.locator(".review__verdict")).to_have_text("good")
    expect(review.locator(".review__note")).to_have_text("On second thought, fine.")

    page.get_by_role("button", name="Delete my review").click()
    expect(page.locator("#no-reviews")).to_be_visible()
    expect(page.locator(".review")).to_have_count(0)
    assert review_count(db, conversation_id) == 0
    assert dialogs == []  # nothing the reviewer typed ran
    assert tab.csp_violations() == []
