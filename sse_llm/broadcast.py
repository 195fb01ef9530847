"""News between processes through PostgreSQL LISTEN/NOTIFY: new chunks, ends, cancels.

The writer notifies `sse_llm_chunks` with the ids of the conversations each committed
batch touched (and once more when a conversation ends). A process following a
conversation that another process generates reads what it has not seen yet from the
`chunks` table whenever it hears of it, and also every `poll_interval` seconds: a missed
notification, or a listening connection that dropped and came back, delays a follower by
at most that long and never makes it skip or repeat a chunk.

The listening connection (`application_name` `sse-llm listen`) has TCP keepalives, and
every `check_interval` seconds of quiet it re-issues a LISTEN (a no-op) under a timeout:
a half-open socket is found and replaced within seconds instead of never. A cancel
notified while it was away is not lost either: cancels are recorded in their rows, and
`on_connect` (the lease's `apply_cancels`) runs each time it has connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from sse_llm import store
from sse_llm.contract import CANCEL_CHANNEL, CHUNKS_CHANNEL, ErrorCode, Status
from sse_llm.database import connection_options
from sse_llm.store import Chunk, Conversation, Outcome

log = logging.getLogger(__name__)


class Broadcast:
    """One LISTEN connection per process, waking the followers of remote conversations."""

    def __init__(
        self,
        database_url: str,
        on_cancel: Callable[[UUID], None],
        poll_interval: float = 2.0,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        check_interval: float = 5.0,
    ) -> None:
        self._database_url = database_url
        self._on_cancel = on_cancel
        self._on_connect = on_connect
        self.poll_interval = poll_interval
        self._check_interval = check_interval
        self._check_timeout = max(2 * check_interval, 5.0)
        # Keyed by the id as text, as notifications carry it: this process hears its own
        # writer's notification for every batch, and parsing ids it does not follow
        # would cost a UUID per conversation per batch.
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        """Start listening in the background (reconnecting as needed)."""
        self._task = asyncio.create_task(self._listen_forever(), name="broadcast-listener")

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def watch(self, conversation_id: UUID) -> asyncio.Event:
        """An event set whenever there is news of this conversation."""
        event = asyncio.Event()
        self._watchers.setdefault(str(conversation_id), set()).add(event)
        return event

    def unwatch(self, conversation_id: UUID, event: asyncio.Event) -> None:
        """Stop waking this event."""
        key = str(conversation_id)
        watchers = self._watchers.get(key)
        if watchers is not None:
            watchers.discard(event)
            if not watchers:
                del self._watchers[key]

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("notification listener lost its connection: %r", exc)
            if self.connected.is_set():
                delay = 0.1  # it was a working connection: come back quickly
            self.connected.clear()
            self._wake_everyone()  # they may have missed news while disconnected
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _listen(self) -> None:
        options = connection_options(self._check_interval, "sse-llm listen")
        async with asyncio.timeout(self._check_timeout):
            conn = await psycopg.AsyncConnection.connect(
                self._database_url, autocommit=True, **options
            )
        async with conn:
            async with asyncio.timeout(self._check_timeout):
                await conn.execute(f"LISTEN {CANCEL_CHANNEL}")
                await conn.execute(f"LISTEN {CHUNKS_CHANNEL}")
            self.connected.set()
            self._wake_everyone()
            await self._connected()
            while True:
                async for notify in conn.notifies(timeout=self._check_interval):
                    if notify.channel == CANCEL_CHANNEL:
                        with contextlib.suppress(ValueError):
                            self._on_cancel(UUID(notify.payload))
                    else:
                        self._wake(notify.payload)
                # Quiet for a while: is anyone there? (Notifications that arrive
                # meanwhile wait in psycopg's backlog for the next loop.)
                async with asyncio.timeout(self._check_timeout):
                    await conn.execute(f"LISTEN {CHUNKS_CHANNEL}")

    async def _connected(self) -> None:
        """Apply the cancels that may have been notified while no connection listened."""
        if self._on_connect is None:
            return
        try:
            async with asyncio.timeout(self._check_timeout):
                await self._on_connect()
        except Exception as exc:  # the lease's next check looks again
            log.warning("could not look for recorded cancels: %r", exc)

    def _wake(self, payload: str) -> None:
        if not self._watchers:
            return  # the usual case: nobody here follows another process's stream
        for raw_id in payload.split(","):
            for event in self._watchers.get(raw_id, ()):
                event.set()

    def _wake_everyone(self) -> None:
        for watchers in self._watchers.values():
            for event in watchers:
                event.set()


async def follow_remote(
    pool: AsyncConnectionPool,
    broadcast: Broadcast,
    conversation_id: UUID,
    after_seq: int,
    ping_interval: float,
) -> AsyncIterator[tuple[list[Chunk], Outcome | None]]:
    """Updates of a conversation generated by another process, read from the database.

    Like a Subscriber's: an empty update after `ping_interval` seconds of nothing.
    """
    news = broadcast.watch(conversation_id)
    loop = asyncio.get_running_loop()
    try:
        last = after_seq
        last_update = loop.time()
        while True:
            news.clear()
            # The status first: if it has ended, every chunk was committed before that,
            # so the read below sees them all.
            conversation = await store.get_status(pool, conversation_id)
            chunks = await store.read_chunks(pool, conversation_id, last)
            if chunks:
                last = chunks[-1].seq
            outcome = None
            if conversation is None or conversation.status != Status.STREAMING:
                outcome = outcome_of(conversation, last)
            now = loop.time()
            if chunks or outcome or 0 < ping_interval <= now - last_update:
                last_update = now
                yield chunks, outcome
            if outcome is not None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(broadcast.poll_interval):
                    await news.wait()
    finally:
        broadcast.unwatch(conversation_id, news)


def outcome_of(conversation: Conversation | Outcome | None, chunks: int) -> Outcome:
    """How a conversation that has ended ended, as its row records it."""
    if conversation is None:
        message = "The conversation was deleted."
        return Outcome(Status.FAILED, chunks, ErrorCode.NOT_FOUND, message)
    return Outcome(
        conversation.status,
        conversation.chunks,
        conversation.error_code,
        conversation.error_message,
    )
