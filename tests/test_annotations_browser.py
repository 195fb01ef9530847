"""Passage annotations in a real browser (issue 14, point 2): a DOM selection becomes the
stored text's code-point offsets, whatever the text holds (emoji outside the BMP,
combining marks, CR LF and lone CR), and annotated passages are highlighted exactly,
overlaps included, in the raw view only.

The selections are made the way a reader's mouse makes them: a DOM Range over the
page's text nodes, found by searching the text the browser shows (where the HTML parser
has already turned every CR LF and lone CR into LF), never from the offsets under test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import httpx
import psycopg
import pytest
from playwright.sync_api import Page, expect

from sse_llm.config import Settings
from tests.browser import BrowserPage
from tests.conftest import RunningServer, start_server
from tests.test_dashboard import start_stream
from tests.test_dashboard_browser import RECORD_TEXT

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
FAMILY = "\U0001f469\u200d\U0001f469\u200d\U0001f467"  # one glyph, five code points
PROMPT = f"Caf\u00e9 \u2615 e\u0301te\u0301\r\nsecond line {FAMILY} done"
RESPONSE = (
    "Start \U0001f600 middle\r\nnext line with cafe\u0301 and more\r\n\r\n"
    "last \U0001d11e line\rlone CR end. **Bold** ![pixel](http://evil.invalid/x.png) "
    "<img src=http://evil.invalid/y.png> [run](javascript:window.pwned=1)"
)

# Select `needle` (stored text) inside `#field`: search the browser's text for it, as it
# shows it (CR LF and lone CR are one LF), and make a DOM Range over the text nodes.
SELECT = """
([selector, needle, occurrence]) => {
  const field = document.querySelector(selector);
  const shown = needle.replace(/\\r\\n?/g, "\\n");
  const nodes = [];
  const walker = document.createTreeWalker(field, NodeFilter.SHOW_TEXT);
  let text = "";
  while (walker.nextNode()) {
    nodes.push([walker.currentNode, text.length]);
    text += walker.currentNode.data;
  }
  let at = -1;
  for (let i = 0; i <= occurrence; i++) at = text.indexOf(shown, at + 1);
  if (at < 0) throw new Error(`not found: ${shown}`);
  const startPoint = (offset) => {
    for (const [node, begin] of nodes) {
      if (offset < begin + node.data.length) return [node, offset - begin];
    }
  };
  const endPoint = (offset) => {
    for (const [node, begin] of nodes) {
      if (offset > begin && offset <= begin + node.data.length) return [node, offset - begin];
    }
  };
  const range = document.createRange();
  range.setStart(...startPoint(at));
  range.setEnd(...endPoint(at + shown.length));
  const selection = document.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}
