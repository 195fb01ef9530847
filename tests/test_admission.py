"""Overload admission: new streams wait while chunks run late, and start once they don't."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry, Gauge

from sse_llm.admission import Admission
from sse_llm.config import Settings
from sse_llm.errors import ApiError
from tests.conftest import start_server
from tests.sse_client import iter_events
from tests.support import wait_until


class Lag:
    """The writer's lag, as the test sets it."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


class Waiting:
    """The gauge the gate keeps, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauge = Gauge("waiting", "streams waiting", registry=self.registry)

    def __call__(self) -> float | None:
        return self.registry.get_sample_value("waiting")


def gate(lag: Lag, max_lag: float = 0.1, max_wait: float = 5.0) -> tuple[Admission, Waiting]:
    waiting = Waiting()
    return Admission(lag, max_lag, max_wait, waiting.gauge), waiting


async def ten_running_then_late(lag: Lag) -> tuple[Admission, Waiting]:
    """A gate with ten streams admitted on time, whose chunks then run late."""
    admission, waiting = gate(lag)
    for _ in range(10):
        await admission.enter()
    lag.seconds = 0.5
    return admission, waiting


async def test_on_time_every_stream_starts_at_once() -> None:
    admission, waiting = gate(Lag())
    assert [await admission.enter() for _ in range(50)] == [False] * 50
    assert admission.running == 50 and admission.limit == math.inf and waiting() == 0


async def test_late_chunks_hold_new_streams_which_start_in_order_as_others_end() -> None:
    lag = Lag()
    admission, waiting = await ten_running_then_late(lag)
    queued = [asyncio.create_task(admission.enter()) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert admission.limit == 9  # cut to nine tenths of the ten running
    assert not any(task.done() for task in queued) and waiting() == 3
    admission.leave()
    admission.leave()  # eight running, under the limit of nine: the first waiter starts
    await asyncio.sleep(0.01)
    assert [task.done() for task in queued] == [True, False, False]
    lag.seconds = 0.0  # on time again: the limit rises and the others start too
    await asyncio.wait_for(asyncio.gather(*queued), 2)
    assert [task.result() for task in queued] == [True, True, True]
    assert waiting() == 0


async def test_a_stream_that_waits_too_long_gets_503_overloaded() -> None:
    lag = Lag()
    admission, waiting = gate(lag, max_wait=0.2)
    await admission.enter()
    lag.seconds = 1.0
    with pytest.raises(ApiError) as refused:
        await admission.enter()
    assert (refused.value.status, refused.value.code) == (503, "overloaded")
    assert refused.value.headers == {"Retry-After": "1"}
    assert admission.running == 1 and waiting() == 0


async def one_running_one_waiting(max_wait: float) -> tuple[Admission, asyncio.Task[bool]]:
    """A gate holding one stream, limited to one, and a second stream waiting its turn."""
    admission, _ = gate(Lag(), max_wait=max_wait)
    admission.limit = 1  # as a cut would set it, without a ticker moving it meanwhile
    await admission.enter()
    waiter = asyncio.create_task(admission.enter())
    await asyncio.sleep(0)  # it queues, and its queue timeout starts
    return admission, waiter


def block_the_loop(seconds: float) -> None:
    """Keep the event loop busy, so every timer due meanwhile fires in its next iteration."""
    time.sleep(seconds)  # in a plain function: the point is that nothing else runs


async def test_a_waiter_admitted_as_its_queue_timeout_fires_is_counted_once() -> None:
    """The stream ahead ends just before the waiter's queue timeout, both handled in one
    loop iteration (3.12's `wait_for` then raised TimeoutError with the slot counted)."""
    admission, waiter = await one_running_one_waiting(max_wait=0.2)
    asyncio.get_running_loop().call_later(0.1, admission.leave)
    block_the_loop(0.3)
    assert await waiter is True  # admitted before its deadline: not refused
    assert admission.running == 1
    admission.leave()
    assert admission.running == 0 and await admission.enter() is False  # no slot leaked


async def test_a_waiter_cancelled_as_it_is_admitted_gives_its_slot_back() -> None:
    """The request goes away (its task is cancelled) in the loop iteration that admits it."""
    admission, waiter = await one_running_one_waiting(max_wait=5)
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, admission.leave)
    loop.call_later(0.15, waiter.cancel)
    block_the_loop(0.3)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.running == 0


