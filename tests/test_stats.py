"""GET /stats (SPEC 10): the figures equal a direct computation over the table, in the
SPEC's shape; percentiles within the histogram's stated error; filters the rollups cannot
answer are estimates over a bounded sample; bad parameters are 422s."""

from __future__ import annotations

import itertools
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from sse_llm import stats_queries
from sse_llm.contract import Status
from sse_llm.history_filters import HistoryFilter
from sse_llm.stats_queries import BINS, bin_value, percentile, stats_bin
from tests.conftest import word
from tests.test_rollups import insert_by_hand

# Percentiles read as a bin's geometric middle: within a factor 2^(1/8) of the truth.
STATED_ERROR = 2 ** (1 / 8) - 1  # 9.05%
FIGURE_KEYS = {
    "conversations", "by_status", "errors", "ttfc_ms", "duration_ms", "chunks", "tokens",
    "reviews",
}  # fmt: skip


def direct(db: psycopg.Connection, model: str, status: str | None = None) -> dict[str, Any]:
    """`model`'s figures computed by SQL over conversations and reviews, not the rollups."""
    where = "c.model = %(model)s AND (%(status)s::text IS NULL OR c.status = %(status)s)"
    params = {"model": model, "status": status}
    by_status = dict(
        db.execute(
            f"SELECT status, count(*) FROM conversations c WHERE {where} GROUP BY 1", params
        ).fetchall()
    )
    errors = dict(
        db.execute(
            f"SELECT error_code, count(*) FROM conversations c WHERE {where}"
            " AND error_code IS NOT NULL GROUP BY 1",
            params,
        ).fetchall()
    )
    row = db.execute(
        f"""
        SELECT sum(chunk_count), count(*), coalesce(sum(prompt_tokens), 0),
               coalesce(sum(completion_tokens), 0), count(*) FILTER (WHERE tokens_estimated)
        FROM conversations c WHERE {where} AND status <> 'streaming'
        """,
        params,
    ).fetchone()
    reviews = db.execute(
        f"""
        SELECT count(DISTINCT r.conversation_id), count(*) FILTER (WHERE verdict = 'good'),
               count(*) FILTER (WHERE verdict = 'bad'), count(*) FILTER (WHERE verdict = 'unsure')
        FROM reviews r JOIN conversations c ON c.id = r.conversation_id WHERE {where}
        """,
        params,
    ).fetchone()
    assert row is not None and reviews is not None
    return {
        "conversations": sum(by_status.values()),
        "by_status": {s: by_status.get(s, 0) for s in Status},
        "errors": errors,
        "chunks": {"mean": round(row[0] / row[1], 2) if row[1] else None},
        "tokens": {"prompt": row[2], "completion": row[3], "estimated": row[4]},
        "reviews": dict(zip(("reviewed", "good", "bad", "unsure"), reviews, strict=True)),
    }


