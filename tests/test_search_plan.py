"""Search planning (search_plan.py): the way to a search's page follows its words' frequency.

A database of its own with 30,000 conversations whose words have known frequencies: a
word in every second one, one in ten, a phrase whose words are in 60% of them but side
by side in 1%, and an absent word. Analysed, so the planner's statistics are real.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, sql

from sse_llm import history_queries, search_plan
from sse_llm.history_filters import HistoryFilter, condition
from tests.conftest import separate_database

ROWS = 30_000
START = datetime(2026, 1, 1, tzinfo=UTC)
COMMON, RARE, ABSENT = "alphacommon", "betararity", "zetanowhere"
PHRASE = '"gammaword deltaword"'

SEED = """
    INSERT INTO conversations (id, prompt, response, status, created_at, model, provider)
    SELECT gen_random_uuid(),
           concat_ws(' ', 'filler text', CASE WHEN i %% 2 = 0 THEN 'alphacommon' END,
                     CASE WHEN i %% 3000 = 7 THEN 'betararity' END,
                     CASE WHEN i %% 100 = 0 THEN 'gammaword deltaword'
                          WHEN i %% 5 < 3 THEN 'gammaword and then deltaword' END),
           'an answer', 'completed', %(start)s + i * interval '1 minute',
           CASE WHEN i %% 4 = 0 THEN 'model-b' ELSE 'model-a' END, 'demo'
    FROM generate_series(1, %(rows)s) AS i
"""


@pytest.fixture(scope="module")
def searched(database_url: str) -> Iterator[str]:
    """A migrated database of this module's own, seeded and analysed."""
    with separate_database(database_url, "search") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SEED, {"start": START, "rows": ROWS})
            conn.execute("VACUUM ANALYZE conversations")
        yield url


def run(url: str, work: Any) -> Any:
    async def go() -> Any:
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            return await work(conn)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("q", "walks"),
    [(COMMON, True), (RARE, False), (ABSENT, False), (PHRASE, True)],
)
def test_the_first_way_follows_the_frequency(searched: str, q: str, walks: bool) -> None:
    estimate = run(searched, lambda conn: search_plan.estimate_search(conn, HistoryFilter(q=q)))
    assert estimate.walks_first(21) is walks


def explain(url: str, statement: sql.Composable, params: dict[str, Any], *settings: str) -> str:
    with psycopg.connect(url) as conn:
        for setting in settings:
            conn.execute(setting)
        rows = conn.execute(sql.SQL("EXPLAIN {}").format(statement), params).fetchall()
        conn.rollback()
    return "\n".join(row[0] for row in rows)


def test_the_walk_reads_newest_first_and_the_gather_the_index(searched: str) -> None:
    """Each way's statement can only be planned its way, whatever the word."""
    keyset, cursor = sql.SQL("TRUE"), {"cursor_at": None, "cursor_id": None}
    for q in (COMMON, RARE):
        chosen = HistoryFilter(q=q)
        statement, _, params = search_plan.walk_statement(chosen, keyset, resume=False)
        plan = explain(searched, statement, params | {"walk_rows": 500, "walk_wanted": 21})
        assert "conversations_newest_idx" in plan and "Bitmap" not in plan, plan
        statement, params = search_plan.gather_statement(chosen, keyset)
        plan = explain(
            searched, statement, params | cursor | {"limit": 21, "offset": 0},
            *search_plan.GATHER_SETTINGS,
        )  # fmt: skip
        assert "Bitmap Index Scan on conversations_search_idx" in plan, plan
        assert "conversations_newest_idx" not in plan, plan


def test_a_windowed_walk_takes_the_index_s_hits_within_its_rows(searched: str) -> None:
    """Bitmaps (the window's time range, and the search's where its hits are fewer), never
    the ordered walk that tests each row."""
    keyset = sql.SQL("TRUE")
    for q in (COMMON, RARE, PHRASE):
        statement, params = search_plan.windowed_statement(
            HistoryFilter(q=q), keyset, resume=False, bounded=True
        )
        window = {"window_at": START + timedelta(days=20), "window_id": uuid.UUID(int=0)}
        plan = explain(
            searched, statement, params | window | {"walk_wanted": 21},
            *search_plan.GATHER_SETTINGS,
        )  # fmt: skip
        assert "Bitmap Heap Scan on conversations" in plan, plan
        assert "Index Scan using" not in plan, plan
        if q == RARE:
            assert "Bitmap Index Scan on conversations_search_idx" in plan, plan


