"""Retention (SPEC 10): `sse-llm prune` and SSE_LLM_RETENTION_DAYS delete what is old, with
everything attached, never a streaming conversation, reviewed ones only when asked, one
pruner at a time; a dry run counts. Each test prunes a database of its own."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sse_llm import delivery_store, history_queries, retention, rollup_store, store
from sse_llm.config import ConfigError, Settings
from sse_llm.contract import DeliveryEnd, DeliveryVia
from tests.conftest import word
from tests.processes import BackgroundStream, spawn_server
from tests.support import run, wait_until

DAY = 86_400.0


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`sse-llm ARGS` as a process of its own, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "sse_llm.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def start_cli(*args: str, **env: str) -> subprocess.Popen[str]:
    """`sse-llm ARGS` started, not waited for."""
    return subprocess.Popen(
        [sys.executable, "-m", "sse_llm.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def add(
    db: psycopg.Connection, days_old: float, status: str = "completed", model: str = "m"
) -> UUID:
    """A conversation created `days_old` days ago, with 3 chunks and a delivery."""
    conversation_id = uuid4()
    db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, created_at, model, provider,
                                   chunk_count, owner_id)
        VALUES (%(id)s, 'a prompt', 'abc', %(status)s, now() - make_interval(secs => %(age)s),
                %(model)s, 'demo', 3, CASE WHEN %(status)s = 'streaming' THEN gen_random_uuid() END)
        """,
        {"id": conversation_id, "status": status, "age": days_old * DAY, "model": model},
    )
    db.execute(
        "INSERT INTO chunks (conversation_id, seq, text)"
        " SELECT %s, s, 'x' FROM generate_series(1, 3) s",
        (conversation_id,),
    )
    db.execute(
        """
        INSERT INTO deliveries (id, conversation_id, via, instance_id, started_at, ended_at,
                                from_seq, last_seq, ended)
        VALUES (gen_random_uuid(), %s, 'stream', gen_random_uuid(), now(), now(), 1, 3, 'done')
        """,
        (conversation_id,),
    )
    return conversation_id


def review(db: psycopg.Connection, conversation_id: UUID) -> None:
    """A review (which the review summaries count) on the conversation."""
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, labels, conversation_created_at)
        SELECT id, 'ana', 'good', ARRAY['tone'], created_at FROM conversations WHERE id = %s
        """,
        (conversation_id,),
    )


def annotate(db: psycopg.Connection, conversation_id: UUID) -> None:
    """An annotation and a review claim (no review) on the conversation."""
    db.execute(
        """
        INSERT INTO annotations (conversation_id, reviewer, field, start_offset, end_offset, label)
        VALUES (%s, 'ana', 'response', 0, 2, 'typo')
        """,
        (conversation_id,),
    )
    db.execute(
        "INSERT INTO review_claims VALUES (%s, 'ana', now() + interval '1 minute')",
        (conversation_id,),
    )


def remaining(db: psycopg.Connection, table: str, ids: list[UUID]) -> set[UUID]:
    """The ids among `ids` that `table` still has rows of."""
    column = "id" if table == "conversations" else "conversation_id"
    rows = db.execute(
        f"SELECT DISTINCT {column} FROM {table} WHERE {column} = ANY(%s)",
        (ids,),
    ).fetchall()
    return {row[0] for row in rows}


ATTACHED = ["chunks", "deliveries", "reviews", "annotations", "review_claims", "review_summaries"]


@pytest.fixture
def conn(own_database: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(own_database, autocommit=True) as connection:
        yield connection


@pytest.fixture
def history(conn: psycopg.Connection) -> dict[str, UUID]:
    """Old and new conversations of each kind, by name."""
    rows = {
        "old_completed": add(conn, 40),
        "old_failed": add(conn, 35, "failed"),
        "old_interrupted": add(conn, 31, "interrupted"),
        "old_annotated": add(conn, 33),
        "old_reviewed": add(conn, 32),
        "old_streaming": add(conn, 45, "streaming"),
        "new_completed": add(conn, 5),
        "new_reviewed": add(conn, 1),
    }
    annotate(conn, rows["old_annotated"])
    annotate(conn, rows["old_reviewed"])
    review(conn, rows["old_reviewed"])
    review(conn, rows["new_reviewed"])
    return rows


def everything(conn: psycopg.Connection) -> dict[str, int]:
    """How many rows each table of the history holds."""
    tables = ["conversations", *ATTACHED, "review_label_counts", "conversation_counts"]
    return {table: one(conn, f"SELECT count(*) FROM {table}") for table in tables}


def one(conn: psycopg.Connection, query: str, *params: object) -> Any:
    """The single value a query returns."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def test_a_dry_run_counts_by_status_and_review_and_deletes_nothing(
    own_database: str, conn: psycopg.Connection, history: dict[str, UUID]
) -> None:
    before = everything(conn)
    result = run_cli("prune", "--older-than", "30", "--dry-run", DATABASE_URL=own_database)
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "completed unreviewed 2 would delete" in lines
    assert "failed unreviewed 1 would delete" in lines
    assert "interrupted unreviewed 1 would delete" in lines
    assert any(line.startswith("completed reviewed 1 would keep (reviewed") for line in lines)
    assert "streaming unreviewed 1 would keep (still streaming)" in lines
    assert lines[-1] == "would delete 4 conversations"
    with_reviewed = run_cli(
        "prune", "--older-than", "30", "--dry-run", "--include-reviewed",
        DATABASE_URL=own_database,
    )  # fmt: skip
    assert with_reviewed.stdout.splitlines()[-1] == "would delete 5 conversations"
    assert everything(conn) == before


