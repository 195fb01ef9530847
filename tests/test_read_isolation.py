"""Expensive reads never starve the streaming path (issue 12, point 8; SPEC 6).

The history's searches, lists and counts run on a small pool of their own under a
statement timeout, so a flood of costly ones queues there, not in front of the resumes,
cancels and readiness probes of the streaming path.
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psycopg
import pytest

from sse_llm.config import ConfigError, Settings
from tests.conftest import separate_database
from tests.processes import ServerProcess, spawn_server
from tests.sse_client import Event, chunk_text, iter_events

HISTORY_ROWS = 150_000
STREAM_TOKENS = 60  # 2 s at 30 tokens/s: each stream outlives its resume and cancel
PROMPT_WORD = "lighthouse"
# Costly for real, and no longer than a search box takes (1,000 characters). Through
# GET /history, 100 words found nowhere: the newest-first walk tests every row of the
# history against a 100-term query (~0.25 s alone at 150,000 rows). Through the
# dashboard, at a deep page: a phrase repeated, which the full-text index cannot answer
# alone, so every one of the 150,000 hits is fetched and rechecked (~0.4 s alone).
_rng = random.Random(12)
NOWHERE_WORDS = " or ".join(
    "zq" + "".join(_rng.choices(string.ascii_lowercase, k=4)) for _ in range(100)
)
PHRASES = " or ".join(['"lighthouse keeper climbed"'] * 30)
DEEP_OFFSET = 100_000
SEARCH_CLIENTS = 32  # more than the 20 connections of the single pool this replaces
PROMPT_DEADLINE = 1.0  # seconds: what "promptly" means for a resume, a cancel, /readyz


@pytest.fixture(scope="module")
def history_database(database_url: str) -> Iterator[str]:
    """A database of this module's own, on the test server, holding a long history."""
    with separate_database(database_url, "reads") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            # One statement, ~3 s: every row holds the prompt word and the phrase.
            conn.execute(
                """
                INSERT INTO conversations
                    (id, prompt, response, status, created_at, completed_at, model, provider,
                     chunk_count)
                SELECT gen_random_uuid(), 'Tell me about the lighthouse number ' || i,
                       'The lighthouse keeper climbed the stairs of tower ' || i
                           || ' and lit the lamp for the ships.',
                       'completed', now() - make_interval(secs => i),
                       now() - make_interval(secs => i - 1), 'demo', 'demo', 12
                FROM generate_series(1, %s) AS i
                """,
                (HISTORY_ROWS,),
            )
            conn.execute("ANALYZE conversations")
        yield url


@pytest.fixture(scope="module")
def server(history_database: str) -> Iterator[ServerProcess]:
    """A real `sse-llm serve` on that database, with streams long enough to resume."""
    running = spawn_server(
        history_database,
        DEMO_TOKENS=str(STREAM_TOKENS),
        DEMO_TOKENS_PER_SECOND="30",
        SSE_LLM_SHUTDOWN_GRACE="2",
    )
    yield running
    running.stop()


@dataclass
class SearchResult:
    """What one search of the flood got, and how long it took."""

    path: str
    status: int
    seconds: float
    code: str | None
    text: str


