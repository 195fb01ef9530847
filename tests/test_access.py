"""SPEC 8: with SSE_LLM_API_KEY set, nothing but /healthz works without the key or a session;
sessions live in PostgreSQL, and no other site can make a browser change anything."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from sse_llm.access import COOKIE_NAME, Sessions
from sse_llm.config import Settings
from sse_llm.database import EmbeddedPostgres, apply_migrations
from tests.conftest import RunningServer, start_server
from tests.processes import spawn_server
from tests.support import wait_until

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


def test_pages_show_who_is_signed_in_and_a_sign_out_form_that_works(
    locked_server: RunningServer,
) -> None:
    with httpx.Client(base_url=locked_server.url) as client:
        client.post(
            "/login",
            data={"key": KEY, "reviewer": "Ada <b>", "next": "/"},
            headers={"Origin": locked_server.url},
        )
        page = client.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 200
        assert 'action="/logout"' in page.text
        assert "Ada &lt;b&gt;" in page.text  # the name is escaped
        # The form posts from the page's own origin, as a browser would send it.
        out = client.post("/logout", data={}, headers={"Origin": locked_server.url})
        assert out.status_code == 303
        again = client.get("/", headers={"Accept": "text/html"})
        assert again.status_code == 303 and again.headers["location"].startswith("/login")


def test_login_never_redirects_off_site(locked_server: RunningServer) -> None:
    for target in ["https://evil.example/", "//evil.example/", "/\\evil.example"]:
        response = httpx.post(
            f"{locked_server.url}/login",
            data={"key": KEY, "next": target},
            headers={"Origin": locked_server.url},
        )
        assert response.headers["location"] == "/"


def sign_in(url: str, reviewer: str | None = None) -> str:
    """Sign in through the form as a browser does; return the session cookie's token."""
    form = {"key": KEY, "next": "/"} | ({"reviewer": reviewer} if reviewer is not None else {})
    response = httpx.post(f"{url}/login", data=form, headers={"Origin": url})
    assert response.status_code == 303, response.text
    return response.cookies[COOKIE_NAME]


def test_forged_expired_or_revoked_sessions_are_refused(
    locked_server: RunningServer, db: psycopg.Connection
) -> None:
    def session_row(hash_with: Sessions, expires: str, revoked: str | None = None) -> str:
        token = secrets.token_urlsafe(32)
        db.execute(
            "INSERT INTO sessions (token_hash, reviewer, expires_at, revoked_at)"
            " VALUES (%s, 'someone', now() + %s::interval, now() + %s::interval)",
            (hash_with.token_hash(token), expires, revoked),
        )
        return token

    live = session_row(Sessions(KEY), "1 hour")
    expired = session_row(Sessions(KEY), "-1 second")
    revoked = session_row(Sessions(KEY), "1 hour", revoked="-1 second")
    other_key = session_row(Sessions("another key"), "1 hour")
    never_issued = secrets.token_urlsafe(32)
    history = f"{locked_server.url}/history"
    assert httpx.get(history, cookies={COOKIE_NAME: live}).status_code == 200
    for token in (expired, revoked, other_key, never_issued, "garbage", live + "x"):
        response = httpx.get(history, cookies={COOKIE_NAME: token})
        assert response.status_code == 401, token


def test_a_session_row_keeps_a_hash_of_the_token_and_the_reviewer_name(
    locked_server: RunningServer, db: psycopg.Connection
) -> None:
    named = sign_in(locked_server.url, reviewer="  Zoe\u0301 ")
    unnamed = sign_in(locked_server.url, reviewer="")
    rows = {
        token: db.execute(
            "SELECT reviewer, expires_at - created_at, revoked_at FROM sessions"
            " WHERE token_hash = %s",
            (Sessions(KEY).token_hash(token),),
        ).fetchone()
        for token in (named, unnamed)
    }
    assert rows[named] == ("Zo\u00e9", timedelta(days=7), None)  # trimmed, NFC
    assert rows[unnamed] == ("reviewer", timedelta(days=7), None)
    stored = db.execute(
        "SELECT count(*) FROM sessions WHERE position(%s::bytea IN token_hash) > 0",
        (named.encode(),),
    ).fetchone()
    assert stored == (0,)  # the token itself is nowhere in the table


@pytest.mark.parametrize("reviewer", ["a/b", ".", "..", "x" * 65, "tab\there", "nul\x00"])
def test_sign_in_refuses_a_bad_reviewer_name(locked_server: RunningServer, reviewer: str) -> None:
    response = httpx.post(
        f"{locked_server.url}/login",
        data={"key": KEY, "next": "/", "reviewer": reviewer},
        headers={"Origin": locked_server.url},
    )
    assert response.status_code == 422
    assert "reviewer name" in response.text
    assert COOKIE_NAME not in response.cookies


