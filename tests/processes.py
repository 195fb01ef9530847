"""Real `sse-llm serve` processes for tests about processes: crash, signals, replicas."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from tests.sse_client import Event, iter_events
from tests.support import free_port, wait_until


@dataclass
class ServerProcess:
    """`sse-llm serve` running as a child process."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(30)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.wait(10)


def spawn_server(database_url: str, *args: str, **env: str) -> ServerProcess:
    """Start `sse-llm serve ARGS` on a free port with extra environment; wait until it answers."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="sse-llm-server-", suffix=".log")[1])
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "LLM_PROVIDER": "demo",
        "SSE_LLM_PORT": str(port),
        "SSE_LLM_COMPACTION_INTERVAL": "0",  # as in conftest's base_settings
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sse_llm.cli", "serve", *args],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)

    def healthy() -> bool:
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("exited")
        return False

    try:
        wait_until(healthy, 30, 0.1, "timed out", error=RuntimeError)
    except RuntimeError:
        server.stop()
        raise RuntimeError(f"sse-llm serve did not start:\n{server.log()}") from None
    return server


class BackgroundStream:
    """POST /stream read to the end by a thread, so the test can act meanwhile."""

    def __init__(self, url: str, prompt: str) -> None:
        self.events: list[Event] = []
        self.conversation_id = ""
        self._started = threading.Event()
        self.chunks_seen = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._run, args=(url, prompt), daemon=True)
        self._thread.start()
        assert self._started.wait(10), "the stream did not start"

    def _run(self, url: str, prompt: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/stream", json={"prompt": prompt}, timeout=60) as r:
                self.conversation_id = r.headers["x-conversation-id"]
                self._started.set()
                for event in iter_events(r):
                    self.events.append(event)
                    if event.event == "message":
                        self.chunks_seen.release()
        except httpx.HTTPError:
            pass  # the server died: keep what arrived

    def wait_chunks(self, count: int, timeout: float = 10) -> None:
        for _ in range(count):
            assert self.chunks_seen.acquire(timeout=timeout), "chunks stopped arriving"

    def join(self, timeout: float = 60) -> list[Event]:
        self._thread.join(timeout=timeout)
        return self.events


def stored(database_url: str, conversation_id: str) -> tuple[str, str, int]:
    """The status, response and chunk count recorded for a conversation."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, response, chunk_count FROM conversations WHERE id = %s",
            (conversation_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]
