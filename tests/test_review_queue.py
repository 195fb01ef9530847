"""The review queue (issue 14 point 4): modes, order, the random sample, claims between
colleagues (concurrent requests), their expiry, blind mode's raw bytes, the forms' origin."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlencode
from uuid import UUID

import httpx
import psycopg
import pytest

from tests.conftest import RunningServer, word

SERVED = re.compile(r'data-conversation="([0-9a-f-]{36})"')


def insert(
    db: psycopg.Connection,
    prompt: str,
    *,
    age_seconds: int = 0,
    status: str = "completed",
    model: str = "demo",
    provider: str = "demo",
) -> UUID:
    """An ended (or streaming) conversation straight in the database, `age_seconds` old."""
    conversation_id = uuid.uuid4()
    db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, created_at, completed_at,
                                   model, provider)
        VALUES (%s, %s, 'an answer', %s, now() - make_interval(secs => %s), now(), %s, %s)
        """,
        (conversation_id, prompt, status, age_seconds, model, provider),
    )
    return conversation_id


def review(
    db: psycopg.Connection, conversation_id: UUID, reviewer: str, verdict: str, note: str = ""
) -> None:
    """A review written with plain SQL (as another reviewer's tool would)."""
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, note, conversation_created_at)
        SELECT id, %s, %s, %s, created_at FROM conversations WHERE id = %s
        """,
        (reviewer, verdict, note, conversation_id),
    )


@pytest.fixture
def reviewer_client(demo_server: RunningServer) -> Iterator[httpx.Client]:
    """A client reviewing as a fresh name (the open-mode reviewer cookie)."""
    with as_reviewer(demo_server, word()) as client:
        yield client


def as_reviewer(server: RunningServer, name: str) -> httpx.Client:
    """A client of `server` that says it is `name` and posts from the server's origin."""
    return httpx.Client(
        base_url=server.url,
        cookies={"sse_llm_reviewer": name},
        headers={"Origin": server.url},
    )


def served(client: httpx.Client, **params: str) -> UUID | None:
    """The conversation /review serves this client, or None."""
    page = client.get(f"/review?{urlencode(params)}")
    assert page.status_code == 200
    found = SERVED.search(page.text)
    return UUID(found.group(1)) if found else None


def judge(
    client: httpx.Client, conversation_id: UUID, verdict: str, **queue: str
) -> httpx.Response:
    """Post a verdict from the queue's form, as the page would."""
    form = {"conversation_id": str(conversation_id), "verdict": verdict, "queue": urlencode(queue)}
    return client.post("/review/verdict", data=form)


def skip(client: httpx.Client, conversation_id: UUID, **queue: str) -> httpx.Response:
    form = {"conversation_id": str(conversation_id), "queue": urlencode(queue)}
    return client.post("/review/skip", data=form)


