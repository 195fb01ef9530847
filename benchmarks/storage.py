"""Bytes on disk per ended conversation, before and after compaction (issue 15, point 6).

Two scenarios on a PostgreSQL server you name (each in a database of its own, dropped
at the end), each with ended 60-chunk answers of ~430 characters stored in the writer's
row shape (the demo provider's answers; one chunk row per word, times 50 ms apart, one
`deliveries` row each), bulk-inserted:

- backlog: N conversations stored as today (chunk rows), measured; then sse-llm starts
  with compaction on while a load of real streams runs (benchmarks/load.py through the
  fake upstream), until the backlog is folded: the compaction rate, the streaming p99
  during it and idle, and the bytes after autovacuum. This is deploying 0015 on an old
  history: the chunks table's b-tree keeps its peak size (its pages are reused by later
  chunks, never returned without REINDEX), so this "after" is not the steady state.
- steady: the history built with compaction running while streaming continues: rounds
  of R conversations, each bulk-inserted and then folded by the service before the
  next, to N in all; then autovacuum. Its "after" is the target's figure. Each round's
  bulk insert runs alone (at the lowest CPU priority where the server is local,
  `lowered`), then a load run of `--load-seconds` times the streams while the service
  folds that round; one last load run with nothing to fold gives the idle p99.

Bytes are pg_total_relation_size (heap, indexes, TOAST, free space) of every table of
the schema, divided by the conversations. Autovacuum only: no VACUUM, no VACUUM FULL.

    nice -n 10 python benchmarks/storage.py --server postgresql://postgres@127.0.0.1:55415
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sse_llm.database import apply_migrations  # noqa: E402
from sse_llm.providers.demo import DemoProvider  # noqa: E402
from tests.support import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# The writer's shape of one ended conversation: its row, one chunk row per piece (each
# word of the demo answer, with its leading space), one delivery (the POST /stream).
CHUNKS_SQL = """
    INSERT INTO chunks (conversation_id, seq, text, created_at)
    SELECT c.id, p.seq, p.piece[1], c.created_at + p.seq * interval '50 ms'
    FROM conversations c
    CROSS JOIN LATERAL regexp_matches(c.response, '(^\\S+| \\S+)', 'g')
        WITH ORDINALITY AS p(piece, seq)
    WHERE c.id = ANY(%(ids)s)
"""
DELIVERIES_SQL = """
    INSERT INTO deliveries
        (id, conversation_id, via, instance_id, started_at, ended_at, from_seq, last_seq, ended)
    SELECT gen_random_uuid(), c.id, 'stream', %(instance)s, c.created_at, c.completed_at,
           1, c.chunk_count, 'done'
    FROM conversations c WHERE c.id = ANY(%(ids)s)
