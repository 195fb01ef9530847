"""SPEC 9's JSON contract for reviewers, reviews and annotations, and who may write as whom."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from openapi_spec_validator import validate

from sse_llm.access import COOKIE_NAME, REVIEWER_COOKIE
from sse_llm.config import Settings
from tests.conftest import RunningServer, create, start_server, word

KEY = "reviews api key"
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)> javascript:alert(3)"
MISSING = "00000000-0000-4000-8000-000000000000"


def conversation(
    db: psycopg.Connection,
    prompt: str = "What is 2+2?",
    response: str = "4",
    status: str = "completed",
) -> str:
    """A stored conversation, written as the writer leaves an ended one."""
    conversation_id = uuid.uuid4()
    db.execute(
        "INSERT INTO conversations (id, prompt, response, status, model, provider, completed_at)"
        " VALUES (%s, %s, %s, %s, 'test-model', 'demo', now())",
        (conversation_id, prompt, response, status),
    )
    return str(conversation_id)


def put(
    client: httpx.Client, conversation_id: str, reviewer: str, body: Any, **kwargs: Any
) -> httpx.Response:
    return client.put(review_path(conversation_id, reviewer), json=body, **kwargs)


def review_path(conversation_id: str, reviewer: str) -> str:
    """The review's URL; dots encoded too, or the client would resolve `.` and `..` away."""
    encoded = quote(reviewer, safe="").replace(".", "%2E")
    return f"/conversations/{conversation_id}/reviews/{encoded}"


