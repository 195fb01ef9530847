"""The dashboard in a real browser: Debian's Chromium driven by Playwright (SPEC 5).

Every test fails on a console error, an uncaught exception or a Content-Security-Policy
violation in the page. Playwright cannot download browsers here, so it launches the
system's /usr/bin/chromium (`apt-get install chromium`; .ci/run does it).
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import suppress
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Request,
    expect,
)

from sse_llm.config import Settings
from tests.browser import BrowserPage
from tests.conftest import RunningServer, start_server
from tests.test_dashboard import HOSTILE_PROMPT, create, start_stream, word

pytestmark = pytest.mark.browser

# Records every text the element takes, to see an answer grow (runs outside the page's CSP).
RECORD_TEXT = """
(selector) => {
  const element = document.querySelector(selector);
  window.textSamples ??= {};
  const samples = (window.textSamples[selector] = [element.textContent]);
  new MutationObserver(() => samples.push(element.textContent))
    .observe(element, { childList: true, characterData: true, subtree: true });
}
"""


class DroppingProxy:
    """A TCP proxy in front of a test server that can cut every open connection at once,
    as a flaky network or a restarting load balancer would."""

    def __init__(self, target_url: str) -> None:
        self.target = urlsplit(target_url)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()

    def __enter__(self) -> DroppingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.close()
        self.drop()

    def drop(self) -> None:
        """Close every connection open through the proxy."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection((self.target.hostname, self.target.port))
            with self.lock:
                self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def slow_server(base_settings: Settings) -> Iterator[RunningServer]:
    """A demo server that takes 4 s per answer: long enough to watch one stream."""
    running = start_server(base_settings.with_changes(demo_tokens=80, demo_tokens_per_second=20))
    yield running
    running.stop()


def test_search_finds_and_highlights_a_word(tab: BrowserPage, demo_server: RunningServer) -> None:
    tag = word()
    with httpx.Client(base_url=demo_server.url) as client:
        create(client, f"what does {tag} mean?")
    page = tab.page
    page.goto(demo_server.url)

    page.get_by_label("Search prompts and answers").fill(tag)
    page.keyboard.press("Enter")

    expect(page).to_have_url(re.compile(rf"/\?q={tag}(&|$)"))
    marks = page.locator(".conversation mark")
    expect(marks.first).to_have_text(tag)
    expect(page.locator(".conversation")).to_have_count(1)


@pytest.mark.slow
def test_playground_streams_the_answer_then_links_to_it(
    tab: BrowserPage, slow_server: RunningServer
) -> None:
    page = tab.page
    page.goto(f"{slow_server.url}/playground")
    page.get_by_label("Prompt").fill("Tell me about streaming")
    page.evaluate(RECORD_TEXT, "#answer")

    page.get_by_role("button", name="Send").click()

    expect(page.locator("#answer-status")).to_have_text("finished", timeout=20_000)
    samples: list[str] = page.evaluate("window.textSamples['#answer']")
    lengths = [len(sample) for sample in samples]
    assert len(set(lengths)) > 10, "the answer should appear piece by piece"
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(samples))
    link = page.get_by_role("link", name="Open this conversation")
    conversation_id = link.get_attribute("href").rsplit("/", 1)[1]
    stored = httpx.get(f"{slow_server.url}/history/{conversation_id}").json()
    assert stored["status"] == "completed"
    assert page.locator("#answer").text_content() == stored["response"]

    link.click()
    expect(page.locator("#response-rendered")).to_have_text(stored["response"])  # Markdown


