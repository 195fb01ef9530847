"""One generation's life: provider → writer → subscribers; cancel, timeouts, shutdown.

A generation runs as its own task, owned by `Generations`, not inside an HTTP response:
a client that disconnects only unsubscribes, and the answer is still completed and saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from sse_llm import store
from sse_llm.batch_writes import rejected_end, unavailable_end
from sse_llm.config import Settings
from sse_llm.contract import INTERRUPTED_MESSAGE, ErrorCode, Status, StopReason
from sse_llm.metrics import Metrics
from sse_llm.providers import Provider, ProviderError
from sse_llm.providers.base import ModelRequest, Usage, estimate_usage
from sse_llm.store import Chunk, Conversation, Ending, Outcome
from sse_llm.writer import Writer

log = logging.getLogger(__name__)


class Subscriber:
    """One listener of a generation: it hears chunks once persisted, then the outcome.

    An empty update (no chunk, no outcome) means the stream has been idle for the ping
    interval: its client should get a keep-alive comment (see Generations._watch).
    """

    # Slots, and a bare future instead of an asyncio.Event (which holds a deque): a few
    # hundred bytes per open stream.
    __slots__ = ("_chunks", "_outcome", "_waiter", "_woken", "last_update")

    def __init__(self) -> None:
        self._chunks: list[Chunk] = []
        self._outcome: Outcome | None = None
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self.last_update = asyncio.get_running_loop().time()

    def deliver(self, chunk: Chunk) -> None:
        """Called by the generation for each persisted chunk, in order."""
        self._chunks.append(chunk)
        self._wake()

    def finish(self, outcome: Outcome) -> None:
        """Called once, after the last chunk."""
        self._outcome = outcome
        self._wake()

    def poke(self) -> None:
        """Wake the listener with nothing new: time for a keep-alive."""
        self._wake()

    def _wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def updates(self) -> AsyncIterator[tuple[list[Chunk], Outcome | None]]:
        """Yield what arrived since the last wake-up, in batches, until the outcome."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._woken:
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            self._woken = False
            self.last_update = loop.time()
            chunks, self._chunks = self._chunks, []
            yield chunks, self._outcome
            if self._outcome is not None:
                return


