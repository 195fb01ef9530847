"""The /stats rollups (migration 0013) always equal a recomputation from the tables.

Every path that creates, ends, settles, repairs, reviews or deletes conversations keeps
them; folding keeps every sum; pruning (keep_rollups) keeps what was counted. Each test
uses a model name of its own, so it reads only its own figures.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg_pool import AsyncConnectionPool

from sse_llm import recovery_store, review_store, rollup_store, store
from sse_llm.contract import ErrorCode, Status, Verdict
from sse_llm.stats_queries import BINS, stats_bin
from sse_llm.store import Ending, NewConversation
from tests.conftest import word
from tests.test_counts import actual, counted, hold_instance_lock

_BIN_SUMS = ", ".join(f"sum(t{k}), sum(d{k})" for k in range(BINS))


def rolled(db: psycopg.Connection, model: str, table: str = "conversation_stats_live") -> Counter:
    """`model`'s figures as the rollup holds them (with the deltas not folded yet), summed
    over writers, zeros left out."""
    rows = db.execute(
        f"""
        SELECT date_trunc('hour', bucket, 'UTC'), status, error_code, sum(conversations),
               sum(ended), sum(chunks), sum(prompt_tokens), sum(completion_tokens),
               sum(tokens_estimated), {_BIN_SUMS}
        FROM {table} WHERE model = %s GROUP BY 1, 2, 3
        """,
        (model,),
    ).fetchall()
    figures: Counter = Counter()
    names = ["conversations", "ended", "chunks", "prompt", "completion", "estimated"]
    names += [f"{h}{k}" for k in range(BINS) for h in ("t", "d")]
    for bucket, status, code, *values in rows:
        for name, value in zip(names, values, strict=True):
            if value:
                figures[(bucket, status, code, name)] += int(value)
    return figures


def recomputed(db: psycopg.Connection, model: str) -> Counter:
    """`model`'s figures computed from the conversations table (bins in Python)."""
    rows = db.execute(
        """
        SELECT date_trunc('hour', created_at, 'UTC'), status, coalesce(error_code, ''),
               chunk_count, prompt_tokens, completion_tokens, tokens_estimated,
               extract(epoch FROM first_chunk_at - created_at)::float8 * 1000,
               extract(epoch FROM completed_at - created_at)::float8 * 1000
        FROM conversations WHERE model = %s
        """,
        (model,),
    ).fetchall()
    figures: Counter = Counter()
    for bucket, status, code, chunks, prompt, completion, estimated, ttfc, took in rows:
        key = (bucket, status, code)
        figures[(*key, "conversations")] += 1
        if status == Status.STREAMING:
            continue
        figures[(*key, "ended")] += 1
        figures[(*key, "chunks")] += chunks
        figures[(*key, "prompt")] += prompt or 0
        figures[(*key, "completion")] += completion or 0
        figures[(*key, "estimated")] += 1 if estimated else 0
        if ttfc is not None:
            figures[(*key, f"t{stats_bin(ttfc)}")] += 1
        if took is not None:
            figures[(*key, f"d{stats_bin(took)}")] += 1
    return +figures  # zeros left out


def rolled_reviews(db: psycopg.Connection, model: str) -> Counter:
    rows = db.execute(
        """
        SELECT bucket, status, sum(reviewed), sum(good), sum(bad), sum(unsure)
        FROM review_counts WHERE model = %s GROUP BY 1, 2
        """,
        (model,),
    ).fetchall()
    figures: Counter = Counter()
    for bucket, status, *values in rows:
        for name, value in zip(("reviewed", "good", "bad", "unsure"), values, strict=True):
            figures[(bucket, status, name)] += int(value)
    return +figures


def recomputed_reviews(db: psycopg.Connection, model: str) -> Counter:
    rows = db.execute(
        """
        SELECT date_trunc('hour', c.created_at, 'UTC'), c.status, c.id, r.verdict
        FROM conversations c JOIN reviews r ON r.conversation_id = c.id WHERE c.model = %s
        """,
        (model,),
    ).fetchall()
    figures: Counter = Counter()
    reviewed = set()
    for bucket, status, conversation_id, verdict in rows:
        figures[(bucket, status, verdict)] += 1
        if conversation_id not in reviewed:
            reviewed.add(conversation_id)
            figures[(bucket, status, "reviewed")] += 1
    return figures


def assert_true(db: psycopg.Connection, model: str) -> None:
    """The rollups of `model` equal the tables (conversations, reviews)."""
    assert rolled(db, model) == recomputed(db, model)
    assert rolled_reviews(db, model) == recomputed_reviews(db, model)
    assert counted(db, model) == actual(db, model)