def test_a_prune_deletes_exactly_the_old_ended_unreviewed_ones_with_what_is_attached(
    own_database: str, conn: psycopg.Connection, history: dict[str, UUID]
) -> None:
    result = run_cli("prune", "--older-than", "30", DATABASE_URL=own_database)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 4 conversations created before ")
    kept = {history[n] for n in ("old_reviewed", "old_streaming", "new_completed", "new_reviewed")}
    ids = list(history.values())
    assert remaining(conn, "conversations", ids) == kept
    for table in ("chunks", "deliveries"):
        assert remaining(conn, table, ids) == kept, table
    # The annotated one went with its annotation and claim; the reviewed one kept its own.
    assert remaining(conn, "annotations", ids) == {history["old_reviewed"]}
    assert remaining(conn, "review_claims", ids) == {history["old_reviewed"]}
    assert remaining(conn, "reviews", ids) == {history["old_reviewed"], history["new_reviewed"]}


def test_include_reviewed_deletes_reviewed_ones_with_their_reviews_but_never_a_streaming_one(
    own_database: str, conn: psycopg.Connection, history: dict[str, UUID]
) -> None:
    result = run_cli("prune", "--older-than", "30", "--include-reviewed", DATABASE_URL=own_database)
    assert result.returncode == 0, result.stderr
    kept = {history[n] for n in ("old_streaming", "new_completed", "new_reviewed")}
    ids = list(history.values())
    assert remaining(conn, "conversations", ids) == kept
    assert remaining(conn, "chunks", ids) == kept
    for table in ("reviews", "review_summaries"):
        assert remaining(conn, table, ids) == {history["new_reviewed"]}, table
    assert remaining(conn, "annotations", ids) == set()
    labels = conn.execute("SELECT conversation_id FROM review_label_counts").fetchall()
    assert {row[0] for row in labels} == {history["new_reviewed"]}


