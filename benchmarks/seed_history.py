"""Seed a large history fast, then time `GET /history` and searches on it.

    DATABASE_URL=postgresql://... python benchmarks/seed_history.py --count 1000000
    python benchmarks/seed_history.py            # no DATABASE_URL: a temporary embedded one

Seeding runs in PostgreSQL (generate_series), in batches of 100,000 rows: prompts and
responses are drawn from pools of random sentences over a Zipf-like vocabulary of
pseudo-words (so full-text search meets common, medium and rare words, like real text),
created_at spreads over the past year, ~5% of conversations are `failed`, and five
models share them unevenly (50/25/15/8/2%). The table's
secondary indexes are dropped during the load and rebuilt after it with their exact
definitions (one index build is far cheaper than a million index insertions), and
`--jobs` connections (2) insert at once: the generated tsvector column is the cost. The
`chunks` table is not seeded: ended conversations are read from their `response`.
Then `--reviews` reviews (default: a tenth of `--count`) and a fifth as many annotations
are seeded on them (seed_reviews.py), and the `conversation_counts` rollup is rebuilt.

Then, unless `--no-time`, it starts `sse-llm serve` on that database and times each
request 20 times on a keep-alive connection over loopback (what a client sees; the
server's own time is this minus ~0.2 ms): the first page, a deep page, a status filter,
and searches for words from very common to rare, an absent word, a phrase, an
exclusion and two words. The target (issue 5) is under 50 ms. Results go to
benchmarks/results/history-<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import random
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
from seed_reviews import rebuild_counts, seed_reviews

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.append(str(REPO))  # the project root: tests.support
from sse_llm.history_filters import SEARCH_VECTOR  # noqa: E402
from tests.support import free_port, wait_until  # noqa: E402

NOT_STARTED = "sse-llm did not start; see results/history-server.log"
RESULTS = HERE / "results"
BATCH = 100_000
TARGET_MS = 50.0

SYLLABLES = [
    "ka", "lo", "mi", "ren", "tas", "vo", "dun", "pe", "ri", "sol", "ma", "tor", "ni", "gal",
    "be", "ux", "fen", "dra", "mo", "lis", "quo", "zer", "an", "tel", "vik", "os", "pra",
    "nu", "hel", "sar",
]  # fmt: skip


def vocabulary(size: int = 50_000) -> list[str]:
    """Distinct pseudo-words, most frequent first (the seed fixes them, run after run)."""
    rng = random.Random(5)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def sentences(words: list[str], count: int, low: int, high: int, rng: random.Random) -> list[str]:
    """`count` texts of `low..high` words; a word's rank is ~ n * random()^3, so a few words
    are in most texts and most words are rare."""
    size = len(words)
    return [
        " ".join(words[int(size * rng.random() ** 3)] for _ in range(rng.randint(low, high)))
        for _ in range(count)
    ]


INSERT_SQL = """
    INSERT INTO conversations
        (id, prompt, response, status, created_at, first_chunk_at, completed_at,
         model, provider, chunk_count, error_code, error_message)
    SELECT gen_random_uuid(),
           p.text,
           r1.text || ' ' || r2.text,
           CASE WHEN g %% 20 = 0 THEN 'failed' ELSE 'completed' END,
           t.created_at,
           t.created_at + interval '300 ms',
           t.created_at + interval '3 s',
           CASE WHEN g %% 100 < 50 THEN 'gpt-4o-mini' WHEN g %% 100 < 75 THEN 'gpt-4o'
                WHEN g %% 100 < 90 THEN 'claude-sonnet' WHEN g %% 100 < 98 THEN 'llama-70b'
                ELSE 'mistral-large' END,
           'openai', 40 + g %% 60,
           CASE WHEN g %% 20 = 0 THEN 'upstream_timeout' END,
           CASE WHEN g %% 20 = 0 THEN 'The model went silent.' END
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
    JOIN seed_prompts p ON p.n = (g * 7919) %% %(pool)s
    JOIN seed_responses r1 ON r1.n = (g * 104729) %% %(pool)s
    JOIN seed_responses r2 ON r2.n = (g * 1299709 + 17) %% %(pool)s
    CROSS JOIN LATERAL (
        SELECT now() - (%(count)s - g) * (interval '365 days' / %(count)s)
               - random() * interval '1 s' AS created_at
    ) AS t
