"""The review dashboard's HTML pages (SPEC 5), read as a browser without JavaScript would."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from uuid import UUID

import httpx
import psycopg
import pytest
from markupsafe import escape
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sse_llm import history_queries
from sse_llm.config import Settings
from sse_llm.dashboard import create_templates, html_errors, split_hits
from sse_llm.history_queries import HIT_START, HIT_STOP
from tests.conftest import create, start_server, with_database, word

HOSTILE_PROMPT = (
    '<script>window.pwned = 1</script> <img src=x onerror="window.pwned = 1"> '
    '<a href="javascript:window.pwned = 1">click</a> '
    "\u202eevil right-to-left override\u202c " + "A" * 3000
)


def page_links(html: str) -> list[str]:
    """The detail-page links of the history rows, in order."""
    return re.findall(r'class="conversation__prompt" href="/conversations/([0-9a-f-]{36})"', html)


def test_history_lists_newest_first_and_links_to_each_conversation(client: httpx.Client) -> None:
    tag = word()
    ids = [create(client, f"{tag} row {n}") for n in range(3)]

    page = client.get("/", params={"q": tag})

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page_links(page.text) == list(reversed(ids))
    assert "completed" in page.text  # the status badge
    assert "[demo] This is sse-llm" in page.text  # the start of the response
    for conversation_id in ids:
        assert client.get(f"/conversations/{conversation_id}").status_code == 200


def test_history_pages_with_previous_and_next_links(client: httpx.Client) -> None:
    tag = word()
    newest_first = list(reversed([create(client, f"{tag} paging {n}") for n in range(5)]))

    first = client.get("/", params={"q": tag, "limit": 2}).text
    assert page_links(first) == newest_first[:2]
    assert 'rel="prev"' not in first
    next_url = re.search(r'rel="next" href="([^"]+)"', first)
    assert next_url is not None

    second = client.get(next_url.group(1).replace("&amp;", "&")).text
    assert page_links(second) == newest_first[2:4]
    assert 'rel="prev"' in second

    last = client.get("/", params={"q": tag, "limit": 2, "offset": 4}).text
    assert page_links(last) == newest_first[4:]
    assert 'rel="next"' not in last


def test_search_highlights_the_matching_words(client: httpx.Client) -> None:
    tag = word()
    create(client, f"please explain {tag} in detail")

    page = client.get("/", params={"q": tag}).text

    assert f"<mark>{tag}</mark>" in page
    assert f"Conversations matching “<bdi>{tag}</bdi>”" in page


def test_stored_text_cannot_forge_a_highlight(client: httpx.Client) -> None:
    tag = word()
    forged = word()
    create(client, f"{tag} {HIT_START}{forged}{HIT_STOP} <mark>fake</mark>")

    for page in (client.get("/", params={"q": tag}).text, client.get("/").text):
        assert f"<mark>{forged}</mark>" not in page
        assert "<mark>fake</mark>" not in page and "&lt;mark&gt;fake&lt;/mark&gt;" in page
        assert HIT_START not in page and HIT_STOP not in page
    assert f"<mark>{tag}</mark>" in client.get("/", params={"q": tag}).text


def test_split_hits_turns_markers_into_parts() -> None:
    excerpt = f"a {HIT_START}hit{HIT_STOP} and {HIT_START}another{HIT_STOP}"
    assert split_hits(excerpt) == [
        ("a ", False),
        ("hit", True),
        (" and ", False),
        ("another", True),
    ]
    assert split_hits("plain <b>text</b>") == [("plain <b>text</b>", False)]
    assert split_hits("") == []


def test_status_filter_and_counts_by_status(client: httpx.Client, db: psycopg.Connection) -> None:
    tag = word()
    create(client, f"{tag} completed one")
    insert_conversation(db, f"{tag} failed one", status="failed", error_code="upstream_error")

    failed = client.get("/", params={"q": tag, "status": "failed"}).text
    assert len(page_links(failed)) == 1
    assert "failed one" in failed and "completed one" not in failed
    assert '<option value="failed" selected>' in failed

    counts = dict(db.execute("SELECT status, count(*) FROM conversations GROUP BY status"))
    page = client.get("/").text
    for status, count in counts.items():
        assert re.search(rf'{status} <span class="count">{count:,}</span>', page), status
    assert f'all <span class="count">{sum(counts.values()):,}</span>' in page


def test_out_of_range_parameters_are_clamped_not_refused(client: httpx.Client) -> None:
    for params in ({"limit": "0"}, {"limit": "abc"}, {"offset": "-5"}, {"status": "bogus"}):
        assert client.get("/", params=params).status_code == 200
    assert client.get("/", params={"q": "x" * 5000 + "\x00"}).status_code == 200


def test_search_without_matches_says_so(client: httpx.Client) -> None:
    page = client.get("/", params={"q": word()}).text
    assert "No matches" in page
    assert page_links(page) == []


def test_empty_history_points_to_the_playground(base_settings: Settings) -> None:
    with scratch_database(base_settings.database_url) as url:
        server = start_server(base_settings.with_changes(database_url=url))
        try:
            page = httpx.get(f"{server.url}/").text
        finally:
            server.stop()
    assert "No conversations yet" in page
    assert 'href="/playground"' in page


def test_detail_shows_prompt_response_and_timings(client: httpx.Client) -> None:
    conversation_id = create(client, "  line one\n\n    indented line two  ")
    stored = client.get(f"/history/{conversation_id}").json()

    page = client.get(f"/conversations/{conversation_id}", params={"view": "raw"}).text

    # Whitespace kept exactly: the text sits directly inside its pre-wrap element (in one
    # segment, as no annotation cuts it).
    prompt = "line one\n\n    indented line two"
    segment = f'<span data-start="0" data-end="{len(prompt)}">{prompt}</span>'
    assert f'data-length="{len(prompt)}">{segment}</div>' in page
    answer = stored["response"]
    assert f'<span data-start="0" data-end="{len(answer)}">{escape(answer)}</span></div>' in page
    for label in ("Created", "Completed", "Time to first chunk", "Duration", "Chunks"):
        assert f"<dt>{label}</dt>" in page
    assert f'<dd id="chunks">{stored["chunks"]}</dd>' in page
    assert "<dd><bdi>demo</bdi></dd>" in page  # model
    assert "badge--completed" in page
    assert "data-follow" not in page  # nothing to follow once it ended
    assert re.search(r"<dt>Time to first chunk</dt><dd>\d+ ms</dd>", page)


def test_detail_shows_the_error_of_a_failed_conversation(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    conversation_id = insert_conversation(
        db, "a prompt", status="failed", error_code="upstream_timeout", error_message="Too slow."
    )
    page = client.get(f"/conversations/{conversation_id}").text
    assert "badge--failed" in page
    assert "<code>upstream_timeout</code> <bdi>Too slow.</bdi>" in page


@pytest.mark.parametrize("conversation_id", [str(uuid.uuid4()), "not-a-uuid", "1%20OR%201=1"])
def test_unknown_conversation_is_an_html_404(client: httpx.Client, conversation_id: str) -> None:
    response = client.get(f"/conversations/{conversation_id}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "Conversation not found" in response.text
    assert response.headers["content-security-policy"].startswith("default-src 'self'")


def test_streaming_detail_renders_persisted_text_and_resumes_after_it(
    base_settings: Settings, db: psycopg.Connection
) -> None:
    slow = start_server(base_settings.with_changes(demo_tokens=40, demo_tokens_per_second=40))
    try:
        with httpx.Client(base_url=slow.url) as client:
            conversation_id = start_stream(client, "follow me")
            time.sleep(0.3)
            page = client.get(f"/conversations/{conversation_id}").text
    finally:
        slow.stop()
    assert "badge--streaming" in page
    follow = re.search(r'data-follow="([^"]+)"', page)
    assert follow is not None
    rendered = int(follow.group(1).rsplit("=", 1)[1])
    assert follow.group(1) == (
        f"/conversations/{conversation_id}/stream?via=dashboard&amp;last_event_id={rendered}"
    )
    # The page holds exactly the chunks before the resume point: none twice, none lost.
    chunks = db.execute(
        "SELECT string_agg(text, '' ORDER BY seq) FROM chunks WHERE conversation_id = %s "
        "AND seq <= %s",
        (conversation_id, rendered),
    ).fetchone()[0]
    assert f'id="response" data-follow="{follow.group(1)}">{escape(chunks or "")}</div>' in page


def test_playground_page_has_a_labelled_form(client: httpx.Client) -> None:
    page = client.get("/playground").text
    assert '<label for="prompt">Prompt</label>' in page
    assert 'id="prompt" name="prompt"' in page
    assert "<noscript>" in page  # says what to do without JavaScript


@pytest.mark.parametrize("path", ["/", "/?q=anything", "/playground", "/conversations/x"])
def test_every_page_sends_the_security_headers(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    # Nothing inline for the policy to block: no inline scripts, no style attributes.
    assert not re.search(r"<script(?![^>]*\bsrc=)", response.text)
    assert " style=" not in response.text and "<style" not in response.text


def test_detail_page_of_a_conversation_has_the_security_headers(client: httpx.Client) -> None:
    conversation_id = create(client, "headers")
    response = client.get(f"/conversations/{conversation_id}")
    assert response.headers["content-security-policy"].startswith("default-src 'self'")
    assert response.headers["x-content-type-options"] == "nosniff"


def test_hostile_text_is_escaped_everywhere(client: httpx.Client) -> None:
    tag = word()
    conversation_id = create(client, f"{tag} {HOSTILE_PROMPT}")
    pages = [
        client.get(f"/conversations/{conversation_id}").text,
        client.get("/", params={"q": tag}).text,
        client.get("/").text,
    ]
    for page in pages:
        assert "<script>window.pwned" not in page
        assert "<img src=x" not in page
        assert 'href="javascript:' not in page
        assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page


def test_static_files_are_served(client: httpx.Client) -> None:
    css = client.get("/static/app.css")
    script = client.get("/static/app.js")
    assert css.status_code == script.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "javascript" in script.headers["content-type"]
    assert "prefers-color-scheme: dark" in css.text


def start_stream(client: httpx.Client, prompt: str) -> str:
    """Start a generation and return its id; it goes on server-side after we hang up."""
    with client.stream("POST", "/stream", json={"prompt": prompt}) as response:
        return response.headers["x-conversation-id"]


def insert_conversation(
    db: psycopg.Connection,
    prompt: str,
    *,
    status: str,
    error_code: str | None = None,
    error_message: str | None = None,
) -> UUID:
    """A finished conversation written straight to the database (for statuses hard to cause)."""
    conversation_id = uuid.uuid4()
    db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, completed_at, model, provider,
                                   error_code, error_message)
        VALUES (%s, %s, 'partial answer', %s, now(), 'demo', 'demo', %s, %s)
        """,
        (conversation_id, prompt, status, error_code, error_message),
    )
    return conversation_id