def test_fractions_of_a_day_are_honoured(own_database: str, conn: psycopg.Connection) -> None:
    older, younger = add(conn, 0.75), add(conn, 0.25)
    result = run_cli("prune", "--older-than", "0.5", DATABASE_URL=own_database)
    assert result.returncode == 0, result.stderr
    assert remaining(conn, "conversations", [older, younger]) == {younger}
    assert Settings.from_env({"SSE_LLM_RETENTION_DAYS": "0.5"}).retention_days == 0.5
    assert Settings.from_env({}).retention_days is None


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", "inf", ""])
def test_a_bad_age_is_a_clear_error_and_deletes_nothing(
    own_database: str, conn: psycopg.Connection, value: str
) -> None:
    old = add(conn, 400)
    result = run_cli("prune", "--older-than", value, DATABASE_URL=own_database)
    assert result.returncode == 2
    assert "--older-than must be a number of days" in result.stderr
    assert "Traceback" not in result.stderr
    if value:
        with pytest.raises(ConfigError, match="SSE_LLM_RETENTION_DAYS must be"):
            Settings.from_env({"SSE_LLM_RETENTION_DAYS": value})
        setting = run_cli("prune", SSE_LLM_RETENTION_DAYS=value, DATABASE_URL=own_database)
        assert setting.returncode == 2
        assert "SSE_LLM_RETENTION_DAYS must be" in setting.stderr
    assert remaining(conn, "conversations", [old]) == {old}


def test_prune_without_an_age_uses_the_setting_or_says_what_it_needs(
    own_database: str, conn: psycopg.Connection
) -> None:
    old = add(conn, 3)
    missing = run_cli("prune", DATABASE_URL=own_database, SSE_LLM_RETENTION_DAYS="")
    assert missing.returncode == 2
    assert "--older-than DAYS" in missing.stderr
    assert remaining(conn, "conversations", [old]) == {old}
    result = run_cli("prune", DATABASE_URL=own_database, SSE_LLM_RETENTION_DAYS="2")
    assert result.returncode == 0, result.stderr
    assert remaining(conn, "conversations", [old]) == set()


