"""What each client connection was sent (SPEC 10, deliveries): recorded per connection,
written in the writer's batches, listed per conversation, and searchable as "no client
was sent the end"."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from sse_llm import delivery_store
from sse_llm.config import Settings
from sse_llm.contract import DeliveryEnd, DeliveryVia
from sse_llm.deliveries import Delivery
from sse_llm.http_protocol import BoundedHttpToolsProtocol
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk, NewConversation
from sse_llm.writer import Writer
from tests.conftest import RunningServer, start_server, word
from tests.fake_upstream import FakeUpstream, Script
from tests.processes import BackgroundStream, spawn_server
from tests.sse_client import Event, iter_events
from tests.support import run, wait_until
from tests.test_writer import Owner

TOKENS = 20


@pytest.fixture(scope="module")
def slow_server(base_settings: Settings) -> Iterator[RunningServer]:
    """Answers of TOKENS chunks at 40 a second: time to leave, resume and attach."""
    running = start_server(
        base_settings.with_changes(demo_tokens=TOKENS, demo_tokens_per_second=40)
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def slow_client(slow_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=slow_server.url, timeout=30) as client:
        yield client


def deliveries(client: httpx.Client, conversation_id: str, count: int) -> list[dict[str, Any]]:
    """The conversation's deliveries once `count` of them have ended (they are written in
    the writer's next batch, a moment after the connection ends)."""

    def ended() -> list[dict[str, Any]] | None:
        response = client.get(f"/conversations/{conversation_id}/deliveries")
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        finished = [item for item in items if item["ended"] is not None]
        return items if len(finished) >= count else None

    return wait_until(ended, 20, message=f"{count} deliveries did not end")


def summary(items: list[dict[str, Any]]) -> list[tuple[str, int, int | None, str | None]]:
    return [(i["via"], i["from_seq"], i["last_seq"], i["ended"]) for i in items]


def read_until(events: Iterator[Event], last_id: int) -> list[Event]:
    seen = []
    for event in events:
        seen.append(event)
        if event.id == str(last_id):
            break
    return seen


def incomplete_ids(client: httpx.Client) -> set[str]:
    response = client.get("/history", params={"delivered": "incomplete", "limit": 100})
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["items"]}


def test_a_stream_read_to_the_end_is_one_delivery_that_sent_done(
    slow_client: httpx.Client,
) -> None:
    with slow_client.stream("POST", "/stream", json={"prompt": "read it all"}) as response:
        conversation_id = response.headers["x-conversation-id"]
        events = list(iter_events(response))
    assert events[-1].event == "done"
    items = deliveries(slow_client, conversation_id, 1)
    assert summary(items) == [("stream", 1, TOKENS, "done")]
    (item,) = items
    assert set(item) == {"started_at", "ended_at", "via", "from_seq", "last_seq", "ended"}
    assert item["started_at"] <= item["ended_at"]
    assert conversation_id not in incomplete_ids(slow_client)


def test_deliveries_of_an_unknown_conversation_are_404(client: httpx.Client) -> None:
    for conversation_id in ("00000000-0000-0000-0000-000000000000", "not-an-id"):
        response = client.get(f"/conversations/{conversation_id}/deliveries")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_a_client_that_leaves_then_resumes_with_last_event_id_is_two_deliveries(
    slow_client: httpx.Client,
) -> None:
    with slow_client.stream("POST", "/stream", json={"prompt": "leave and come back"}) as r:
        conversation_id = r.headers["x-conversation-id"]
        read_until(iter_events(r), 7)
    url = f"/conversations/{conversation_id}/stream"
    with slow_client.stream("GET", url, headers={"Last-Event-ID": "7"}) as resumed:
        events = list(iter_events(resumed))
    assert events[0].id == "8" and events[-1].event == "done"
    items = deliveries(slow_client, conversation_id, 2)
    (first, second) = summary(items)
    # The first connection sent at least chunk 7 (perhaps a little more before the
    # server noticed the client had gone), never the end.
    assert first[:2] == ("stream", 1) and first[3] == "client_left"
    assert first[2] is not None and 7 <= first[2] < TOKENS
    assert second == ("attach", 8, TOKENS, "done")
    # Someone was sent the end: not "incomplete", although the first client left.
    assert conversation_id not in incomplete_ids(slow_client)