"""
# The text each annotation's highlight covers, joined in page order, by annotation id.
HIGHLIGHTS = """
() => {
  const seen = {};
  for (const mark of document.querySelectorAll("mark.annotated")) {
    for (const id of mark.dataset.annotations.split(" ")) {
      seen[id] = (seen[id] ?? "") + mark.textContent;
    }
  }
  return seen;
}
"""


def shown(text: str) -> str:
    """The text as the browser's DOM holds it: the HTML parser makes CR LF and CR an LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def insert_conversation(db: psycopg.Connection, prompt: str, response: str) -> UUID:
    """An ended conversation with exactly these texts (a demo answer has no CR or emoji)."""
    conversation_id = uuid.uuid4()
    db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, first_chunk_at, completed_at,
                                   model, provider, chunk_count)
        VALUES (%s, %s, %s, 'completed', now(), now(), 'demo', 'demo', 1)
        """,
        (conversation_id, prompt, response),
    )
    return conversation_id


def add_annotation(
    db: psycopg.Connection, conversation_id: UUID, field: str, start: int, end: int, label: str
) -> str:
    row = db.execute(
        """
        INSERT INTO annotations (conversation_id, reviewer, field, start_offset, end_offset, label)
        VALUES (%s, 'ada', %s, %s, %s, %s) RETURNING id
        """,
        (conversation_id, field, start, end, label),
    ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.fixture
def conversation(db: psycopg.Connection) -> Iterator[UUID]:
    yield insert_conversation(db, PROMPT, RESPONSE)


@pytest.fixture
def requests_seen(tab: BrowserPage) -> list[str]:
    seen: list[str] = []
    tab.page.on("request", lambda request: seen.append(request.url))
    return seen


def selected(page: Page, selector: str, needle: str, occurrence: int = 0) -> tuple[str, int, int]:
    """Select `needle` in the page; the (field, start, end) the form now holds."""
    page.evaluate(SELECT, [selector, needle, occurrence])
    form = page.locator("#annotate-form")
    expect(page.locator("#annotate-save")).to_be_enabled()
    values = [
        form.locator(f"input[name={name}]").input_value() for name in ("field", "start", "end")
    ]
    return values[0], int(values[1]), int(values[2])


def open_raw(page: Page, server: RunningServer, conversation_id: UUID) -> None:
    page.goto(f"{server.url}/conversations/{conversation_id}?view=raw")
    expect(page.locator("#annotate-form")).to_be_visible()


@pytest.mark.parametrize(
    ("selector", "text", "needle"),
    [
        ("#response", RESPONSE, "\U0001f600 middle"),  # after and on an astral emoji
        ("#response", RESPONSE, "middle\r\nnext"),  # across a CR LF
        ("#response", RESPONSE, "next line"),  # starting right after a CR LF
        ("#response", RESPONSE, "cafe\u0301"),  # a combining mark is its own code point
        ("#response", RESPONSE, "more\r\n\r\nlast"),  # two CR LF in a row
        ("#response", RESPONSE, "line\rlone"),  # a lone CR
        ("#response", RESPONSE, "and more\r\n"),  # ending just after a CR LF, in its node
        ("#response", RESPONSE, "line\r"),  # ending just after a lone CR
        ("#response", RESPONSE, "\U0001d11e"),  # just one astral character
        ("#response", RESPONSE, "Start"),  # the very start
        ("#response", RESPONSE, "javascript:window.pwned=1)"),  # the very end
        ("#prompt", PROMPT, "\u00e9 \u2615 e\u0301te\u0301\r\nsecond"),
        ("#prompt", PROMPT, f"{FAMILY} done"),  # a ZWJ sequence
    ],
)
def test_a_selection_becomes_the_stored_texts_code_point_offsets(
    tab: BrowserPage,
    demo_server: RunningServer,
    conversation: UUID,
    selector: str,
    text: str,
    needle: str,
) -> None:
    page = tab.page
    open_raw(page, demo_server, conversation)
    field, start, end = selected(page, selector, needle)
    assert field == selector.removeprefix("#")
    assert text[start:end] == needle
    assert (start, end) == (text.index(needle), text.index(needle) + len(needle))


def test_a_selection_is_clamped_to_its_text_and_must_stay_in_one(
    tab: BrowserPage,
    demo_server: RunningServer,
    conversation: UUID,
) -> None:
    page = tab.page
    open_raw(page, demo_server, conversation)
    # From the "Response" heading into the answer: starts at the answer's start.
    page.evaluate(
        """() => {
          const range = document.createRange();
          range.setStartBefore(document.getElementById("response-heading"));
          const text = document.querySelector("#response span").firstChild;
          range.setEnd(text, 5);
          document.getSelection().removeAllRanges();
          document.getSelection().addRange(range);
        }"""
    )
    expect(page.locator("#annotate-passage")).to_contain_text("response, characters 0\N{EN DASH}5")
    # The whole answer, selected as its element's contents.
    page.evaluate(
        """() => {
          const range = document.createRange();
          range.selectNodeContents(document.getElementById("response"));
          document.getSelection().removeAllRanges();
          document.getSelection().addRange(range);
        }"""
    )
    expect(page.locator("#annotate-passage")).to_contain_text(
        f"characters 0\N{EN DASH}{len(RESPONSE)}"
    )
    # From the prompt into the answer: refused, and nothing can be saved.
    page.evaluate(
        """() => {
          const range = document.createRange();
          range.setStart(document.querySelector("#prompt span").firstChild, 1);
          range.setEnd(document.querySelector("#response span").firstChild, 2);
          document.getSelection().removeAllRanges();
          document.getSelection().addRange(range);
        }"""
    )
    expect(page.locator("#annotate-passage")).to_have_text(
        "Select a passage within one text: the prompt or the answer."
    )
    expect(page.locator("#annotate-save")).to_be_disabled()


def test_annotate_a_selected_passage_then_see_it_after_a_reload(
    tab: BrowserPage,
    demo_server: RunningServer,
    conversation: UUID,
    requests_seen: list[str],
) -> None:
    page = tab.page
    open_raw(page, demo_server, conversation)
    needle = "\U0001f600 middle\r\nnext"
    selected(page, "#response", needle)
    page.get_by_label("Reviewer").fill("ada")
    page.get_by_label("Label").fill("Tone")
    page.get_by_label("Note").fill("<b>too</b> chatty")
    page.get_by_role("button", name="Annotate passage").click()

    item = page.locator(".annotation")
    expect(item).to_have_count(1)  # the page reloaded with the server's view
    stored = httpx.get(f"{demo_server.url}/conversations/{conversation}/annotations").json()
    [annotation] = stored["items"]
    start = RESPONSE.index(needle)
    assert (annotation["field"], annotation["start"], annotation["end"]) == (
        "response",
        start,
        start + len(needle),
    )
    assert annotation["label"] == "tone" and annotation["reviewer"] == "ada"
    expect(item.locator(".label-chip")).to_have_text("tone")
    expect(item.locator(".annotation__passage")).to_have_text(shown(needle))
    expect(item.locator(".annotation__note")).to_have_text("<b>too</b> chatty")
    expect(item).to_contain_text("ada")
    assert page.evaluate(HIGHLIGHTS) == {annotation["id"]: shown(needle)}
    assert "?view=raw" in page.url

    page.reload()
    assert page.evaluate(HIGHLIGHTS) == {annotation["id"]: shown(needle)}
    assert tab.csp_violations() == []
    assert [url for url in requests_seen if not url.startswith(demo_server.url)] == []


def test_overlapping_annotations_are_highlighted_exactly(
    tab: BrowserPage,
    demo_server: RunningServer,
    db: psycopg.Connection,
    conversation: UUID,
) -> None:
    spans = {
        "outer": (RESPONSE.index("middle"), RESPONSE.index(" and more")),
        "inner": (RESPONSE.index("next"), RESPONSE.index(" with")),
        "across": (RESPONSE.index("line with"), RESPONSE.index("last")),
    }
    ids = {
        add_annotation(db, conversation, "response", start, end, label): (start, end)
        for label, (start, end) in spans.items()
    }
    prompt_id = add_annotation(db, conversation, "prompt", 5, 11, "emoji")
    page = tab.page
    open_raw(page, demo_server, conversation)

    highlights = page.evaluate(HIGHLIGHTS)
    expected = {id_: shown(RESPONSE[start:end]) for id_, (start, end) in ids.items()}
    expected[prompt_id] = shown(PROMPT[5:11])
    assert highlights == expected
    # Where all three overlap ("line"), the highlight is the darkest and names all three.
    triple = page.locator("mark.annotated--3")
    expect(triple).to_have_count(1)
    expect(triple).to_have_text("line")
    assert set(triple.get_attribute("data-annotations").split()) == set(ids)
    assert triple.get_attribute("title") == "outer, inner, across"
    expect(page.locator(".annotation")).to_have_count(4)
    # Hovering an annotation in the list outlines its passage only.
    inner_id = next(i for i, span in ids.items() if span == spans["inner"])
    page.locator(f"#annotation-{inner_id}").hover()
    focused = page.locator("mark.annotated--focus")
    assert "".join(focused.all_text_contents()) == "next line"


def test_the_rendered_view_shows_no_highlight_and_fetches_nothing(
    tab: BrowserPage,
    demo_server: RunningServer,
    db: psycopg.Connection,
    conversation: UUID,
    requests_seen: list[str],
) -> None:
    add_annotation(db, conversation, "response", 6, 14, "tone")
    page = tab.page
    page.goto(f"{demo_server.url}/conversations/{conversation}")
    page.wait_for_load_state("networkidle")

    assert page.locator("mark, [data-start], #annotate-form").count() == 0
    expect(page.locator("#view-note")).to_contain_text("switch to raw text")
    expect(page.locator("#response-rendered strong")).to_have_text("Bold")
    image = page.locator("#response-rendered a.md-image")
    expect(image).to_have_attribute("href", "http://evil.invalid/x.png")
    expect(image).to_have_attribute("rel", "nofollow noopener")
    assert page.locator("main img, main a[href^='javascript:']").count() == 0
    expect(page.locator("#response-rendered")).to_contain_text(
        "<img src=http://evil.invalid/y.png>"
    )
    assert page.evaluate("window.pwned") is None
    assert [url for url in requests_seen if not url.startswith(demo_server.url)] == []
    assert tab.csp_violations() == []

    page.get_by_role("link", name="Raw text and annotations").first.click()
    expect(page.locator("mark.annotated")).to_have_text(RESPONSE[6:14])
    page.get_by_role("link", name="Rendered").click()
    assert page.locator("mark").count() == 0


def test_an_annotation_is_deleted_from_the_list(
    tab: BrowserPage,
    demo_server: RunningServer,
    db: psycopg.Connection,
    conversation: UUID,
) -> None:
    keep = add_annotation(db, conversation, "response", 0, 5, "keep")
    drop = add_annotation(db, conversation, "response", 2, 9, "drop")
    page = tab.page
    open_raw(page, demo_server, conversation)
    page.locator(f"#annotation-{drop}").get_by_role("button", name="Delete").click()

    expect(page.locator(".annotation")).to_have_count(1)
    assert page.evaluate(HIGHLIGHTS) == {keep: RESPONSE[0:5]}
    left = db.execute("SELECT id FROM annotations WHERE conversation_id = %s", (conversation,))
    assert [str(row[0]) for row in left] == [keep]


def test_a_refused_annotation_says_why_and_creates_nothing(
    tab: BrowserPage,
    demo_server: RunningServer,
    db: psycopg.Connection,
    conversation: UUID,
) -> None:
    tab.expected.append("status of 422")  # the browser logs the refused request
    page = tab.page
    open_raw(page, demo_server, conversation)
    selected(page, "#response", "middle")
    page.get_by_label("Reviewer").fill("ada")
    page.get_by_label("Label").fill("a,b")  # a label cannot hold a comma
    page.get_by_role("button", name="Annotate passage").click()

    expect(page.locator("#annotate-status")).to_contain_text("comma")
    expect(page.locator("#annotate-save")).to_be_enabled()
    count = db.execute(
        "SELECT count(*) FROM annotations WHERE conversation_id = %s", (conversation,)
    )
    assert count.fetchone() == (0,)


@pytest.mark.slow
def test_a_streaming_answer_grows_raw_then_renders_when_it_ends(
    tab: BrowserPage,
    base_settings: Settings,
) -> None:
    server = start_server(base_settings.with_changes(demo_tokens=40, demo_tokens_per_second=20))
    try:
        with httpx.Client(base_url=server.url) as client:
            conversation_id = start_stream(client, "Render **this** when done")
        page = tab.page
        page.goto(f"{server.url}/conversations/{conversation_id}")
        assert page.locator("#response-rendered, #view-toggle, mark").count() == 0
        page.evaluate(RECORD_TEXT, "#response")

        expect(page.locator("#live-status")).to_have_text("finished", timeout=20_000)
        rendered = page.locator("#response-rendered")
        expect(rendered.locator("p")).to_contain_text("You asked about: Render this when done")
        expect(page.locator("#response")).to_be_hidden()  # the live raw text, kept hidden
        expect(page.locator("#view-toggle a")).to_have_attribute(
            "href", f"/conversations/{conversation_id}?view=raw"
        )
        samples: list[str] = page.evaluate("window.textSamples['#response']")
        assert len({len(sample) for sample in samples}) > 5  # it grew live first
        stored = httpx.get(f"{server.url}/history/{conversation_id}").json()
        assert samples[-1] == stored["response"]
        assert tab.csp_violations() == []
    finally:
        server.stop()


SHOWCASE_PROMPT = "Compare EventSource and a fetch() stream for an LLM answer, in a table."
SHOWCASE_RESPONSE = """## EventSource or fetch()?

