"""Streams across real processes: replicas, cross-process cancel, kill -9, SIGTERM drain."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from tests.conftest import RunningServer
from tests.processes import BackgroundStream, ServerProcess, spawn_server, stored
from tests.sse_client import Event, chunk_text, iter_events
from tests.support import wait_until


@pytest.fixture
def process_a(database_url: str) -> Iterator[ServerProcess]:
    """A separate `sse-llm serve` process on the same database, 40 slow tokens."""
    server = spawn_server(database_url, DEMO_TOKENS="40", DEMO_TOKENS_PER_SECOND="20")
    yield server
    server.stop()


def wait_status(database_url: str, conversation_id: str, timeout: float = 20) -> str:
    """The conversation's status once it is no longer `streaming`."""

    def ended() -> str | None:
        status = stored(database_url, conversation_id)[0]
        return status if status != "streaming" else None

    return wait_until(ended, timeout, 0.1, "the conversation is still streaming")


@pytest.mark.slow
def test_client_on_another_process_follows_the_generation_live(
    process_a: ServerProcess, demo_server: RunningServer, database_url: str
) -> None:
    stream = BackgroundStream(process_a.url, "followed from elsewhere")
    stream.wait_chunks(2)
    status_at_first_live_chunk = None
    followed: list[Event] = []
    url = f"{demo_server.url}/conversations/{stream.conversation_id}/stream"
    with httpx.stream("GET", url, headers={"Last-Event-ID": "2"}, timeout=30) as response:
        for event in iter_events(response):
            followed.append(event)
            if status_at_first_live_chunk is None:
                status_at_first_live_chunk = stored(database_url, stream.conversation_id)[0]
    original = stream.join()
    assert status_at_first_live_chunk == "streaming"  # it was live, not a replay
    assert followed[-1].event == "done"
    assert [e.id for e in followed if e.event == "message"] == [str(n) for n in range(3, 41)]
    assert chunk_text(followed) == chunk_text(original[3:])
    assert stored(database_url, stream.conversation_id)[1] == chunk_text(original)


def test_cancel_through_another_process(
    process_a: ServerProcess, demo_server: RunningServer, database_url: str
) -> None:
    stream = BackgroundStream(process_a.url, "cancel from elsewhere")
    stream.wait_chunks(3)
    reply = httpx.post(f"{demo_server.url}/conversations/{stream.conversation_id}/cancel")
    assert reply.status_code == 202
    events = stream.join()
    assert events[-1].event == "error"
    assert events[-1].json["error"]["code"] == "cancelled"
    status, response, chunks = stored(database_url, stream.conversation_id)
    assert status == "cancelled"
    assert response == chunk_text(events)
    assert 3 <= chunks < 40


@pytest.mark.slow
def test_kill_9_mid_stream_then_restart_keeps_every_chunk_sent(database_url: str) -> None:
    server = spawn_server(database_url, DEMO_TOKENS="200", DEMO_TOKENS_PER_SECOND="20")
    try:
        stream = BackgroundStream(server.url, "crash while streaming")
        stream.wait_chunks(5)
        server.signal(signal.SIGKILL)
        server.wait(10)
        received = chunk_text(stream.join())
    finally:
        server.stop()
    assert stored(database_url, stream.conversation_id)[0] == "streaming"
    restarted = spawn_server(database_url)
    try:
        status = wait_status(database_url, stream.conversation_id, timeout=15)
    finally:
        restarted.stop()
    assert status == "interrupted"
    _, response, chunks = stored(database_url, stream.conversation_id)
    assert response.startswith(received)  # every chunk its client received is there
    assert chunks >= 5


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_lets_short_streams_finish(database_url: str, signum: int) -> None:
    server = spawn_server(
        database_url, DEMO_TOKENS="30", DEMO_TOKENS_PER_SECOND="20", SSE_LLM_SHUTDOWN_GRACE="10"
    )
    try:
        stream = BackgroundStream(server.url, "finish before you go")
        stream.wait_chunks(2)
        server.signal(signum)
        events = stream.join()
        assert server.wait(30) == 0
    finally:
        server.stop()
    assert events[-1].event == "done"
    assert [e.id for e in events if e.event == "message"] == [str(n) for n in range(1, 31)]
    assert stored(database_url, stream.conversation_id)[0] == "completed"


@pytest.mark.slow
def test_sigterm_interrupts_streams_past_the_grace_period(database_url: str) -> None:
    server = spawn_server(
        database_url, DEMO_TOKENS="400", DEMO_TOKENS_PER_SECOND="20", SSE_LLM_SHUTDOWN_GRACE="1"
    )
    try:
        stream = BackgroundStream(server.url, "too long to wait for")
        stream.wait_chunks(2)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        events = stream.join()
        assert server.wait(30) == 0
        took = time.monotonic() - signalled
    finally:
        server.stop()
    assert took < 8
    assert events[-1].event == "error"
    assert events[-1].json["status"] == "interrupted"
    status, response, chunks = stored(database_url, stream.conversation_id)
    assert status == "interrupted"
    assert response == chunk_text(events)
    assert chunks == events[-1].json["chunks"]