async def test_a_waiter_cancelled_while_waiting_is_never_counted() -> None:
    admission, waiter = await one_running_one_waiting(max_wait=5)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    admission.leave()  # the stream ahead ends: nobody is waiting any more
    assert admission.running == 0
    assert await admission.enter() is False


async def test_the_limit_is_dropped_once_it_holds_nobody_back() -> None:
    lag = Lag()
    admission, _ = await ten_running_then_late(lag)
    task = asyncio.create_task(admission.enter())
    await asyncio.sleep(0.05)
    assert admission.limit < math.inf
    lag.seconds = 0.0
    await asyncio.wait_for(task, 2)
    for _ in range(11):
        admission.leave()
    await asyncio.sleep(0.5)  # 25 ticks on time: the limit grows past twice the running
    assert admission.limit == math.inf


async def test_a_lag_limit_of_zero_never_holds_anyone() -> None:
    lag = Lag()
    admission, _ = gate(lag, max_lag=0)
    lag.seconds = 10.0
    assert await admission.enter() is False


@pytest.mark.slow
def test_a_stalled_database_holds_new_streams_and_refuses_them_after_the_queue_timeout(
    base_settings: Settings, database_url: str
) -> None:
    """The writer cannot commit (a lock held on the chunks table): the running stream's
    chunks age, so a new stream waits, is counted in /metrics, then gets 503 `overloaded`
    and creates nothing. Once the database moves again, everything completes."""
    server = start_server(
        base_settings.with_changes(
            demo_tokens=60, demo_tokens_per_second=20, overload_lag=0.2, queue_timeout=1.5
        )
    )
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            before = client.get("/history", params={"limit": 1}).json()["items"]
            events = []
            with client.stream("POST", "/stream", json={"prompt": "first in line"}) as response:
                lines = iter_events(response)
                events.append(next(lines))  # start
                events.append(next(lines))  # chunk 1
                with psycopg.connect(database_url) as blocker:
                    blocker.execute("LOCK TABLE chunks IN SHARE MODE")
                    time.sleep(0.5)  # chunks 2.. wait for the writer, which waits for us
                    refused: list[httpx.Response] = []
                    late = threading.Thread(target=_post, args=(server.url, "second", refused))
                    late.start()
                    assert _waiting_streams(client) == 1
                    late.join(10)
                    blocker.rollback()
                events.extend(lines)
            assert refused[0].status_code == 503
            assert refused[0].json()["error"]["code"] == "overloaded"
            assert events[-1].event == "done" and events[-1].json["chunks"] == 60
            after = client.get("/history", params={"limit": 2}).json()["items"]
            assert after[0]["prompt"] == "first in line"  # the refused one created nothing
            assert after[1:] == before
            # On time again: a new stream starts at once.
            with client.stream("POST", "/stream", json={"prompt": "third"}) as response:
                assert response.status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_a_client_that_leaves_while_waiting_starts_nothing(
    base_settings: Settings, database_url: str, db: psycopg.Connection
) -> None:
    server = start_server(
        base_settings.with_changes(
            demo_tokens=60, demo_tokens_per_second=20, overload_lag=0.2, queue_timeout=10
        )
    )
    impatient = f"impatient {time.time_ns()}"
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/stream", json={"prompt": "keeps going"}) as response:
                lines = iter_events(response)
                next(lines), next(lines)  # start, chunk 1
                with psycopg.connect(database_url) as blocker:
                    blocker.execute("LOCK TABLE chunks IN SHARE MODE")
                    time.sleep(0.5)  # the writer is stalled: new streams wait
                    with pytest.raises(httpx.ReadTimeout):
                        httpx.post(
                            f"{server.url}/stream", json={"prompt": impatient}, timeout=1
                        )  # gives up and closes its connection while waiting
                    blocker.rollback()
                events = list(lines)
            assert events[-1].event == "done"
            time.sleep(0.5)  # the gate lets the waiting request through as the lag falls
        count = db.execute("SELECT count(*) FROM conversations WHERE prompt = %s", (impatient,))
        assert count.fetchone() == (0,)
    finally:
        server.stop()


def _post(url: str, prompt: str, answers: list[httpx.Response]) -> None:
    answers.append(httpx.post(f"{url}/stream", json={"prompt": prompt}, timeout=30))


def _waiting_streams(client: httpx.Client) -> float:
    """sse_llm_waiting_streams from /metrics, once it is above 0 (fails after 1 s)."""

    def waiting() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("sse_llm_waiting_streams "):
                return float(line.split()[1])
        return 0.0

    return wait_until(waiting, timeout=1, message="no stream waited")
