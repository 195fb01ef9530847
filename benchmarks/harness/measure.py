"""The measured run: load.py against one server, and what the server spent on it.

load.py reports what clients saw (TTFC, per-chunk latency, chunks/s, protocol checks,
and with --verify the stored answers against the received ones); this module adds the
server's CPU seconds (every process of the server, PostgreSQL counted apart), its peak
RSS, what else ran on its CPU meanwhile and, for sse-llm, the writer's commits.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from harness.config import HERE, PYTHON, REPO
from harness.processes import Bench, Server, checkpoint, http_get, persist_batches

STREAMS_DONE = '{"phase": "streams_done"}'  # load.py's line between streaming and verifying


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
    """The summed resident memory of `processes`."""
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


@dataclass
class Clocks:
    """CPU counters of the server, its database and its CPUs from a run's start."""

    server: Server
    cpus: set[int] | None
    measured: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cpu_before = cpu_seconds(self.server.server_processes())
        self.db_before = cpu_seconds(self.server.database_processes())
        self.busy_before, self.steal_before = busy_and_steal(self.cpus)
        self.started = time.monotonic()

    def stop(self) -> None:
        """Read every counter now: the end of the measured window."""
        server = self.server
        self.measured["cpu"] = cpu_delta(self.cpu_before, cpu_seconds(server.server_processes()))
        self.measured["db_cpu"] = cpu_delta(
            self.db_before, cpu_seconds(server.database_processes())
        )
        self.measured["busy"], self.measured["steal"] = busy_and_steal(self.cpus)
        self.measured["wall"] = time.monotonic() - self.started

    def others_and_stolen(self) -> tuple[float, float]:
        """% of the server's CPUs used by other processes, and taken by the hypervisor."""
        # Other users' processes, and the kernel's share of loopback networking.
        cores = len(self.cpus) if self.cpus else os.cpu_count() or 1
        window = self.measured["wall"] * cores
        others = max(0.0, self.measured["busy"] - self.busy_before - self.measured["cpu"])
        stolen = max(0.0, self.measured["steal"] - self.steal_before)
        return others / window * 100, stolen / window * 100


def load_command(
    bench: Bench, server: Server, concurrency: int, streams: int, chunks: int, verify: bool
) -> list[str]:
    """The load.py command line of one run."""
    config = bench.config
    command = [PYTHON, str(HERE / "load.py"), "--url", server.url]
    command += ["-c", str(concurrency), "-s", str(streams), "--chunks", str(chunks)]
    command += ["--interval-ms", str(config.interval_ms), "--max-seconds", str(config.max_seconds)]
    if server.verify and verify:
        command.append("--verify")
    return command


def drive(
    bench: Bench, server: Server, command: list[str], clocks: Clocks
) -> tuple[dict[str, Any], int]:
    """Run load.py, stop the clocks when its streams are done; (its result, peak RSS)."""
    streams_done = threading.Event()
    lines: list[str] = []
    load = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        preexec_fn=bench.prepare_load(),
    )

    def read_output() -> None:
        assert load.stdout is not None
        for raw in load.stdout:
            line = raw.decode().strip()
            if line == STREAMS_DONE:
                clocks.stop()  # the stream phase is over: not the verification's reads
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
    if "cpu" not in clocks.measured:  # no verification: the process ended with the streams
        clocks.stop()
    return json.loads(lines[-1]), peak_rss


def run_load(
    bench: Bench,
    server: Server,
    concurrency: int,
    streams: int,
    chunks: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Run load.py against `server` and add the server-side figures."""
    command = load_command(
        bench, server, concurrency, streams, chunks or bench.config.chunks, verify
    )
    http_get(f"{bench.upstream_url}/stats?reset")
    checkpoint(server)
    batches_before = persist_batches(server)
    clocks = Clocks(server, bench.server_cpus)
    result, peak_rss = drive(bench, server, command, clocks)
    others, stolen = clocks.others_and_stolen()
    received = result["chunks_received"] or 1
    measured = clocks.measured
    result.update(
        server=server.name,
        seconds=round(time.monotonic() - clocks.started, 1),
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
        upstream=json.loads(http_get(f"{bench.upstream_url}/stats")),
        server_cpu_busy_by_others_pct=round(others, 1),
        server_cpu_steal_pct=round(stolen, 1),
    )
    batches = persist_batches(server) - batches_before
    if server.postgres_marker and batches > 0:
        result["persist_batches"] = batches
        result["chunks_per_batch"] = round(result["chunks_received"] / batches, 2)
    server.largest_run = max(server.largest_run, concurrency)
    return result


def warm_up(bench: Bench, server: Server) -> None:
    """A few short streams (imports, pools, first connections), then the idle RSS."""
    run_load(bench, server, concurrency=4, streams=8, chunks=5)
    time.sleep(1)
    server.idle_rss = rss_bytes(server.server_processes())
    server.largest_run = 0
