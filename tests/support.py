"""Waiting and port picking shared by the tests and the benchmarks.

One polling loop and one free-port picker instead of a copy in every file that needs
them; `benchmarks/` imports this module too.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition not met in time",
    error: type[Exception] = AssertionError,
) -> T:
    """Call `predicate` every `interval` s until it returns something truthy; return that.

    It is always called at least once, and once more after the deadline, so a slow
    machine that wakes late still gets its answer; past that, `error(message)` (a test's
    failure by default; the benchmarks raise RuntimeError).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(message)
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109  # a deadline that fails the test, not a cancel
    interval: float = 0.05,
    message: str = "condition not met in time",
) -> T:
    """`wait_until` for the event loop: sleeps with asyncio; `predicate` may be async."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(interval)


def run(
    scenario: Coroutine[Any, Any, T] | Callable[[], Coroutine[Any, Any, T]], timeout: float = 60
) -> T:
    """Run an async scenario (a coroutine, or a function making one) on an event loop of its
    own, in a thread of its own: it must not meet another test's loop, nor Playwright's."""
    coroutine = scenario() if callable(scenario) else scenario
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, asyncio.wait_for(coroutine, timeout)).result()
