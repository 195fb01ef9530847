"""The folded hours of every slice together (migration 0017), which GET /stats and
/insights read by hour when no model or status is asked: always the sum of the slices.

Folding adds what it merges to them; a rebuild recomputes them; the rows not folded yet
are added by the reader. Each test checks the whole table's invariant (every hour, not
only its own), and /stats unsliced against the sum of its models' slices.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sse_llm import rollup_store, stats_queries
from sse_llm.history_filters import HistoryFilter
from sse_llm.stats_queries import BINS
from tests.conftest import word
from tests.test_rollups import insert_by_hand

_COLUMNS = ["conversations", "ended", "chunks", "prompt_tokens", "completion_tokens",
            "tokens_estimated", *(f"{h}{k}" for h in ("t", "d") for k in range(BINS))]  # fmt: skip


def hours_that_differ(db: psycopg.Connection) -> list[Any]:
    """Hours whose folded row is not the sum of their folded slices (none, when true)."""
    sums = ", ".join(f"coalesce(sum({c}), 0)::bigint AS {c}" for c in _COLUMNS)
    plain = ", ".join(f"coalesce({c}, 0)::bigint AS {c}" for c in _COLUMNS)
    rows = db.execute(
        f"""
        SELECT coalesce(a.bucket, b.bucket) FROM
            (SELECT bucket, {sums} FROM conversation_stats
             WHERE writer = %(folded)s GROUP BY bucket) AS a
        FULL JOIN (SELECT bucket, {plain} FROM conversation_stats_hours) AS b
            ON a.bucket = b.bucket
        WHERE (a.*) IS DISTINCT FROM (b.*)
        """,
        {"folded": rollup_store.NO_WRITER},
    ).fetchall()
    return [row[0] for row in rows]


async def unsliced_equals_its_slices(pool: AsyncConnectionPool, start: datetime) -> int:
    """/stats by hour unsliced == its models' slices summed, over [start, now]; returns
    the conversations of that range."""
    end = datetime.now(UTC) + timedelta(hours=1)
    whole = await stats_queries.stats(pool, HistoryFilter(), "hour", start, end)
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT DISTINCT model FROM conversation_stats_live WHERE bucket >= %s",
            [start - timedelta(hours=1)],
        )
        models = [row[0] for row in await cursor.fetchall()]
    slices = [
        await stats_queries.stats(pool, HistoryFilter(model=m), "hour", start, end) for m in models
    ]
    for index, bucket in enumerate(whole["buckets"]):
        parts = [s["buckets"][index] for s in slices]
        assert bucket["conversations"] == sum(p["conversations"] for p in parts)
        for key in ("prompt", "completion", "estimated"):
            assert bucket["tokens"][key] == sum(p["tokens"][key] for p in parts)
    assert whole["totals"]["conversations"] == sum(s["totals"]["conversations"] for s in slices)
    return int(whole["totals"]["conversations"])


async def test_folding_adds_every_slice_of_an_hour_to_its_folded_row(
    database_url: str, db: psycopg.Connection
) -> None:
    model = f"hours-{word()}"
    insert_by_hand(db, model, 12, ago=timedelta(hours=3))
    insert_by_hand(db, f"{model}-b", 7, ago=timedelta(hours=3))
    insert_by_hand(db, model, 5, ago=timedelta(days=2))
    insert_by_hand(db, model, 4)  # this hour: not folded yet, read from its slices
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        await rollup_store.fold_counts(pool)
        assert hours_that_differ(db) == []
        start = datetime.now(UTC) - timedelta(hours=4)
        assert await unsliced_equals_its_slices(pool, start) >= 12 + 7 + 4
        # Folded again later (late ends of an old hour): added, not replaced.
        insert_by_hand(db, model, 3, ago=timedelta(hours=3))
        # Before that fold, the hour is its folded row and rows not folded yet: both count.
        assert await unsliced_equals_its_slices(pool, start) >= 12 + 7 + 4 + 3
        await rollup_store.fold_counts(pool)
        assert hours_that_differ(db) == []
        assert await unsliced_equals_its_slices(pool, start) >= 12 + 7 + 4 + 3


def test_a_rebuild_recomputes_the_folded_hours(db: psycopg.Connection) -> None:
    insert_by_hand(db, f"hours-{word()}", 6, ago=timedelta(hours=5))
    db.execute("UPDATE conversation_stats_hours SET conversations = conversations + 1")
    assert hours_that_differ(db) != []  # the check sees a wrong row
    db.execute("SELECT rebuild_conversation_stats()")
    assert hours_that_differ(db) == []