def by_status(db: psycopg.Connection, model: str) -> dict[str, int]:
    """`model`'s conversations by status, as the rollup holds them."""
    found: Counter = Counter()
    for (_, status, _, name), value in rolled(db, model).items():
        if name == "conversations":
            found[status] += value
    return dict(+found)


def new(model: str, owner_id: UUID) -> NewConversation:
    return NewConversation(uuid4(), "a prompt", model, "demo", owner_id)


def insert_by_hand(db: psycopg.Connection, model: str, count: int, **columns: Any) -> list[UUID]:
    """`count` ended conversations with varied times, chunks and tokens, by SQL."""
    ago = columns.get("ago", timedelta(0))
    rows = db.execute(
        """
        INSERT INTO conversations (id, prompt, status, created_at, first_chunk_at,
            completed_at, model, provider, chunk_count, error_code, prompt_tokens,
            completion_tokens, tokens_estimated, owner_id)
        SELECT gen_random_uuid(), 'p', CASE WHEN g %% 4 = 0 THEN 'failed' ELSE 'completed' END,
               now() - %(ago)s, now() - %(ago)s + g * interval '7 ms',
               now() - %(ago)s + g * interval '90 ms', %(model)s, 'demo', g,
               CASE WHEN g %% 4 = 0 THEN 'upstream_error' END, 10 + g, 2 * g, g %% 3 = 0,
               %(owner)s
        FROM generate_series(1, %(count)s) AS g
        RETURNING id
        """,
        {"ago": ago, "model": model, "count": count, "owner": columns.get("owner")},
    ).fetchall()
    return [row[0] for row in rows]


async def test_every_store_path_keeps_the_stats_equal_to_the_table(
    database_url: str, db: psycopg.Connection
) -> None:
    model, owner = f"stats-{word()}", uuid4()
    hold_instance_lock(db, owner)
    conversations = [new(model, owner) for _ in range(6)]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.insert_conversations(conn, conversations)
        await store.insert_conversations(conn, conversations)  # a retry: counted once
        assert_true(db, model)
        assert by_status(db, model) == {"streaming": 6}
        # Chunks as the writer stores them (the end reads their count and first time).
        db.execute(
            "INSERT INTO chunks (conversation_id, seq, text, created_at)"
            " SELECT %s, g, 'x', now() + g * interval '40 ms' FROM generate_series(1, 3) g",
            (conversations[0].id,),
        )
        ends = [
            Ending(conversations[0].id, Status.COMPLETED),
            Ending(conversations[1].id, Status.FAILED, ErrorCode.UPSTREAM_ERROR, "broken"),
        ]
        await store.finish_conversations(conn, ends, owner)
        await store.finish_conversations(conn, ends, owner)  # a retry changes nothing
        assert_true(db, model)
        await store.delete_unconfirmed_conversations(conn, [conversations[2].id])
        assert_true(db, model)
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        await recovery_store.interrupt_conversations(
            pool, owner_id=owner, except_ids=[conversations[3].id]
        )
    assert_true(db, model)
    assert by_status(db, model) == {"completed": 1, "failed": 1, "interrupted": 2, "streaming": 1}
    assert any(key[3].startswith("t") for key in rolled(db, model))  # a first chunk's time


def test_sql_run_by_hand_keeps_the_stats_too(db: psycopg.Connection) -> None:
    model = f"stats-{word()}"
    insert_by_hand(db, model, 40)
    assert_true(db, model)
    # A repair: statuses, codes, tokens and times changed by hand.
    db.execute(
        """
        UPDATE conversations SET status = 'cancelled', error_code = 'cancelled',
            completion_tokens = completion_tokens + 5,
            completed_at = completed_at + interval '2 s'
        WHERE model = %s AND chunk_count %% 5 = 0
        """,
        (model,),
    )
    db.execute(
        "UPDATE conversations SET tokens_estimated = NOT tokens_estimated WHERE model = %s",
        (model,),
    )
    assert_true(db, model)
    db.execute("DELETE FROM conversations WHERE model = %s AND chunk_count %% 3 = 0", (model,))
    assert_true(db, model)


def test_a_big_update_that_changes_no_counted_column_takes_linear_time(
    db: psycopg.Connection,
) -> None:
    """Migration 0019: the trigger's questions about old and new rows are hash joins. With
    0013's EXISTS the planner read every pair by a nested loop (8,000 rows: 13 s; these
    20,000 would take over a minute): here they take a second or two."""
    model = f"stats-{word()}"
    insert_by_hand(db, model, 20_000)
    db.execute("SET statement_timeout = '10s'")
    try:
        db.execute(
            "UPDATE conversations SET delivery_cut = NOT delivery_cut WHERE model = %s", (model,)
        )
        # One changed row among thousands that are not: still counted.
        db.execute(
            "UPDATE conversations SET delivery_cut = false,"
            " status = CASE WHEN chunk_count = 20000 THEN 'cancelled' ELSE status END"
            " WHERE model = %s",
            (model,),
        )
    finally:
        db.execute("RESET statement_timeout")
    assert by_status(db, model)["cancelled"] == 1
    assert_true(db, model)