def test_two_clients_on_one_stream_each_have_their_delivery(
    slow_client: httpx.Client, slow_server: RunningServer
) -> None:
    with slow_client.stream("POST", "/stream", json={"prompt": "two of us"}) as first:
        conversation_id = first.headers["x-conversation-id"]
        first_events = iter_events(first)
        read_until(first_events, 2)
        url = f"/conversations/{conversation_id}/stream"
        # A second client's bad input creates nothing and touches nobody's stream.
        refused = slow_client.get(url, headers={"Last-Event-ID": "minus one"})
        assert refused.status_code == 422
        with httpx.Client(base_url=slow_server.url, timeout=30) as other:
            with other.stream("GET", url, params={"via": "dashboard"}) as watcher:
                read_until(iter_events(watcher), 5)
            # The watcher left: the first client goes on to the end.
            rest = list(first_events)
    assert rest[-1].event == "done"
    items = deliveries(slow_client, conversation_id, 2)
    by_via = {item["via"]: item for item in items}
    assert len(items) == 2 and set(by_via) == {"stream", "dashboard"}
    assert summary([by_via["stream"]]) == [("stream", 1, TOKENS, "done")]
    watcher_row = by_via["dashboard"]
    assert (watcher_row["from_seq"], watcher_row["ended"]) == (1, "client_left")
    assert 5 <= watcher_row["last_seq"] < TOKENS


def test_a_bad_via_is_refused_and_recorded_nowhere(client: httpx.Client) -> None:
    response, _ = stream_and_id(client, "bad via")
    conversation_id = response.headers["x-conversation-id"]
    before = deliveries(client, conversation_id, 1)
    bad = client.get(f"/conversations/{conversation_id}/stream", params={"via": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
    time.sleep(0.2)
    assert client.get(f"/conversations/{conversation_id}/deliveries").json()["items"] == before


def stream_and_id(client: httpx.Client, prompt: str) -> tuple[httpx.Response, list[Event]]:
    with client.stream("POST", "/stream", json={"prompt": prompt}) as response:
        return response, list(iter_events(response))


def test_replaying_an_ended_conversation_is_an_attach_that_sent_done(
    client: httpx.Client,
) -> None:
    response, events = stream_and_id(client, "replay me")
    conversation_id = response.headers["x-conversation-id"]
    chunks = sum(1 for e in events if e.event == "message")
    with client.stream("GET", f"/conversations/{conversation_id}/stream") as replay:
        assert list(iter_events(replay))[-1].event == "done"
    # Nothing new after the last chunk: 204, and EventSource stops. No stream was served.
    after_all = client.get(
        f"/conversations/{conversation_id}/stream", headers={"Last-Event-ID": str(chunks)}
    )
    assert after_all.status_code == 204
    items = deliveries(client, conversation_id, 2)
    assert summary(items) == [("stream", 1, chunks, "done"), ("attach", 1, chunks, "done")]


def test_v1_calls_streamed_and_not_are_v1_deliveries(client: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "hello v1"}]}
    whole = client.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200
    conversation_id = whole.headers["x-conversation-id"]
    chunks = client.get(f"/history/{conversation_id}").json()["chunks"]
    assert summary(deliveries(client, conversation_id, 1)) == [("v1", 1, chunks, "done")]
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        streamed_id = r.headers["x-conversation-id"]
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = client.get(f"/history/{streamed_id}").json()["chunks"]
    assert summary(deliveries(client, streamed_id, 1)) == [("v1", 1, chunks, "done")]


def test_a_stream_that_ends_in_error_is_a_delivery_that_sent_the_error(
    openai_server: RunningServer, upstream: FakeUpstream
) -> None:
    upstream.script("fail midway", Script(["one ", "two "], then="error_event"))
    with httpx.Client(base_url=openai_server.url, timeout=30) as client:
        response, events = stream_and_id(client, "fail midway")
        assert events[-1].event == "error"
        conversation_id = response.headers["x-conversation-id"]
        assert summary(deliveries(client, conversation_id, 1)) == [("stream", 1, 2, "error")]
        # The error event was sent: the end reached a client.
        assert conversation_id not in incomplete_ids(client)


class QuickToDropProtocol(BoundedHttpToolsProtocol):
    stalled_client_timeout = 0.5


