"""SPEC 6: one client's bad input never touches another client's stream.

The writer commits many streams' chunks in one transaction, so one value PostgreSQL
refuses would fail every stream sharing the batch. Each such value is refused when its
request is read: `422 validation_error` naming the field natively, `400
invalid_request_error` with `param` on /v1. A body that cannot be parsed is a `400`.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psycopg
import pytest

from sse_llm.config import Settings
from tests.conftest import RunningServer, start_server
from tests.fake_upstream import FakeUpstream, Script
from tests.sse_client import chunk_text, iter_events
from tests.support import wait_until

JSON = {"Content-Type": "application/json"}
LONE = "\ud800"  # a lone surrogate: json.dumps sends it as the escape \ud800
NUL = "\x00"


def user(text: str) -> dict[str, object]:
    return {"role": "user", "content": text}


def with_messages(**fields: object) -> dict[str, object]:
    return {"messages": [user("hello")], **fields}


def v1_cases(bad: str) -> list[tuple[dict[str, object], str]]:
    """A body with `bad` in each field that would be stored, and that field's path."""
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": " there", "foo": bad}]
    return [
        (with_messages(model=bad), "model"),
        (with_messages(model="a" + bad), "model"),
        ({"messages": [{"role": "user", "content": "hi", "name": bad}]}, "messages[0].name"),
        (with_messages(user=bad), "user"),
        (with_messages(stop=bad), "stop"),
        (with_messages(stop=["ok", bad]), "stop[1]"),
        ({"messages": [{"role": "system", "content": bad}, user("hi")]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": parts}]}, "messages[0].content[1].foo"),
        ({"messages": [{"role": "user", "content": "hi " + bad}]}, "messages[0].content"),
        (with_messages(stream_options={"include_usage": bad}), "stream_options.include_usage"),
    ]


V1_UNSTORABLE = [
    pytest.param(body, param, id=f"{kind}-{param}")
    for kind, bad in (("surrogate", LONE), ("low-surrogate", "x\udc00y"), ("nul", NUL))
    for body, param in v1_cases(bad)
]


@pytest.mark.parametrize(("body", "param"), V1_UNSTORABLE)
def test_an_unstorable_string_on_v1_is_a_400_naming_its_path(
    demo_server: RunningServer, db: psycopg.Connection, body: dict[str, object], param: str
) -> None:
    before = count_conversations(db)
    url = f"{demo_server.url}/v1/chat/completions"
    response = httpx.post(url, content=dumps(body), headers=JSON)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert param in error["message"]
    assert count_conversations(db) == before


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        # A key is a string that is stored too (in the messages' jsonb).
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", '
            b'"\\ud800": 1}]}]}',
            'messages[0].content[0]."\\ud800"',
        ),
        # 1e400 reads as infinity, which jsonb cannot hold.
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", '
            b'"x": 1e400}]}]}',
            "messages[0].content[0].x",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1e999}',
            "temperature",
        ),
    ],
)
def test_an_unstorable_key_or_number_on_v1_is_a_400_naming_its_path(
    demo_server: RunningServer, raw: bytes, param: str
) -> None:
    response = httpx.post(f"{demo_server.url}/v1/chat/completions", content=raw, headers=JSON)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        (b'{"prompt": "\\ud800"}', "prompt"),
        (b'{"prompt": "a\\u0000b"}', "NUL"),
        (b'{"prompt": "hi", "\\udfff": 1}', "(a key)"),
        (b'{"prompt": "hi", "extra": ["\\ud800"]}', "extra[0]"),
        (b'{"prompt": "hi", "extra": 1e400}', "extra"),
    ],
)
def test_an_unstorable_value_on_stream_is_a_422_naming_the_field(
    demo_server: RunningServer, db: psycopg.Connection, raw: bytes, mentions: str
) -> None:
    before = count_conversations(db)
    response = httpx.post(f"{demo_server.url}/stream", content=raw, headers=JSON)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert mentions in error["message"]
    assert count_conversations(db) == before


