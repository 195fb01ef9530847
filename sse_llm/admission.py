"""Overload admission: while chunks run late, new streams wait their turn.

Past its capacity a server can slow every running stream a little more with each new
one, until nobody's tokens arrive on time; or it can hold new streams back until the
running ones are served on time again. Model servers (vLLM, TGI) queue requests for the
same reason. Here "late" means the writer's oldest chunk not yet committed is older
than `max_lag`: that catches a slow database and a saturated event loop alike, since
either keeps a committed chunk from reaching its client.

The gate is a concurrency limit found the way TCP finds its window: cut by a tenth
when chunks run late, raised a little while they are on time. Waiting streams start as
running ones end, one at a time, so their start-up work never arrives in a burst.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

from prometheus_client import Gauge

from sse_llm.contract import ErrorCode
from sse_llm.errors import ApiError

TICK_SECONDS = 0.02
# After a cut, how long before the next: a cut shows in the lag only once the streams
# it holds back would have sent their chunks.
CUT_EVERY_SECONDS = 0.5
CUT_TO = 0.9  # of the streams running
RAISE_BY = 0.01  # of the limit, per tick on time (about +60%/s)


class Admission:
    """A first-come, first-served gate in front of new streams."""

    def __init__(
        self, lag: Callable[[], float], max_lag: float, max_wait: float, waiting: Gauge
    ) -> None:
        self._lag = lag
        self._max_lag = max_lag  # 0: never hold anyone
        self._max_wait = max_wait
        self._waiting_gauge = waiting
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.limit = math.inf
        self.running = 0  # streams admitted and not yet ended
        self._last_cut = -math.inf
        self._ticker: asyncio.Task[None] | None = None

    async def enter(self) -> bool:
        """Return when a new stream may start, True if it had to wait; 503 `overloaded`
        after `max_wait` seconds. Every entry must be matched by one `leave()`."""
        if self._max_lag > 0 and self._ticker is None and self._lag() >= self._max_lag:
            self._cut()
        if not self._waiting and self.running < self.limit:
            self.running += 1
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append(future)
        self._waiting_gauge.inc()
        # The future alone says how the wait ended: `_admit` sets its result (and counts
        # us in), the timer its TimeoutError, whichever comes first. A timeout that
        # cancels the wait instead (`wait_for` on 3.12+) can fire in the loop iteration
        # that admitted us: both would happen, and the slot counted for us would leak.
        expiry = loop.call_later(self._max_wait, _expire, future)
        try:
            await future
        except TimeoutError:
            message = "The service is overloaded: the stream could not start in time."
            raise ApiError(503, ErrorCode.OVERLOADED, message, {"Retry-After": "1"}) from None
        except BaseException:
            # Cancelled (the request went away): if admitted in the same loop iteration,
            # nobody else will give the slot back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.leave()
            raise
        finally:
            expiry.cancel()
            self._waiting_gauge.dec()
        return True

    def leave(self) -> None:
        """A stream admitted by `enter()` has ended (or never started): let the next in."""
        self.running -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self.running < self.limit:
            future = self._waiting.popleft()
            if not future.done():  # else its request gave up waiting
                future.set_result(None)
                self.running += 1

    def _cut(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_cut < CUT_EVERY_SECONDS:
            return
        self._last_cut = loop.time()
        self.limit = max(1.0, min(self.limit, self.running) * CUT_TO)
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tune(), name="admission")

    async def _tune(self) -> None:
        """While a limit is set: cut it when chunks run late, raise it while they are on
        time, and drop it once it no longer holds anyone back."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                due = loop.time() + TICK_SECONDS
                await asyncio.sleep(TICK_SECONDS)
                # The writer's lag, and this task's own lateness: the event loop's.
                lag = max(self._lag(), loop.time() - due)
                if lag >= self._max_lag:
                    self._cut()
                elif lag < self._max_lag / 2:
                    self.limit += max(1.0, self.limit * RAISE_BY)
                    self._admit()
                    if not self._waiting and self.limit > 2 * self.running:
                        self.limit = math.inf
                        return
        finally:
            self._ticker = None


def _expire(future: asyncio.Future[None]) -> None:
    """The queue timeout: refuse the waiter unless it was admitted already."""
    if not future.done():
        future.set_exception(TimeoutError())