"""


def seed(conn: psycopg.Connection, count: int, offset: int) -> datetime:
    """Insert `count` ended conversations, as the writer leaves them, with their chunks;
    return a time after every end they record."""
    demo = DemoProvider(None, 60, 0)
    ids = [uuid.uuid4() for _ in range(count)]
    # In the past: the ends come before the time returned.
    now = time.time() - 10
    with conn.transaction():
        with conn.cursor().copy(
            "COPY conversations (id, prompt, response, status, created_at, first_chunk_at,"
            " completed_at, model, provider, chunk_count, prompt_tokens, completion_tokens,"
            " tokens_estimated) FROM STDIN"
        ) as copy:
            for index, conversation_id in enumerate(ids):
                prompt = f"bench k=60 t=50 pad=0 stream {offset + index} {os.urandom(4).hex()}"
                response = "".join(demo.answer(prompt))
                created = now - 3 - (count - index) * 0.001
                copy.write_row(
                    (conversation_id, prompt, response, "completed", _at(created),
                     _at(created + 0.05), _at(created + 3), "demo", "demo", 60, 12, 60, True)
                )  # fmt: skip
        conn.execute(CHUNKS_SQL, {"ids": ids})
        conn.execute(DELIVERIES_SQL, {"ids": ids, "instance": uuid.uuid4()})
    return _at(now)


def lowered(conn: psycopg.Connection) -> bool:
    """Give the seeding connection's backend the lowest CPU priority, when the server runs
    on this machine and this user may: the bulk load stands in for what the streams would
    have written over minutes, and at full priority (~300,000 chunk rows and their index
    entries a round, one statement) it took a CPU of two from the streams being timed."""
    try:
        os.setpriority(os.PRIO_PROCESS, conn.info.backend_pid, 19)
    except (OSError, PermissionError):
        return False  # a remote server, or not ours to renice: timed at full priority
    return True


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def sizes(conn: psycopg.Connection) -> dict[str, int]:
    """Every table of the schema: its bytes on disk with indexes and TOAST."""
    rows = conn.execute(
        """
        SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'm')
        ORDER BY 2 DESC
        """
    ).fetchall()
    return dict(rows)


def per_conversation(conn: psycopg.Connection) -> dict[str, Any]:
    """Bytes per conversation, per table and in all."""
    conversations = conn.execute("SELECT count(*) FROM conversations").fetchone()[0]  # type: ignore[index]
    tables = sizes(conn)
    return {
        "conversations": conversations,
        "bytes_per_conversation": round(sum(tables.values()) / conversations),
        "tables": {name: round(size / conversations) for name, size in tables.items()},
        "total_bytes": sum(tables.values()),
    }


def uncompacted(conn: psycopg.Connection, ended_before: datetime) -> int:
    """Conversations that ended before `ended_before` (the seeded ones) not compacted yet."""
    row = conn.execute(
        "SELECT count(*) FROM conversations c WHERE status <> 'streaming' AND chunk_count > 0"
        " AND completed_at < %s"
        " AND NOT EXISTS (SELECT 1 FROM chunk_layouts l WHERE l.conversation_id = c.id)",
        (ended_before,),
    ).fetchone()
    return int(row[0]) if row else 0


def wait_for_autovacuum(conn: psycopg.Connection, limit: float) -> float:
    """Wait until autovacuum has visited conversations and chunks since now; its seconds."""
    began = time.monotonic()
    since = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    while time.monotonic() - began < limit:
        row = conn.execute(
            """
            SELECT count(*) FROM pg_stat_user_tables
            WHERE relname IN ('conversations', 'chunks') AND last_autovacuum > %s
            """,
            (since,),
        ).fetchone()
        if row and row[0] == 2:
            break
        time.sleep(5)
    return time.monotonic() - began


# `--search expression`: the schema with the stored `search` vector replaced by an
# expression GIN index, which issue 15 allows; it measures what the vector costs. It is
# not the schema: without the vector a search that walks the newest rows recomputes each
# one's (see search_plan.py and the README's storage decision).
EXPRESSION_SEARCH = """
    ALTER TABLE conversations DROP COLUMN search;
    CREATE INDEX conversations_search_idx ON conversations USING gin (
        to_tsvector('english'::regconfig, left(prompt, 100000) || ' ' || left(response, 400000))
    );
"""


@contextmanager
def database(server: str, name: str, search: str = "stored") -> Iterator[str]:
    """A fresh migrated database on `server` (`search`: "stored" or "expression", the
    search vector's form), dropped afterwards."""
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    # Only the path names the database: a socket URL keeps its ?host=... query.
    url = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    apply_migrations(url)
    if search == "expression":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(EXPRESSION_SEARCH)
    try:
        yield url
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class Service:
    """The fake upstream, sse-llm (compaction on) and a repeated load of real streams."""

    def __init__(self, database_url: str, args: argparse.Namespace) -> None:
        self.args = args
        upstream_port, self.port = free_port(), free_port()
        python = sys.executable
        self.upstream = subprocess.Popen(
            [python, str(ROOT / "benchmarks/upstream.py"), "--port", str(upstream_port),
             "--chunks", "60", "--interval-ms", "50"]
        )  # fmt: skip
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "OPENAI_API_KEY": "bench",
            "LLM_MODEL": "bench",
            "SSE_LLM_PORT": str(self.port),
            "SSE_LLM_COMPACTION_INTERVAL": str(args.interval),
            "SSE_LLM_COMPACTION_BATCH": str(args.batch),
        }
        self.log = open(RESULTS / "storage-server.log", "ab")  # noqa: SIM115
        self.server = subprocess.Popen(
            [python, "-m", "sse_llm.cli", "serve"], env=env, stdout=self.log, stderr=self.log
        )
        self.load: subprocess.Popen[str] | None = None
        self.p99s: list[tuple[bool, float | None]] = []  # (compaction busy, p99 ms) per load run
        time.sleep(4)

    def load_round(self) -> subprocess.Popen[str]:
        """Start one load run of `--load-seconds` (its summary is read by `collect`)."""
        command = [
            sys.executable, str(ROOT / "benchmarks/load.py"), "--url",
            f"http://127.0.0.1:{self.port}", "-c", str(self.args.concurrency), "-s", "100000",
            "--chunks", "60", "--interval-ms", "50", "--max-seconds", str(self.args.load_seconds),
        ]  # fmt: skip
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    def collect(self, load: subprocess.Popen[str], busy: bool) -> None:
        out, _ = load.communicate()
        summary = json.loads(out.strip().splitlines()[-1])
        p99 = (summary.get("steady_chunk_latency_ms") or {}).get("p99")
        if p99 is None:
            p99 = summary["chunk_latency_ms"]["p99"]
        self.p99s.append((busy, p99))

    def close(self) -> None:
        for process in (self.load, self.server, self.upstream):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)
        self.log.close()