@dataclass
class SearchFlood:
    """Clients that search the history as fast as they are answered, until stopped."""

    url: str
    clients: int
    results: list[SearchResult] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SearchFlood:
        for number in range(self.clients):
            thread = threading.Thread(target=self._search, args=(number,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _search(self, number: int) -> None:
        # Half search through the JSON API, half through the dashboard.
        if number % 2:
            path, params = "/history", {"q": NOWHERE_WORDS}
        else:
            path, params = "/", {"q": PHRASES, "offset": str(DEEP_OFFSET)}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                response = client.get(path, params=params)
                seconds = time.monotonic() - began
                code = None
                if response.headers.get("content-type", "").startswith("application/json"):
                    code = response.json().get("error", {}).get("code")
                self.results.append(
                    SearchResult(path, response.status_code, seconds, code, response.text)
                )
                if response.status_code != 200:
                    time.sleep(0.2)  # as a client honouring Retry-After would


def read_chunks_until(events: Iterator[Event], count: int) -> list[Event]:
    """Read events up to and including the `count`-th chunk."""
    seen = []
    for event in events:
        seen.append(event)
        if event.event == "message" and event.id == str(count):
            break
    return seen


def resume_mid_stream(client: httpx.Client) -> tuple[str, str]:
    """Start a stream, drop it after 3 chunks, resume it promptly; (id, text assembled)."""
    with client.stream("POST", "/stream", json={"prompt": f"{PROMPT_WORD} resume"}) as response:
        assert response.status_code == 200
        conversation_id = response.headers["x-conversation-id"]
        before = read_chunks_until(iter_events(response), 3)
    began = time.monotonic()
    with client.stream(
        "GET", f"/conversations/{conversation_id}/stream", headers={"Last-Event-ID": "3"}
    ) as response:
        events = iter_events(response)
        first = next(events, None)
        seconds = time.monotonic() - began
        assert seconds < PROMPT_DEADLINE, f"the resume's first event took {seconds:.2f} s"
        assert response.status_code == 200, response.read()
        after = [first, *events]
    assert after[-1].event == "done"
    assert after[0].id == "4"  # exactly the rest: nothing skipped, nothing repeated
    return conversation_id, chunk_text(before) + chunk_text(after)


def cancel_mid_stream(client: httpx.Client) -> None:
    """Start a stream, cancel it after 2 chunks: a prompt 202, and the stream ends cancelled."""
    with client.stream("POST", "/stream", json={"prompt": f"{PROMPT_WORD} cancel"}) as response:
        assert response.status_code == 200
        conversation_id = response.headers["x-conversation-id"]
        events = iter_events(response)
        read_chunks_until(events, 2)
        began = time.monotonic()
        reply = client.post(f"/conversations/{conversation_id}/cancel")
        seconds = time.monotonic() - began
        assert seconds < PROMPT_DEADLINE, f"the cancel took {seconds:.2f} s"
        assert reply.status_code == 202, reply.text
        end = list(events)[-1]
    assert end.event == "error"
    assert end.json["error"]["code"] == "cancelled"


def get_promptly(client: httpx.Client, path: str) -> httpx.Response:
    """GET `path`, which must answer 200 within the deadline."""
    began = time.monotonic()
    response = client.get(path)
    seconds = time.monotonic() - began
    assert seconds < PROMPT_DEADLINE, f"GET {path} took {seconds:.2f} s"
    assert response.status_code == 200, response.text[:300]
    return response


@pytest.mark.slow
def test_resumes_cancels_and_single_reads_answer_promptly_under_a_flood_of_costly_searches(
    server: ServerProcess,
) -> None:
    with (
        SearchFlood(server.url, SEARCH_CLIENTS) as flood,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        time.sleep(2)  # every search connection busy, and a line waiting for one
        for _ in range(3):
            conversation_id, text = resume_mid_stream(client)
            cancel_mid_stream(client)
            get_promptly(client, "/readyz")
            # Reads of one conversation are as bounded as a resume's, and as prompt; and
            # what the resumed client assembled is exactly what was stored.
            stored = get_promptly(client, f"/history/{conversation_id}").json()
            assert (stored["status"], stored["response"]) == ("completed", text)
            get_promptly(client, f"/conversations/{conversation_id}")

    # The flood was real: searches had to wait or were turned away.
    assert len(flood.results) >= SEARCH_CLIENTS
    assert max(result.seconds for result in flood.results) > PROMPT_DEADLINE
    for result in flood.results:
        assert result.status in (200, 503), (result.path, result.status, result.text[:300])
        if result.status == 503 and result.path == "/history":
            assert result.code in ("query_timeout", "too_many_queries"), result.text
        if result.status == 503 and result.path == "/":
            assert "too long" in result.text or "busy" in result.text, result.text[:300]
        assert "SELECT" not in result.text and "Traceback" not in result.text


@pytest.fixture
def impatient_server(history_database: str) -> Iterator[ServerProcess]:
    """A server whose history queries may run for 50 ms only."""
    running = spawn_server(history_database, SSE_LLM_QUERY_TIMEOUT="0.05")
    yield running
    running.stop()


def test_a_search_over_the_statement_timeout_answers_query_timeout(
    impatient_server: ServerProcess,
) -> None:
    with httpx.Client(base_url=impatient_server.url, timeout=30) as client:
        # A deep page of the phrase: GET /history now finds rare words by the full-text
        # index (history_queries.page_ids), so NOWHERE_WORDS no longer costs it enough.
        response = client.get("/history", params={"q": PHRASES, "offset": str(DEEP_OFFSET)})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "query_timeout"
        assert "narrow" in response.json()["error"]["message"]
        assert "statement" not in response.text and "SELECT" not in response.text

        page = client.get("/", params={"q": PHRASES, "offset": str(DEEP_OFFSET)})
        assert page.status_code == 503
        assert page.headers["content-type"].startswith("text/html")
        assert "took too long" in page.text
        assert "statement" not in page.text and "SELECT" not in page.text

        # The cancelled statement left its connection fit for the next, cheap query.
        assert client.get("/history", params={"limit": "1"}).status_code == 200


def test_sse_llm_query_timeout_is_read_and_bad_values_are_refused_by_name() -> None:
    assert Settings.from_env({}).query_timeout == 5.0
    assert Settings.from_env({"SSE_LLM_QUERY_TIMEOUT": "1.5"}).query_timeout == 1.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="SSE_LLM_QUERY_TIMEOUT"):
            Settings.from_env({"SSE_LLM_QUERY_TIMEOUT": bad})
