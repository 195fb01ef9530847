"""Seed a large history fast, then time `GET /history` and searches on it.

    DATABASE_URL=postgresql://... python benchmarks/seed_history.py --count 1000000
    python benchmarks/seed_history.py            # no DATABASE_URL: a temporary embedded one

Seeding runs in PostgreSQL (seed_conversations.py): generate_series in batches of
100,000 rows, `--jobs` connections (2) at once, the secondary indexes of the seeded
tables dropped during the load and rebuilt after it. The history looks like production
for every figure of issue 15: created_at spread over the past year; five models shared
unevenly (50/25/15/8/2%) over two providers; 91% completed, 5% failed (upstream_timeout,
upstream_error, storage_unavailable), 2.5% cancelled, 1.5% interrupted; log-normal time to
first chunk (150-3000 ms) and chunk gaps, so durations vary; 20-120 chunks; token counts,
~11% of them estimated; and a `deliveries` row per conversation (a second one for
clients who came back), ~3% of them ended before the final event. The `chunks` table is
not seeded: ended conversations are read from their `response`. Then `--reviews` reviews
(default: a tenth of `--count`) and a fifth as many annotations are seeded on them
(seed_reviews.py), the rollups are rebuilt, and the size of every table is measured.
Seeding stops adding rows (and goes on to the indexes) when the data folder's disk has
less than `--min-free-gb` left.

Then, unless `--no-time`, it starts `sse-llm serve` on that database and times each
request 20 times on a keep-alive connection over loopback (what a client sees; the
server's own time is this minus ~0.2 ms): the first page, a deep page, a status filter,
and searches for words from very common to rare, an absent word, a phrase, an
exclusion and two words. The target (issue 5) is under 50 ms. Results go to
benchmarks/results/history-<timestamp>.json and .md (history_check.py times every
page, filter and route of issue 15 by server time).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from seed_conversations import DiskGuard, mark_delivery_cuts, seed, table_sizes, vocabulary
from seed_reviews import rebuild_counts, seed_reviews

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.append(str(REPO))  # the project root: tests.support
from sse_llm.history_filters import SEARCH_VECTOR  # noqa: E402
from tests.support import free_port, wait_until  # noqa: E402

NOT_STARTED = "sse-llm did not start; see results/history-server.log"
RESULTS = HERE / "results"
TARGET_MS = 50.0

# Vocabulary ranks of the searched words and, with 50,000 words drawn as n * random()^3
# into ~80-word texts, roughly the share of conversations each one matches.
SEARCHED = [("very common, ~99%", 0), ("common, ~40%", 3), ("medium, ~10%", 20),
            ("uncommon, ~1%", 500), ("rare, ~0.05%", 40_000)]  # fmt: skip


def queries(words: list[str]) -> list[tuple[str, str]]:
    """(label, path) of the requests to time."""
    found = [(label, words[rank]) for label, rank in SEARCHED]
    common, medium, rare = words[3], words[20], words[40_000]
    quote = urllib.parse.quote
    paths = [
        ("first page", "/history"),
        ("page 101", "/history?offset=2000"),
        ("status filter", "/history?status=failed"),
        *((f"search, {label}", f"/history?q={word}") for label, word in found),
        ("search, absent word", "/history?q=zyzzyvaqua"),
        ("phrase, two common words", "/history?q=" + quote(f'"{words[0]} {common}"')),
        ("medium word, excluding a common one", "/history?q=" + quote(f"{medium} -{common}")),
        ("two words (AND)", "/history?q=" + quote(f"{medium} {rare}")),
        ("rare word + status", f"/history?q={rare}&status=completed"),
    ]  # fmt: skip
    return paths


def match_counts(database_url: str, words: list[str]) -> dict[str, int]:
    """How many conversations each searched word matches (not timed)."""
    counts = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        for word in [words[rank] for _, rank in SEARCHED]:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM conversations c"
                    " WHERE {vector} @@ websearch_to_tsquery('english', %s)"
                ).format(vector=SEARCH_VECTOR),
                (word,),
            ).fetchone()
            counts[word] = row[0] if row else 0
    return counts


@contextlib.contextmanager
def sse_llm_server(database_url: str) -> Iterator[int]:
    """`sse-llm serve` on the seeded database; yields its port."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "LLM_PROVIDER": "demo"}
    env.pop("SSE_LLM_API_KEY", None)
    log = (RESULTS / "history-server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sse_llm.cli", "serve", "--port", str(port)],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def ready() -> bool:
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return True
            if process.poll() is not None:
                raise RuntimeError(NOT_STARTED)
            return False

        wait_until(ready, 60, 0.3, NOT_STARTED, error=RuntimeError)
        yield port
    finally:
        process.terminate()
        process.wait(30)


