"""Agreement (issue 14 point 5, SPEC 9): the figures against hand-computed Cohen's and
Fleiss' kappa, the nulls, and GET /agreement's shape over a slice and a set of reviewers."""

from __future__ import annotations

import random
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest

from sse_llm.agreement import cohen, fleiss
from tests.conftest import RunningServer, word
from tests.test_review_queue import insert


def test_cohen_kappa_of_a_two_by_two_table() -> None:
    # 50 items, two raters:      B good  B bad
    #                   A good     20      5     (A: 25 good)
    #                   A bad      10     15     (A: 25 bad)
    #                             (B: 30 good, 20 bad)
    # p_o = (20 + 15) / 50 = 0.7
    # p_e = 25/50 * 30/50 + 25/50 * 20/50 = 0.3 + 0.2 = 0.5
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    pairs = (
        [("good", "good")] * 20
        + [("good", "bad")] * 5
        + [("bad", "good")] * 10
        + [("bad", "bad")] * 15
    )
    agreement, kappa = cohen(pairs)
    assert agreement == pytest.approx(0.7)
    assert kappa == pytest.approx(0.4)


# Fleiss (1971) as Wikipedia's "Fleiss' kappa" works it: 10 items, 14 raters, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_of_the_classic_example() -> None:
    # P_i = sum_j n_ij (n_ij - 1) / (14 * 13): the numerators are
    #   182, 46, 56, 80, 60, 84, 44, 32, 52, 52 (sum 688), so P = 688 / 1820 = 0.37802
    # Column totals 20, 28, 39, 21, 32 of 140 ratings:
    #   P_e = (20² + 28² + 39² + 21² + 32²) / 140² = 4170 / 19600 = 0.21276
    # kappa = (0.37802 - 0.21276) / (1 - 0.21276) = 0.20993
    items = [
        [category for category, count in zip("abcde", row, strict=True) for _ in range(count)]
        for row in FLEISS_TABLE
    ]
    agreement, kappa = fleiss(items)
    assert agreement == pytest.approx(688 / 1820)
    assert kappa == pytest.approx((688 / 1820 - 4170 / 19600) / (1 - 4170 / 19600))
    assert kappa == pytest.approx(0.2099, abs=1e-4)


def test_fleiss_kappa_with_unequal_raters_per_item() -> None:
    # item 1: good good good     n=3  P = 3*2 / (3*2)         = 1
    # item 2: good bad           n=2  P = 0 / (2*1)           = 0
    # item 3: bad bad unsure bad n=4  P = (3*2 + 0) / (4*3)   = 0.5
    # P = 1.5 / 3 = 0.5; ratings: good 4, bad 4, unsure 1 of 9
    # P_e = (16 + 16 + 1) / 81 = 11/27; kappa = (1/2 - 11/27) / (16/27) = 5/32
    items = [["good"] * 3, ["good", "bad"], ["bad", "bad", "unsure", "bad"]]
    agreement, kappa = fleiss(items)
    assert agreement == pytest.approx(0.5)
    assert kappa == pytest.approx(5 / 32)


def test_kappa_is_null_where_undefined() -> None:
    assert cohen([]) == (None, None)
    assert fleiss([]) == (None, None)
    # One item: agreement is its own, kappa needs two.
    assert cohen([("good", "bad")]) == (0.0, None)
    assert fleiss([["good", "good", "bad"]]) == (pytest.approx(1 / 3), None)
    # Everyone always said the same: chance agreement is 1, kappa 0/0.
    assert cohen([("good", "good")] * 5) == (1.0, None)
    assert fleiss([["bad"] * 3] * 4) == (1.0, None)
    # Perfect agreement with some variety is 1; systematic disagreement is below 0.
    assert cohen([("good", "good"), ("bad", "bad")]) == (1.0, 1.0)
    assert cohen([("good", "bad"), ("bad", "good")]) == (0.0, -1.0)


