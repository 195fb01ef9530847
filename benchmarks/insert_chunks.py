"""Micro-benchmark of the writer's chunk insert: cost per chunk on one connection.

Runs `store.insert_chunks` (fenced: a FOR SHARE lock per conversation and batch) and the
unfenced statement it replaced, each with and without the foreign key chunks ->
conversations, on batches of 1, 10 and 100 chunks of as many streaming conversations
(the writer's batches under load hold one chunk of each of many streams), among
`--streams` conversations streaming for the same process (the fence must look the
batch's rows up by key, not scan every live stream's). Prints the
wall time and the PostgreSQL backend's CPU time per chunk, the median of `--rounds`
interleaved rounds (so a neighbour's burst hits every variant alike).

    python benchmarks/insert_chunks.py --database-url postgresql://...   # or embedded
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from sse_llm import store
from sse_llm.database import EmbeddedPostgres, apply_migrations
from sse_llm.store import Chunk

UNFENCED = """
    WITH batch AS (
        SELECT (r->>0)::uuid AS id, (r->>1)::int AS seq, r->>2 AS text
        FROM json_array_elements(%(rows)s::json) AS r
    ), inserted AS (
        INSERT INTO chunks (conversation_id, seq, text) SELECT id, seq, text FROM batch
        ON CONFLICT DO NOTHING
    ), touched AS (
        SELECT id::text, (row_number() OVER () - 1) / 200 AS part
        FROM (SELECT DISTINCT id FROM batch) AS distinct_ids
    )
    SELECT pg_notify('sse_llm_chunks', string_agg(id, ',')) FROM touched GROUP BY part
"""
TEXT = "a token "  # ~ one model token


async def unfenced(conn: psycopg.AsyncConnection, chunks: list[Chunk], owner: uuid.UUID) -> None:
    rows = store._json_rows.encode([(c.conversation_id.hex, c.seq, c.text) for c in chunks])
    await conn.execute(UNFENCED, {"rows": rows})


async def fenced(conn: psycopg.AsyncConnection, chunks: list[Chunk], owner: uuid.UUID) -> None:
    assert not await store.insert_chunks(conn, chunks, owner)


def backend_cpu(pid: int) -> float:
    """Seconds of CPU the backend process has run (Linux schedstat: nanoseconds)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


async def measure(
    url: str, insert, batch: int, chunks_total: int, fsync: bool, streams: int
) -> tuple[float, float, float]:
    """(wall, client CPU, backend CPU) µs per chunk for `chunks_total` chunks in batches
    of `batch`."""
    owner = uuid.uuid4()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if not fsync:  # the statement's own cost, without waiting for the disk
            await conn.execute("SET synchronous_commit = off")
        everyone = [uuid.uuid4() for _ in range(max(streams, batch))]
        ids = everyone[:batch]
        await conn.execute(
            "INSERT INTO conversations (id, prompt, model, provider, owner_id)"
            " SELECT unnest(%s::uuid[]), 'p', 'm', 'demo', %s",
            (everyone, owner),
        )
        pid = (await (await conn.execute("SELECT pg_backend_pid()")).fetchone())[0]
        seq = 0
        for _ in range(5):  # warm the plan and caches
            seq += 1
            await insert(conn, [Chunk(i, seq, TEXT) for i in ids], owner)
        cpu, wall, client = backend_cpu(pid), time.perf_counter(), time.process_time()
        for _ in range(chunks_total // batch):
            seq += 1
            await insert(conn, [Chunk(i, seq, TEXT) for i in ids], owner)
        wall, cpu = time.perf_counter() - wall, backend_cpu(pid) - cpu
        client = time.process_time() - client
    n = (chunks_total // batch) * batch
    return wall / n * 1e6, client / n * 1e6, cpu / n * 1e6


def databases(server_url: str) -> dict[str, str]:
    """Two migrated databases: one as migrated, one without the foreign key."""
    urls = {}
    for name in ("fk", "no_fk"):
        db = f"bench_{name}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        url = server_url.replace("/postgres?", f"/{db}?", 1)
        apply_migrations(url)
        urls[name] = url
    with psycopg.connect(urls["no_fk"], autocommit=True) as conn:
        conn.execute("ALTER TABLE chunks DROP CONSTRAINT IF EXISTS chunks_conversation_id_fkey")
    with psycopg.connect(urls["fk"], autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE chunks DROP CONSTRAINT IF EXISTS chunks_conversation_id_fkey,"
            " ADD CONSTRAINT chunks_conversation_id_fkey FOREIGN KEY (conversation_id)"
            " REFERENCES conversations (id) ON DELETE CASCADE"
        )
    return urls


async def run(server_url: str, rounds: int, chunks_total: int, fsync: bool, streams: int) -> None:
    urls = databases(server_url)
    variants = {
        "unfenced, FK": (urls["fk"], unfenced),
        "fenced, FK": (urls["fk"], fenced),
        "unfenced, no FK": (urls["no_fk"], unfenced),
        "fenced, no FK": (urls["no_fk"], fenced),
    }
    for batch in (1, 10, 100):
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (url, insert) in variants.items():
                sample = await measure(url, insert, batch, chunks_total, fsync, streams)
                results[name].append(sample)
        for name, samples in results.items():
            wall, client, cpu = (statistics.median(s[i] for s in samples) for i in range(3))
            print(
                f"batch {batch:3d}  {name:16s}  µs per chunk: wall {wall:7.1f}  "
                f"client CPU {client:6.1f}  PostgreSQL CPU {cpu:6.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="a server URL (default: an embedded one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=3000, help="chunks per measurement")
    parser.add_argument(
        "--no-fsync", action="store_true", help="synchronous_commit = off: no wait for the disk"
    )
    parser.add_argument("--streams", type=int, default=1000, help="live streams of the owner")
    args = parser.parse_args()
    fsync = not args.no_fsync
    if args.database_url:
        asyncio.run(run(args.database_url, args.rounds, args.chunks, fsync, args.streams))
        return
    with tempfile.TemporaryDirectory() as folder, EmbeddedPostgres(Path(folder)) as postgres:
        asyncio.run(run(postgres.url, args.rounds, args.chunks, fsync, args.streams))


if __name__ == "__main__":
    main()