def test_a_client_that_stops_reading_is_dropped(
    base_settings: Settings, upstream: FakeUpstream, db: psycopg.Connection
) -> None:
    # Far more than the sockets' buffers hold: the server's writes stall while the
    # client reads nothing, and the protocol drops it.
    upstream.script("never read me", Script(["x" * 8000] * 400))
    settings = base_settings.with_changes(
        provider="openai", openai_base_url=upstream.base_url, model="fake-model"
    )
    server = start_server(settings, http=QuickToDropProtocol)
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "never read me"}).encode()
    request = (
        b"POST /stream HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(request)
            head = sock.recv(4096)
            found = re.search(rb"x-conversation-id: ([0-9a-f-]+)", head, re.I)
            assert found is not None, head[:300]
            conversation_id = found.group(1).decode()
            with httpx.Client(base_url=server.url, timeout=30) as client:
                (item,) = deliveries(client, conversation_id, 1)
        # Not `done`: the end waited behind the full buffer until the client was dropped.
        # (`last_seq` counts what was handed to the connection, its buffer included.)
        assert (item["via"], item["ended"]) == ("stream", "dropped")
    finally:
        server.stop()


@pytest.mark.slow
def test_a_delivery_whose_process_is_killed_is_lost_and_a_live_replicas_is_not(
    database_url: str, db: psycopg.Connection
) -> None:
    slow = {"DEMO_TOKENS": "400", "DEMO_TOKENS_PER_SECOND": "20", "SSE_LLM_LEASE_INTERVAL": "1"}
    doomed = spawn_server(database_url, **slow)
    survivor = spawn_server(database_url, **slow)
    sweeper = spawn_server(database_url, **slow)  # a third replica: it sweeps both
    try:
        on_doomed = BackgroundStream(doomed.url, "killed mid stream")
        on_survivor = BackgroundStream(survivor.url, "still streaming")
        on_doomed.wait_chunks(3)
        on_survivor.wait_chunks(3)
        # Opens are written in the writer's next gathering (up to 0.25 s later): a process
        # killed before that leaves no row at all. Kill it once its open is on disk.
        with httpx.Client(base_url=sweeper.url, timeout=30) as client:
            for stream in (on_doomed, on_survivor):
                url = f"/conversations/{stream.conversation_id}/deliveries"
                wait_until(lambda u=url: client.get(u).json()["items"], 10, message="no open row")
        doomed.signal(signal.SIGKILL)
        doomed.wait(10)
        with httpx.Client(base_url=sweeper.url, timeout=30) as client:
            lost = deliveries(client, on_doomed.conversation_id, 1)
            assert [(i["via"], i["ended"]) for i in lost] == [("stream", "lost")]
            # Several sweeps later, the live replica's open delivery is still open.
            time.sleep(3)
            live = client.get(f"/conversations/{on_survivor.conversation_id}/deliveries")
            assert [(i["via"], i["ended"]) for i in live.json()["items"]] == [("stream", None)]
            # Nobody was sent the end of the killed one: "delivered=incomplete" finds it.
            status = client.get(f"/history/{on_doomed.conversation_id}").json()["status"]
            assert status == "interrupted"
            assert on_doomed.conversation_id in incomplete_ids(client)
            assert on_survivor.conversation_id not in incomplete_ids(client)
    finally:
        for server in (doomed, survivor, sweeper):
            server.stop()


@pytest.mark.slow
def test_a_clean_shutdown_ends_its_deliveries_with_the_end_it_sent(
    database_url: str, client: httpx.Client
) -> None:
    server = spawn_server(
        database_url, DEMO_TOKENS="400", DEMO_TOKENS_PER_SECOND="20", SSE_LLM_SHUTDOWN_GRACE="1"
    )
    try:
        stream = BackgroundStream(server.url, "interrupted by a shutdown")
        stream.wait_chunks(2)
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.stop()
    events = stream.join()
    assert events[-1].event == "error"  # `interrupted`, told before the process stopped
    (item,) = deliveries(client, stream.conversation_id, 1)
    # Ended by the process itself, in its last batches: not left to recovery as `lost`.
    assert (item["via"], item["ended"]) == ("stream", "error")
    assert item["last_seq"] == sum(1 for e in events if e.event == "message")


def test_a_cut_off_answer_nobody_saw_the_end_of_is_found_as_incomplete(
    slow_client: httpx.Client, db: psycopg.Connection
) -> None:
    tag = word()
    with slow_client.stream("POST", "/stream", json={"prompt": f"{tag} nobody sees"}) as r:
        conversation_id = r.headers["x-conversation-id"]
        read_until(iter_events(r), 3)

    def ended() -> bool:
        status = slow_client.get(f"/history/{conversation_id}").json()["status"]
        return status != "streaming"

    wait_until(ended, 20, message="the answer did not end")
    assert summary(deliveries(slow_client, conversation_id, 1))[0][3] == "client_left"
    assert conversation_id in incomplete_ids(slow_client)
    assert cut_flag(db, conversation_id) is True
    # With the other filters: a search, a status, a review condition (each walk of the
    # history's page finder).
    for extra in ({"q": tag}, {"status": "completed"}, {"reviewed": "false", "q": tag}):
        found = slow_client.get("/history", params={"delivered": "incomplete", **extra})
        assert found.status_code == 200, (extra, found.text)
        assert conversation_id in {item["id"] for item in found.json()["items"]}, extra
    assert "incomplete" in slow_client.get("/?delivered=incomplete").text
    # Strict in the API: an unknown value names the parameter.
    refused = slow_client.get("/history", params={"delivered": "maybe"})
    assert refused.status_code == 422 and "delivered" in refused.json()["error"]["message"]
    # Then someone resumes from the start and is sent the end: no longer incomplete.
    with slow_client.stream("GET", f"/conversations/{conversation_id}/stream") as replay:
        assert list(iter_events(replay))[-1].event == "done"
    deliveries(slow_client, conversation_id, 2)
    assert conversation_id not in incomplete_ids(slow_client)
    assert cut_flag(db, conversation_id) is False  # cleared by the end sent, not just masked


def cut_flag(db: psycopg.Connection, conversation_id: str) -> bool:
    row = db.execute(
        "SELECT delivery_cut FROM conversations WHERE id = %s", (conversation_id,)
    ).fetchone()
    assert row is not None
    return bool(row[0])


def test_deliveries_are_written_in_the_writers_batches_never_per_chunk(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, bool, str]] = []
    real = delivery_store.write_deliveries
    lock = threading.Lock()

    async def counted(conn: psycopg.AsyncConnection, rows: Any) -> list[Any]:
        in_transaction = conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        name = conn.info.parameter_status("application_name") or ""
        with lock:
            calls.append((len(rows), in_transaction, name))
        return await real(conn, rows)

    monkeypatch.setattr(delivery_store, "write_deliveries", counted)
    # 100 chunks in half a second each: dozens of wake-ups and batches per stream.
    server = start_server(base_settings.with_changes(demo_tokens=100, demo_tokens_per_second=200))
    streams = 5
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            threads = [
                threading.Thread(target=stream_and_id, args=(client, f"batch {n}"))
                for n in range(streams)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wait_until(lambda: sum(rows for rows, _, _ in calls) >= 2 * streams or None, 10)
    finally:
        server.stop()
    # 500 chunks; an open and an end per connection, at most: never a statement per chunk.
    print(f"delivery statements for {streams} streams of 100 chunks: {len(calls)}")
    assert len(calls) <= 2 * streams
    assert all(in_transaction for _, in_transaction, _ in calls)  # inside a batch's transaction
    assert {name for _, _, name in calls} == {"sse-llm writer"}


def test_openapi_describes_deliveries_and_the_delivered_filter(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    route = document["paths"]["/conversations/{conversation_id}/deliveries"]["get"]
    assert set(route["responses"]) >= {"200", "404"}
    schema = document["components"]["schemas"]["Delivery"]
    assert set(schema["required"]) == {
        "started_at",
        "ended_at",
        "via",
        "from_seq",
        "last_seq",
        "ended",
    }
    history = document["paths"]["/history"]["get"]["parameters"]
    assert "delivered" in {parameter["name"] for parameter in history}


def test_a_connection_that_ends_before_its_open_is_written_is_one_row_written_once(
    database_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[list[tuple[str | None, int | None]]] = []
    real = delivery_store.write_deliveries

    async def counted(conn: psycopg.AsyncConnection, rows: Any) -> list[Any]:
        written.append([(row.ended, row.last_seq) for row in rows])
        return await real(conn, rows)

    monkeypatch.setattr(delivery_store, "write_deliveries", counted)

    async def scenario() -> UUID:
        writer = Writer(database_url, storage_timeout=5, metrics=Metrics())
        owner_id = uuid4()
        writer.start(owner_id)
        try:
            row = await writer.create(NewConversation(uuid4(), "quick", "demo", "demo", owner_id))
            delivery = Delivery(writer, {}, row.id, DeliveryVia.V1, owner_id)
            # Opened and ended with no await between: the writer has not taken its batch.
            delivery.open()
            delivery.end_with(DeliveryEnd.DONE, 3)
            delivery.close()
            await writer.write(Chunk(row.id, 1, "x"), Owner())  # a batch after it
            return row.id
        finally:
            await writer.close()

    conversation_id = run(scenario())
    assert written == [[("done", 3)]]
    stored = db.execute(
        "SELECT via, from_seq, last_seq, ended, ended_at IS NOT NULL FROM deliveries"
        " WHERE conversation_id = %s",
        (conversation_id,),
    ).fetchall()
    assert stored == [("v1", 1, 3, "done", True)]