def test_a_model_name_is_at_most_200_characters(demo_server: RunningServer) -> None:
    url = f"{demo_server.url}/v1/chat/completions"
    response = httpx.post(url, json=with_messages(model="m" * 201))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
    assert httpx.post(url, json=with_messages(model="m" * 200)).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": [{"role": ["user"], "content": "hi"}]}, id="role-list"),
        pytest.param({"messages": [{"role": {}, "content": "hi"}]}, id="role-object"),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            id="text-number",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, id="text-missing"
        ),
    ],
)
def test_a_v1_body_of_the_wrong_shape_is_a_400_not_a_500(
    demo_server: RunningServer, body: dict[str, object]
) -> None:
    response = httpx.post(f"{demo_server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("messages[0]")


DEEP = 200_000  # about 200 KB of brackets: far below the body limit


UNPARSABLE = [
    pytest.param(b"[" * DEEP, id="deep-array"),
    pytest.param(b"[" * DEEP + b"]" * DEEP, id="deep-closed-array"),
    pytest.param(b'{"a": ' * (DEEP // 6) + b"1" + b"}" * (DEEP // 6), id="deep-object"),
    pytest.param(b'{"prompt": "hi", "x": ' + b"[" * 64 + b"]" * 64 + b"}", id="depth-65"),
    pytest.param(b'{"prompt": "\xff"}', id="invalid-utf8"),
    pytest.param(b'{"prompt": "\xed\xa0\x80"}', id="encoded-surrogate"),
    pytest.param(b'{"prompt": "hi", "x": NaN}', id="nan"),
    pytest.param(b'{"prompt": "hi", "x": -Infinity}', id="infinity"),
    pytest.param(b'{"prompt": "hi"', id="truncated"),
]


@pytest.mark.parametrize("raw", UNPARSABLE)
def test_a_body_that_cannot_be_parsed_is_a_400_natively(
    demo_server: RunningServer, raw: bytes
) -> None:
    response = httpx.post(f"{demo_server.url}/stream", content=raw, headers=JSON)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": {"code": "invalid_json", "message": error_message(raw)}}


@pytest.mark.parametrize("raw", UNPARSABLE)
def test_a_body_that_cannot_be_parsed_is_a_400_in_openai_shape_on_v1(
    demo_server: RunningServer, raw: bytes
) -> None:
    response = httpx.post(f"{demo_server.url}/v1/chat/completions", content=raw, headers=JSON)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")


def error_message(raw: bytes) -> str:
    if raw.count(b"[") + raw.count(b"{") > 64:
        return "The body is not valid JSON: it is nested deeper than 64 levels."
    if b"\xff" in raw or b"\xed" in raw:
        return "The body is not valid UTF-8 JSON."
    return "The body is not valid JSON."


def test_nesting_up_to_64_and_brackets_inside_strings_are_accepted(
    demo_server: RunningServer,
) -> None:
    # 64 deep parses (then fails validation for the unknown field, not the nesting).
    raw = b'{"prompt": "hi", "x": ' + b"[" * 63 + b"]" * 63 + b"}"
    response = httpx.post(f"{demo_server.url}/stream", content=raw, headers=JSON)
    assert (response.status_code, response.json()["error"]["code"]) == (422, "validation_error")
    # Brackets and escaped quotes inside a string are text, however many.
    prompt = '[{"\\' * 2000 + "end"
    with httpx.stream("POST", f"{demo_server.url}/stream", json={"prompt": prompt}) as response:
        assert response.status_code == 200
        events = list(iter_events(response))
    assert events[-1].event == "done"
    stored = httpx.get(f"{demo_server.url}/history/{events[0].json['id']}").json()
    assert stored["prompt"] == prompt


# The headline: 30 streams run while bad requests arrive on every route.

STREAMS = 30
CHUNKS = 30
CHUNK_DELAY = 0.1  # 30 chunks 0.1 s apart: every stream is open for about 3 s


@dataclass
class Received:
    """What one good client was sent."""

    conversation_id: str
    text: str
    ended: str  # "done" or the error code


@pytest.fixture(scope="module")
def paced_server(base_settings: Settings, upstream: FakeUpstream) -> Iterator[RunningServer]:
    """The openai provider in front of the fake upstream, with room for slow answers."""
    settings = base_settings.with_changes(
        provider="openai",
        openai_base_url=upstream.base_url,
        model="fake-model",
        first_chunk_timeout=10.0,
        chunk_timeout=10.0,
        total_timeout=60.0,
    )
    running = start_server(settings)
    yield running
    running.stop()


def stream_natively(url: str, prompt: str) -> Received:
    with (
        httpx.Client(base_url=url, timeout=60) as client,
        client.stream("POST", "/stream", json={"prompt": prompt}) as response,
    ):
        if response.status_code != 200:
            return Received("", "", f"HTTP {response.status_code}")
        events = list(iter_events(response))
    last = events[-1]
    ended = "done" if last.event == "done" else last.json["error"]["code"]
    return Received(response.headers["x-conversation-id"], chunk_text(events), ended)


def stream_on_v1(url: str, prompt: str) -> Received:
    body = {"model": "fake-model", "messages": [user(prompt)], "stream": True}
    text, ended = "", "incomplete"
    with (
        httpx.Client(base_url=url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        if response.status_code != 200:
            return Received("", "", f"HTTP {response.status_code}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                ended = "done"
                break
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                ended = event["error"]["code"]
                break
            for choice in event["choices"]:
                text += choice["delta"].get("content") or ""
    return Received(response.headers["x-conversation-id"], text, ended)


def bad_requests(url: str, live_id: str) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """(name, method, path, headers, body) of a request that must get a 4xx, on every route."""
    requests: list[tuple[str, str, str, dict[str, str], bytes]] = []
    for kind, bad in (("surrogate", LONE), ("nul", NUL)):
        for body, param in v1_cases(bad):
            requests.append(
                (f"v1 {kind} {param}", "POST", "/v1/chat/completions", JSON, dumps(body))
            )
        requests.append((f"stream {kind}", "POST", "/stream", JSON, dumps({"prompt": bad})))
        requests.append(
            (f"stream key {kind}", "POST", "/stream", JSON, dumps({"prompt": "x", bad: 1}))
        )
    for raw in (b"[" * DEEP, b'{"prompt": "\xff"}', b'{"prompt": NaN}'):
        requests.append((f"stream {raw[:12]!r}", "POST", "/stream", JSON, raw))
        requests.append((f"v1 {raw[:12]!r}", "POST", "/v1/chat/completions", JSON, raw))
    infinite = b'{"messages": [{"role": "user", "content": "hi"}], "user": "u", "x": 1e400}'
    requests.append(("v1 1e400", "POST", "/v1/chat/completions", JSON, infinite))
    part = (
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1e400}]}]}'
    )
    requests.append(("v1 part 1e400", "POST", "/v1/chat/completions", JSON, part))
    requests.append(
        (
            "v1 long model",
            "POST",
            "/v1/chat/completions",
            JSON,
            dumps(with_messages(model="m" * 201)),
        )
    )
    for query in ("limit=abc", "offset=-1", "status=bogus", "q=a%00b", "q=" + "x" * 1001):
        requests.append((f"history {query[:12]}", "GET", f"/history?{query}", {}, b""))
    for path in (
        "/history/not-a-uuid",
        "/conversations/not-a-uuid/stream",
        "/conversations/not-a-uuid/cancel",
        f"/conversations/{uuid.uuid4()}/cancel",
    ):
        method = "POST" if path.endswith("cancel") else "GET"
        requests.append((f"{method} {path}", method, path, {}, b""))
    for garbage in ("abc", "-1", "1e3", "99999999999999999999"):
        headers = {"Last-Event-ID": garbage}
        requests.append(
            (f"attach {garbage}", "GET", f"/conversations/{live_id}/stream", headers, b"")
        )
    return requests


def dumps(body: object) -> bytes:
    return json.dumps(body).encode()  # lone surrogates and NUL travel as \u escapes


@pytest.mark.slow
def test_bad_requests_on_every_route_never_touch_30_running_streams(
    paced_server: RunningServer, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    prompts = [f"hostile neighbours {n} {uuid.uuid4().hex[:8]}" for n in range(STREAMS)]
    for prompt in prompts:
        upstream.script(prompt, Script([f" w{i}" for i in range(CHUNKS)], delay=CHUNK_DELAY))
    before = count_conversations(db)
    url = paced_server.url
    answers: list[tuple[str, int, str]] = []  # (bad request, status, body)
    streams_done = threading.Event()

    def attack() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            live_id = wait_for_a_live_stream(client)
            requests = bad_requests(url, live_id)
            rounds = 0
            while rounds < 2 or not streams_done.is_set():
                for name, method, path, headers, body in requests:
                    try:
                        response = client.request(method, path, headers=headers, content=body)
                    except httpx.TransportError as exc:  # the server dropped the connection
                        answers.append((name, 0, repr(exc)))
                        continue
                    answers.append((name, response.status_code, response.text[:200]))
                rounds += 1

    with ThreadPoolExecutor(max_workers=STREAMS + 1) as pool:
        attacker = pool.submit(attack)
        futures = [
            pool.submit(stream_natively if n % 2 else stream_on_v1, url, prompt)
            for n, prompt in enumerate(prompts)
        ]
        try:
            received = [future.result(timeout=120) for future in futures]
        finally:
            streams_done.set()
        attacker.result(timeout=120)

    endings = Counter(r.ended for r in received)
    assert endings == {"done": STREAMS}, f"bad requests broke good streams: {endings}"
    refused = [(name, status, body) for name, status, body in answers if not 400 <= status < 500]
    assert not refused, f"{len(refused)} bad requests not refused with a 4xx: {refused[:5]}"
    assert len(answers) >= 2 * len(bad_requests(url, str(uuid.uuid4())))
    for got, prompt in zip(received, prompts, strict=True):
        row = db.execute(
            "SELECT status, response, chunk_count, error_code FROM conversations WHERE id = %s",
            (got.conversation_id,),
        ).fetchone()
        assert row == ("completed", got.text, CHUNKS, None)
        assert got.text == "".join(f" w{i}" for i in range(CHUNKS)), prompt
    # Not one of the bad requests created a conversation.
    assert count_conversations(db) == before + STREAMS


def wait_for_a_live_stream(client: httpx.Client) -> str:
    """The id of a conversation that is streaming right now (once the streams have begun)."""

    def live() -> list[dict[str, object]]:
        return client.get("/history", params={"status": "streaming", "limit": 1}).json()["items"]

    return str(wait_until(live, 30, message="no stream started")[0]["id"])


def count_conversations(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM conversations").fetchone()
    assert row is not None
    return int(row[0])