def time_requests(port: int, paths: list[tuple[str, str]], repeat: int) -> list[dict[str, Any]]:
    """Each request `repeat` times after one warm-up: p50 and max in ms, and the item count."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    timings = []
    for label, path in paths:
        samples = []
        items = None
        for attempt in range(repeat + 1):
            began = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            elapsed = (time.perf_counter() - began) * 1000
            if response.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
            if attempt:
                samples.append(elapsed)
            items = len(json.loads(body)["items"])
        samples.sort()
        timings.append(
            {
                "query": label,
                "path": path,
                "items": items,
                "p50_ms": round(samples[len(samples) // 2], 2),
                "max_ms": round(samples[-1], 2),
                "under_target": samples[len(samples) // 2] < TARGET_MS,
            }
        )
    return timings


def markdown(report: dict[str, Any]) -> str:
    seeded = report["seed"]
    lines = [
        f"# History with {seeded['rows_total']:,} conversations — {report['started']}",
        "",
        f"Seeded {seeded['rows_seeded']:,} rows in {seeded['seconds_total']} s "
        f"(pools {seeded['seconds_pools']} s, insert {seeded['seconds_insert']} s, "
        f"indexes {seeded['seconds_indexes']} s); conversations table {seeded['table_size']}.",
        f"Matches: {', '.join(f'{w} {n:,}' for w, n in report['matches'].items())}.",
        "",
        f"| request | items | p50 ms | max ms ({report['repeat']} runs) | < {TARGET_MS:g} ms |",
        "|---|---|---|---|---|",
    ]
    for timing in report.get("timings", []):
        lines.append(
            f"| `{timing['path']}` ({timing['query']}) | {timing['items']} | {timing['p50_ms']}"
            f" | {timing['max_ms']} | {'yes' if timing['under_target'] else 'NO'} |"
        )
    return "\n".join(lines + size_lines(report["sizes"], seeded["rows_total"])) + "\n"


def size_lines(sizes: dict[str, dict[str, int]], conversations: int) -> list[str]:
    """The on-disk size table: per table, heap, TOAST and indexes, and bytes per conversation."""
    mib = 1024 * 1024
    lines = [
        "",
        "| table | rows | heap MiB | TOAST MiB | indexes MiB | total MiB | B/conversation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size in sizes.items():
        lines.append(
            f"| {name} | {size['rows']:,} | {size['heap'] / mib:,.0f} | {size['toast'] / mib:,.0f}"
            f" | {size['indexes'] / mib:,.0f} | {size['total'] / mib:,.0f}"
            f" | {size['total'] / max(1, conversations):,.0f} |"
        )
    total = sum(size["total"] for size in sizes.values())
    lines.append(f"| all | | | | | {total / mib:,.0f} | {total / max(1, conversations):,.0f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="conversations to add")
    parser.add_argument("--no-time", action="store_true", help="seed only, time nothing")
    parser.add_argument("--no-seed", action="store_true", help="time an existing database")
    parser.add_argument("--jobs", type=int, default=2, help="connections inserting at once")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per request")
    parser.add_argument("--data-dir", help="embedded PostgreSQL folder (default: temporary)")
    parser.add_argument(
        "--reviews", type=int, help="reviews to seed (default: count / 10; with --no-seed, none)"
    )
    parser.add_argument(
        "--min-free-gb", type=float, default=8.0,
        help="stop adding rows when the data folder's disk has less free (GB)",
    )  # fmt: skip
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
    began = time.monotonic()
    folder = ""
    with contextlib.ExitStack() as stack:
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            from sse_llm.database import EmbeddedPostgres

            folder = args.data_dir or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="sse-llm-history-")
            )
            database_url = stack.enter_context(EmbeddedPostgres(Path(folder))).url
            print(f"embedded PostgreSQL in {folder}", flush=True)
        from sse_llm.database import apply_migrations

        apply_migrations(database_url)
        words = vocabulary()
        if args.no_seed:
            with psycopg.connect(database_url) as conn:
                row = conn.execute("SELECT count(*) FROM conversations").fetchone()
            seeded: dict[str, Any] = {
                "rows_seeded": 0, "rows_total": row[0] if row else 0, "table_size": "?",
                "seconds_pools": 0, "seconds_insert": 0, "seconds_indexes": 0, "seconds_total": 0,
            }  # fmt: skip
        else:
            print(f"seeding {args.count:,} conversations ...", flush=True)
            guard = DiskGuard(Path(folder) if not os.environ.get("DATABASE_URL") else None,
                              args.min_free_gb)  # fmt: skip
            seeded = seed(database_url, args.count, args.jobs, guard)
            with psycopg.connect(database_url, autocommit=True) as conn:
                rebuild_counts(conn)
        # Also on an existing history: one seeded before migration 0014 has no flag yet.
        seeded["delivery_cuts_marked"] = mark_delivery_cuts(database_url)
        reviews = args.reviews
        if reviews is None:
            reviews = 0 if args.no_seed else args.count // 10
        if reviews:
            print(f"seeding {reviews:,} reviews ...", flush=True)
            seeded["reviews"] = seed_reviews(database_url, reviews)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("ANALYZE")  # the row estimates of the size table
        seeded["seconds_with_reviews"] = round(time.monotonic() - began, 1)
        report: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"),
            "seed": seeded,
            "repeat": args.repeat,
            "matches": match_counts(database_url, words),
            "sizes": table_sizes(database_url),
        }
        if not args.no_time:
            with sse_llm_server(database_url) as port:
                report["timings"] = time_requests(port, queries(words), args.repeat)
    text = markdown(report)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"history-{stamp}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"history-{stamp}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