async def test_a_dead_processs_streams_settled_by_another_are_counted_as_interrupted(
    database_url: str, db: psycopg.Connection
) -> None:
    model, dead, settler = f"stats-{word()}", uuid4(), uuid4()
    db.execute(
        "INSERT INTO instances (id, server_started_at) VALUES (%s, pg_postmaster_start_time())",
        (dead,),
    )
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.insert_conversations(conn, [new(model, dead) for _ in range(3)])
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        await recovery_store.interrupt_orphaned_conversations(
            pool, settler_id=settler, quiet_server=None
        )
    assert by_status(db, model) == {"interrupted": 3}
    assert_true(db, model)


async def test_review_edits_keep_the_review_figures_by_the_conversations_status(
    database_url: str, db: psycopg.Connection
) -> None:
    model, owner = f"stats-{word()}", uuid4()
    hold_instance_lock(db, owner)
    ended = insert_by_hand(db, model, 3)
    streaming = new(model, owner)
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        async with pool.connection() as conn:
            await store.insert_conversations(conn, [streaming])
        for conversation_id, reviewer, verdict in [
            (ended[0], "ana", Verdict.GOOD),
            (ended[0], "bo", Verdict.BAD),
            (ended[1], "ana", Verdict.UNSURE),
            (streaming.id, "ana", Verdict.GOOD),  # a streaming answer may be reviewed
        ]:
            await review_store.put_review(pool, conversation_id, reviewer, verdict, [], "")
        assert_true(db, model)
        await review_store.put_review(pool, ended[0], "bo", Verdict.GOOD, ["x"], "changed")
        await review_store.put_review(pool, ended[1], "ana", Verdict.UNSURE, [], "a note")
        assert_true(db, model)
        await review_store.delete_review(pool, ended[1], "ana")
        assert_true(db, model)
        # The reviewed stream ends: its review now counts under its end's status.
        async with pool.connection() as conn:
            await store.finish_conversations(conn, [Ending(streaming.id, Status.COMPLETED)], owner)
        assert rolled_reviews(db, model).get((_hour(db, streaming.id), "streaming", "good")) is None
        assert_true(db, model)
    # Deleting a reviewed conversation takes its reviews away (by cascade).
    db.execute("DELETE FROM conversations WHERE id = %s", (ended[0],))
    assert_true(db, model)


def _hour(db: psycopg.Connection, conversation_id: UUID) -> Any:
    row = db.execute(
        "SELECT date_trunc('hour', created_at, 'UTC') FROM conversations WHERE id = %s",
        (conversation_id,),
    ).fetchone()
    assert row is not None
    return row[0]


def test_pruning_with_keep_rollups_keeps_every_rollup(db: psycopg.Connection) -> None:
    model = f"stats-{word()}"
    ids = insert_by_hand(db, model, 20)
    db.execute(
        "INSERT INTO reviews (conversation_id, reviewer, verdict, conversation_created_at)"
        " SELECT id, 'ana', 'good', created_at FROM conversations WHERE id = ANY(%s)",
        (ids[:5],),
    )
    before = (rolled(db, model), rolled_reviews(db, model), counted(db, model))
    assert_true(db, model)
    with db.transaction():
        db.execute("SET LOCAL sse_llm.keep_rollups = 'on'")
        db.execute("DELETE FROM conversations WHERE id = ANY(%s)", (ids[:10],))
    assert (rolled(db, model), rolled_reviews(db, model), counted(db, model)) == before
    # Without it (an operator's DELETE), the figures follow the table.
    db.execute("DELETE FROM conversations WHERE id = ANY(%s)", (ids[10:15],))
    remaining = recomputed(db, model)
    pruned = before[0] - rolled(db, model)
    assert sum(v for k, v in pruned.items() if k[3] == "conversations") == 5
    assert sum(v for k, v in remaining.items() if k[3] == "conversations") == 5