"""


def seed(database_url: str, count: int, jobs: int, pool: int = 20_000) -> dict[str, Any]:
    """Insert `count` conversations with `jobs` connections in parallel; returns timings."""
    words = vocabulary()
    began = time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        # PostgreSQL 18 builds GIN indexes in parallel too.
        conn.execute(f"SET max_parallel_maintenance_workers = {max(0, jobs - 1)}")
        # Pools of texts made here and combined in SQL: rows get varied text for the
        # cost of 40,000 sentences, not a million.
        rng = random.Random(1)
        for name, low, high in (("seed_prompts", 6, 15), ("seed_responses", 25, 55)):
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(f"CREATE UNLOGGED TABLE {name} (n integer PRIMARY KEY, text text)")
            with conn.cursor().copy(f"COPY {name} (n, text) FROM STDIN") as copy:
                for n, text in enumerate(sentences(words, pool, low, high, rng)):
                    copy.write_row((n, text))
        indexes = conn.execute(
            """
            SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
            FROM pg_index i
            WHERE i.indrelid = 'conversations'::regclass AND NOT i.indisprimary
            """
        ).fetchall()
        # The statistics targets of expression indexes (the search's: migration 0015),
        # which their definitions do not carry.
        targets = conn.execute(
            """
            SELECT format('ALTER INDEX %s ALTER COLUMN %s SET STATISTICS %s',
                          a.attrelid::regclass, a.attnum, a.attstattarget)
            FROM pg_attribute a JOIN pg_index i ON i.indexrelid = a.attrelid
            WHERE i.indrelid = 'conversations'::regclass AND a.attstattarget > 0
            """
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f"DROP INDEX {name}")  # rebuilt below with the same definition
        pools_done = time.monotonic()
        try:
            batches = [(first, min(count, first + BATCH) - 1) for first in range(0, count, BATCH)]
            with concurrent.futures.ThreadPoolExecutor(jobs) as executor:
                work = [
                    executor.submit(insert_batches, database_url, batches[job::jobs], pool, count)
                    for job in range(jobs)
                ]
                for future in work:
                    future.result()
        finally:
            inserted = time.monotonic()
            for name, definition in indexes:
                print(f"  rebuilding {name}", flush=True)
                conn.execute(definition)
            for (target,) in targets:
                conn.execute(target)
            conn.execute("DROP TABLE IF EXISTS seed_prompts, seed_responses")
        conn.execute("ANALYZE conversations")
        total = conn.execute("SELECT count(*) FROM conversations").fetchone()
        size = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('conversations'))"
        ).fetchone()
    finished = time.monotonic()
    return {
        "rows_seeded": count,
        "rows_total": total[0] if total else None,
        "table_size": size[0] if size else None,
        "seconds_pools": round(pools_done - began, 1),
        "seconds_insert": round(inserted - pools_done, 1),
        "seconds_indexes": round(finished - inserted, 1),
        "seconds_total": round(finished - began, 1),
    }


def insert_batches(
    database_url: str, batches: list[tuple[int, int]], pool: int, count: int
) -> None:
    """One connection's share of the batches, each its own transaction."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        for first, last in batches:
            conn.execute(
                INSERT_SQL,  # type: ignore[arg-type]
                {"first": first, "last": last, "pool": pool, "count": count},
            )
            print(f"  rows {first + 1:,}..{last + 1:,} of {count:,}", flush=True)


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
    return "\n".join(lines) + "\n"


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
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
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
            seeded = seed(database_url, args.count, args.jobs)
            with psycopg.connect(database_url, autocommit=True) as conn:
                rebuild_counts(conn)
        reviews = args.reviews
        if reviews is None:
            reviews = 0 if args.no_seed else args.count // 10
        if reviews:
            print(f"seeding {reviews:,} reviews ...", flush=True)
            seeded["reviews"] = seed_reviews(database_url, reviews)
        report: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"),
            "seed": seeded,
            "repeat": args.repeat,
            "matches": match_counts(database_url, words),
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