def add_review(
    db: psycopg.Connection, conversation_id: UUID, reviewer: str, verdict: str, labels: list[str]
) -> None:
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, labels, conversation_created_at)
        SELECT id, %s, %s, %s, created_at FROM conversations WHERE id = %s
        """,
        (reviewer, verdict, labels, conversation_id),
    )


def seed_reviews(db: psycopg.Connection) -> tuple[str, list[str], dict[str, UUID]]:
    """Four conversations judged by two or three reviewers, one judged once, in a slice.

         r1             r2             r3
    A    good [tone]    good [tone]    good
    B    good [tone]    bad
    C    bad            bad            good
    D    unsure         bad
    E    good                                   (one review: not counted)
    """
    tag = word()
    ids = {name: insert(db, f"{tag} {name}", age_seconds=age) for age, name in enumerate("ABCDE")}
    r1, r2, r3 = (f"{n}-{word()}" for n in ("r1", "r2", "r3"))
    rows = [
        ("A", r1, "good", ["tone"]),
        ("A", r2, "good", ["tone"]),
        ("A", r3, "good", []),
        ("B", r1, "good", ["tone"]),
        ("B", r2, "bad", []),
        ("C", r1, "bad", []),
        ("C", r2, "bad", []),
        ("C", r3, "good", []),
        ("D", r1, "unsure", []),
        ("D", r2, "bad", []),
        ("E", r1, "good", []),
    ]
    for name, reviewer, verdict, labels in rows:
        add_review(db, ids[name], reviewer, verdict, labels)
    return tag, [r1, r2, r3], ids


def test_agreement_of_two_reviewers_is_cohens(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, (r1, r2, _), ids = seed_reviews(db)
    answer = httpx.get(f"{demo_server.url}/agreement", params={"q": tag, "reviewers": f"{r1},{r2}"})
    assert answer.status_code == 200
    body = answer.json()
    # Verdicts of r1 / r2 on A-D: good/good, good/bad, bad/bad, unsure/bad.
    # p_o = 2/4; r1: good 2, bad 1, unsure 1; r2: good 1, bad 3
    # p_e = (2*1 + 1*3 + 1*0) / 16 = 5/16; kappa = (1/2 - 5/16) / (11/16) = 3/11
    # Label tone (present/absent): A p/p, B p/a, C a/a, D a/a: p_o = 3/4,
    # p_e = 2/4 * 1/4 + 2/4 * 3/4 = 1/2; kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert body == {
        "conversations": 4,
        "reviewers": sorted([r1, r2]),
        "verdict": {"agreement": 0.5, "kappa": pytest.approx(3 / 11), "method": "cohen"},
        "labels": {"tone": {"agreement": 0.75, "kappa": pytest.approx(0.5), "method": "cohen"}},
        "disagreements": {"count": 2, "ids": [str(ids["B"]), str(ids["D"])]},  # newest first
    }


def test_agreement_of_three_reviewers_is_fleiss_with_unequal_raters(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, reviewers, ids = seed_reviews(db)
    answer = httpx.get(f"{demo_server.url}/agreement", params={"q": tag})
    body = answer.json()
    # Verdicts: A good x3 (P=1), B good,bad (0), C bad,bad,good (2/6), D unsure,bad (0)
    # P = (1 + 0 + 1/3 + 0) / 4 = 1/3; good 5, bad 4, unsure 1 of 10: P_e = 0.42
    # kappa = (1/3 - 21/50) / (29/50) = -13/87
    assert body["conversations"] == 4
    assert body["reviewers"] == sorted(reviewers)
    assert body["verdict"] == {
        "agreement": pytest.approx(1 / 3),
        "kappa": pytest.approx(-13 / 87),
        "method": "fleiss",
    }
    # Label tone: A p,p,a (2/6), B p,a (0), C a,a,a (1), D a,a (1): P = 7/12;
    # present 3, absent 7 of 10: P_e = 0.58; kappa = (7/12 - 29/50) / (21/50) = 1/126
    assert body["labels"]["tone"] == {
        "agreement": pytest.approx(7 / 12),
        "kappa": pytest.approx(1 / 126),
        "method": "fleiss",
    }
    assert body["disagreements"] == {
        "count": 3,
        "ids": [str(ids["B"]), str(ids["C"]), str(ids["D"])],
    }


def test_agreement_with_nobody_to_compare_is_null(demo_server: RunningServer) -> None:
    body = httpx.get(f"{demo_server.url}/agreement", params={"q": word()}).json()
    assert body == {
        "conversations": 0,
        "reviewers": [],
        "verdict": {"agreement": None, "kappa": None, "method": "fleiss"},
        "labels": {},
        "disagreements": {"count": 0, "ids": []},
    }


@pytest.mark.parametrize(
    "params",
    [{"reviewers": "a/b"}, {"status": "nonsense"}, {"from": "yesterday"}],
    ids=["bad-reviewer", "bad-status", "bad-time"],
)
def test_bad_agreement_parameters_are_422(
    demo_server: RunningServer, params: dict[str, str]
) -> None:
    answer = httpx.get(f"{demo_server.url}/agreement", params=params)
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "validation_error"


def test_agreement_page_names_the_method_and_links_the_disagreements(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag, (r1, r2, _), ids = seed_reviews(db)
    page = httpx.get(
        f"{demo_server.url}/reviews/agreement", params={"q": tag, "reviewers": f"{r1}, {r2}"}
    )
    assert page.status_code == 200
    assert "Cohen's kappa" in page.text
    assert "0.273" in page.text  # 3/11
    assert f'href="/conversations/{ids["B"]}"' in page.text
    assert f'href="/conversations/{ids["D"]}"' in page.text
    assert f'href="/conversations/{ids["C"]}"' not in page.text  # they agree on C
    three = httpx.get(f"{demo_server.url}/reviews/agreement", params={"q": tag})
    assert "Fleiss' kappa, generalised" in three.text
    assert "-0.149" in three.text  # -13/87


def summaries(db: psycopg.Connection, ids: list[UUID]) -> tuple[list[Any], list[Any]]:
    """review_summaries' and review_label_counts' rows of some conversations (migration 0011)."""
    kept = db.execute(
        "SELECT conversation_id, conversation_created_at, reviews, good, bad, unsure"
        " FROM review_summaries WHERE conversation_id = ANY(%s) ORDER BY 1",
        (ids,),
    ).fetchall()
    labels = db.execute(
        "SELECT conversation_id, label, reviews FROM review_label_counts"
        " WHERE conversation_id = ANY(%s) ORDER BY 1, 2",
        (ids,),
    ).fetchall()
    return kept, labels


def recount(db: psycopg.Connection, ids: list[UUID]) -> tuple[list[Any], list[Any]]:
    """The same, counted from reviews itself."""
    kept = db.execute(
        """
        SELECT conversation_id, max(conversation_created_at), count(*)::int,
               (count(*) FILTER (WHERE verdict = 'good'))::int,
               (count(*) FILTER (WHERE verdict = 'bad'))::int,
               (count(*) FILTER (WHERE verdict = 'unsure'))::int
        FROM reviews WHERE conversation_id = ANY(%s) GROUP BY 1 ORDER BY 1
        """,
        (ids,),
    ).fetchall()
    labels = db.execute(
        "SELECT conversation_id, label, count(*)::int FROM reviews, unnest(labels) AS label"
        " WHERE conversation_id = ANY(%s) GROUP BY 1, 2 ORDER BY 1, 2",
        (ids,),
    ).fetchall()
    return kept, labels


def test_review_summaries_equal_a_recount_after_every_kind_of_write(
    db: psycopg.Connection,
) -> None:
    tag = word()
    ids = [insert(db, f"{tag} {n}", age_seconds=n) for n in range(4)]
    a, b, c, d = ids

    def check() -> None:
        assert summaries(db, ids) == recount(db, ids)

    # One statement, several conversations and reviewers.
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, labels, conversation_created_at)
        SELECT c.id, v.reviewer, v.verdict, v.labels, c.created_at
        FROM (VALUES (%s::uuid, 'r1', 'good', '{tone,long}'::text[]),
                     (%s::uuid, 'r2', 'bad', '{tone}'::text[]),
                     (%s::uuid, 'r1', 'unsure', '{}'::text[]),
                     (%s::uuid, 'r2', 'good', '{long}'::text[]),
                     (%s::uuid, 'r1', 'bad', '{}'::text[])) AS v(id, reviewer, verdict, labels)
        JOIN conversations c ON c.id = v.id
        """,
        (a, a, b, b, c),
    )
    check()
    assert summaries(db, [a])[0][0][2:] == (2, 1, 1, 0)
    # A replace as PUT does it (INSERT ... ON CONFLICT DO UPDATE): verdict and labels change.
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, labels, conversation_created_at)
        SELECT id, 'r2', 'good', '{long,rude}', created_at FROM conversations WHERE id = %s
        ON CONFLICT (conversation_id, reviewer) DO UPDATE
            SET verdict = excluded.verdict, labels = excluded.labels
        """,
        (a,),
    )
    check()
    # Updates of many rows at once; one that changes only the note.
    db.execute("UPDATE reviews SET verdict = 'bad' WHERE conversation_id = ANY(%s)", (ids,))
    check()
    db.execute("UPDATE reviews SET labels = '{}' WHERE conversation_id = %s", (b,))
    check()
    db.execute("UPDATE reviews SET note = 'why' WHERE conversation_id = ANY(%s)", (ids,))
    check()
    add_review(db, d, "r3", "good", ["tone", "tone2"])
    check()
    # Deletes: one review, then a conversation whose reviews go by cascade.
    db.execute("DELETE FROM reviews WHERE conversation_id = %s AND reviewer = 'r1'", (a,))
    check()
    db.execute("DELETE FROM conversations WHERE id = ANY(%s)", ([c, d],))
    check()
    db.execute("DELETE FROM reviews WHERE conversation_id = ANY(%s)", (ids,))
    check()
    assert summaries(db, ids) == ([], [])  # no row of zeros is left behind
    # Leave the shared test database's history as it was (other modules count it).
    db.execute("DELETE FROM conversations WHERE id = ANY(%s)", (ids,))


def test_agreement_from_summaries_equals_agreement_from_every_review(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    # Everyone's reviews (the summaries) and the same reviewers named (every review read)
    # must give the same figures, over a slice by conversations and one by time alone.
    rng = random.Random(14)
    tag = word()
    names = [f"{n}-{word()}" for n in ("p", "q", "r", "s")]
    ids = [insert(db, f"{tag} {n}", age_seconds=n) for n in range(40)]
    for conversation_id in ids:
        for name in rng.sample(names, rng.randint(1, 4)):
            labels = [label for label in ("tone", "long", "rude") if rng.random() < 0.3]
            add_review(db, conversation_id, name, rng.choice(["good", "bad", "unsure"]), labels)
    try:
        same_figures(demo_server, {"q": tag}, names)
        same_figures(demo_server, {"from": "2000-01-01", "q": tag}, names)
    finally:
        # Leave the shared test database's history as it was (other modules count it).
        db.execute("DELETE FROM conversations WHERE id = ANY(%s)", (ids,))


def same_figures(server: RunningServer, params: dict[str, str], names: list[str]) -> None:
    """Agreement over `params` from the summaries equals agreement from every review."""
    everyone = httpx.get(f"{server.url}/agreement", params=params).json()
    named = httpx.get(
        f"{server.url}/agreement", params={**params, "reviewers": ",".join(names)}
    ).json()
    assert everyone["verdict"]["method"] == "fleiss"
    assert everyone["conversations"] > 10
    assert everyone == named | {
        "verdict": {
            **named["verdict"],
            "agreement": pytest.approx(named["verdict"]["agreement"]),
            "kappa": pytest.approx(named["verdict"]["kappa"]),
        },
        "labels": {
            label: {
                **figure,
                "agreement": pytest.approx(figure["agreement"]),
                "kappa": pytest.approx(figure["kappa"]),
            }
            for label, figure in named["labels"].items()
        },
    }
