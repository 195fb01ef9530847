"""Shared fixtures: real PostgreSQL, a fake upstream on a real socket, servers on free ports."""

from __future__ import annotations

import os
import random
import string
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import uvicorn
from playwright.sync_api import Browser, sync_playwright
from psycopg import sql

from sse_llm.app import create_app
from sse_llm.config import Settings
from sse_llm.database import EmbeddedPostgres, apply_migrations
from sse_llm.http_protocol import BoundedHttpToolsProtocol
from tests.browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    RECORD_CSP_VIOLATIONS,
    BrowserPage,
    require_chromium,
)
from tests.fake_upstream import FakeUpstream
from tests.sse_client import stream_prompt
from tests.support import free_port, wait_until

__all__ = ["free_port"]  # other test modules import it from here too


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, migrated database for this test session.

    On the server `TEST_DATABASE_URL` names, or else on an embedded PostgreSQL in a
    temporary folder. Dropped at the end.
    """
    with tempfile.TemporaryDirectory(prefix="sse-llm-test-") as folder:
        server_url = os.environ.get("TEST_DATABASE_URL")
        embedded = None
        if not server_url:
            embedded = EmbeddedPostgres(Path(folder)).start()
            server_url = embedded.url
        name = f"sse_llm_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = with_database(server_url, name)
        apply_migrations(url)
        try:
            yield url
        finally:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            if embedded is not None:
                embedded.stop()


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextmanager
def separate_database(database_url: str, prefix: str) -> Iterator[str]:
    """A fresh, migrated database on the same server as `database_url`, dropped after."""
    name = f"sse_llm_{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(database_url, name)
    try:
        apply_migrations(url)
        yield url
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    """A fresh, migrated database on the test server, dropped afterwards (for statements
    that act on every row, such as the recovery sweeps)."""
    with separate_database(database_url, "own") as url:
        yield url


@pytest.fixture
def restartable_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A migrated PostgreSQL of the test's own, so it can be stopped, started and restarted."""
    postgres = EmbeddedPostgres(tmp_path).start()
    apply_migrations(postgres.url)
    yield postgres
    postgres.stop()


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    """A fake OpenAI-compatible server on a real socket, shared by the session."""

    with FakeUpstream() as fake:
        yield fake


@dataclass
class RunningServer:
    """An sse-llm app served by uvicorn on a free port, in a thread of this process."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread
    settings: Settings

    def stop(self) -> None:
        """Shut down as on SIGTERM (lifespan shutdown included) and wait for it."""
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "server did not stop"


def start_server(
    settings: Settings, http: type[BoundedHttpToolsProtocol] = BoundedHttpToolsProtocol
) -> RunningServer:
    """Serve `create_app(settings)` on a free port; return once it accepts requests."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings.with_changes(port=port)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=http,  # BoundedHttpToolsProtocol, as `sse-llm serve` runs it
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()

    def started() -> bool:
        if server.started:
            return True
        if not thread.is_alive():
            raise RuntimeError("the test server did not start")
        return False

    wait_until(started, 30, 0.01, "the test server did not start", error=RuntimeError)
    return RunningServer(f"http://127.0.0.1:{port}", server, thread, settings)


@pytest.fixture(scope="session")
def base_settings(database_url: str) -> Settings:
    """Settings for test servers: the test database, a quick demo provider."""
    return Settings(
        database_url=database_url,
        provider="demo",
        demo_tokens=12,
        demo_tokens_per_second=200,
        shutdown_grace=2,
        # Off: tests look at the chunk rows of ended conversations; test_compaction.py
        # runs it where it is tested.
        compaction_interval=0,
    )


@pytest.fixture(scope="session")
def demo_server(base_settings: Settings) -> Iterator[RunningServer]:
    """A server on the demo provider, shared by the session."""
    running = start_server(base_settings)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def openai_server(base_settings: Settings, upstream: FakeUpstream) -> Iterator[RunningServer]:
    """A server on the openai provider pointed at the fake upstream, with short timeouts."""
    settings = base_settings.with_changes(
        provider="openai",
        openai_base_url=upstream.base_url,
        openai_api_key="test-upstream-key",
        model="fake-model",
        first_chunk_timeout=1.0,
        chunk_timeout=1.0,
        total_timeout=20.0,
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """A plain connection to look at what the service stored."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def client(demo_server: RunningServer) -> Iterator[httpx.Client]:
    """An HTTP client of the shared demo server."""
    with httpx.Client(base_url=demo_server.url) as client:
        yield client


def word() -> str:
    """A made-up word no other test uses (letters only, so the English stemmer keeps it)."""
    return "zq" + "".join(random.choices(string.ascii_lowercase, k=10))


def create(client: httpx.Client, prompt: str) -> str:
    """Stream a prompt's answer to the end; return the conversation's id."""
    response, events = stream_prompt(client, prompt)
    assert events[-1].event == "done"
    return response.headers["x-conversation-id"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for one test module. Not for the session: Playwright's sync API keeps an
    event loop on this thread while it runs, and the asyncio tests of later modules could
    not start theirs."""
    require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def tab(browser: Browser) -> Iterator[BrowserPage]:
    """A fresh page; the test fails on any problem the page had (but `tab.expected` ones)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = context.new_page()
    tab = BrowserPage(page, context)
    page.on("console", tab.on_console)
    page.on("pageerror", lambda error: tab.problems.append(f"uncaught: {error}"))
    yield tab
    context.close()
    assert [p for p in tab.problems if not any(e in p for e in tab.expected)] == []