@pytest.mark.slow
def test_logout_ends_the_session_on_every_replica_within_a_second(database_url: str) -> None:
    first = spawn_server(database_url, SSE_LLM_API_KEY=KEY)
    second = spawn_server(database_url, SSE_LLM_API_KEY=KEY)
    try:
        token = sign_in(first.url)
        cookies = {COOKIE_NAME: token}
        assert httpx.get(f"{second.url}/history", cookies=cookies).status_code == 200
        logout = httpx.post(f"{first.url}/logout", cookies=cookies, headers={"Origin": first.url})
        assert logout.status_code == 303
        wait_until(
            lambda: httpx.get(f"{second.url}/history", cookies=cookies).status_code == 401,
            timeout=1,
            message="the session outlived its logout",
        )
        assert httpx.get(f"{first.url}/history", cookies=cookies).status_code == 401
        # Signing in again gives a new session that works on both.
        again = {COOKIE_NAME: sign_in(second.url)}
        assert httpx.get(f"{first.url}/history", cookies=again).status_code == 200
    finally:
        first.stop()
        second.stop()


@pytest.mark.slow
def test_a_database_outage_during_a_session_check_answers_503(
    tmp_path: Path, base_settings: Settings
) -> None:
    postgres = EmbeddedPostgres(tmp_path).start()
    try:
        apply_migrations(postgres.url)
        server = start_server(base_settings.with_changes(database_url=postgres.url, api_key=KEY))
        try:
            cookies = {COOKIE_NAME: sign_in(server.url)}
            playground = f"{server.url}/playground"  # a page that reads nothing else
            assert httpx.get(playground, cookies=cookies).status_code == 200
            postgres.stop()
            try:
                response = httpx.get(playground, cookies=cookies, timeout=15)
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "database_unavailable"
                assert "psycopg" not in response.text and "Traceback" not in response.text
            finally:
                postgres.start()
            wait_until(
                lambda: httpx.get(playground, cookies=cookies, timeout=15).status_code == 200,
                timeout=20,
                interval=0.2,
                message="the session did not come back",
            )
        finally:
            server.stop()
    finally:
        postgres.stop()


def test_sign_in_form_from_another_site_or_none_is_refused(locked_server: RunningServer) -> None:
    form = {"key": KEY, "next": "/"}
    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        response = httpx.post(f"{locked_server.url}/login", data=form, headers=headers)
        assert response.status_code == 403, headers
        assert response.json()["error"]["code"] == "forbidden"
        assert COOKIE_NAME not in response.cookies
    by_referer = httpx.post(
        f"{locked_server.url}/login", data=form, headers={"Referer": f"{locked_server.url}/login"}
    )
    assert by_referer.status_code == 303


CANCEL = "/conversations/00000000-0000-0000-0000-000000000000/cancel"


def test_an_open_service_refuses_changes_sent_from_another_site(
    demo_server: RunningServer,
) -> None:
    url = demo_server.url
    evil = "https://evil.example"
    refused = [
        # A cross-site <form> or no-cors fetch: simple content types, no preflight.
        {"content": "x", "headers": {"Content-Type": "text/plain", "Origin": evil}},
        {"data": {"a": "b"}, "headers": {"Origin": evil}},
        {"files": {"f": b"x"}, "headers": {"Referer": f"{evil}/page"}},
        {"headers": {"Origin": evil}},  # a body-less fetch still names its origin
        # No origin at all, but what only a browser sends: a cookie.
        {"json": {}, "headers": {"Cookie": "sse_llm_session=x"}},
        # A look-alike of this origin.
        {"data": {"a": "b"}, "headers": {"Origin": url + ".evil.example"}},
    ]
    for request in refused:
        response = httpx.post(url + CANCEL, **request)  # type: ignore[arg-type]
        assert response.status_code == 403, request
        assert response.json()["error"]["code"] == "forbidden"
    allowed = [
        {"data": {"a": "b"}, "headers": {"Origin": url}},
        {"headers": {"Cookie": "a=b", "Referer": f"{url}/playground"}},
        {"headers": {"Cookie": "a=b", "Authorization": "Bearer anything"}},  # no page can
        {"json": {}},  # a program: no cookie, no form, no Origin
    ]
    for request in allowed:
        response = httpx.post(url + CANCEL, **request)  # type: ignore[arg-type]
        assert response.status_code == 404, request  # it reached the route
    with httpx.stream("POST", f"{url}/stream", json={"prompt": "curl-like"}) as response:
        assert response.status_code == 200


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
