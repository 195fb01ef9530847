"""Seed conversations and their deliveries fast, in PostgreSQL (imported by seed_history.py).

Rows are made by generate_series in batches of 100,000 rows, `jobs` connections at once;
prompts and responses come from pools of random sentences over a Zipf-like vocabulary of
pseudo-words (so full-text search meets common, medium and rare words, like real text).
Each row's status, error code, times, chunk count and token counts are drawn to look like
production (the comments on DRAWS and INSERT_SQL give the shares). The seeded tables'
secondary indexes, read from the live schema (so later migrations' indexes are included),
are dropped during the load and rebuilt after it with their exact definitions: one index
build is far cheaper than millions of index insertions.
"""

from __future__ import annotations

import concurrent.futures
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from sse_llm.contract import INTERRUPTED_MESSAGE

BATCH = 100_000

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


# Each row's draws, made once in a LATERAL subquery that refers to the row (so it is
# re-run per row and the fields drawn from one value stay consistent with each other).
# Statuses: completed 91%, failed 5% (upstream_timeout 2.5%, upstream_error 1.75%,
# storage_unavailable 0.75%), cancelled 2.5%, interrupted 1.5%. Time to first chunk is
# log-normal (median 450 ms, clipped to 150..3000 ms); the gap between chunks too (median
# 35 ms, 8..400 ms); an answer has 20..120 chunks (skewed short); a cut-off answer keeps a
# share of them, and a third of the timeouts never sent a first chunk. Token counts are
# the model's (the chunk count, give or take) except for cut-off answers and 2% of the
# others: estimated (~11% in all). Gaussian draws by Box-Muller.
DRAWS = """
    SELECT g, t.created_at,
           CASE WHEN d.s < 0.91 THEN 'completed' WHEN d.s < 0.96 THEN 'failed'
                WHEN d.s < 0.985 THEN 'cancelled' ELSE 'interrupted' END AS status,
           CASE WHEN d.s < 0.91 THEN NULL
                WHEN d.s < 0.935 THEN 'upstream_timeout'
                WHEN d.s < 0.9525 THEN 'upstream_error'
                WHEN d.s < 0.96 THEN 'storage_unavailable'
                WHEN d.s < 0.985 THEN 'cancelled' ELSE 'interrupted' END AS error_code,
           d.s >= 0.91 AND d.s < 0.9333 AND d.cut < 0.33 AS no_first_chunk,
           least(3000, greatest(150, exp(ln(450) + 0.7 * d.n1)))::int AS ttfc_ms,
           least(400, greatest(8, exp(ln(35) + 0.5 * d.n2))) AS gap_ms,
           CASE WHEN d.s < 0.91 THEN d.full_chunks
                ELSE greatest(1, floor(d.full_chunks * d.cut)::int) END AS chunks,
           d.tok, d.deliv, d.resumed, d.via
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
    CROSS JOIN LATERAL (
        SELECT now() - (%(count)s - g) * (interval '365 days' / %(count)s)
               - random() * interval '1 s' AS created_at
    ) AS t
    CROSS JOIN LATERAL (
        SELECT random() AS s, random() AS cut, random() AS tok, random() AS deliv,
               random() AS resumed, random() AS via,
               20 + floor(101 * random() ^ 1.6)::int AS full_chunks,
               sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) AS n1,
               sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) AS n2,
               g AS correlate
    ) AS d
"""