def review(db: psycopg.Connection, model: str) -> None:
    """Reviews on some of `model`'s conversations: two reviewers on a few."""
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, conversation_created_at)
        SELECT id, r.name, (ARRAY['good', 'bad', 'unsure'])[1 + chunk_count %% 3], created_at
        FROM conversations, (VALUES ('ana'), ('bo')) AS r(name)
        WHERE model = %s AND (chunk_count %% 4 = 1 OR (r.name = 'ana' AND chunk_count %% 4 = 2))
        """,
        (model,),
    )


def figures_of(body: dict[str, Any]) -> dict[str, Any]:
    return {key: body[key] for key in ("conversations", "by_status", "errors", "chunks",
                                       "tokens", "reviews")}  # fmt: skip


@pytest.mark.parametrize("bucket", ["hour", "day"])
def test_the_figures_equal_a_direct_computation_in_the_spec_shape(
    client: httpx.Client, db: psycopg.Connection, bucket: str
) -> None:
    model = f"stats-{word()}"
    insert_by_hand(db, model, 60)
    insert_by_hand(db, model, 30, ago=timedelta(days=3))
    review(db, model)
    response = client.get("/stats", params={"model": model, "bucket": bucket})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"buckets", "totals", "estimate"}
    assert body["estimate"] is False
    assert set(body["totals"]) == FIGURE_KEYS
    assert figures_of(body["totals"]) == direct(db, model)
    for item in body["buckets"]:
        assert set(item) == FIGURE_KEYS | {"start"}
        assert set(item["ttfc_ms"]) == set(item["duration_ms"]) == {"p50", "p95"}
    starts = [datetime.fromisoformat(item["start"]) for item in body["buckets"]]
    width = timedelta(hours=1) if bucket == "hour" else timedelta(days=1)
    assert all(b - a == width for a, b in itertools.pairwise(starts))
    assert all(s.utcoffset() == timedelta(0) and s.minute == 0 for s in starts)
    assert len(starts) in ((168, 169) if bucket == "hour" else (90, 91))
    busy = [item for item in body["buckets"] if item["conversations"]]
    assert [item["conversations"] for item in busy] == [30, 60]
    # A status filter: from the rollups too, the reviews of that status only.
    failed = client.get("/stats", params={"model": model, "status": "failed"}).json()
    assert failed["estimate"] is False
    assert figures_of(failed["totals"]) == direct(db, model, "failed")


def exact_percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


async def test_percentiles_are_within_the_stated_error(
    database_url: str, db: psycopg.Connection
) -> None:
    model = f"stats-{word()}"
    rng = random.Random(15)
    # Log-uniform from 0.5 ms to 20 minutes: every scale a bin must read right. As many as
    # the sample holds, so the estimated figures (q=) are of the same conversations.
    ttfc = [
        math.exp(rng.uniform(math.log(0.5), math.log(60_000)))
        for _ in range(stats_queries.SAMPLE_SIZE)
    ]
    took = [t + math.exp(rng.uniform(math.log(1), math.log(1_200_000))) for t in ttfc]
    db.execute(
        """
        INSERT INTO conversations (id, prompt, status, created_at, first_chunk_at,
            completed_at, model, provider, chunk_count)
        SELECT gen_random_uuid(), 'p', 'completed', now(), now() + t * interval '1 ms',
               now() + d * interval '1 ms', %s, 'demo', 1
        FROM unnest(%s::float8[], %s::float8[]) AS x(t, d)
        """,
        (model, ttfc, took),
    )
    now = datetime.now(UTC)
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        for chosen in (HistoryFilter(model=model), HistoryFilter(model=model, q="p")):
            body = await stats_queries.stats(pool, chosen, "day", now - timedelta(days=2), now)
            for name, values in (("ttfc_ms", ttfc), ("duration_ms", took)):
                for key, fraction in (("p50", 0.5), ("p95", 0.95)):
                    true = exact_percentile(values, fraction)
                    reported = body["totals"][name][key]
                    assert abs(reported / true - 1) <= STATED_ERROR + 0.001, (name, key)


def test_the_python_bins_are_the_migrations_bins(db: psycopg.Connection) -> None:
    samples = [0.0, 0.99, 1.0, 1.1, 7.3, 299.9, 300.0, 3000.0, 65_000.0, 4.2e6, 9e9]
    row = db.execute(
        "SELECT array_agg(stats_bin(x) ORDER BY n) FROM unnest(%s::float8[])"
        " WITH ORDINALITY AS u(x, n)",
        (samples,),
    ).fetchone()
    assert row is not None
    assert row[0] == [stats_bin(x) for x in samples]
    # Every value reads back within the stated error (between 1 ms and 70 minutes).
    for value in (1.0, 1.5, 17.0, 333.3, 5_000.0, 4_000_000.0):
        assert abs(bin_value(stats_bin(value)) / value - 1) <= STATED_ERROR + 1e-9
    assert percentile([0] * BINS, 0.5) is None


@pytest.mark.parametrize(
    "params",
    [
        {"q": "prompt"},
        {"verdict": "good"},
        {"consensus": "bad"},
        {"reviewer": "ana"},
        {"label": "tone"},
        {"reviewed": "true"},
        {"reviewed": "false"},
    ],
)
def test_filters_the_rollups_cannot_answer_are_estimates(
    client: httpx.Client, db: psycopg.Connection, params: dict[str, str]
) -> None:
    model = f"stats-{word()}"
    insert_by_hand(db, model, 8)
    db.execute("UPDATE conversations SET prompt = 'a prompt' WHERE model = %s", (model,))
    review(db, model)
    body = client.get("/stats", params={"model": model, **params}).json()
    assert body["estimate"] is True
    assert set(body["totals"]) == FIGURE_KEYS


def test_a_sample_covering_every_match_gives_the_rollups_figures(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    model = f"stats-{word()}"
    insert_by_hand(db, model, 40)
    review(db, model)
    marker = word()
    db.execute("UPDATE conversations SET prompt = %s WHERE model = %s", (marker, model))
    rollups = client.get("/stats", params={"model": model}).json()
    sample = client.get("/stats", params={"model": model, "q": marker}).json()
    assert (rollups["estimate"], sample["estimate"]) == (False, True)
    assert sample["totals"] == rollups["totals"]
    assert sample["buckets"] == rollups["buckets"]


async def test_the_sample_is_bounded_to_the_newest_matches(
    database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = f"stats-{word()}"
    insert_by_hand(db, model, 30)
    insert_by_hand(db, model, 10, ago=timedelta(hours=5))
    monkeypatch.setattr(stats_queries, "SAMPLE_SIZE", 25)
    now = datetime.now(UTC)
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        body = await stats_queries.stats(
            pool, HistoryFilter(model=model, q="p"), "hour", now - timedelta(hours=8), now
        )
    assert body["estimate"] is True
    assert body["totals"]["conversations"] == 25
    assert [b["conversations"] for b in body["buckets"] if b["conversations"]] == [25]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"bucket": "week"}, "bucket"),
        ({"status": "nope"}, "status"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"}, "from"),  # 2,160 h
        ({"bucket": "day", "from": "2010-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),
        ({"reviewed": "maybe"}, "reviewed"),
        ({"to": "0001-01-02T00:00:00Z"}, "from"),  # 7 days before it: before year 1
        ({"from": "9999-12-31T23:30:00Z", "to": "9999-12-31T23:59:00Z"}, "from"),
    ],
)
def test_bad_parameters_are_422s_naming_the_field(
    client: httpx.Client, params: dict[str, str], field: str
) -> None:
    response = client.get("/stats", params=params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["message"]


def test_2000_buckets_are_allowed_and_buckets_are_utc(client: httpx.Client) -> None:
    # 2,000 hours exactly; `from` given in another zone is the same instant in UTC.
    params = {"from": "2026-01-01T02:00:00+02:00", "to": "2026-03-25T08:00:00Z"}
    body = client.get("/stats", params=params).json()
    assert len(body["buckets"]) == 2000
    assert body["buckets"][0]["start"] == "2026-01-01T00:00:00+00:00"
    day = client.get("/stats", params={"bucket": "day", **params}).json()
    assert day["buckets"][0]["start"] == "2026-01-01T00:00:00+00:00"
    assert len(day["buckets"]) == 84


def test_openapi_describes_stats(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/stats"]["get"]
    names = {parameter["name"] for parameter in operation["parameters"]}
    assert {"bucket", "q", "status", "model", "from", "to", "verdict", "label"} <= names
    assert set(document["components"]["schemas"]["StatsBucket"]["required"]) == FIGURE_KEYS | {
        "start"
    }
