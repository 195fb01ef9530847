"""The smaller indexes of migration 0018: each still serves the queries it is there for.

A database of its own with 20,000 conversations, 1% of them failed, analysed: a page of
a rare status is found by its partial index even by a generic plan (what a statement
psycopg has prepared gets), and the search index takes entries without a pending list.
And migration 0022's storage: the search vector stays in the row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

from sse_llm.contract import Status
from sse_llm.history_filters import HistoryFilter, condition
from tests.conftest import separate_database

ROWS = 20_000
SEED = """
    INSERT INTO conversations (id, prompt, response, status, created_at, model, provider)
    SELECT gen_random_uuid(), 'a prompt', 'an answer',
           CASE WHEN i %% 100 = 0 THEN 'failed' ELSE 'completed' END,
           %(start)s + i * interval '1 minute', 'demo', 'demo'
    FROM generate_series(1, %(rows)s) AS i
"""


@pytest.fixture(scope="module")
def indexed(database_url: str) -> Iterator[str]:
    """A migrated database of this module's own, seeded and analysed."""
    with separate_database(database_url, "indexes") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SEED, {"start": datetime(2026, 1, 1, tzinfo=UTC), "rows": ROWS})
            conn.execute("VACUUM ANALYZE conversations")
        yield url


def generic_plan(url: str, status: Status) -> str:
    """EXPLAIN of the history's status page as a prepared statement's generic plan."""
    where, params = condition(HistoryFilter(status=status))
    with psycopg.connect(url) as conn:
        text = (
            sql.SQL(
                "SELECT c.id FROM conversations c WHERE {}"
                " ORDER BY c.created_at DESC, c.id DESC LIMIT 51"
            )
            .format(where)
            .as_string(conn)
        )
        # Each bound parameter becomes $n: the plan cannot look at its value.
        names = list(params)
        text = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m[1]) + 1}::text", text)
        conn.execute(sql.SQL("PREPARE page AS {}").format(sql.SQL(text)))  # type: ignore[arg-type]
        conn.execute("SET plan_cache_mode = force_generic_plan")
        values = sql.SQL(", ").join(sql.Literal(str(params[name])) for name in names)
        rows = conn.execute(sql.SQL("EXPLAIN EXECUTE page({})").format(values)).fetchall()
    return "\n".join(row[0] for row in rows)


def test_a_rare_status_is_found_by_its_partial_index_in_a_generic_plan(indexed: str) -> None:
    assert "conversations_status_newest_idx" in generic_plan(indexed, Status.FAILED)


def test_completed_is_found_walking_the_newest_rows(indexed: str) -> None:
    plan = generic_plan(indexed, Status.COMPLETED)
    assert "conversations_newest_idx" in plan and "status_newest" not in plan, plan


def test_the_partial_index_holds_only_the_rare_statuses(indexed: str) -> None:
    with psycopg.connect(indexed) as conn:
        row = conn.execute(
            "SELECT reltuples FROM pg_class WHERE relname = 'conversations_status_newest_idx'"
        ).fetchone()
    assert row is not None and row[0] == ROWS // 100


def test_the_search_index_takes_entries_without_a_pending_list(indexed: str) -> None:
    with psycopg.connect(indexed) as conn:
        row = conn.execute(
            "SELECT reloptions FROM pg_class WHERE relname = 'conversations_search_idx'"
        ).fetchone()
    assert row is not None and "fastupdate=off" in (row[0] or []), row


def test_chunks_are_vacuumed_at_a_fixed_number_of_dead_rows(indexed: str) -> None:
    with psycopg.connect(indexed) as conn:
        row = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'chunks'").fetchone()
    assert row is not None and "autovacuum_vacuum_scale_factor=0" in (row[0] or []), row


def test_autovacuum_spares_the_streams_needless_passes(indexed: str) -> None:
    # Migration 0020: chunks analyzed once per million changes, not at every pass; a young
    # conversations table vacuumed for 20,000 dead rows, not for 50 and a fifth.
    with psycopg.connect(indexed) as conn:
        options = dict(
            conn.execute(
                "SELECT relname, reloptions FROM pg_class"
                " WHERE relname IN ('chunks', 'conversations')"
            ).fetchall()
        )
    assert "autovacuum_analyze_threshold=1000000" in options["chunks"]
    assert "autovacuum_analyze_scale_factor=0" in options["chunks"]
    assert "autovacuum_vacuum_threshold=20000" in options["conversations"]
    assert "autovacuum_vacuum_insert_threshold=20000" in options["conversations"]


def test_a_long_answer_goes_out_of_line_before_its_search_vector(indexed: str) -> None:
    # Migration 0022: a walk tests each row's vector, so the vector stays in the row and
    # the answer's text is what moves to TOAST when the row outgrows ~2 KB. 120 distinct
    # words that do not compress: a text of ~1.3 KB, a vector of ~2 KB.
    words = " ".join(uuid4().hex[:10] for _ in range(120))
    with psycopg.connect(indexed, autocommit=True) as conn:
        if conn.info.server_version < 170000:
            pytest.skip("pg_column_toast_chunk_id() is PostgreSQL 17's")
        conn.execute(
            "INSERT INTO conversations (id, prompt, response, status, created_at, model,"
            " provider) VALUES (%s, 'a prompt', %s, 'completed', now(), 'demo', 'demo')",
            (conversation_id := uuid4(), words),
        )
        row = conn.execute(
            "SELECT pg_column_toast_chunk_id(search) IS NULL,"
            " pg_column_toast_chunk_id(response) IS NULL FROM conversations WHERE id = %s",
            (conversation_id,),
        ).fetchone()
    assert row == (True, False), "(vector in the row, text out of line) expected"