def test_newest_first_then_each_verdict_serves_the_next(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag = word()
    oldest = insert(db, f"{tag} oldest", age_seconds=30)
    middle = insert(db, f"{tag} middle", age_seconds=20)
    newest = insert(db, f"{tag} newest", age_seconds=10)
    insert(db, f"{tag} still streaming", status="streaming")  # never served: not ended

    order = []
    for _ in range(3):
        conversation_id = served(reviewer_client, q=tag)
        assert conversation_id is not None
        order.append(conversation_id)
        answer = judge(reviewer_client, conversation_id, "good", q=tag)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/review?q=")
    assert order == [newest, middle, oldest]
    assert served(reviewer_client, q=tag) is None
    assert "Nothing left to review" in reviewer_client.get(f"/review?q={tag}").text
    reviewer = reviewer_client.cookies["sse_llm_reviewer"]
    rows = db.execute("SELECT verdict FROM reviews WHERE reviewer = %s", (reviewer,)).fetchall()
    assert rows == [("good",)] * 3


def test_a_reload_serves_the_conversation_i_hold(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag = word()
    insert(db, f"{tag} one", age_seconds=5)
    first = served(reviewer_client, q=tag)
    insert(db, f"{tag} newer")  # arrives meanwhile; my claim still comes first
    assert served(reviewer_client, q=tag) == first


def test_mine_skips_my_reviews_and_nobody_skips_everyones(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag = word()
    mine = insert(db, f"{tag} mine", age_seconds=1)
    theirs = insert(db, f"{tag} theirs", age_seconds=2)
    fresh = insert(db, f"{tag} fresh", age_seconds=3)
    review(db, mine, reviewer_client.cookies["sse_llm_reviewer"], "bad")
    review(db, theirs, word(), "good")

    assert served(reviewer_client, q=tag, mode="mine") == theirs
    skip(reviewer_client, theirs, q=tag, mode="nobody")
    assert served(reviewer_client, q=tag, mode="nobody") == fresh


def test_skip_releases_the_claim_and_walks_on_then_wraps_around(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag = word()
    newer = insert(db, f"{tag} a", age_seconds=1)
    older = insert(db, f"{tag} b", age_seconds=2)
    assert served(reviewer_client, q=tag) == newer

    answer = skip(reviewer_client, newer, q=tag)

    assert answer.status_code == 303
    assert f"after={newer}" in answer.headers["location"]
    claims = db.execute("SELECT count(*) FROM review_claims WHERE conversation_id = %s", (newer,))
    assert claims.fetchone() == (0,)
    assert served(reviewer_client, q=tag, after=str(newer)) == older
    skip(reviewer_client, older, q=tag)
    assert served(reviewer_client, q=tag, after=str(older)) == newer  # wrapped around


def test_random_sample_follows_the_hash_from_my_seed_without_repeating(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag = word()
    newest_first = [insert(db, f"{tag} {n}", age_seconds=n) for n in range(12)]
    ids = set(newest_first)
    for name in (word(), word()):
        # The order the queue promises: by the id's hash, starting at my name's hash.
        expected = [
            row[0]
            for row in db.execute(
                """
                SELECT id FROM conversations WHERE id = ANY(%s)
                ORDER BY uuid_hash_extended(id, 0) < hashtextextended(%s, 0),
                         uuid_hash_extended(id, 0), id
                """,
                (list(ids), name),
            )
        ]
        with as_reviewer(demo_server, name) as client:
            order = []
            while (conversation_id := served(client, q=tag, order="sample")) is not None:
                order.append(conversation_id)
                assert (
                    judge(client, conversation_id, "unsure", q=tag, order="sample").status_code
                    == 303
                )
                assert len(order) <= 12
        assert order == expected  # covers the slice once each, in my seed's order
        assert set(order) == ids
        assert order != newest_first  # 1 chance in 12! of being so by luck


def test_colleagues_asking_at_once_get_different_conversations(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag = word()
    for n in range(6):
        insert(db, f"{tag} {n}", age_seconds=n)
    names = [word() for _ in range(6)]
    for order in ("newest", "sample"):
        db.execute("DELETE FROM review_claims WHERE reviewer = ANY(%s)", (names,))
        results: dict[str, UUID | None] = {}
        barrier = threading.Barrier(len(names))

        def ask(
            name: str,
            order: str = order,
            barrier: threading.Barrier = barrier,
            results: dict[str, UUID | None] = results,
        ) -> None:
            with as_reviewer(demo_server, name) as client:
                barrier.wait()
                results[name] = served(client, q=tag, order=order)

        threads = [threading.Thread(target=ask, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        got = list(results.values())
        assert None not in got and len(got) == 6
        assert len(set(got)) == 6, f"two colleagues got the same conversation ({order})"


def test_a_claim_expires_and_a_colleague_takes_it_over(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    tag = word()
    newer = insert(db, f"{tag} a", age_seconds=1)
    older = insert(db, f"{tag} b", age_seconds=2)
    first, second, third = word(), word(), word()
    with as_reviewer(demo_server, first) as a, as_reviewer(demo_server, second) as b:
        assert served(a, q=tag) == newer
        assert served(b, q=tag) == older  # newer is held by a
        expires = db.execute(
            "SELECT expires_at - now() FROM review_claims WHERE conversation_id = %s", (newer,)
        )
        held_for = expires.fetchone()[0].total_seconds()
        assert 590 < held_for <= 600
        db.execute(
            "UPDATE review_claims SET expires_at = now() - interval '1 second'"
            " WHERE conversation_id = %s",
            (newer,),
        )
    with as_reviewer(demo_server, third) as c:
        assert served(c, q=tag) == newer
    holder = db.execute("SELECT reviewer FROM review_claims WHERE conversation_id = %s", (newer,))
    assert holder.fetchone() == (third,)


def test_blind_mode_keeps_model_provider_and_colleagues_out_of_every_byte(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag = word()
    model, provider, colleague, note = (
        f"{kind}{word()}" for kind in ("model", "provider", "colleague", "note")
    )
    conversation_id = insert(db, f"{tag} judge me", model=model, provider=provider)
    review(db, conversation_id, colleague, "bad", note=note)
    secrets = (model, provider, colleague, note)

    blind = reviewer_client.get(f"/review?q={tag}&blind=1")
    assert SERVED.search(blind.text).group(1) == str(conversation_id)
    # Every byte the page loads: the HTML and each same-origin file it references.
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', blind.text)
    assert any("review.js" in asset for asset in assets)
    for body in [blind.content] + [reviewer_client.get(asset).content for asset in assets]:
        for secret in secrets:
            assert secret.encode() not in body

    seeing = reviewer_client.get(f"/review?q={tag}")  # not blind: they show
    assert all(secret in seeing.text for secret in secrets)

    after = judge(reviewer_client, conversation_id, "good", q=tag, blind="1")
    revealed = reviewer_client.get(after.headers["location"])
    assert "blind=1" in after.headers["location"]
    assert model in revealed.text and colleague in revealed.text  # my verdict is in


@pytest.mark.parametrize(
    "headers",
    [{}, {"Origin": "https://evil.example"}, {"Referer": "https://evil.example/form"}],
    ids=["no-origin", "foreign-origin", "foreign-referer"],
)
@pytest.mark.parametrize("path", ["/review/verdict", "/review/skip"])
def test_queue_forms_refuse_other_origins(
    demo_server: RunningServer, db: psycopg.Connection, headers: dict[str, str], path: str
) -> None:
    conversation_id = insert(db, f"{word()} forged")
    name = word()
    form = {"conversation_id": str(conversation_id), "verdict": "bad", "queue": ""}
    with httpx.Client(base_url=demo_server.url, cookies={"sse_llm_reviewer": name}) as client:
        answer = client.post(path, data=form, headers=headers)
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "forbidden"
        # Without any cookie too (open mode: the reviewer's name could be in the form).
        client.cookies.clear()
        assert client.post(path, data=form, headers=headers).status_code == 403
    reviews = db.execute(
        "SELECT count(*) FROM reviews WHERE conversation_id = %s", (conversation_id,)
    )
    assert reviews.fetchone() == (0,)


def test_a_bad_verdict_or_label_is_refused_and_creates_nothing(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    conversation_id = insert(db, f"{word()} bad input")
    assert judge(reviewer_client, conversation_id, "excellent").status_code == 422
    form = {"conversation_id": str(conversation_id), "verdict": "good", "labels": "x" * 41}
    assert reviewer_client.post("/review/verdict", data=form).status_code == 422
    form = {"conversation_id": str(uuid.uuid4()), "verdict": "good"}
    assert reviewer_client.post("/review/verdict", data=form).status_code == 404
    reviews = db.execute(
        "SELECT count(*) FROM reviews WHERE conversation_id = %s", (conversation_id,)
    )
    assert reviews.fetchone() == (0,)


def test_labels_and_note_from_the_form_are_normalised(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    conversation_id = insert(db, f"{word()} labelled")
    form = {
        "conversation_id": str(conversation_id),
        "verdict": "bad",
        "labels": " Tone, tone ,Facts",
        "note": "  wrong year  ",
    }
    assert reviewer_client.post("/review/verdict", data=form).status_code == 303
    row = db.execute(
        "SELECT labels, note FROM reviews WHERE conversation_id = %s", (conversation_id,)
    )
    assert row.fetchone() == (["tone", "facts"], "wrong year")


def test_without_a_name_the_queue_asks_who_is_reviewing(demo_server: RunningServer) -> None:
    page = httpx.get(f"{demo_server.url}/review")
    assert page.status_code == 200
    assert "Who is reviewing?" in page.text
    assert SERVED.search(page.text) is None


def test_the_slice_is_any_history_filter(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag = word()
    judged_bad = insert(db, f"{tag} bad one", age_seconds=2)
    insert(db, f"{tag} unjudged", age_seconds=1)
    failed = insert(db, f"{tag} failed one", age_seconds=3, status="failed")
    review(db, judged_bad, word(), "bad")

    # Bad according to someone, not yet reviewed by me.
    assert served(reviewer_client, q=tag, verdict="bad") == judged_bad
    skip(reviewer_client, judged_bad, q=tag, verdict="bad")
    assert served(reviewer_client, q=tag, status="failed") == failed


def test_done_reveals_only_a_conversation_i_judged(
    reviewer_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag, model = word(), f"model{word()}"
    other = insert(db, f"{tag} not mine", model=model)
    page = reviewer_client.get(f"/review?q={word()}&blind=1&done={other}")
    assert model not in page.text  # a forged `done` shows nothing
    review(db, other, reviewer_client.cookies["sse_llm_reviewer"], "good")
    page = reviewer_client.get(f"/review?q={word()}&blind=1&done={other}")
    assert model in page.text


def test_a_slice_that_needs_a_review_serves_nothing_with_nobody_at_once(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    me = word()
    model = f"contradiction-{word()}"
    conversation_id = insert(db, "judged", model=model)
    review(db, conversation_id, "colleague", "bad")
    with as_reviewer(demo_server, me) as client:
        assert served(client, mode="nobody", model=model) is None
        for needs_a_review in ({"verdict": "bad"}, {"label": "tone"}, {"reviewed": "true"},
                               {"consensus": "bad"}, {"reviewer": "colleague"}):  # fmt: skip
            page = client.get(f"/review?{urlencode({'mode': 'nobody', **needs_a_review})}")
            assert "Nothing left to review" in page.text
        # Mine, yet reviewed by me: nothing either; by a colleague: their bad one.
        assert served(client, mode="mine", reviewer=me) is None
        assert served(client, mode="mine", reviewer="colleague", model=model) == conversation_id


def test_contradictory_slices_are_known_without_a_query() -> None:
    from sse_llm.history_filters import HistoryFilter
    from sse_llm.review_queries import QueueMode
    from sse_llm.review_queue import Queue, contradictory

    nobody = QueueMode.NOBODY
    assert contradictory(Queue(HistoryFilter(labels=("tone",)), mode=nobody), "me")
    assert contradictory(Queue(HistoryFilter(reviewer="x"), mode=nobody), "me")
    assert not contradictory(Queue(HistoryFilter(reviewer="x", reviewed=False), mode=nobody), "me")
    assert not contradictory(Queue(HistoryFilter(model="m"), mode=nobody), "me")
    assert contradictory(Queue(HistoryFilter(reviewer="me")), "me")
    assert not contradictory(Queue(HistoryFilter(reviewer="me", reviewed=False)), "me")
    assert not contradictory(Queue(HistoryFilter(verdict="bad")), "me")


WALK_ON = re.compile(r'href="/review\?([^"]*)" id="walk-on"')


def many(db: psycopg.Connection, model: str, count: int) -> list[UUID]:
    """`count` ended conversations of `model`, newest first, one second apart."""
    rows = db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, created_at, completed_at,
                                   model, provider)
        SELECT gen_random_uuid(), 'many', 'an answer', 'completed',
               now() - make_interval(secs => n), now(), %s, 'demo'
        FROM generate_series(1, %s) AS n
        RETURNING id, created_at
        """,
        (model, count),
    ).fetchall()
    return [row[0] for row in sorted(rows, key=lambda row: row[1], reverse=True)]


def review_all(db: psycopg.Connection, ids: list[UUID], reviewer: str, verdict: str) -> None:
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, conversation_created_at)
        SELECT id, %s, %s, created_at FROM conversations WHERE id = ANY(%s)
        """,
        (reviewer, verdict, ids),
    )


def walk_on(client: httpx.Client, **params: str) -> str:
    """The query of the page's "look further" link (the walk found nothing in its stretch)."""
    page = client.get(f"/review?{urlencode(params)}")
    found = WALK_ON.search(page.text)
    assert found, "the walk was expected to stop and link on"
    return found.group(1).replace("&amp;", "&")


@pytest.mark.parametrize("side", ["conversations", "reviews"])
def test_one_request_walks_at_most_walk_limit_then_links_on(
    demo_server: RunningServer, db: psycopg.Connection, side: str
) -> None:
    from sse_llm.review_queries import WALK_LIMIT

    me = word()
    model = f"walk-{word()}"
    ids = many(db, model, WALK_LIMIT + 3)
    review_all(db, ids[: WALK_LIMIT + 1], me, "good")  # the newest, judged already
    # By conversations (a model), or by reviews (bad according to someone, not yet me).
    slice_ = {"model": model}
    if side == "reviews":
        review_all(db, ids, "colleague", "bad")
        slice_ |= {"verdict": "bad", "reviewer": me, "reviewed": "false"}
    try:
        with as_reviewer(demo_server, me) as client:
            further = walk_on(client, mode="mine", **slice_)
            page = client.get(f"/review?{further}")
            found = SERVED.search(page.text)
            assert found and UUID(found.group(1)) == ids[WALK_LIMIT + 1]
    finally:
        # Leave the shared test database's history as it was (other modules count it).
        db.execute("DELETE FROM conversations WHERE model = %s", (model,))
