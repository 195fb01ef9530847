"""The drain on SIGTERM holds for streams that arrive while it starts (SPEC 7)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import psycopg
import pytest

from tests.conftest import word
from tests.processes import spawn_server
from tests.sse_client import Event, iter_events
from tests.test_operations import backend_waiting_for_lock
from tests.test_processes import BackgroundStream, stored


class LateStream:
    """POST /stream from a thread whose answer may take a while to begin."""

    def __init__(self, url: str, prompt: str) -> None:
        self.status = 0
        self.conversation_id = ""
        self.events: list[Event] = []
        self._thread = threading.Thread(target=self._run, args=(url, prompt), daemon=True)
        self._thread.start()

    def _run(self, url: str, prompt: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/stream", json={"prompt": prompt}, timeout=60) as r:
                self.status = r.status_code
                self.conversation_id = r.headers.get("x-conversation-id", "")
                self.events.extend(iter_events(r))
        except httpx.HTTPError:
            pass  # the server went away: keep what arrived

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the late stream did not end"


@pytest.mark.slow
def test_a_stream_whose_row_is_created_while_the_drain_waits_ends_interrupted(
    database_url: str, db: psycopg.Connection
) -> None:
    """A request admitted just before SIGTERM, still waiting for its row (the table is
    locked) when the grace period ends: once created, its stream is stopped and awaited
    like the others. Its client hears `interrupted`, and the row says so."""
    server = spawn_server(
        database_url,
        DEMO_TOKENS="200",
        DEMO_TOKENS_PER_SECOND="20",
        SSE_LLM_SHUTDOWN_GRACE="1",
    )
    tag = word()
    try:
        running = BackgroundStream(server.url, f"{tag} running")
        running.wait_chunks(1)
        with psycopg.connect(database_url) as blocker:
            blocker.execute("LOCK TABLE conversations IN SHARE MODE")  # new rows wait
            late = LateStream(server.url, f"{tag} late")
            backend_waiting_for_lock(db, "INSERT INTO conversations")  # admitted, row pending
            server.signal(signal.SIGTERM)
            time.sleep(2.5)  # the grace period ends; the running stream is stopped
            blocker.rollback()
        late.join(30)
        assert server.wait(30) == 0
    finally:
        server.stop()
    assert late.status == 200
    assert [event.event for event in late.events] == ["start", "error"]
    assert late.events[-1].json["error"]["code"] == "interrupted"
    assert stored(database_url, late.conversation_id) == ("interrupted", "", 0)
    assert running.join()[-1].event == "error"
    assert stored(database_url, running.conversation_id)[0] == "interrupted"