@pytest.mark.slow
def test_streaming_detail_follows_live_and_survives_a_reconnect(
    tab: BrowserPage, slow_server: RunningServer
) -> None:
    tab.expected.append("ERR_INCOMPLETE_CHUNKED_ENCODING")  # the browser reports the cut
    page = tab.page
    streams: list[Request] = []
    page.on("request", lambda r: streams.append(r) if "/stream" in r.url else None)
    with httpx.Client(base_url=slow_server.url) as client:
        conversation_id = start_stream(client, "Follow this answer live")
    with DroppingProxy(slow_server.url) as proxy:
        page.goto(f"{proxy.url}/conversations/{conversation_id}")
        page.evaluate(RECORD_TEXT, "#response")
        page.evaluate(RECORD_TEXT, "#live-status")
        page.wait_for_function("() => window.textSamples['#response'].length > 3")

        proxy.drop()  # the EventSource loses its connection and reconnects by itself

        expect(page.locator("#live-status")).to_have_text("finished", timeout=20_000)
        expect(page.locator("#status")).to_have_text("completed")  # facts refreshed
    statuses: list[str] = page.evaluate("window.textSamples['#live-status']")
    assert "connection lost — reconnecting…" in statuses
    assert statuses.index("streaming live") < statuses.index("connection lost — reconnecting…")
    stored = httpx.get(f"{slow_server.url}/history/{conversation_id}").json()
    assert stored["status"] == "completed"
    assert page.locator("#response").text_content() == stored["response"]  # no gap, no repeat
    samples: list[str] = page.evaluate("window.textSamples['#response']")
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(samples))
    first, reconnect = (request.all_headers() for request in streams)
    assert "last-event-id" not in first  # the page asks with ?last_event_id=
    assert int(reconnect["last-event-id"]) > 0  # the browser resumes after the last chunk seen


def test_hostile_text_renders_as_text_and_runs_nothing(
    tab: BrowserPage, demo_server: RunningServer
) -> None:
    tag = word()
    with httpx.Client(base_url=demo_server.url) as client:
        conversation_id = create(client, f"{tag} {HOSTILE_PROMPT}")
    page = tab.page
    page.set_viewport_size({"width": 375, "height": 800})
    for path in (f"/conversations/{conversation_id}", f"/?q={tag}", "/"):
        page.goto(f"{demo_server.url}{path}")
        assert page.evaluate("window.pwned") is None
        assert page.locator("main img, main script, main a[href^='javascript:']").count() == 0
        expect(page.locator("main")).to_contain_text("<script>window.pwned = 1</script>")
        # The 3,000-letter word wraps: nothing is wider than the phone's screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
    prompt = page.goto(f"{demo_server.url}/conversations/{conversation_id}")
    assert prompt is not None
    bidi = page.locator(".text--prompt").evaluate("e => getComputedStyle(e).unicodeBidi")
    assert bidi == "isolate"


@pytest.mark.slow
def test_no_console_errors_or_csp_violations_on_any_page(
    tab: BrowserPage, demo_server: RunningServer
) -> None:
    tag = word()
    with httpx.Client(base_url=demo_server.url) as client:
        conversation_id = create(client, f"{tag} console check")
    page = tab.page
    for path in ("/", f"/?q={tag}", f"/conversations/{conversation_id}", "/playground"):
        response = page.goto(f"{demo_server.url}{path}")
        assert response is not None and response.ok
        page.wait_for_load_state("networkidle")
        assert tab.csp_violations() == [], path
        assert page.locator("link[rel=stylesheet]").evaluate("e => e.sheet !== null")

    tab.expected.append("status of 404")  # the browser reports the 404 page's status
    response = page.goto(f"{demo_server.url}/conversations/nope")
    assert response is not None and response.status == 404
    assert tab.csp_violations() == []


def test_history_is_usable_with_the_keyboard(tab: BrowserPage, demo_server: RunningServer) -> None:
    tag = word()
    with httpx.Client(base_url=demo_server.url) as client:
        conversation_id = create(client, f"{tag} keyboard")
    page = tab.page
    page.goto(f"{demo_server.url}/?q={tag}")

    target = f"{demo_server.url}/conversations/{conversation_id}"
    focused = []
    while target not in focused and len(focused) < 30:
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.href"))
    assert focused[0].endswith("#main")  # the skip link comes first
    assert "q" in focused and "status" in focused  # the search form
    assert focused[-1] == target  # then each conversation
    page.keyboard.press("Enter")
    expect(page).to_have_url(target)