# One `deliveries` row per conversation (0012), from the connection that started it
# (`stream` 90%, `v1` 10%): a completed answer's ended `done` (failed/cancelled: `error`;
# interrupted: `error` or, half the time, `lost` with its process), except ~3% whose client
# left before the end and 0.3% dropped; a quarter of those who left came back: a second,
# `attach` row from where they left off, ended `done`/`error`. So `delivered=incomplete`
# (no connection sent the final event) matches ~3% of the history.
INSERT_SQL = (
    "WITH drawn AS ("
    + DRAWS
    + """),
    shaped AS (
        SELECT *, gen_random_uuid() AS id,
               CASE WHEN no_first_chunk THEN 0 ELSE chunks END AS chunk_count,
               CASE WHEN no_first_chunk THEN NULL
                    ELSE created_at + ttfc_ms * interval '1 ms' END AS first_chunk_at,
               created_at + CASE WHEN no_first_chunk THEN interval '30 s'
                    ELSE (ttfc_ms + chunks * gap_ms) * interval '1 ms' END AS completed_at,
               CASE WHEN g %% 100 < 50 THEN 'gpt-4o-mini' WHEN g %% 100 < 75 THEN 'gpt-4o'
                    WHEN g %% 100 < 90 THEN 'claude-sonnet' WHEN g %% 100 < 98 THEN 'llama-70b'
                    ELSE 'mistral-large' END AS model,
               status <> 'completed' OR tok < 0.02 AS tokens_estimated
        FROM drawn
    ),
    inserted AS (
        INSERT INTO conversations
            (id, prompt, response, status, created_at, first_chunk_at, completed_at,
             model, provider, chunk_count, error_code, error_message,
             prompt_tokens, completion_tokens, tokens_estimated)
        SELECT s.id,
               p.text,
               CASE WHEN s.chunk_count = 0 THEN ''
                    WHEN s.status = 'completed' THEN r1.text || ' ' || r2.text
                    ELSE r1.text END,
               s.status, s.created_at, s.first_chunk_at, s.completed_at, s.model,
               CASE WHEN s.model = 'claude-sonnet' THEN 'anthropic' ELSE 'openai' END,
               s.chunk_count, s.error_code,
               CASE s.error_code
                   WHEN 'upstream_timeout' THEN CASE WHEN s.no_first_chunk
                       THEN 'The model sent nothing within LLM_FIRST_CHUNK_TIMEOUT (30 s).'
                       ELSE 'The model went silent for LLM_CHUNK_TIMEOUT (30 s).' END
                   WHEN 'upstream_error' THEN 'The model answered HTTP 502.'
                   WHEN 'storage_unavailable' THEN 'The database could not store the answer.'
                   WHEN 'cancelled' THEN 'The generation was cancelled.'
                   WHEN 'interrupted' THEN %(interrupted)s END,
               char_length(p.text) / 4 + 12,
               CASE WHEN s.tokens_estimated THEN s.chunk_count
                    ELSE s.chunk_count + floor(s.tok * 8)::int END,
               s.tokens_estimated
        FROM shaped s
        JOIN seed_prompts p ON p.n = (s.g * 7919) %% %(pool)s
        JOIN seed_responses r1 ON r1.n = (s.g * 104729) %% %(pool)s
        JOIN seed_responses r2 ON r2.n = (s.g * 1299709 + 17) %% %(pool)s
        -- In created_at order, as the service appends them: the hash joins hand rows
        -- over in the order of the texts' table, which put the rows of consecutive
        -- seconds ~400 pages apart (a walk of the newest rows read a page per row).
        ORDER BY s.g
    ),
    first_connection AS (
        -- From `shaped`, not the INSERT's RETURNING: it has the draws too (same ids).
        SELECT id, g, status, created_at, completed_at, chunk_count, deliv, resumed, via,
               CASE WHEN deliv < 0.03 THEN 'client_left' WHEN deliv < 0.033 THEN 'dropped'
                    WHEN status = 'completed' THEN 'done'
                    WHEN status = 'interrupted' AND deliv > 0.5 THEN 'lost'
                    ELSE 'error' END AS ended
        FROM shaped
    )
    INSERT INTO deliveries
        (id, conversation_id, via, instance_id, started_at, ended_at, from_seq, last_seq,
         ended)
    SELECT gen_random_uuid(), f.id, CASE WHEN f.via < 0.9 THEN 'stream' ELSE 'v1' END,
           (%(instances)s::uuid[])[1 + f.g %% 4], f.created_at,
           CASE WHEN f.ended IN ('client_left', 'dropped')
                THEN f.created_at + (f.completed_at - f.created_at) * f.deliv * 30
                ELSE f.completed_at END,
           1,
           CASE WHEN f.ended IN ('client_left', 'dropped')
                THEN nullif(floor(f.chunk_count * f.deliv * 30)::int, 0)
                ELSE nullif(f.chunk_count, 0) END,
           f.ended
    FROM first_connection f
    UNION ALL
    SELECT gen_random_uuid(), f.id, 'attach',
           (%(instances)s::uuid[])[1 + (f.g + 1) %% 4],
           f.created_at + (f.completed_at - f.created_at) * f.deliv * 31, f.completed_at,
           1 + floor(f.chunk_count * f.deliv * 30)::int, nullif(f.chunk_count, 0),
           CASE WHEN f.status = 'completed' THEN 'done' ELSE 'error' END
    FROM first_connection f
    WHERE f.ended = 'client_left' AND f.resumed < 0.25
"""
)