def seed_old(conn: psycopg.Connection, count: int) -> None:
    """`count` old completed conversations (no chunks), quickly."""
    conn.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, created_at, model, provider)
        SELECT gen_random_uuid(), 'p', 'r', 'completed',
               now() - interval '10 days' - g * interval '1 s', 'bulk', 'demo'
        FROM generate_series(1, %s) g
        """,
        (count,),
    )


def test_a_second_pruner_says_another_runs_and_deletes_nothing(
    own_database: str, conn: psycopg.Connection
) -> None:
    old = add(conn, 10)
    with psycopg.connect(own_database, autocommit=True) as holder:
        # Holding the lock as a running pruner does.
        holder.execute("SELECT pg_advisory_lock(%s, 0)", (retention.PRUNE_LOCK_NAMESPACE,))
        result = run_cli("prune", "--older-than", "1", DATABASE_URL=own_database)
        assert result.returncode == 3
        assert "another pruner is running" in result.stderr
        assert remaining(conn, "conversations", [old]) == {old}
        # A dry run takes no lock: it deletes nothing.
        assert (
            run_cli("prune", "--older-than", "1", "--dry-run", DATABASE_URL=own_database).returncode
            == 0
        )
    assert run_cli("prune", "--older-than", "1", DATABASE_URL=own_database).returncode == 0
    assert remaining(conn, "conversations", [old]) == set()


def pruner_holds_lock(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        """
        SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
        WHERE l.locktype = 'advisory' AND l.classid = %s AND l.granted
          AND a.application_name = 'sse-llm pruner'
        """,
        (retention.PRUNE_LOCK_NAMESPACE,),
    ).fetchone()
    return row is not None and row[0] > 0


@pytest.mark.slow
def test_two_pruner_processes_at_once_never_both_run(
    own_database: str, conn: psycopg.Connection
) -> None:
    seed_old(conn, 60_000)
    first = start_cli("prune", "--older-than", "1", DATABASE_URL=own_database)
    try:
        wait_until(lambda: pruner_holds_lock(conn), 30, 0.02, "the first pruner never ran")
        second = run_cli("prune", "--older-than", "1", DATABASE_URL=own_database)
        still_running = first.poll() is None
        out, err = first.communicate(timeout=180)
    finally:
        first.kill()
    assert still_running, "the first pruner ended before the second started: seed more rows"
    assert second.returncode == 3, second.stderr
    assert "another pruner is running" in second.stderr
    assert first.returncode == 0, err
    assert out.startswith("deleted 60000 conversations")
    assert conn.execute("SELECT count(*) FROM conversations").fetchone() == (0,)


def test_the_service_prunes_in_the_background_with_the_setting(
    own_database: str, conn: psycopg.Connection
) -> None:
    old, young = add(conn, 2.5), add(conn, 1.5)
    server = spawn_server(own_database, SSE_LLM_RETENTION_DAYS="2", SSE_LLM_LEASE_INTERVAL="0.5")
    try:
        wait_until(lambda: not remaining(conn, "conversations", [old]), 30, 0.1, "not pruned")
        assert remaining(conn, "conversations", [young]) == {young}
        assert remaining(conn, "chunks", [old, young]) == {young}
        wait_until(lambda: "pruned 1 conversations" in server.log(), 10, 0.1, server.log())
    finally:
        server.stop()


@pytest.mark.slow
def test_a_prune_while_a_stream_runs_leaves_the_stream_exact(
    own_database: str, conn: psycopg.Connection
) -> None:
    seed_old(conn, 20_000)
    server = spawn_server(own_database, DEMO_TOKENS="60", DEMO_TOKENS_PER_SECOND="10")
    try:
        stream = BackgroundStream(server.url, f"stream while pruning {word()}")
        stream.wait_chunks(3)
        # The oldest of all, so the first batch meets it while it streams (6 s), and the
        # prune's later batches run while it goes on.
        conn.execute(
            "UPDATE conversations SET created_at = now() - interval '50 days' WHERE id = %s",
            (stream.conversation_id,),
        )
        result = run_cli(
            "prune", "--older-than", "1", "--include-reviewed", DATABASE_URL=own_database
        )
        events = stream.join()
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 20000 conversations")
    chunks = [event.data for event in events if event.event == "message"]
    assert events[-1].event == "done"
    assert len(chunks) == 60
    row = conn.execute(
        "SELECT status, response, chunk_count FROM conversations WHERE id = %s",
        (stream.conversation_id,),
    ).fetchone()
    assert row is not None
    status, response, chunk_count = row
    assert (status, chunk_count) == ("completed", 60)
    stored = conn.execute(
        "SELECT string_agg(text, '' ORDER BY seq), count(*) FROM chunks WHERE conversation_id = %s",
        (stream.conversation_id,),
    ).fetchone()
    assert stored == (response, 60)
    assert "".join(event.json["text"] for event in events if event.event == "message") == response


def rollups_honour_keep_rollups(conn: psycopg.Connection) -> bool:
    """Whether the rollups' triggers on conversations skip a prune's deletes (the rollups
    part of issue 15, merged or not)."""
    return bool(
        one(
            conn,
            """
            SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
            WHERE t.tgrelid = 'conversations'::regclass AND p.prosrc LIKE '%%keep_rollups%%'
            """,
        )
    )


def test_pruning_keeps_the_rollups_and_the_history_counts_match_the_table(
    own_database: str, conn: psycopg.Connection
) -> None:
    if not rollups_honour_keep_rollups(conn):
        pytest.skip("the rollups' delete triggers do not honour sse_llm.keep_rollups yet")
    model = f"kept-{word()}"
    reviewed = add(conn, 38, "completed", model)
    review(conn, reviewed)
    for days, status in [(40, "completed"), (40, "failed"), (35, "completed"), (2, "completed")]:
        add(conn, days, status, model)
    server = spawn_server(own_database)
    try:

        def stats() -> dict[str, Any]:
            query = {"bucket": "day", "model": model}
            totals: dict[str, Any] = httpx.get(f"{server.url}/stats", params=query).json()["totals"]
            return totals

        before = stats()
        result = run_cli(
            "prune", "--older-than", "30", "--include-reviewed", DATABASE_URL=own_database
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("deleted 4 conversations")
        # The pruned periods keep their figures in /stats (the days of 35-40 days ago are
        # inside its default 90 days), reviews included ...
        after = stats()
        assert after == before
        by_status = {status: n for status, n in after["by_status"].items() if n}
        assert (after["conversations"], by_status) == (5, {"completed": 4, "failed": 1})
        assert after["reviews"]["reviewed"] == 1
        page = httpx.get(f"{server.url}/")
    finally:
        server.stop()

    # ... and the history page's counts say what it can list: only the young one is left.
    async def history_counts() -> dict[str, int]:
        async with AsyncConnectionPool(own_database, kwargs={"autocommit": True}) as pool:
            return {c.status: c.count for c in await history_queries.count_by_status(pool)}

    table: dict[str, int] = dict(
        conn.execute("SELECT status, count(*)::int FROM conversations GROUP BY 1").fetchall()
    )
    assert run(history_counts) == table == {"completed": 1}
    assert page.status_code == 200


def test_store_namespaces_do_not_clash_with_the_pruners() -> None:
    namespaces = {
        store.INSTANCE_LOCK_NAMESPACE,
        store.FENCE_LOCK_NAMESPACE,
        rollup_store.COUNTS_LOCK_NAMESPACE,
    }
    assert retention.PRUNE_LOCK_NAMESPACE not in namespaces


def test_a_long_prune_returns_once_nothing_old_is_left(
    own_database: str, conn: psycopg.Connection
) -> None:
    seed_old(conn, 1_234)
    began = time.monotonic()
    result = run(retention.prune(own_database, 1, batch_size=100, min_pause=0))
    assert (result.deleted, result.batches) == (1_234, 13)
    assert result.longest_batch_seconds <= time.monotonic() - began


def delivery_of(conversation_id: UUID, ended: DeliveryEnd | None) -> delivery_store.DeliveryRow:
    """An attach to the conversation, open (ended None) or ended."""
    now = datetime.now(UTC)
    return delivery_store.DeliveryRow(
        uuid4(), conversation_id, DeliveryVia.ATTACH, uuid4(), now,
        now if ended else None, 1, 3 if ended else None, ended,
    )  # fmt: skip


def test_a_delivery_ended_after_its_conversation_was_pruned_is_not_brought_back(
    own_database: str, conn: psycopg.Connection
) -> None:
    old = add(conn, 40)
    opened = delivery_of(old, None)

    async def scenario() -> None:
        async with await AsyncConnection.connect(own_database, autocommit=True) as writer:
            await delivery_store.write_deliveries(writer, [opened])
            assert remaining(conn, "deliveries", [old]) == {old}
            # A slow client is still being replayed the old answer when the prune runs.
            await retention.prune(own_database, 30, min_pause=0)
            ended = replace(opened, ended_at=datetime.now(UTC), last_seq=3, ended=DeliveryEnd.DONE)
            await delivery_store.write_deliveries(writer, [ended, delivery_of(old, None)])

    run(scenario)
    assert remaining(conn, "conversations", [old]) == set()
    assert remaining(conn, "deliveries", [old]) == set()


def test_a_delivery_written_while_a_prune_deletes_its_conversation_waits_and_is_dropped(
    own_database: str, conn: psycopg.Connection
) -> None:
    old, kept = add(conn, 40), add(conn, 1)

    async def scenario() -> bool:
        connect = AsyncConnection.connect
        async with (
            await connect(own_database) as pruner,
            await connect(own_database, autocommit=True) as writer,
        ):
            # The prune's batch, stopped before its commit: rows locked, then deleted.
            await pruner.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (old,))
            await pruner.execute("DELETE FROM deliveries WHERE conversation_id = %s", (old,))
            await pruner.execute("DELETE FROM conversations WHERE id = %s", (old,))
            rows = [delivery_of(old, DeliveryEnd.DONE), delivery_of(kept, DeliveryEnd.DONE)]
            written = asyncio.create_task(delivery_store.write_deliveries(writer, rows))
            deadline = time.monotonic() + 3
            waited = False
            while not waited and time.monotonic() < deadline and not written.done():
                waited = one(
                    conn,
                    "SELECT count(*) > 0 FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                await asyncio.sleep(0.02)
            await pruner.commit()
            await written
            return waited

    waited = run(scenario)
    # It waited for the prune to end, as a foreign key's check would, then wrote the
    # delivery of the conversation that is left and not the other's.
    assert waited
    assert remaining(conn, "deliveries", [old]) == set()
    assert one(conn, "SELECT count(*) FROM deliveries WHERE conversation_id = %s", kept) == 2