def expected(url: str, chosen: HistoryFilter, limit: int, offset: int) -> list[uuid.UUID]:
    """The page as a plain query finds it (whatever its plan)."""
    where, params = condition(chosen)
    statement = sql.SQL(
        "SELECT c.id FROM conversations c WHERE {} ORDER BY c.created_at DESC, c.id DESC"
        " LIMIT %(limit)s OFFSET %(offset)s"
    ).format(where)
    with psycopg.connect(url) as conn:
        rows = conn.execute(statement, params | {"limit": limit, "offset": offset}).fetchall()
    return [row[0] for row in rows]


def page(url: str, chosen: HistoryFilter, limit: int, offset: int) -> list[uuid.UUID]:
    async def work(conn: AsyncConnection) -> list[uuid.UUID]:
        return [row[0] for row in await history_queries.page_ids(conn, chosen, limit, offset)]

    return list(run(url, work))


FILTERS = [
    HistoryFilter(q=COMMON),
    HistoryFilter(q=RARE),
    HistoryFilter(q=ABSENT),
    HistoryFilter(q=PHRASE),
    HistoryFilter(q=f"{COMMON} -gammaword"),
    HistoryFilter(q=f"{RARE} or zetanowhere"),
    HistoryFilter(q=f"{COMMON} {RARE}"),
    HistoryFilter(q=COMMON, model="model-b"),
    HistoryFilter(q=PHRASE, model="model-a", status="completed"),  # type: ignore[arg-type]
    HistoryFilter(q=RARE, from_=START + timedelta(days=5), to=START + timedelta(days=15)),
    HistoryFilter(q=COMMON, from_=START + timedelta(days=5), to=START + timedelta(days=6)),
]


@pytest.mark.parametrize("windowed", [False, True], ids=["tested", "windowed"])
@pytest.mark.parametrize("chosen", FILTERS, ids=lambda f: f"{f.q}|{f.model}|{f.from_}")
def test_every_way_finds_the_same_page(
    searched: str, chosen: HistoryFilter, windowed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windowed: every walk takes its matches from the index within its rows instead."""
    if windowed:
        monkeypatch.setattr(search_plan, "WINDOWED_WALK_ROWS", 1)
        monkeypatch.setattr(search_plan, "WINDOWED_HITS_PER_ROW", math.inf)
    for limit, offset in ((21, 0), (5, 40), (101, 0), (1000, 0)):
        assert page(searched, chosen, limit, offset) == expected(searched, chosen, limit, offset)


def test_a_keyset_page_continues_where_the_last_ended(searched: str) -> None:
    for q in (COMMON, RARE, PHRASE):
        first = page(searched, HistoryFilter(q=q), 20, 0)
        after = HistoryFilter(q=q, before=first[-1])
        assert page(searched, after, 20, 0) == expected(searched, HistoryFilter(q=q), 20, 20)


def test_a_phrase_walks_on_from_what_it_saw(
    searched: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The estimate takes the phrase for its words (60%); the walk finds 1% side by side,
    and walks on rather than gathering 18,000 candidates to test each."""
    caplog.set_level(logging.DEBUG, logger="sse_llm.search_plan")
    assert page(searched, HistoryFilter(q=PHRASE), 21, 0) == expected(
        searched, HistoryFilter(q=PHRASE), 21, 0
    )
    said = [record.getMessage() for record in caplog.records]
    assert len(said) >= 2 and all(line.startswith("search: walked") for line in said), said


def test_an_absent_word_never_walks(searched: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sse_llm.search_plan")
    assert page(searched, HistoryFilter(q=ABSENT), 21, 0) == []
    said = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in said] == ["search: gather"], said


@pytest.mark.parametrize("windowed", [False, True], ids=["tested", "windowed"])
def test_a_walk_says_where_to_go_on(searched: str, windowed: bool) -> None:
    """After a full walk: its last match; after a short one: its last row; at the end: None."""
    keyset, cursor = sql.SQL("TRUE"), {"cursor_at": None, "cursor_id": None}
    chosen = HistoryFilter(q=COMMON)

    def walked(rows: int, wanted: int) -> Any:
        return run(
            searched,
            lambda conn: search_plan.walk(
                conn, chosen, keyset, cursor, None, rows, wanted, windowed=windowed
            ),
        )

    hits, boundary = walked(100, 5)
    assert len(hits) == 5 and boundary == (hits[-1][1], hits[-1][0])
    hits, boundary = walked(20, 50)
    newest = expected(searched, HistoryFilter(), 20, 0)
    assert len(hits) == 10 and boundary is not None and boundary[1] == newest[-1]
    assert walked(ROWS + 1, ROWS)[1] is None
    # A short walk's matches are exactly those among its rows, its last row included.
    matching = set(expected(searched, chosen, ROWS, 0))
    for rows in range(15, 25):
        newest = expected(searched, HistoryFilter(), rows, 0)
        hits, _ = walked(rows, rows + 1)
        assert [hit[0] for hit in hits] == [id_ for id_ in newest if id_ in matching], rows