@pytest.mark.slow
def test_two_workers_serve_streams(database_url: str) -> None:
    server = spawn_server(
        database_url, "--workers", "2", DEMO_TOKENS="10", DEMO_TOKENS_PER_SECOND="100"
    )
    try:
        for n in range(6):
            with httpx.stream(
                "POST", f"{server.url}/stream", json={"prompt": f"worker {n}"}
            ) as response:
                events = list(iter_events(response))
            assert events[-1].event == "done"
            conversation_id = response.headers["x-conversation-id"]
            replay = httpx.get(f"{server.url}/conversations/{conversation_id}/stream")
            assert replay.status_code == 200
            assert chunk_text(list(iter_events(replay))) == chunk_text(events)
        # Whichever worker answers a scrape reports the sum over both.
        for _ in range(4):
            metrics = httpx.get(f"{server.url}/metrics").text
            assert "\nsse_llm_chunks_total 60.0\n" in metrics
    finally:
        server.stop()
    assert server.log().count("Started server process") == 2


@pytest.mark.slow
def test_a_starting_process_leaves_live_streams_alone(database_url: str) -> None:
    owner = spawn_server(database_url, DEMO_TOKENS="100", DEMO_TOKENS_PER_SECOND="20")
    try:
        stream = BackgroundStream(owner.url, "do not touch")
        stream.wait_chunks(2)
        newcomer = spawn_server(database_url)  # runs its startup recovery now
        try:
            assert stored(database_url, stream.conversation_id)[0] == "streaming"
            events = stream.join()
        finally:
            newcomer.stop()
    finally:
        owner.stop()
    assert events[-1].event == "done"
    assert stored(database_url, stream.conversation_id)[0] == "completed"


@pytest.mark.slow
def test_follower_survives_its_listening_connection_dropping(
    process_a: ServerProcess, demo_server: RunningServer, database_url: str
) -> None:
    stream = BackgroundStream(process_a.url, "listener drops")
    stream.wait_chunks(1)
    followed: list[Event] = []
    url = f"{demo_server.url}/conversations/{stream.conversation_id}/stream"
    with httpx.stream("GET", url, timeout=30) as response:
        for event in iter_events(response):
            followed.append(event)
            if event.id == "5":
                # Cut every LISTEN connection: notifications are lost until they reconnect.
                with psycopg.connect(database_url, autocommit=True) as conn:
                    cut = conn.execute(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                        " FROM pg_stat_activity"
                        " WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
                    ).fetchone()
                assert cut is not None and cut[0] >= 2  # process A's and this one's
    original = stream.join()
    assert followed[-1].event == "done"
    assert [e.id for e in followed if e.event == "message"] == [str(n) for n in range(1, 41)]
    assert chunk_text(followed) == chunk_text(original)


def cut_listeners(conn: psycopg.Connection, spare: int) -> int:
    """Terminate every LISTEN connection of the database but `spare`; how many there were."""
    cut = conn.execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
        " FROM pg_stat_activity"
        " WHERE query LIKE 'LISTEN%%' AND datname = current_database() AND pid <> %s",
        (spare,),
    ).fetchone()
    assert cut is not None
    return int(cut[0])


@pytest.mark.slow
def test_a_cancel_sent_while_the_owners_listener_reconnects_is_not_lost(
    demo_server: RunningServer, database_url: str
) -> None:
    owner = spawn_server(database_url, DEMO_TOKENS="400", DEMO_TOKENS_PER_SECOND="20")
    try:
        stream = BackgroundStream(owner.url, "cancel me while nobody listens")
        stream.wait_chunks(3)
        cancel_url = f"{demo_server.url}/conversations/{stream.conversation_id}/cancel"
        reply = None
        cut = 0
        with (
            psycopg.connect(database_url, autocommit=True) as conn,
            psycopg.connect(database_url, autocommit=True) as other_replica,
        ):
            # One listener stays, as another replica's would (were none left, PostgreSQL
            # would hand the next one to connect the notifications still queued).
            other_replica.execute("LISTEN sse_llm_cancel")
            # For 3 s, every other LISTEN connection (the owner's among them) is cut as
            # soon as it is back, so they wait longer and longer to reconnect (today up
            # to 2 s); the cancel goes out near the end: the owner does not hear it.
            started = time.monotonic()
            while time.monotonic() - started < 3:
                cut += cut_listeners(conn, spare=other_replica.info.backend_pid)
                if reply is None and time.monotonic() - started > 2.5:
                    reply = httpx.post(cancel_url)
                    cancelled_at = time.monotonic()
                time.sleep(0.005)
            heard = [n.payload for n in other_replica.notifies(timeout=1, stop_after=1)]
        assert heard == [stream.conversation_id]  # it was sent
        assert cut >= 2
        assert reply is not None and reply.status_code == 202
        events = stream.join(timeout=30)
        took = time.monotonic() - cancelled_at
    finally:
        owner.stop()
    assert events[-1].event == "error", events[-1]
    assert events[-1].json["error"]["code"] == "cancelled"
    assert took < 5 + 1  # within the lease interval
    status, response, chunks = stored(database_url, stream.conversation_id)
    assert status == "cancelled"
    assert response == chunk_text(events)
    assert 3 <= chunks < 400
