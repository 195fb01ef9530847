"""Time GET /export over a large history: rows/s, and the server's memory, sampled each second.

    python benchmarks/seed_history.py --count 1000000 --no-time --data-dir /work/data/export
    nice -n 10 python benchmarks/export.py --data-dir /work/data/export

Starts the embedded PostgreSQL of `--data-dir` (or uses DATABASE_URL), then `sse-llm serve`
on it, and downloads the whole history once per format (jsonl, csv, openai), plus the
fine-tuning set (`format=openai&consensus=good`, walked from the reviews' side), reading
as fast as the client can. Every second it samples the server's resident memory
(VmRSS of its process) and the export connection's `backend_xmin` in pg_stat_activity:
memory that stays flat while a million rows pass is the constant-memory claim, and an
xmin that is mostly NULL is the claim that no snapshot is held across pages.
Results go to benchmarks/results/export-<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from seed_history import sse_llm_server

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.append(str(REPO))
from sse_llm.export_queries import APPLICATION_NAME  # noqa: E402

RESULTS = HERE / "results"
CASES = [
    ("jsonl", "format=jsonl"),
    ("csv", "format=csv"),
    ("openai", "format=openai"),
    ("openai, consensus=good", "format=openai&consensus=good"),
]


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def server_pid(port: int) -> int:
    """The process listening on `port` (sse-llm serve runs uvicorn in its own process)."""
    wanted = f":{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(wanted) and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return int(proc.name)
    raise RuntimeError(f"no process listens on {port}")


class Sampler:
    """Every second: the server's RSS and the export backend's xmin, until stopped."""

    def __init__(self, pid: int, database_url: str) -> None:
        self.pid = pid
        self.database_url = database_url
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self._stop.wait(1.0):
                row = conn.execute(
                    "SELECT state, backend_xmin::text FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    [APPLICATION_NAME],
                ).fetchone()
                self.samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "rss_mib": round(rss_kib(self.pid) / 1024, 1),
                        "state": row[0] if row else None,
                        "xmin": row[1] if row else None,
                    }
                )


def download(port: int, query: str) -> tuple[int, int, float]:
    """GET /export?query read to the end: (lines, bytes, seconds)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request("GET", f"/export?{query}")
    response = connection.getresponse()
    assert response.status == 200, response.read()[:500]
    lines = size = 0
    while piece := response.read(1 << 20):
        lines += piece.count(b"\n")
        size += len(piece)
    return lines, size, time.perf_counter() - started


def run_case(port: int, pid: int, database_url: str, name: str, query: str) -> dict[str, Any]:
    before = rss_kib(pid) / 1024
    with Sampler(pid, database_url) as sampler:
        lines, size, seconds = download(port, query)
    rows = lines - 1 if name == "csv" else lines  # the header
    rss = [sample["rss_mib"] for sample in sampler.samples] or [before]
    with_xmin = sum(1 for sample in sampler.samples if sample["xmin"] is not None)
    result = {
        "case": name,
        "query": query,
        "rows": rows,
        "megabytes": round(size / 2**20, 1),
        "seconds": round(seconds, 1),
        "rows_per_second": round(rows / seconds),
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": max(rss),
        "rss_min_mib": min(rss),
        "samples": len(sampler.samples),
        "samples_with_xmin": with_xmin,
        "rss_series_mib": rss,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_series_mib"}), flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GET /export over {report['conversations']:,} conversations — {report['started']}",
        "",
        "Whole history per format, one client reading as fast as it can, server and",
        "PostgreSQL on this 2-core machine (shared), under `nice -n 10`. RSS: the server",
        "process, sampled every second; xmin: samples where the export's connection held",
        "a snapshot (it is between statements the rest of the time).",
        "",
        "| export | rows | MB | s | rows/s | RSS before | RSS min-peak (MiB) | samples with xmin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        lines.append(
            f"| {r['case']} | {r['rows']:,} | {r['megabytes']:,} | {r['seconds']} | "
            f"{r['rows_per_second']:,} | {r['rss_before_mib']} | "
            f"{r['rss_min_mib']}-{r['rss_peak_mib']} | {r['samples_with_xmin']}/{r['samples']} |"
        )
    lines += ["", "RSS every second (MiB):", ""]
    for r in report["cases"]:
        lines.append(f"- {r['case']}: {' '.join(str(v) for v in r['rss_series_mib'])}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def database(args: argparse.Namespace) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from sse_llm.database import EmbeddedPostgres

    with EmbeddedPostgres(Path(args.data_dir)) as postgres:
        yield postgres.url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/work/data/export", help="embedded PostgreSQL")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
    chosen = [c for c in CASES if not args.cases or c[0] in args.cases.split(",")]
    with database(args) as url, sse_llm_server(url) as port:
        pid = server_pid(port)
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM conversations").fetchone()
        report: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"),
            "conversations": row[0] if row else 0,
            "cases": [run_case(port, pid, url, name, query) for name, query in chosen],
        }
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"export-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"export-{stamp}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
