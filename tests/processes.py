"""Real `sse-llm serve` processes for tests about processes: crash, signals, replicas."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port


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
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"sse-llm serve did not start:\n{server.log()}")
        time.sleep(0.1)
