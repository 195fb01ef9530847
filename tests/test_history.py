"""GET /history and /history/{id} (SPEC 4): paging, full-text search, status filter."""

from __future__ import annotations

import httpx

from tests.conftest import create, word


def test_history_lists_newest_first_with_paging(client: httpx.Client) -> None:
    tag = word()
    ids = [create(client, f"{tag} number {n}") for n in range(5)]
    newest_first = list(reversed(ids))

    first = client.get("/history", params={"q": tag, "limit": 2}).json()
    assert [item["id"] for item in first["items"]] == newest_first[:2]
    assert (first["limit"], first["offset"], first["has_more"]) == (2, 0, True)

    last = client.get("/history", params={"q": tag, "limit": 2, "offset": 4}).json()
    assert [item["id"] for item in last["items"]] == newest_first[4:]
    assert last["has_more"] is False


def test_history_defaults(client: httpx.Client) -> None:
    create(client, "defaults check")
    page = client.get("/history").json()
    assert (page["limit"], page["offset"]) == (20, 0)
    item = page["items"][0]
    assert set(item) == {
        "id",
        "prompt",
        "response",
        "status",
        "created_at",
        "completed_at",
        "model",
        "provider",
        "chunks",
        "error",
        "usage",  # token counts, with the end (test_usage.py)
        "reviews",  # SPEC 9
    }


def test_search_uses_web_search_syntax(client: httpx.Client) -> None:
    alpha, beta, gamma = word(), word(), word()
    both = create(client, f"{alpha} and {beta} together")
    only_alpha = create(client, f"{alpha} alone here")
    only_gamma = create(client, f"{gamma} elsewhere")

    def found(query: str) -> set[str]:
        return {i["id"] for i in client.get("/history", params={"q": query}).json()["items"]}

    assert found(alpha) == {both, only_alpha}
    assert found(f"{alpha} {beta}") == {both}
    assert found(f"{alpha} -{beta}") == {only_alpha}
    assert found(f'"{alpha} and {beta}"') == {both}
    assert found(f'"{beta} {alpha}"') == set()
    assert found(f"{beta} or {gamma}") == {both, only_gamma}


def test_search_covers_the_response_text(client: httpx.Client) -> None:
    conversation_id = create(client, word())
    response_text = client.get(f"/history/{conversation_id}").json()["response"]
    assert "demo" in response_text
    hits = client.get("/history", params={"q": "built-in demo provider", "limit": 100}).json()
    assert conversation_id in {item["id"] for item in hits["items"]}


def test_status_filter(client: httpx.Client) -> None:
    create(client, "filter me")
    completed = client.get("/history", params={"status": "completed"}).json()["items"]
    assert completed and all(item["status"] == "completed" for item in completed)
    failed = client.get("/history", params={"status": "failed", "q": word()}).json()
    assert failed["items"] == []


def test_history_item(client: httpx.Client) -> None:
    conversation_id = create(client, "fetch me by id")
    item = client.get(f"/history/{conversation_id}").json()
    assert item["id"] == conversation_id
    assert item["prompt"] == "fetch me by id"
    assert item["status"] == "completed"
    assert item["model"] == "demo"
