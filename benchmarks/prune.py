"""Prune a large history while streams run: the streaming p99 without and with pruning.

    python benchmarks/seed_history.py --count 1000000 --no-time --data-dir /work/data/retention
    nice -n 10 python benchmarks/prune.py --data-dir /work/data/retention

Starts the embedded PostgreSQL of `--data-dir` (migrating it), the fake upstream
(upstream.py) and `sse-llm serve` on it (LLM_PROVIDER=openai, pointed at the upstream),
then, back to back on the same database: `--runs` load runs of `--seconds` each without
pruning (load.py: C streams of 50 chunks, one every 50 ms), then the same load runs,
repeated until it ends, while `retention.prune` deletes every conversation older than
`--older-than` days (reviewed ones included, as `sse-llm prune --include-reviewed`). It
reports each run's steady chunk-latency p50/p99/max, the prune's rate (rows/s), its
batches and the longest, and writes benchmarks/results/prune-<timestamp>.json and .md.
Nothing is pinned: on a shared machine, compare the two conditions of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.append(str(REPO))  # the project root: tests.support
from sse_llm import retention  # noqa: E402
from sse_llm.database import EmbeddedPostgres, apply_migrations  # noqa: E402
from tests.support import free_port, wait_until  # noqa: E402

RESULTS = HERE / "results"


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A child process, its output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )


def load_run(
    url: str, concurrency: int, seconds: float, server: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """One load.py run; its JSON summary. Raises if the server is gone (a stray signal)."""
    if server.poll() is not None:
        raise RuntimeError(f"sse-llm exited with {server.returncode}: see its log")
    result = subprocess.run(
        [sys.executable, str(HERE / "load.py"), "--url", url, "-c", str(concurrency),
         "-s", str(concurrency * 10_000), "--max-seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return summary


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run worth a table's row."""
    steady = summary["steady_chunk_latency_ms"]
    return {
        "streams": summary["streams"],
        "failed": summary["streams_failed"],
        "chunks_per_second": round(summary["steady_chunks_per_second"] or 0),
        "p50_ms": steady["p50"],
        "p99_ms": steady["p99"],
        "max_ms": steady["max"],
    }


def prune_in_thread(database_url: str, older_than: float, out: dict[str, Any]) -> threading.Thread:
    """Run retention.prune in a thread of its own; fill `out` with its figures."""
    batches: list[float] = []

    def on_batch(result: retention.PruneResult) -> None:
        batches.append(result.last_batch_seconds)

    def work() -> None:
        began = time.monotonic()
        result = asyncio.run(
            retention.prune(database_url, older_than, include_reviewed=True, on_batch=on_batch)
        )
        out.update(
            deleted=result.deleted,
            batches=result.batches,
            seconds=round(time.monotonic() - began, 1),
            rows_per_second=round(result.deleted / result.seconds) if result.seconds else None,
            batch_ms_p50=round(statistics.median(batches) * 1000, 1) if batches else None,
            batch_ms_p99=round(sorted(batches)[int(len(batches) * 0.99)] * 1000, 1)
            if batches
            else None,
            longest_batch_ms=round(result.longest_batch_seconds * 1000, 1),
        )

    thread = threading.Thread(target=work, name="pruner")
    thread.start()
    return thread


def counts(database_url: str) -> dict[str, int]:
    """Rows in the tables a prune empties."""
    with psycopg.connect(database_url) as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("conversations", "reviews", "annotations", "chunks", "deliveries")
        }


def report(result: dict[str, Any]) -> str:
    """The results as Markdown."""
    lines = [
        f"# Prune while streaming ({result['started']})",
        "",
        f"Load: C={result['concurrency']} streams of 50 chunks every 50 ms, runs of "
        f"{result['seconds']} s; both conditions back to back on one database, on a machine "
        "shared with other engineers' work (nothing pinned).",
        "",
        "| condition | run | streams | failed | chunks/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for condition in ("without_pruning", "with_pruning"):
        for n, run in enumerate(result[condition], 1):
            lines.append(
                f"| {condition.replace('_', ' ')} | {n} | {run['streams']} | {run['failed']} | "
                f"{run['chunks_per_second']} | {run['p50_ms']:.1f} | {run['p99_ms']:.1f} | "
                f"{run['max_ms']:.1f} |"
            )
    prune = result["prune"]
    lines += [
        "",
        f"Prune: {prune['deleted']:,} conversations in {prune['seconds']} s "
        f"({prune['rows_per_second']:,} rows/s), {prune['batches']} batches of "
        f"{retention.BATCH_SIZE}: p50 {prune['batch_ms_p50']} ms, p99 {prune['batch_ms_p99']} "
        f"ms, longest {prune['longest_batch_ms']} ms.",
        f"Rows before: {result['before']}; after: {result['after']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the seeded embedded PostgreSQL")
    parser.add_argument("--older-than", type=float, default=0.01, help="days (0.01: 14 min)")
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30, help="length of one load run")
    parser.add_argument("--runs", type=int, default=3, help="load runs without pruning")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    result: dict[str, Any] = {"started": stamp, "concurrency": args.concurrency}
    result["seconds"] = args.seconds
    with EmbeddedPostgres(Path(args.data_dir)) as postgres:
        database_url = postgres.url
        apply_migrations(database_url)
        result["before"] = counts(database_url)
        upstream_port, port = free_port(), free_port()
        upstream = start(
            [sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)],
            RESULTS / f"prune-{stamp}-upstream.log",
        )
        server = start(
            [sys.executable, "-m", "sse_llm.cli", "serve", "--port", str(port)],
            RESULTS / f"prune-{stamp}-server.log",
            DATABASE_URL=database_url,
            LLM_PROVIDER="openai",
            OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
            OPENAI_API_KEY="bench",
            LLM_MODEL="bench",
            SSE_LLM_MAX_STREAMS="20000",
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _up(url), 60, 0.2, "sse-llm did not start", error=RuntimeError)
            result["without_pruning"] = []
            for _ in range(args.runs):
                result["without_pruning"].append(
                    figures(load_run(url, args.concurrency, args.seconds, server))
                )
                print(result["without_pruning"][-1], flush=True)
            prune: dict[str, Any] = {}
            thread = prune_in_thread(database_url, args.older_than, prune)
            result["with_pruning"] = []
            while thread.is_alive():
                result["with_pruning"].append(
                    figures(load_run(url, args.concurrency, args.seconds, server))
                )
                print(result["with_pruning"][-1], flush=True)
            thread.join()
            result["prune"] = prune
            print(prune, flush=True)
        finally:
            for process in (server, upstream):
                process.terminate()
                process.wait(30)
        result["after"] = counts(database_url)
    (RESULTS / f"prune-{stamp}.json").write_text(json.dumps(result, indent=2))
    text = report(result)
    (RESULTS / f"prune-{stamp}.md").write_text(text)
    print(text)
    return 0


def _up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