async def test_folding_keeps_every_sum_and_fills_the_daily_table(
    database_url: str, db: psycopg.Connection
) -> None:
    model = f"stats-{word()}"
    owners = [uuid4(), uuid4()]
    for owner in owners:
        insert_by_hand(db, model, 12, ago=timedelta(hours=3), owner=owner)
    insert_by_hand(db, model, 5, ago=timedelta(days=2))
    insert_by_hand(db, model, 4)  # this hour: not folded yet
    db.execute(
        "INSERT INTO reviews (conversation_id, reviewer, verdict, conversation_created_at)"
        " SELECT id, 'ana', 'bad', created_at FROM conversations WHERE model = %s",
        (model,),
    )
    before = rolled(db, model)
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        await rollup_store.fold_counts(pool)
    assert rolled(db, model) == before
    assert_true(db, model)
    writers = db.execute(
        "SELECT DISTINCT writer = %s FROM conversation_stats WHERE model = %s"
        " AND bucket < date_trunc('hour', now(), 'UTC') - interval '1 hour'",
        (rollup_store.NO_WRITER, model),
    ).fetchall()
    assert writers == [(True,)]
    assert db.execute(
        "SELECT DISTINCT writer FROM review_counts WHERE model = %s", (model,)
    ).fetchall() == [(0,)]
    # A day = its daily row + its unfolded hours: the same as the hours summed.
    by_day = _days(db, "conversation_stats", model)
    daily = _days(db, "conversation_stats_daily", model) + _days(
        db, "conversation_stats", model, unfolded=True
    )
    assert by_day == daily


def _days(db: psycopg.Connection, table: str, model: str, *, unfolded: bool = False) -> Counter:
    where = f"AND writer <> '{rollup_store.NO_WRITER}'" if unfolded else ""
    rows = db.execute(
        f"""
        SELECT date_trunc('day', bucket, 'UTC'), status, sum(conversations), sum(ended),
               sum(chunks), sum(t20) FILTER (WHERE true), sum(d40)
        FROM {table} WHERE model = %s {where} GROUP BY 1, 2
        """,
        (model,),
    ).fetchall()
    found: Counter = Counter()
    for day, status, *values in rows:
        for index, value in enumerate(values):
            found[(day, status, index)] += int(value or 0)
    return +found


async def test_two_writers_ending_streams_of_one_hour_never_wait_for_each_other(
    database_url: str, db: psycopg.Connection
) -> None:
    model, first, second = f"stats-{word()}", uuid4(), uuid4()
    hold_instance_lock(db, first)
    hold_instance_lock(db, second)
    a, b = new(model, first), new(model, second)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as one,
        await psycopg.AsyncConnection.connect(database_url) as two,
    ):
        await store.insert_conversations(one, [a])
        await store.insert_conversations(two, [b])
        await one.commit()
        await two.commit()
        # `one` ends its stream and holds its transaction open (its rows' locks)...
        await store.finish_conversations(one, [Ending(a.id, Status.COMPLETED)], first)
        # ...while `two` ends a stream of the same hour and model: its own rows.
        await two.execute("SET lock_timeout = '2s'")
        await asyncio.wait_for(
            store.finish_conversations(two, [Ending(b.id, Status.COMPLETED)], second), 10
        )
        await two.commit()
        await one.commit()
    assert by_status(db, model) == {"completed": 2}
    assert_true(db, model)


async def test_the_writers_statements_leave_deltas_that_the_fold_moves_in(
    database_url: str, db: psycopg.Connection
) -> None:
    # Migration 0021: a create or an end appends narrow deltas (not the 180-bin upsert
    # the writer's batch waited for); readers count them at once, a fold moves them in.
    model, owner = f"stats-{word()}", uuid4()
    hold_instance_lock(db, owner)
    # No server folds meanwhile: this session holds both folds' locks.
    locks = [
        (rollup_store.COUNTS_LOCK_NAMESPACE, key) for key in (0, rollup_store.PENDING_FOLD_LOCK)
    ]
    for lock in locks:
        db.execute("SELECT pg_advisory_lock(%s, %s)", lock)
    conversations = [new(model, owner) for _ in range(4)]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.insert_conversations(conn, conversations)
        ends = [Ending(c.id, Status.COMPLETED) for c in conversations[:3]]
        await store.finish_conversations(conn, ends, owner)

    def table_rows() -> int:
        row = db.execute(
            "SELECT count(*) FROM conversation_stats WHERE model = %s", (model,)
        ).fetchone()
        return row[0] if row else 0

    pending = db.execute(
        "SELECT sum(sign) FROM conversation_stats_pending WHERE model = %s GROUP BY status"
        " ORDER BY status",
        (model,),
    ).fetchall()
    assert table_rows() == 0
    assert pending == [(3,), (1,)]  # completed +3; streaming +4 -3
    assert_true(db, model)

    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        assert await rollup_store.fold_pending_stats(pool) == 0  # the lock is held: skipped
        for lock in locks:
            db.execute("SELECT pg_advisory_unlock(%s, %s)", lock)
        assert await rollup_store.fold_pending_stats(pool) >= 4 + 2 * 3
    assert table_rows() > 0
    assert db.execute(
        "SELECT count(*) FROM conversation_stats_pending WHERE model = %s", (model,)
    ).fetchone() == (0,)
    assert rolled(db, model, "conversation_stats") == recomputed(db, model)
    assert_true(db, model)
