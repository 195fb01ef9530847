"""SPEC 6: every bad request gets a clear JSON error with the right status, and creates nothing."""

from __future__ import annotations

import json
import socket

import httpx
import psycopg
import pytest

from tests.conftest import RunningServer

JSON = {"Content-Type": "application/json"}


def count_conversations(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM conversations").fetchone()
    assert row is not None
    return int(row[0])


def assert_error_shape(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    for leak in ("Traceback", 'File "', "SELECT", "INSERT", "psycopg", "/work/", ".py"):
        assert leak not in response.text
    return body["error"]


BAD_STREAM_REQUESTS = [
    pytest.param(b"{not json", JSON, 400, "invalid_json", None, id="malformed-json"),
    pytest.param(b"\xff\xfe\x00", JSON, 400, "invalid_json", None, id="not-utf8"),
    pytest.param(b"", JSON, 400, "invalid_json", None, id="empty-body"),
    pytest.param(
        b"prompt=hi",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,  # no cookie, no Origin: a plain client, told what it sent wrong
        "unsupported_media_type",
        None,
        id="form",
    ),
    pytest.param(
        b'{"prompt": "hi"}',
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
        None,
        id="text-plain",
    ),
    pytest.param(b'{"prompt": "hi"}', {}, 415, "unsupported_media_type", None, id="no-type"),
    pytest.param(b'["prompt"]', JSON, 422, "validation_error", "object", id="array"),
    pytest.param(b"{}", JSON, 422, "validation_error", "prompt", id="missing"),
    pytest.param(b'{"prompt": 5}', JSON, 422, "validation_error", "prompt", id="number"),
    pytest.param(b'{"prompt": null}', JSON, 422, "validation_error", "prompt", id="null"),
    pytest.param(b'{"prompt": ["a"]}', JSON, 422, "validation_error", "prompt", id="list"),
    pytest.param(b'{"prompt": ""}', JSON, 422, "validation_error", "prompt", id="empty"),
    pytest.param(b'{"prompt": "  \\n\\t "}', JSON, 422, "validation_error", "prompt", id="blank"),
    pytest.param(b'{"prompt": "a\\u0000b"}', JSON, 422, "validation_error", "NUL", id="nul"),
    pytest.param(b'{"prompt": "\\ud800"}', JSON, 422, "validation_error", "prompt", id="surrogate"),
    pytest.param(
        json.dumps({"prompt": "x" * 32001}).encode(),
        JSON,
        422,
        "validation_error",
        "prompt",
        id="too-long",
    ),
    pytest.param(
        b'{"prompt": "hi", "model": "x"}',
        JSON,
        422,
        "validation_error",
        "model",
        id="unknown-field",
    ),
]


@pytest.mark.parametrize(("body", "headers", "status", "code", "mentions"), BAD_STREAM_REQUESTS)
def test_bad_stream_request_gets_error_and_creates_nothing(
    demo_server: RunningServer,
    db: psycopg.Connection,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
    mentions: str | None,
) -> None:
    before = count_conversations(db)
    response = httpx.post(f"{demo_server.url}/stream", content=body, headers=headers)
    error = assert_error_shape(response, status, code)
    if mentions:
        assert mentions in error["message"]
    assert count_conversations(db) == before


def test_prompt_of_exactly_the_maximum_length_is_accepted(demo_server: RunningServer) -> None:
    with httpx.stream(
        "POST", f"{demo_server.url}/stream", json={"prompt": "x" * 32000}
    ) as response:
        assert response.status_code == 200


def test_declared_body_over_one_mebibyte_is_refused_unread(demo_server: RunningServer) -> None:
    # Only the headers are sent: the refusal must come without waiting for the body.
    host, port = demo_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /stream HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2097152\r\n\r\n{"
        )
        reply = sock.recv(65536).decode()
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_chunked_body_over_one_mebibyte_is_refused(
    demo_server: RunningServer, db: psycopg.Connection
) -> None:
    before = count_conversations(db)

    def body():  # type: ignore[no-untyped-def]
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(f"{demo_server.url}/stream", content=body(), headers=JSON)
    assert_error_shape(response, 413, "payload_too_large")
    assert count_conversations(db) == before


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("GET", "/stream", 405, "method_not_allowed"),
        ("DELETE", "/history", 405, "method_not_allowed"),
        ("GET", "/history/00000000-0000-0000-0000-000000000000", 404, "not_found"),
        ("GET", "/history/not-a-uuid", 404, "not_found"),
        ("GET", "/history/' OR 1=1 --", 404, "not_found"),
        ("GET", "/history?limit=0", 422, "validation_error"),
        ("GET", "/history?limit=101", 422, "validation_error"),
        ("GET", "/history?limit=ten", 422, "validation_error"),
        ("GET", "/history?offset=-1", 422, "validation_error"),
        ("GET", "/history?offset=99999999999999999999", 422, "validation_error"),
        ("GET", "/history?status=done", 422, "validation_error"),
        ("GET", "/conversations/00000000-0000-0000-0000-000000000000/stream", 404, "not_found"),
        ("GET", "/conversations/nope/stream", 404, "not_found"),
        ("POST", "/conversations/00000000-0000-0000-0000-000000000000/cancel", 404, "not_found"),
    ],
)
def test_bad_reads_get_errors_in_the_spec_shape(
    demo_server: RunningServer, method: str, path: str, status: int, code: str
) -> None:
    response = httpx.request(method, f"{demo_server.url}{path}")
    error = assert_error_shape(response, status, code)
    if status == 422:
        field = path.split("?")[1].split("=")[0]
        assert field in error["message"]


def test_history_search_with_sql_and_tsquery_syntax_is_harmless(
    demo_server: RunningServer,
) -> None:
    for query in ["'; DROP TABLE conversations; --", "a & | ! (", '"unclosed', "-", "or or"]:
        response = httpx.get(f"{demo_server.url}/history", params={"q": query})
        assert response.status_code == 200, query
        assert isinstance(response.json()["items"], list)