INSTANCES = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(1, 5)]
SEEDED_TABLES = ("conversations", "deliveries")


@dataclass
class DiskGuard:
    """Stops the load when the disk holding `folder` has less than `min_free_gb` left."""

    folder: Path | None
    min_free_gb: float
    stopped: bool = False

    def full(self) -> bool:
        """True (and remembered) once the free space is below the floor."""
        if self.folder is not None and not self.stopped:
            free = shutil.disk_usage(self.folder).free / 1e9
            if free < self.min_free_gb:
                print(f"  {free:.1f} GB free < {self.min_free_gb:g} GB: no more rows", flush=True)
                self.stopped = True
        return self.stopped


def seed(
    database_url: str, count: int, jobs: int, guard: DiskGuard, pool: int = 20_000
) -> dict[str, Any]:
    """Insert `count` conversations with `jobs` connections in parallel; returns timings."""
    words = vocabulary()
    began = time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Pools of texts made here and combined in SQL: rows get varied text for the
        # cost of 40,000 sentences, not a million.
        rng = random.Random(1)
        for name, low, high in (("seed_prompts", 6, 15), ("seed_responses", 25, 55)):
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(f"CREATE UNLOGGED TABLE {name} (n integer PRIMARY KEY, text text)")
            with conn.cursor().copy(f"COPY {name} (n, text) FROM STDIN") as copy:
                for n, text in enumerate(sentences(words, pool, low, high, rng)):
                    copy.write_row((n, text))
        before = conn.execute("SELECT count(*) FROM conversations").fetchone()
        indexes = secondary_indexes(conn)
        targets = statistics_targets(conn)
        for name, _, _ in indexes:
            conn.execute(f"DROP INDEX {name}")  # rebuilt below with the same definition
        pools_done = time.monotonic()
        try:
            batches = [(first, min(count, first + BATCH) - 1) for first in range(0, count, BATCH)]
            with concurrent.futures.ThreadPoolExecutor(jobs) as executor:
                work = [
                    executor.submit(
                        insert_batches, database_url, batches[job::jobs], pool, count, guard
                    )
                    for job in range(jobs)
                ]
                for future in work:
                    future.result()
        finally:
            inserted = time.monotonic()
            rebuild_indexes(database_url, indexes, jobs)
            for (target,) in targets:
                conn.execute(target)
            conn.execute("DROP TABLE IF EXISTS seed_prompts, seed_responses")
        conn.execute("ANALYZE")  # every table: the figures below read its row estimates
        total = conn.execute("SELECT count(*) FROM conversations").fetchone()
        size = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('conversations'))"
        ).fetchone()
    finished = time.monotonic()
    return {
        "rows_seeded": (total[0] - before[0]) if total and before else None,
        "rows_total": total[0] if total else None,
        "table_size": size[0] if size else None,
        "indexes_rebuilt": [name for name, _, _ in indexes],
        "stopped_for_disk": guard.stopped,
        "seconds_pools": round(pools_done - began, 1),
        "seconds_insert": round(inserted - pools_done, 1),
        "seconds_indexes": round(finished - inserted, 1),
        "seconds_total": round(finished - began, 1),
    }