def review_count(db: psycopg.Connection, conversation_id: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM reviews WHERE conversation_id = %s", (conversation_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def annotation_count(db: psycopg.Connection, conversation_id: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM annotations WHERE conversation_id = %s", (conversation_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


# --- reviews ---


def test_put_creates_a_review_in_the_spec_shape(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db)
    response = put(client, conversation_id, "ada", {"verdict": "good"})
    assert response.status_code == 200
    review = response.json()
    assert set(review) == {
        "conversation_id",
        "reviewer",
        "verdict",
        "labels",
        "note",
        "created_at",
        "updated_at",
    }
    assert review["conversation_id"] == conversation_id
    assert (review["reviewer"], review["verdict"], review["labels"], review["note"]) == (
        "ada",
        "good",
        [],
        "",
    )
    assert review["created_at"] == review["updated_at"]
    listed = client.get(f"/conversations/{conversation_id}/reviews").json()
    assert listed == {"items": [review]}


def test_put_replaces_and_keeps_created_at(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db)
    first = put(client, conversation_id, "ada", {"verdict": "good", "labels": ["tone"]}).json()
    time.sleep(0.01)
    second = put(client, conversation_id, "ada", {"verdict": "bad", "note": "wrong sum"})
    assert second.status_code == 200
    replaced = second.json()
    assert replaced["created_at"] == first["created_at"]
    assert replaced["updated_at"] > first["updated_at"]
    assert (replaced["verdict"], replaced["labels"], replaced["note"]) == ("bad", [], "wrong sum")
    assert review_count(db, conversation_id) == 1


def test_reviews_are_one_per_reviewer_and_copy_the_conversation_time(
    client: httpx.Client, db: psycopg.Connection
):
    conversation_id = conversation(db)
    put(client, conversation_id, "ada", {"verdict": "good"})
    put(client, conversation_id, "Ada", {"verdict": "bad"})  # names are case-sensitive
    items = client.get(f"/conversations/{conversation_id}/reviews").json()["items"]
    assert [(item["reviewer"], item["verdict"]) for item in items] == [
        ("ada", "good"),
        ("Ada", "bad"),
    ]
    row = db.execute(
        "SELECT bool_and(r.conversation_created_at = c.created_at) FROM reviews r"
        " JOIN conversations c ON c.id = r.conversation_id WHERE c.id = %s",
        (conversation_id,),
    ).fetchone()
    assert row == (True,)


def test_labels_are_trimmed_case_folded_deduplicated_in_order(
    client: httpx.Client, db: psycopg.Connection
):
    conversation_id = conversation(db)
    labels = ["  Tone ", "tone", "FACTUAL", "Straße", "Cafe\u0301"]
    response = put(client, conversation_id, "ada", {"verdict": "unsure", "labels": labels})
    assert response.status_code == 200
    assert response.json()["labels"] == ["tone", "factual", "strasse", "caf\u00e9"]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({}, "verdict"),
        ({"verdict": "great"}, "verdict"),
        ({"verdict": None}, "verdict"),
        ({"verdict": "good", "score": 3}, "score"),
        ({"verdict": "good", "labels": "tone"}, "labels"),
        ({"verdict": "good", "labels": [3]}, "labels[0]"),
        ({"verdict": "good", "labels": ["ok", " "]}, "labels[1]"),
        ({"verdict": "good", "labels": ["a,b"]}, "comma"),
        ({"verdict": "good", "labels": ["x" * 41]}, "40"),
        ({"verdict": "good", "labels": ["tab\there"]}, "control"),
        ({"verdict": "good", "labels": [f"l{n}" for n in range(21)]}, "20"),
        ({"verdict": "good", "note": 5}, "note"),
        ({"verdict": "good", "note": "x" * 4001}, "4000"),
        ({"verdict": "good", "note": "nul\x00"}, "note"),
    ],
)
def test_bad_review_bodies_are_422_and_create_nothing(
    client: httpx.Client, db: psycopg.Connection, body: dict[str, Any], names: str
):
    conversation_id = conversation(db)
    response = put(client, conversation_id, "ada", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "validation_error"
    assert names in response.json()["error"]["message"]
    assert review_count(db, conversation_id) == 0


def test_limits_hold_exactly_at_their_edge(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db)
    body = {
        "verdict": "good",
        "labels": [f"l{n}" for n in range(20)] + ["l0"],  # 20 once the duplicate is dropped
        "note": "\U0001f600" * 4000,  # code points, not UTF-16 units or bytes
    }
    response = put(client, conversation_id, "x" * 64, body)
    assert response.status_code == 200, response.text
    assert len(response.json()["labels"]) == 20
    assert put(client, conversation_id, "x" * 65, {"verdict": "good"}).status_code == 422
    label = "\U0001f600" * 40
    assert put(client, conversation_id, "b", {"verdict": "good", "labels": [label]}).is_success


def test_bodies_that_are_not_json_objects_are_refused(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db)
    path = f"/conversations/{conversation_id}/reviews/ada"
    assert client.put(path, content="verdict=good").status_code == 415
    headers = {"Content-Type": "application/json"}
    assert client.put(path, content="{", headers=headers).status_code == 400
    assert client.put(path, content='["good"]', headers=headers).status_code == 422
    assert review_count(db, conversation_id) == 0


@pytest.mark.parametrize("reviewer", ["a/b", ".", "..", " ", "tab\there", "nul\x00", "x" * 65])
def test_bad_reviewer_names_in_the_url_are_refused(
    client: httpx.Client, db: psycopg.Connection, reviewer: str
):
    conversation_id = conversation(db)
    response = put(client, conversation_id, reviewer, {"verdict": "good"})
    # A / splits the path: no such route (404); anything else is a 422 naming the reviewer.
    expected = 404 if "/" in reviewer else 422
    assert response.status_code == expected, response.text
    assert review_count(db, conversation_id) == 0


def test_reviewer_in_the_url_is_percent_decoded_trimmed_and_nfc(
    client: httpx.Client, db: psycopg.Connection
):
    conversation_id = conversation(db)
    decomposed = "  Zoe\u0308 <b>"  # e + combining diaeresis, spaces, markup
    response = put(client, conversation_id, decomposed, {"verdict": "good"})
    assert response.status_code == 200
    assert response.json()["reviewer"] == "Zo\u00eb <b>"
    # The composed spelling is the same reviewer: it replaces, and DELETE finds it.
    assert put(client, conversation_id, "Zo\u00eb <b>", {"verdict": "bad"}).json()["verdict"] == (
        "bad"
    )
    assert review_count(db, conversation_id) == 1
    assert client.delete(review_path(conversation_id, decomposed)).status_code == 204
    assert review_count(db, conversation_id) == 0


def test_delete_is_204_then_404(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db)
    put(client, conversation_id, "ada", {"verdict": "good"})
    path = f"/conversations/{conversation_id}/reviews/ada"
    deleted = client.delete(path)
    assert deleted.status_code == 204 and deleted.content == b""
    again = client.delete(path)
    assert again.status_code == 404 and error_code(again) == "not_found"
    assert client.get(f"/conversations/{conversation_id}/reviews").json() == {"items": []}


@pytest.mark.parametrize("conversation_id", [MISSING, "not-a-uuid"])
def test_unknown_conversations_are_404_on_every_route(
    client: httpx.Client, db: psycopg.Connection, conversation_id: str
):
    base = f"/conversations/{conversation_id}"
    annotation = {"reviewer": "ada", "field": "prompt", "start": 0, "end": 1, "label": "x"}
    responses = [
        client.put(f"{base}/reviews/ada", json={"verdict": "good"}),
        client.delete(f"{base}/reviews/ada"),
        client.get(f"{base}/reviews"),
        client.post(f"{base}/annotations", json=annotation),
        client.get(f"{base}/annotations"),
        client.delete(f"{base}/annotations/{uuid.uuid4()}"),
    ]
    for response in responses:
        assert response.status_code == 404, response.request
        assert error_code(response) == "not_found"


def test_a_streaming_conversation_can_be_reviewed(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db, response="", status="streaming")
    assert put(client, conversation_id, "ada", {"verdict": "unsure"}).status_code == 200


def test_reviewers_lists_counts_and_latest_times(client: httpx.Client, db: psycopg.Connection):
    name = f"rev-{word()}"
    first, second = conversation(db), conversation(db)
    put(client, first, name, {"verdict": "good"})
    latest = put(client, second, name, {"verdict": "bad"}).json()
    body = client.get("/reviewers").json()
    assert set(body) == {"items"}
    mine = [item for item in body["items"] if item["reviewer"] == name]
    assert mine == [{"reviewer": name, "reviews": 2, "last_review_at": latest["updated_at"]}]
    names = [item["reviewer"] for item in body["items"]]
    assert names == sorted(names)


def test_hostile_text_is_stored_and_returned_as_text(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db)
    labels = ["<script>x</script>", "javascript:alert(1)"]
    name = "<img src=x onerror=alert(1)>"
    response = put(
        client, conversation_id, name, {"verdict": "bad", "labels": labels, "note": HOSTILE}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    stored = db.execute(
        "SELECT reviewer, labels, note FROM reviews WHERE conversation_id = %s",
        (conversation_id,),
    ).fetchone()
    assert stored == (name, labels, HOSTILE)


def test_a_real_streamed_conversation_is_reviewed_end_to_end(
    client: httpx.Client, db: psycopg.Connection
):
    conversation_id = create(client, f"review me {word()}")
    assert put(client, conversation_id, "ada", {"verdict": "good"}).status_code == 200
    length = len(client.get(f"/history/{conversation_id}").json()["response"])
    annotation = {"reviewer": "ada", "field": "response", "start": 0, "end": length, "label": "all"}
    assert client.post(f"/conversations/{conversation_id}/annotations", json=annotation).is_success


# --- annotations ---


def annotate(client: httpx.Client, conversation_id: str, **fields: Any) -> httpx.Response:
    body = {"reviewer": "ada", "field": "response", "start": 0, "end": 1, "label": "x"} | fields
    return client.post(f"/conversations/{conversation_id}/annotations", json=body)


def test_annotations_are_201_in_the_spec_shape_and_listed_by_start(
    client: httpx.Client, db: psycopg.Connection
):
    conversation_id = conversation(db, prompt="Say hi", response="Hello, world")
    late = annotate(client, conversation_id, start=7, end=12, label=" Place ", note="ok")
    assert late.status_code == 201
    item = late.json()
    assert set(item) == {
        "id",
        "conversation_id",
        "reviewer",
        "field",
        "start",
        "end",
        "label",
        "note",
        "created_at",
    }
    assert (item["field"], item["start"], item["end"], item["label"], item["note"]) == (
        "response",
        7,
        12,
        "place",
        "ok",
    )
    uuid.UUID(item["id"])
    early = annotate(client, conversation_id, start=0, end=5).json()
    overlapping = annotate(client, conversation_id, start=3, end=9).json()
    prompt = annotate(client, conversation_id, field="prompt", start=4, end=6).json()
    listed = client.get(f"/conversations/{conversation_id}/annotations").json()
    assert [a["id"] for a in listed["items"]] == [
        early["id"],
        overlapping["id"],
        prompt["id"],
        item["id"],
    ]


def test_offsets_are_code_points_up_to_the_stored_length(
    client: httpx.Client, db: psycopg.Connection
):
    text = "a\U0001f600e\u0301\r\nz"  # emoji (2 UTF-16 units), combining mark, CR LF: 7 points
    conversation_id = conversation(db, prompt=text, response=text)
    assert annotate(client, conversation_id, start=0, end=7).status_code == 201
    assert annotate(client, conversation_id, field="prompt", start=1, end=2).status_code == 201
    too_far = annotate(client, conversation_id, start=0, end=8)
    assert too_far.status_code == 422 and "7" in too_far.json()["error"]["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"start": 2, "end": 2},
        {"start": 3, "end": 1},
        {"start": -1},
        {"start": 0.5},
        {"start": True},
        {"start": "0"},
        {"end": 10**12},
        {"end": 99},
        {"field": "note"},
        {"label": ""},
        {"label": "a,b"},
        {"label": None},
        {"note": "x" * 4001},
        {"reviewer": ".."},
        {"reviewer": None},
        {"colour": "red"},
    ],
)
def test_bad_annotations_are_422_and_create_nothing(
    client: httpx.Client, db: psycopg.Connection, fields: dict[str, Any]
):
    conversation_id = conversation(db, response="Hello")
    response = annotate(client, conversation_id, **fields)
    assert response.status_code == 422, response.text
    assert error_code(response) == "validation_error"
    assert annotation_count(db, conversation_id) == 0


def test_missing_annotation_fields_are_422(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db, response="Hello")
    for missing in ("reviewer", "field", "start", "end", "label"):
        body = {"reviewer": "ada", "field": "response", "start": 0, "end": 1, "label": "x"}
        del body[missing]
        response = client.post(f"/conversations/{conversation_id}/annotations", json=body)
        assert response.status_code == 422, missing
        assert missing in response.json()["error"]["message"]
    assert annotation_count(db, conversation_id) == 0


def test_annotation_delete_is_204_then_404(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db, response="Hello")
    other = conversation(db, response="Hello")
    annotation_id = annotate(client, conversation_id).json()["id"]
    # Another conversation's path does not reach it.
    assert client.delete(f"/conversations/{other}/annotations/{annotation_id}").status_code == 404
    path = f"/conversations/{conversation_id}/annotations/{annotation_id}"
    assert client.delete(path).status_code == 204
    assert client.delete(path).status_code == 404
    assert client.delete(f"/conversations/{conversation_id}/annotations/x").status_code == 404
    assert client.get(f"/conversations/{conversation_id}/annotations").json() == {"items": []}


def test_annotation_hostile_text_is_stored_as_text(client: httpx.Client, db: psycopg.Connection):
    conversation_id = conversation(db, response="Hello")
    response = annotate(client, conversation_id, label="<img src=x>", note=HOSTILE)
    assert response.status_code == 201
    assert (response.json()["label"], response.json()["note"]) == ("<img src=x>", HOSTILE)


# --- who may write as whom (SPEC 8, 9) ---


@contextmanager
def named_browser(url: str, name: str) -> Iterator[httpx.Client]:
    """A browser on open mode that said who it is on /reviewer."""
    with httpx.Client(base_url=url, headers={"Origin": url}) as browser:
        response = browser.post("/reviewer", data={"reviewer": name, "next": "/"})
        assert response.status_code == 303, response.text
        yield browser


def test_open_mode_a_named_browser_writes_only_as_itself(
    demo_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    with named_browser(demo_server.url, "Zoe\u0308") as browser:
        cookie = browser.cookies[REVIEWER_COOKIE]
        assert cookie.isascii()
        assert put(browser, conversation_id, "Zo\u00eb", {"verdict": "good"}).status_code == 200
        refused = put(browser, conversation_id, "mallory", {"verdict": "bad"})
        assert refused.status_code == 403 and error_code(refused) == "forbidden"
        assert browser.delete(f"/conversations/{conversation_id}/reviews/mallory").status_code == (
            403
        )
        annotation = {"reviewer": "mallory", "field": "prompt", "start": 0, "end": 1, "label": "x"}
        forged = browser.post(f"/conversations/{conversation_id}/annotations", json=annotation)
        assert forged.status_code == 403
    assert review_count(db, conversation_id) == 1
    assert annotation_count(db, conversation_id) == 0


def test_open_mode_a_client_without_cookies_writes_any_name(
    client: httpx.Client, db: psycopg.Connection
):
    conversation_id = conversation(db)
    for name in ("ada", "grace"):
        assert put(client, conversation_id, name, {"verdict": "good"}).status_code == 200


def test_a_named_browser_may_not_delete_anothers_annotation(
    demo_server: RunningServer, client: httpx.Client, db: psycopg.Connection
):
    conversation_id = conversation(db, response="Hello")
    theirs = annotate(client, conversation_id, reviewer="grace").json()["id"]
    with named_browser(demo_server.url, "ada") as browser:
        mine = annotate(browser, conversation_id, reviewer="ada").json()["id"]
        base = f"/conversations/{conversation_id}/annotations"
        assert browser.delete(f"{base}/{theirs}").status_code == 403
        assert browser.delete(f"{base}/{mine}").status_code == 204
    assert annotation_count(db, conversation_id) == 1


def test_open_mode_cookie_writes_from_another_origin_are_refused(
    demo_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    with named_browser(demo_server.url, "ada") as browser:
        evil = {"Origin": "https://evil.example"}
        forged = put(browser, conversation_id, "ada", {"verdict": "bad"}, headers=evil)
        assert forged.status_code == 403
        path = f"/conversations/{conversation_id}/annotations"
        body = {"reviewer": "ada", "field": "prompt", "start": 0, "end": 1, "label": "x"}
        assert browser.post(path, json=body, headers=evil).status_code == 403
        # The same browser from the service's own page is let through.
        assert put(browser, conversation_id, "ada", {"verdict": "bad"}).status_code == 200
    assert review_count(db, conversation_id) == 1


def test_reviewer_form_refuses_bad_names_and_other_sites(demo_server: RunningServer):
    url = demo_server.url
    page = httpx.get(f"{url}/reviewer?next=/playground")
    assert page.status_code == 200 and 'name="reviewer"' in page.text
    assert 'value="/playground"' in page.text
    bad = httpx.post(f"{url}/reviewer", data={"reviewer": "a/b"}, headers={"Origin": url})
    assert bad.status_code == 422 and REVIEWER_COOKIE not in bad.cookies
    evil = {"Origin": "https://evil.example"}
    forged = httpx.post(f"{url}/reviewer", data={"reviewer": "x"}, headers=evil)
    assert forged.status_code == 403 and REVIEWER_COOKIE not in forged.cookies
    headless = httpx.post(f"{url}/reviewer", data={"reviewer": "x"})  # no Origin: not our page
    assert headless.status_code == 403
    form = {"reviewer": "x", "next": "//evil.example/"}
    offsite = httpx.post(f"{url}/reviewer", data=form, headers={"Origin": url})
    assert offsite.status_code == 303 and offsite.headers["location"] == "/"
    cookie = offsite.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie


@pytest.fixture(scope="module")
def locked_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(base_settings.with_changes(api_key=KEY))
    yield running
    running.stop()


def signed_in(url: str, reviewer: str) -> httpx.Client:
    """A browser signed in with the key under `reviewer`."""
    form = {"key": KEY, "next": "/", "reviewer": reviewer}
    response = httpx.post(f"{url}/login", data=form, headers={"Origin": url})
    assert response.status_code == 303, response.text
    return httpx.Client(
        base_url=url, cookies={COOKIE_NAME: response.cookies[COOKIE_NAME]}, headers={"Origin": url}
    )


def test_with_a_key_a_session_writes_only_as_its_sign_in_name(
    locked_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    with signed_in(locked_server.url, " Zoe\u0308 ") as browser:
        assert put(browser, conversation_id, "Zo\u00eb", {"verdict": "good"}).status_code == 200
        assert put(browser, conversation_id, "ada", {"verdict": "good"}).status_code == 403
        # The reviewer cookie of open mode means nothing here.
        browser.cookies.set(REVIEWER_COOKIE, "ada")
        assert put(browser, conversation_id, "ada", {"verdict": "good"}).status_code == 403
        named = browser.post("/reviewer", data={"reviewer": "ada"})
        assert named.status_code == 409 and REVIEWER_COOKIE not in named.cookies
    assert review_count(db, conversation_id) == 1


def test_with_a_key_bearer_clients_write_any_name(
    locked_server: RunningServer, db: psycopg.Connection
):
    conversation_id = conversation(db)
    bearer = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=locked_server.url, headers=bearer) as program:
        for name in ("ada", "grace"):
            assert put(program, conversation_id, name, {"verdict": "good"}).status_code == 200
        assert program.get("/reviewers").status_code == 200
    with httpx.Client(base_url=locked_server.url) as stranger:
        assert put(stranger, conversation_id, "eve", {"verdict": "bad"}).status_code == 401
        assert stranger.get(f"/conversations/{conversation_id}/reviews").status_code == 401
    assert review_count(db, conversation_id) == 2


def test_openapi_describes_the_review_routes(demo_server: RunningServer):
    document = httpx.get(f"{demo_server.url}/openapi.json").json()
    validate(document)
    paths = document["paths"]
    assert set(paths["/conversations/{conversation_id}/reviews/{reviewer}"]) == {"put", "delete"}
    assert set(paths["/conversations/{conversation_id}/annotations"]) == {"get", "post"}
    assert "delete" in paths["/conversations/{conversation_id}/annotations/{annotation_id}"]
    assert "get" in paths["/conversations/{conversation_id}/reviews"]
    assert "get" in paths["/reviewers"]
    schemas = document["components"]["schemas"]
    assert set(schemas["Review"]["required"]) == {
        "conversation_id",
        "reviewer",
        "verdict",
        "labels",
        "note",
        "created_at",
        "updated_at",
    }