Both read **Server-Sent Events**; they differ in what they let you send:

| | EventSource | fetch() stream |
|:--|:--:|--:|
| Method | GET only | any |
| Reconnects | by itself | you write it |

```js
const source = new EventSource("/conversations/42/stream");
source.onmessage = (event) => append(JSON.parse(event.data).text);
```

- Use *EventSource* to follow a conversation: it resumes with `Last-Event-ID`.
- Use `fetch()` to POST the prompt. See [the spec](https://html.spec.whatwg.org/) \
  and ![a diagram](https://example.com/sse.png).
"""


@pytest.mark.skipif(not os.environ.get("SSE_LLM_SCREENSHOTS"), reason="SSE_LLM_SCREENSHOTS=1")
def test_take_screenshots(
    tab: BrowserPage,
    demo_server: RunningServer,
    db: psycopg.Connection,
) -> None:
    """tests/screenshots/annotations-* (raw view, overlapping annotations) and markdown-*."""
    conversation_id = insert_conversation(db, SHOWCASE_PROMPT, SHOWCASE_RESPONSE)
    for label, passage in [
        ("accuracy", "Reconnects | by itself"),
        ("tone", "by itself | you write it"),
        ("good example", "it resumes with `Last-Event-ID`"),
    ]:
        start = SHOWCASE_RESPONSE.index(passage)
        add_annotation(db, conversation_id, "response", start, start + len(passage), label)
    add_annotation(db, conversation_id, "prompt", 8, 19, "vague")
    page = tab.page
    url = f"{demo_server.url}/conversations/{conversation_id}"
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        for width in (1280, 375):
            page.set_viewport_size({"width": width, "height": 900})
            page.goto(f"{url}?view=raw")
            selected(page, "#response", "GET only")
            name = f"annotations-{width}-{scheme}.png"
            page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
            page.goto(url)
            page.screenshot(
                path=str(SCREENSHOTS / f"markdown-{width}-{scheme}.png"), full_page=True
            )
