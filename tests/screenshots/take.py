"""Take the README's dashboard screenshots: each page at 1280 and 375 px, light and dark.

    python tests/screenshots/take.py

Starts an embedded PostgreSQL in a temporary folder, serves the app on it with the demo
provider, adds a few conversations (a failed and a cancelled one written directly), and
drives Debian's Chromium with Playwright, as the browser tests do.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import httpx
import psycopg
from playwright.sync_api import sync_playwright

from sse_llm.config import Settings
from sse_llm.database import EmbeddedPostgres
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import start_server

OUT = Path(__file__).resolve().parent
PROMPTS = [
    "List three ways a client can resume a dropped stream",
    "What is the difference between EventSource and a fetch() stream?",
    "Write a haiku about PostgreSQL",
    "Summarize the trade-offs of group commit for chunk persistence",
    "Draft a polite reply declining Thursday's meeting",
    "Explain server-sent events in one paragraph, with an example of the wire format:"
    "\n\nevent: start\ndata: {...}",
]
ENDED_BADLY = """
    INSERT INTO conversations (id, prompt, response, status, created_at, first_chunk_at,
        completed_at, model, provider, chunk_count, error_code, error_message)
    VALUES (%s, 'Translate this contract into French', 'Voici la traduction du', 'failed',
            now() - interval '31 s', now() - interval '30.6 s', now(), 'gpt-4o-mini', 'openai', 5,
            'upstream_timeout', 'The model sent nothing for 30 s.'),
           (%s, 'Write a long story about a lighthouse keeper', 'Once upon a time, on a rocky',
            'cancelled', now() - interval '2 s', now() - interval '1.7 s', now(), 'gpt-4o-mini',
            'openai', 7, 'cancelled', 'Cancelled by a client.')
"""


def seed(url: str, database_url: str) -> str:
    """Add the example conversations; return the id of the one the detail shot shows."""
    ids = []
    with httpx.Client(base_url=url) as client:
        for n, prompt in enumerate(PROMPTS):
            if n == 3:
                with psycopg.connect(database_url, autocommit=True) as conn:
                    conn.execute(ENDED_BADLY, (uuid.uuid4(), uuid.uuid4()))
            with client.stream("POST", "/stream", json={"prompt": prompt}) as response:
                ids.append(response.headers["x-conversation-id"])
                response.read()
    return ids[-1]


def shoot(url: str, detail_id: str) -> None:
    """Every page, at two widths, in both colour schemes."""
    pages = {
        "history": "/",
        "search": "/?q=stream",
        "detail": f"/conversations/{detail_id}",
        "playground": "/playground",
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for scheme in ("light", "dark"):
            for width, height in ((1280, 860), (375, 760)):
                context = browser.new_context(
                    viewport={"width": width, "height": height},
                    color_scheme=scheme,
                )
                page = context.new_page()
                for name, path in pages.items():
                    page.goto(url + path)
                    if name == "playground":
                        page.get_by_role("button", name="Send").click()
                        page.locator("#answer-status").filter(has_text="finished").wait_for()
                    # The lists show one screenful; the single conversation shows whole.
                    whole = name in ("detail", "playground")
                    page.screenshot(path=str(OUT / f"{name}-{width}-{scheme}.png"), full_page=whole)
                context.close()
        browser.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sse-llm-screenshots-") as folder:
        postgres = EmbeddedPostgres(Path(folder)).start()
        try:
            settings = Settings(
                database_url=postgres.url,
                demo_tokens=45,
                demo_tokens_per_second=200,
                shutdown_grace=1,
            )
            server = start_server(settings)
            try:
                shoot(server.url, seed(server.url, postgres.url))
            finally:
                server.stop()
        finally:
            postgres.stop()


if __name__ == "__main__":
    main()