def p99_figures(p99s: list[tuple[bool, float | None]]) -> dict[str, Any]:
    busy = [p for b, p in p99s if b and p is not None]
    idle = [p for b, p in p99s if not b and p is not None]
    return {
        "chunk_latency_p99_ms_during_compaction": {
            "runs": len(busy), "median": statistics.median(busy) if busy else None,
            "max": max(busy) if busy else None,
        },
        "chunk_latency_p99_ms_idle": {
            "runs": len(idle), "median": statistics.median(idle) if idle else None,
        },
    }  # fmt: skip


def backlog(server: str, args: argparse.Namespace) -> dict[str, Any]:
    """N conversations as rows, then the service folds them while streams run."""
    made = database(server, "storage_backlog", args.search)
    with made as url, psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, args.conversations, 10_000):
            seeded = seed(conn, min(10_000, args.conversations - start), start)
        conn.execute("ANALYZE")
        before = per_conversation(conn)
        print(json.dumps({"backlog_before": before}), flush=True)
        service = Service(url, args)
        try:
            began, total = time.monotonic(), uncompacted(conn, seeded)
            left, done_at = total, None
            while left:
                busy, load = True, service.load_round()
                while load.poll() is None:
                    time.sleep(5)
                    left = uncompacted(conn, seeded)
                    if not left and done_at is None:
                        done_at = time.monotonic()
                service.collect(load, busy=busy)
                print(json.dumps({"uncompacted": left}), flush=True)
            seconds = (done_at or time.monotonic()) - began
            service.collect(service.load_round(), busy=False)  # only the live ends to fold
            vacuum_wait = wait_for_autovacuum(conn, args.vacuum_wait)
            after = per_conversation(conn)
        finally:
            service.close()
    return {
        "before": before,
        "after": after,
        "compacted": total,
        "compaction_seconds": round(seconds, 1),
        "conversations_per_second": round(total / seconds, 1),
        "autovacuum_wait_seconds": round(vacuum_wait),
        **p99_figures(service.p99s),
    }


def steady(server: str, args: argparse.Namespace) -> dict[str, Any]:
    """The history built round by round while the service compacts and streams run."""
    made = database(server, "storage_steady", args.search)
    with made as url, psycopg.connect(url, autocommit=True) as conn:
        niced = lowered(conn)
        service = Service(url, args)
        try:
            seeded, rates = 0, []
            while seeded < args.conversations:
                # Seeded with no load running: a load run then times the streams beside
                # the compaction of that round only, not beside the harness's bulk insert
                # (its WAL and fsyncs slowed them as much as the compaction, niced or not).
                ended_before = seed(conn, args.round, seeded)
                seeded += args.round
                load = service.load_round()
                began = time.monotonic()
                while uncompacted(conn, ended_before):
                    time.sleep(2)
                rates.append(args.round / (time.monotonic() - began))
                print(json.dumps({"seeded": seeded, "rate": round(rates[-1], 1)}), flush=True)
                service.collect(load, busy=True)
            print(json.dumps({"steady_seeded": seeded}), flush=True)
            vacuum_wait = wait_for_autovacuum(conn, args.vacuum_wait)
            after = per_conversation(conn)
            service.collect(service.load_round(), busy=False)  # the same load, nothing to fold
        finally:
            service.close()
    return {
        "after": after,
        "seed_niced": niced,
        "conversations_per_second": round(statistics.median(rates), 1),
        "autovacuum_wait_seconds": round(vacuum_wait),
        **p99_figures(service.p99s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server", required=True, help="PostgreSQL server URL (a database is made)"
    )
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--round", type=int, default=2_000, help="steady: conversations a round")
    parser.add_argument("--concurrency", type=int, default=50, help="streams open at once")
    parser.add_argument("--load-seconds", type=float, default=20)
    parser.add_argument("--interval", type=float, default=5.0, help="SSE_LLM_COMPACTION_INTERVAL")
    parser.add_argument("--batch", type=int, default=200, help="SSE_LLM_COMPACTION_BATCH")
    parser.add_argument(
        "--vacuum-wait", type=float, default=300, help="longest wait for autovacuum"
    )
    parser.add_argument("--scenarios", default="backlog,steady")
    parser.add_argument(
        "--search", choices=("stored", "expression"), default="stored",
        help="the search vector: stored (the schema) or an expression index in its place",
    )  # fmt: skip
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    report: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                              "arguments": vars(args)}  # fmt: skip
    for name in args.scenarios.split(","):
        report[name] = {"backlog": backlog, "steady": steady}[name](args.server, args)
        print(json.dumps({name: report[name]}), flush=True)
    path = RESULTS / "storage.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
