"""SPEC 8: with SSE_LLM_API_KEY set, nothing but /healthz works without the key or a session."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sse_llm.access import Sessions
from sse_llm.config import Settings
from tests.conftest import RunningServer, start_server

KEY = "correct horse battery staple"


@pytest.fixture(scope="module")
def locked_server(base_settings: Settings) -> Iterator[RunningServer]:
    running = start_server(base_settings.with_changes(api_key=KEY))
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/history"),
        ("GET", "/history/00000000-0000-0000-0000-000000000000"),
        ("POST", "/stream"),
        ("GET", "/conversations/00000000-0000-0000-0000-000000000000/stream"),
        ("POST", "/conversations/00000000-0000-0000-0000-000000000000/cancel"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/nowhere"),
    ],
)
def test_api_without_key_is_401(locked_server: RunningServer, method: str, path: str) -> None:
    response = httpx.request(method, locked_server.url + path, json={"prompt": "hi"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_401_and_right_key_works(locked_server: RunningServer) -> None:
    wrong = httpx.get(f"{locked_server.url}/history", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = httpx.get(f"{locked_server.url}/history", headers={"Authorization": f"Bearer {KEY}"})
    assert right.status_code == 200
    with httpx.stream(
        "POST",
        f"{locked_server.url}/stream",
        json={"prompt": "with a key"},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        assert response.status_code == 200


def test_healthz_needs_no_key(locked_server: RunningServer) -> None:
    assert httpx.get(f"{locked_server.url}/healthz").status_code == 200


def test_pages_redirect_browsers_to_login(locked_server: RunningServer) -> None:
    response = httpx.get(f"{locked_server.url}/playground", headers={"Accept": "text/html"})
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fplayground"


def test_login_sets_a_strict_http_only_cookie_that_works(locked_server: RunningServer) -> None:
    with httpx.Client(base_url=locked_server.url) as client:
        assert client.get("/login").status_code == 200
        refused = client.post(
            "/login",
            data={"key": "wrong", "next": "/history"},
            headers={"Origin": locked_server.url},
        )
        assert refused.status_code == 401
        response = client.post(
            "/login",
            data={"key": KEY, "next": "/history"},
            headers={"Origin": locked_server.url},
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/history"
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=" in cookie
        assert "secure" not in cookie  # plain http here; https gets Secure
        assert client.get("/history").status_code == 200
        # EventSource sends the cookie too.
        stream = client.get("/conversations/00000000-0000-0000-0000-000000000000/stream")
        assert stream.status_code == 404
        # A change needs this origin.
        cross = client.post(
            "/stream", json={"prompt": "x"}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403
        same = client.post(
            "/conversations/00000000-0000-0000-0000-000000000000/cancel",
            headers={"Origin": locked_server.url},
        )
        assert same.status_code == 404
        assert client.post("/logout", headers={"Origin": locked_server.url}).status_code == 303
        assert client.get("/history").status_code == 401


def test_login_never_redirects_off_site(locked_server: RunningServer) -> None:
    for target in ["https://evil.example/", "//evil.example/", "/\\evil.example"]:
        response = httpx.post(
            f"{locked_server.url}/login",
            data={"key": KEY, "next": target},
            headers={"Origin": locked_server.url},
        )
        assert response.headers["location"] == "/"


def test_forged_or_expired_sessions_are_refused(locked_server: RunningServer) -> None:
    sessions = Sessions(KEY)
    expired = sessions.issue(now=0)
    forged = sessions.issue().split(".")[0] + ".deadbeef"
    other_key = Sessions("another key").issue()
    for token in (expired, forged, other_key, "garbage"):
        response = httpx.get(f"{locked_server.url}/history", cookies={"sse_llm_session": token})
        assert response.status_code == 401, token


def test_open_service_says_so_in_its_log(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(base_settings)
    server.stop()
    assert any("SSE_LLM_API_KEY is not set" in r.getMessage() for r in caplog.records)


def test_cookie_is_secure_behind_an_https_proxy(locked_server: RunningServer) -> None:
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (FORWARDED_ALLOW_IPS) by default.
    response = httpx.post(
        f"{locked_server.url}/login",
        data={"key": KEY, "next": "/"},
        headers={
            "Origin": "https://" + locked_server.url.removeprefix("http://"),
            "X-Forwarded-Proto": "https",
        },
    )
    assert response.status_code == 303
    assert "secure" in response.headers["set-cookie"].lower()