@contextmanager
def scratch_database(server_url: str | None) -> Iterator[str]:
    """An empty database on the test server for the length of a `with` block."""
    assert server_url is not None
    name = f"sse_llm_scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_database_outage_is_an_html_503_page() -> None:
    async def failing(request: Request) -> Response:
        raise psycopg.OperationalError("connection refused")

    app = Starlette(routes=[Route("/", html_errors(failing))])
    # The one part an error page needs (create_app's lifespan would make them all).
    app.state.service = SimpleNamespace(templates=create_templates())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as test_client:
        response = await test_client.get("/")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert "Database unavailable" in response.text
    assert "connection refused" not in response.text  # details stay in the log
    assert response.headers["content-security-policy"].startswith("default-src 'self'")


async def test_search_pages_match_the_api_whichever_way_they_are_found(
    client: httpx.Client, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = word()
    for n in range(6):
        create(client, f"{tag} hit {n}")
        create(client, f"no match here {n}")
    # A window of 2 rows makes most pages come from the full-text index instead.
    monkeypatch.setattr(history_queries, "_SEARCH_WINDOW_ROWS", 2)
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        for limit, offset in [(1, 0), (2, 0), (2, 1), (4, 2), (3, 5), (5, 6)]:
            rows = await history_queries.list_history_rows(
                pool, limit=limit, offset=offset, query=tag
            )
            expected = await history_queries.list_conversations(
                pool, limit=limit, offset=offset, query=tag
            )
            assert [row.id for row in rows.items] == [c.id for c in expected.items]
            assert rows.has_more == expected.has_more