class Generation:
    """Streams one answer from the provider through the writer to its subscribers."""

    __slots__ = (
        "_characters",
        "_fenced",
        "_first_chunk_after",
        "_generating",
        "_last_write",
        "_metrics",
        "_pool",
        "_provider",
        "_settings",
        "_stop_reason",
        "_storage_code",
        "_subscribers",
        "_usage",
        "_writer",
        "conversation",
        "deadline",
        "id",
        "outcome",
        "persisted",
        "request_id",
        "storage_failed",
        "task",
    )  # fmt: skip

    def __init__(
        self,
        conversation: Conversation,
        provider: Provider,
        writer: Writer,
        pool: AsyncConnectionPool,
        settings: Settings,
        metrics: Metrics,
        request_id: str | None = None,
    ) -> None:
        self.conversation = conversation
        self.request_id = request_id
        self._metrics = metrics
        self.id: UUID = conversation.id
        self.persisted = 0  # highest seq persisted and published
        self.storage_failed = False  # no more of its chunks may be stored
        self._storage_code: StopReason | None = None  # why, when the writer failed them
        self._fenced = False  # another process settled the conversation
        self.outcome: Outcome | None = None
        self._provider = provider
        self._writer = writer
        self._pool = pool
        self._settings = settings
        self._subscribers: set[Subscriber] = set()
        self._stop_reason: StopReason | None = None  # why stop() was called, once it was
        self._generating = False  # reading the provider: the only phase stop() may cancel
        self._last_write: asyncio.Future[bool] | None = None
        self._first_chunk_after: float | None = None
        self._usage: Usage | None = None  # the model's token counts, if it sent them
        self._characters = 0  # of the answer so far, for an estimate of its tokens
        self.deadline = float("inf")  # loop time by which the next piece must arrive
        self.task: asyncio.Task[None] | None = None

    def subscribe(self) -> Subscriber:
        """Listen from the next persisted chunk on (callers replay older ones from the database)."""
        subscriber = Subscriber()
        if self.outcome is not None:
            subscriber.finish(self.outcome)
        else:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop telling this subscriber anything (its client went away)."""
        self._subscribers.discard(subscriber)

    def ping_idle_subscribers(self, idle_since: float) -> None:
        """Poke the subscribers that have had no update since `idle_since` (loop time)."""
        for subscriber in self._subscribers:
            if subscriber.last_update <= idle_since:
                subscriber.poke()

    def publish(self, chunk: Chunk) -> None:
        """Called by the writer once the chunk is committed."""
        self.persisted = chunk.seq
        for subscriber in self._subscribers:
            subscriber.deliver(chunk)

    def fail_storage(self, code: StopReason) -> None:
        """Called by the writer when the database could not take this generation's chunks
        (`storage_unavailable` or `storage_rejected`); the writer records that end."""
        self.storage_failed = True
        self._storage_code = code
        self.stop(code)

    def fence(self) -> None:
        """Called by the writer when the conversation is no longer this process's (another
        settled it): stop, and tell the clients what its row says."""
        self.storage_failed = True
        self._fenced = True
        self.stop(StopReason.FENCED)

    def stop(self, reason: StopReason) -> None:
        """Stop generating: `cancelled` (asked by a user), `interrupted` (shutdown),
        `timeout` (the watchdog), `storage_unavailable`, `storage_rejected` or `fenced`."""
        # Only the provider loop is cancelled: once it is over, the last chunks and the end
        # are being persisted, and interrupting that would lose them.
        if self._stop_reason is not None or self.outcome is not None:
            return
        self._stop_reason = reason
        if self._generating and self.task is not None:
            self.task.cancel()

    @property
    def stop_reason(self) -> StopReason | None:
        """Why stop() was called, once it was."""
        return self._stop_reason

    async def run(self) -> None:
        """Generate, wait for the last chunk to be persisted, record the end, tell everyone."""
        started = time.monotonic()
        self._metrics.active_streams.inc()
        try:
            produced = await self._generate()
        finally:
            self._metrics.active_streams.dec()
        if self._last_write is not None:
            await self._last_write  # every chunk handed to the writer is settled after this
        outcome = await self._record(produced)
        self.outcome = outcome
        for subscriber in self._subscribers:
            subscriber.finish(outcome)
        self._subscribers.clear()
        self._report(outcome, started)

    async def _record(self, produced: Outcome) -> Outcome:
        """Have the end recorded; return the one the row holds, which clients are told."""
        if self._fenced:
            return await self._recorded_outcome()
        if self.storage_failed:  # the writer records this end itself, when it can
            return self._with_persisted_count(
                self._stopped_outcome(self._storage_code or StopReason.STORAGE_UNAVAILABLE)
            )
        usage = self._usage or estimate_usage(self._model_request().messages, self._characters)
        ending = Ending(
            self.id,
            produced.status,
            produced.error_code,
            produced.error_message,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.estimated,
        )
        recorded = await self._writer.finish(ending)
        if recorded is None:  # another process settled the conversation first
            return await self._recorded_outcome()
        return self._with_persisted_count(
            Outcome(
                recorded.status,
                0,
                recorded.error_code,
                recorded.error_message,
                recorded.prompt_tokens,
                recorded.completion_tokens,
                recorded.tokens_estimated,
            )
        )

    async def _recorded_outcome(self) -> Outcome:
        """How the row of a conversation another process settled says it ended."""
        try:
            recorded = await store.get_status(self._pool, self.id)
        except Exception as exc:  # the database went away again
            log.warning("could not read how conversation %s ended: %s", self.id, exc)
            recorded = None
        if recorded is None or recorded.status == Status.STREAMING:
            # Only a process that takes this one for dead settles its conversations, and
            # it marks them interrupted.
            recorded = self._stopped_outcome(StopReason.INTERRUPTED)
        # Its clients got the chunks persisted and published; a settler assembled the
        # same ones (the fence refused any later), so the counts agree.
        return self._with_persisted_count(recorded)

    def _with_persisted_count(self, outcome: Outcome) -> Outcome:
        """`outcome` with the number of chunks persisted and published."""
        return dataclasses.replace(outcome, chunks=self.persisted)

    def _report(self, outcome: Outcome, started: float) -> None:
        """The per-stream log line and metrics (never the prompt or response text)."""
        self._metrics.streams.labels(outcome.status).inc()
        if outcome.error_code:
            self._metrics.stream_errors.labels(outcome.error_code).inc()
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "conversation_id": str(self.id),
            "status": outcome.status,
            "chunks": outcome.chunks,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        if self._first_chunk_after is not None:
            fields["ttfc_ms"] = round(self._first_chunk_after * 1000, 1)
        if outcome.error_code:
            fields["error"] = outcome.error_code
        log.info("stream ended", extra={"fields": fields})

    async def _generate(self) -> Outcome:
        """Read the provider under the SPEC 1 timeouts, handing each piece to the writer.

        The timeouts are enforced by the Generations watchdog, which stops a generation
        whose `deadline` has passed: moving a timer on every chunk cost ~9% of the CPU.
        """
        settings = self._settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        total_deadline = started + settings.total_timeout
        self.deadline = min(started + settings.first_chunk_timeout, total_deadline)
        seq = 0
        if self._stop_reason is not None:  # stopped before it started
            return self._stopped_outcome(self._stop_reason)
        self._generating = True
        try:
            async with aclosing(self._provider.stream(self._model_request())) as pieces:
                async for text in pieces:
                    if isinstance(text, Usage):  # the model's counts, after its last piece
                        self._usage = text
                        continue
                    if not text:
                        continue
                    seq += 1
                    self._characters += len(text)
                    now = loop.time()
                    self.deadline = min(now + settings.chunk_timeout, total_deadline)
                    if seq == 1:
                        self._first_chunk_after = now - started
                        self._metrics.time_to_first_chunk.observe(self._first_chunk_after)
                    self._last_write = self._writer.write(Chunk(self.id, seq, text, now), self)
        except ProviderError as exc:
            return Outcome(Status.FAILED, seq, exc.code, exc.message)
        except Exception:
            log.exception("generation %s failed unexpectedly", self.id)
            message = "The generation failed unexpectedly; see the service log."
            return Outcome(Status.FAILED, seq, ErrorCode.INTERNAL_ERROR, message)
        except asyncio.CancelledError:
            reason = self.stop_reason  # set by stop() while the provider was read
            if reason is None:
                raise  # not ours: the event loop is going away
            task = asyncio.current_task()
            assert task is not None  # a coroutine that was cancelled runs in a task
            task.uncancel()
            if reason == StopReason.TIMEOUT:
                return self._timeout_outcome(seq, loop.time() >= total_deadline)
            return self._stopped_outcome(reason)
        finally:
            self._generating = False
        return Outcome(Status.COMPLETED, seq)

    def _model_request(self) -> ModelRequest:
        conversation = self.conversation
        if conversation.messages is None:  # POST /stream: one prompt
            return ModelRequest.from_prompt(conversation.prompt, conversation.model)
        return ModelRequest(
            conversation.messages, conversation.model, conversation.parameters or {}
        )

    def _timeout_outcome(self, seq: int, total: bool) -> Outcome:
        if total:
            limit = self._settings.total_timeout
            message = f"The model did not finish within LLM_TOTAL_TIMEOUT ({limit:g} s)."
        elif seq == 0:
            limit = self._settings.first_chunk_timeout
            message = f"The model sent nothing within LLM_FIRST_CHUNK_TIMEOUT ({limit:g} s)."
        else:
            limit = self._settings.chunk_timeout
            message = f"The model went silent for LLM_CHUNK_TIMEOUT ({limit:g} s)."
        return Outcome(Status.FAILED, seq, ErrorCode.UPSTREAM_TIMEOUT, message)

    def _stopped_outcome(self, reason: StopReason) -> Outcome:
        # `chunks` is filled in by run() from what was actually persisted.
        if reason == StopReason.CANCELLED:
            message = "The generation was cancelled."
            return Outcome(Status.CANCELLED, 0, ErrorCode.CANCELLED, message)
        if reason == StopReason.STORAGE_REJECTED:
            ending = rejected_end(self.id)
            return Outcome(ending.status, 0, ending.error_code, ending.error_message)
        if reason == StopReason.STORAGE_UNAVAILABLE:
            ending = unavailable_end(self.id)
            return Outcome(ending.status, 0, ending.error_code, ending.error_message)
        return Outcome(Status.INTERRUPTED, 0, ErrorCode.INTERRUPTED, INTERRUPTED_MESSAGE)


class Generations:
    """Owns every running generation of this process: starts, finds, stops them."""

    def __init__(
        self,
        provider: Provider,
        writer: Writer,
        pool: AsyncConnectionPool,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._provider = provider
        self._writer = writer
        self._pool = pool
        self._settings = settings
        self._running: dict[UUID, Generation] = {}
        # Slots of SSE_LLM_MAX_STREAMS taken by requests still creating their row: counted
        # from the admission decision on, or a burst would all pass while none is running.
        self._reserved = 0
        self._closing = False  # shutting down: every new generation is interrupted at once
        self._idle = asyncio.Event()  # nothing running or reserved, while closing
        self._watchdog: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """Streams running, or admitted and about to (their slot is reserved)."""
        return len(self._running) + self._reserved

    def reserve(self) -> bool:
        """Take one of SSE_LLM_MAX_STREAMS' slots for a stream about to start; False if
        none is free. `start()` takes the slot over; else give it back with `release()`."""
        if len(self) >= self._settings.max_streams:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by `reserve()` for a stream that will not start."""
        self._reserved -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        if self._closing and not self._running and not self._reserved:
            self._idle.set()

    def ids(self) -> list[UUID]:
        """The conversations this process is generating right now."""
        return list(self._running)

    def start(self, conversation: Conversation, request_id: str | None = None) -> Generation:
        """Start generating the answer to a new conversation, in a slot from `reserve()`.

        Once shutting down, its row exists already: it starts interrupted, so its client
        hears the end and the row says so, and `shutdown()` waits for it like any other.
        """
        generation = Generation(
            conversation,
            self._provider,
            self._writer,
            self._pool,
            self._settings,
            self._metrics,
            request_id,
        )
        if self._closing:
            generation.stop(StopReason.INTERRUPTED)
        elif self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="watchdog")
        generation.task = asyncio.create_task(
            generation.run(), name=f"generation-{conversation.id}"
        )
        self._reserved -= 1
        self._running[conversation.id] = generation
        generation.task.add_done_callback(lambda _: self._end(conversation.id))
        return generation

    def _end(self, conversation_id: UUID) -> None:
        self._running.pop(conversation_id, None)
        self._check_idle()

    def get(self, conversation_id: UUID) -> Generation | None:
        """The running generation of a conversation, if this process runs it."""
        return self._running.get(conversation_id)

    def cancel(self, conversation_id: UUID) -> None:
        """Cancel a generation if this process runs it (else nothing to do here)."""
        generation = self._running.get(conversation_id)
        if generation is not None:
            generation.stop(StopReason.CANCELLED)

    async def _watch(self) -> None:
        """Stop every generation whose model has been silent past its deadline, and poke
        every subscriber that has had nothing for the ping interval.

        One pass over all generations a few times a second costs far less than a timer
        per stream moved on every chunk (~9% of the CPU), or a keep-alive task per stream;
        a timeout fires, and a ping is sent, within `interval` of its exact time.
        """
        settings = self._settings
        shortest = min(settings.first_chunk_timeout, settings.chunk_timeout)
        interval = min(max(shortest / 20, 0.02), 0.5)
        ping_interval = settings.ping_interval
        if ping_interval > 0:
            interval = min(interval, max(ping_interval / 4, 0.02))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for generation in list(self._running.values()):
                if now >= generation.deadline:
                    generation.stop(StopReason.TIMEOUT)
                if ping_interval > 0:
                    generation.ping_idle_subscribers(now - ping_interval)

    async def shutdown(self, grace: float) -> None:
        """Let running generations finish for `grace` seconds, then interrupt the rest.

        From the first moment, new generations start interrupted; every generation is
        awaited, those registered meanwhile too, as are the requests still creating a
        row (they will start one), so the writer is not closed under any of them.
        """
        self._closing = True
        self._check_idle()
        if not self._idle.is_set():
            log.info("waiting up to %gs for %d running streams", grace, len(self))
            if grace > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await self._idle.wait()
            for generation in list(self._running.values()):
                generation.stop(StopReason.INTERRUPTED)
            await self._idle.wait()
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