def secondary_indexes(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    """(name, definition, table pages) of the seeded tables' indexes, read from the live
    schema (so indexes added by later migrations are rebuilt too), biggest table first;
    primary keys and indexes behind a constraint stay (they check the rows)."""
    rows = conn.execute(
        """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid),
               t.relpages + CASE WHEN a.amname = 'gin' THEN 1000000000 ELSE 0 END
        FROM pg_index i
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_class x ON x.oid = i.indexrelid
        JOIN pg_am a ON a.oid = x.relam
        WHERE i.indrelid = ANY(%s::regclass[]) AND NOT i.indisprimary
          AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        ORDER BY 3 DESC, 1
        """,
        (list(SEEDED_TABLES),),
    ).fetchall()
    return [(name, definition, pages) for name, definition, pages in rows]


def statistics_targets(conn: psycopg.Connection[Any]) -> list[tuple[str]]:
    """The statistics targets set on the seeded tables' expression indexes (the search's:
    migration 0015), which their definitions do not carry, as statements to set them."""
    rows = conn.execute(
        """
        SELECT format('ALTER INDEX %%s ALTER COLUMN %%s SET STATISTICS %%s',
                      a.attrelid::regclass, a.attnum, a.attstattarget)
        FROM pg_attribute a JOIN pg_index i ON i.indexrelid = a.attrelid
        WHERE i.indrelid = ANY(%s::regclass[]) AND a.attstattarget > 0
        """,
        (list(SEEDED_TABLES),),
    ).fetchall()
    return [(row[0],) for row in rows]


def rebuild_indexes(database_url: str, indexes: list[tuple[str, str, int]], jobs: int) -> None:
    """Build the dropped indexes again, `jobs` at once; the slowest (GIN) starts first."""

    def build(name: str, definition: str) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SET maintenance_work_mem = '512MB'")
            # PostgreSQL 18 builds GIN indexes in parallel too.
            conn.execute(f"SET max_parallel_maintenance_workers = {max(0, jobs - 1)}")
            began = time.monotonic()
            conn.execute(definition)
            print(f"  rebuilt {name} in {time.monotonic() - began:.0f} s", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as executor:
        for future in [executor.submit(build, name, sql) for name, sql, _ in indexes]:
            future.result()


# Migration 0014 (deliveries) flags, in `conversations.delivery_cut`, the ended
# conversations no connection was sent the end of; the writer keeps it, so seeded rows
# (and rows seeded before 0014) get it here, from their deliveries.
MARK_CUTS_SQL = """
    UPDATE conversations c SET delivery_cut = true
    WHERE c.status <> 'streaming' AND NOT c.delivery_cut
      AND EXISTS (SELECT FROM deliveries d WHERE d.conversation_id = c.id
                  AND d.ended IN ('client_left', 'dropped', 'lost'))
      AND NOT EXISTS (SELECT FROM deliveries d WHERE d.conversation_id = c.id
                      AND d.ended IN ('done', 'error'))
"""


def mark_delivery_cuts(database_url: str) -> int | None:
    """Set `delivery_cut` from the deliveries where the schema has it; rows marked."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        has = conn.execute(
            "SELECT FROM information_schema.columns"
            " WHERE table_name = 'conversations' AND column_name = 'delivery_cut'"
        ).fetchone()
        if has is None:
            return None  # a schema before migration 0014
        return conn.execute(MARK_CUTS_SQL).rowcount


def table_sizes(database_url: str) -> dict[str, dict[str, int]]:
    """Bytes on disk per table of the schema: heap, TOAST, indexes, and its row estimate."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            """
            SELECT c.relname, pg_relation_size(c.oid),
                   coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0),
                   pg_indexes_size(c.oid), pg_total_relation_size(c.oid),
                   greatest(c.reltuples, 0)::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND n.nspname = current_schema()
            ORDER BY pg_total_relation_size(c.oid) DESC
            """
        ).fetchall()
    return {
        name: {"heap": heap, "toast": toast, "indexes": indexes, "total": total, "rows": rows_}
        for name, heap, toast, indexes, total, rows_ in rows
    }


def insert_batches(
    database_url: str, batches: list[tuple[int, int]], pool: int, count: int, guard: DiskGuard
) -> None:
    """One connection's share of the batches, each its own transaction."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        for first, last in batches:
            if guard.full():
                return
            conn.execute(
                INSERT_SQL,
                {"first": first, "last": last, "pool": pool, "count": count,
                 "instances": INSTANCES, "interrupted": INTERRUPTED_MESSAGE},
            )  # fmt: skip
            print(f"  rows {first + 1:,}..{last + 1:,} of {count:,}", flush=True)
