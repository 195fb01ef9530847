"""The writer: every write of the streaming path goes through it, in batches.

Group commit: while one batch is being written, new conversations, chunks and ends
arrive and wait together; the next batch writes them all in one transaction. A lone
stream gets its chunk written at once (the batch holds one chunk); a thousand streams
cost one transaction per batch, not one per chunk, and never queue for the pool. Under
load the writer also lingers 3 ms before each batch, so that batches grow.
Only once a batch is committed are its chunks handed to their generations, which pass
them on to subscribers: no client ever sees a chunk that is not on disk.

What can go wrong, and why each answer is what it is:

- Only a lost connection (or a condition of the server's, not of the data: class 08,
  40, 53, 57, 58) is an outage. The batch is retried with backoff for up to the
  storage timeout; its new conversations fail at once (no client has seen anything
  of them), the rest fail `storage_unavailable` after the timeout.
- Any other error is the fault of some items of the batch (text the database cannot
  hold, an index row too long). Failing the whole batch would let one client end every
  stream of the process, so the batch is written again in one transaction with each
  half under a savepoint, halving whatever fails: k bad items among n cost O(k log n)
  statements, every other item is stored and published, and each bad item fails alone
  with `storage_rejected` (a bad end is recorded as a plain failed end instead).
- Chunks and ends are fenced (see lease.py): they are written only into conversations
  this process still owns and that still stream. One that is refused was settled by
  another process; its generation stops and tells its clients what the row says.
- An end its clients were told but that could not be stored (an outage past the
  storage timeout) is kept and retried with every later batch, and once more at close,
  so the history says what the clients saw. A batch whose COMMIT reply was lost may
  have created conversations for requests that got an error: nobody knows their ids,
  so their rows are deleted once the database answers again.
- Deliveries (what each client connection was sent) are records, not the stream: opens
  and ends gather for up to DELIVERY_LINGER_SECONDS, then ride the next batch (one
  statement for all of them: a few a second however many streams, not one per batch);
  a delivery whose open is still waiting when it ends is written once, ended. Through an
  outage they are kept and retried with the other leftovers; none ever fails a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard
from uuid import UUID

import psycopg

from sse_llm import batch_writes, store
from sse_llm.batch_writes import Stored, is_outage, rejected_end, unavailable_end
from sse_llm.contract import StopReason
from sse_llm.database import connection_options
from sse_llm.delivery_store import DeliveryRow
from sse_llm.errors import StorageRejected, StorageUnavailable
from sse_llm.metrics import Metrics
from sse_llm.store import Chunk, Conversation, Ending, NewConversation

__all__ = ["ChunkOwner", "StorageRejected", "StorageUnavailable", "Writer"]

log = logging.getLogger(__name__)

# Under load, how long the writer waits for more chunks before it commits a batch: a
# commit costs about the same CPU whether it holds 1 chunk or 100 (~110 µs of psycopg
# and socket work). Only after a batch of BUSY_BATCH chunks or more, so a lone stream
# (batches of one chunk) never waits.
LINGER_SECONDS = 0.003
BUSY_BATCH = 4
# Deliveries kept through an outage, at most (a few per client connection; past this the
# oldest records are given up, with a log line, rather than memory).
MAX_KEPT_DELIVERIES = 10_000
# How long deliveries' opens and ends wait to be written together: a crash loses at most
# this much of them (an end not written leaves its row to recovery, which says `lost`).
DELIVERY_LINGER_SECONDS = 0.25
# Backoff between attempts while the database is away (a batch's own retries, and
# those of kept ends and unconfirmed conversations when nothing else is written).
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0


class ChunkOwner(Protocol):
    """What the writer tells about a chunk once its batch is settled (a Generation)."""

    # True once none of its chunks may be stored any more: a later one would leave a gap.
    storage_failed: bool

    def publish(self, chunk: Chunk) -> None:
        """The chunk is persisted: pass it on."""

    def fail_storage(self, code: StopReason) -> None:
        """Its chunks could not be stored (`storage_unavailable` or `storage_rejected`);
        the writer records that end itself."""

    def fence(self) -> None:
        """Its conversation is no longer this process's to write: another settled it."""


class DeliveryRecord(Protocol):
    """A client connection's record (deliveries.Delivery): written as it is at write time."""

    id: UUID

    def row(self) -> DeliveryRow:
        """The row as it stands: open, or ended."""


@dataclass
class _Batch:
    """What waits for the next transaction."""

    creates: list[tuple[NewConversation, asyncio.Future[Conversation]]] = field(
        default_factory=list
    )
    chunks: list[tuple[Chunk, ChunkOwner]] = field(default_factory=list)
    ends: list[tuple[Ending, asyncio.Future[Ending | None]]] = field(default_factory=list)
    # By id: an open and its end queued in the same batch are one row.
    deliveries: dict[UUID, DeliveryRecord] = field(default_factory=dict)
    # One future for all the chunks of the batch: no allocation per chunk.
    chunks_done: asyncio.Future[bool] | None = None

    def __bool__(self) -> bool:
        return bool(self.creates or self.chunks or self.ends or self.deliveries)


def _is_conflict(exc: BaseException) -> TypeGuard[psycopg.Error]:
    """A transaction rollback (SQLSTATE class 40): a deadlock or serialization failure."""
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("40")


class Writer:
    """Writes batches on one dedicated connection, retrying through database outages."""

    def __init__(self, database_url: str, storage_timeout: float, metrics: Metrics) -> None:
        self._database_url = database_url
        self._storage_timeout = storage_timeout
        self._metrics = metrics
        self._owner_id: UUID | None = None
        self._pending = _Batch()
        self._writing: _Batch | None = None
        # Ends clients were told but not stored yet, and conversations to delete.
        self._kept: dict[UUID, Ending] = {}
        self._unconfirmed: set[UUID] = set()
        self._kept_deliveries: dict[UUID, DeliveryRecord] = {}
        self._waiting_deliveries: dict[UUID, DeliveryRecord] = {}
        self._deliveries_due = 0.0  # loop time by which the waiting ones are written
        self._retry_delay = 0.0
        self._committing = False  # the COMMIT of the current transaction is under way
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        self._connection: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, owner_id: UUID) -> None:
        """Start writing batches for the process whose instance id is `owner_id`.

        Chunks and ends are written only into conversations `owner_id` still owns.
        """
        self._owner_id = owner_id
        self._task = asyncio.create_task(self._run(), name="writer")

    async def close(self) -> None:
        """Write everything pending (and retry kept ends once more), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._closed = True  # also if never started
        await self._disconnect()

    def create(self, conversation: NewConversation) -> asyncio.Future[Conversation]:
        """Queue a new conversation; the future gives its row once committed."""
        future: asyncio.Future[Conversation] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(StorageUnavailable("the writer is closed"))
            return future
        self._pending.creates.append((conversation, future))
        self._wake.set()
        return future

    def write(self, chunk: Chunk, owner: ChunkOwner) -> asyncio.Future[bool]:
        """Queue a chunk; the future resolves True once its batch is committed and published,
        False if the batch could not be stored."""
        pending = self._pending
        if self._closed:
            owner.fail_storage(StopReason.STORAGE_UNAVAILABLE)
            done = asyncio.get_running_loop().create_future()
            done.set_result(False)
            return done
        if pending.chunks_done is None:
            pending.chunks_done = asyncio.get_running_loop().create_future()
        pending.chunks.append((chunk, owner))
        self._wake.set()
        return pending.chunks_done

    def finish(self, ending: Ending) -> asyncio.Future[Ending | None]:
        """Queue the end of a generation; the future gives the end its clients must be
        told (the one recorded, or kept to be recorded), or None if another process
        settled the conversation first (its row says how it ended)."""
        future: asyncio.Future[Ending | None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_result(unavailable_end(ending.conversation_id))
            return future
        self._pending.ends.append((ending, future))
        self._wake.set()
        return future

    def record_delivery(self, delivery: DeliveryRecord) -> None:
        """Queue a delivery's open or end, written within DELIVERY_LINGER_SECONDS (no
        future: nobody waits)."""
        if self._closed:
            return
        if not self._waiting_deliveries:
            self._deliveries_due = asyncio.get_running_loop().time() + DELIVERY_LINGER_SECONDS
            self._wake.set()  # an idle writer starts counting
        self._waiting_deliveries[delivery.id] = delivery

    def _take_deliveries(self, batch: _Batch, *, now: bool = False) -> None:
        """Move the waiting deliveries into `batch` once they are due (or `now`)."""
        waiting = self._waiting_deliveries
        if waiting and (now or asyncio.get_running_loop().time() >= self._deliveries_due):
            batch.deliveries, self._waiting_deliveries = waiting, {}

    def unsettled_ids(self) -> set[UUID]:
        """Conversations whose end is queued, being written or kept for a retry, or whose
        row is to be deleted: a sweep of this process's own rows must leave them alone."""
        ids = set(self._kept) | self._unconfirmed
        ids.update(ending.conversation_id for ending, _ in self._pending.ends)
        if self._writing is not None:
            ids.update(ending.conversation_id for ending, _ in self._writing.ends)
        return ids

    def lag(self) -> float:
        """Seconds since the oldest chunk no client can see yet was produced (0: none)."""
        writing = self._writing
        batch = writing if writing is not None and writing.chunks else self._pending
        if not batch.chunks:
            return 0.0
        return asyncio.get_running_loop().time() - batch.chunks[0][0].received

    async def _run(self) -> None:
        busy = False  # the last batch held chunks of several streams
        last_try = False  # closing: the leftovers have had their last attempt
        while True:
            # Checked before every wait, not after a wake-up: a write and close() in the
            # same tick set the event once, and the close must not wait for another.
            if not self._pending:
                if self._waiting_deliveries:
                    due = self._deliveries_due - asyncio.get_running_loop().time()
                    if self._closing or due <= 0:
                        batch = _Batch()
                        self._take_deliveries(batch, now=True)
                        await self._write_batch(batch)
                    else:
                        await self._woken_within(due)
                    continue
                leftovers = bool(self._kept or self._unconfirmed or self._kept_deliveries)
                if self._closing:
                    if not leftovers or last_try:
                        break
                    last_try = True  # once more, before the lease lets go of the rows
                    await self._write_batch(_Batch())
                    continue
                if leftovers:
                    if not await self._woken_within(self._retry_delay):
                        await self._write_batch(_Batch())  # the leftovers alone
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            if busy and not self._closing:
                await asyncio.sleep(LINGER_SECONDS)
            batch, self._pending = self._pending, _Batch()
            self._take_deliveries(batch, now=self._closing)
            self._writing = batch
            await self._write_batch(batch)
            self._writing = None
            busy = len(batch.chunks) >= BUSY_BATCH
        # No await since the last look at _pending: nothing queued can be left behind.
        self._closed = True

    async def _woken_within(self, seconds: float) -> bool:
        self._wake.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def _write_batch(self, batch: _Batch) -> None:
        # An owner whose earlier batch failed must not get later chunks stored: that
        # would leave a gap in its sequence.
        batch.chunks = [(c, owner) for c, owner in batch.chunks if not owner.storage_failed]
        # A create whose request went away while it waited is not written at all.
        batch.creates = [(c, future) for c, future in batch.creates if not future.done()]
        started = time.monotonic()
        try:
            stored = await self._persist(batch)
        except StorageUnavailable as exc:
            self._retry_delay = min(
                max(self._retry_delay * 2, RETRY_FIRST_SECONDS), RETRY_MAX_SECONDS
            )
            self._fail(batch, exc)
            return
        except Exception as exc:  # a bug of ours: the writer, which every stream needs, lives on
            log.exception("could not write a batch")
            self._fail(batch, StorageUnavailable(str(exc)))
            return
        self._retry_delay = 0.0
        self._settle(batch, stored, time.monotonic() - started)

    def _settle(self, batch: _Batch, stored: Stored, seconds: float) -> None:
        """Tell everyone waiting on the committed batch what became of their items."""
        for conversation, future in batch.creates:
            if conversation.id in stored.rejected_creates:
                if not future.done():
                    future.set_exception(StorageRejected())
            elif not future.done():
                future.set_result(stored.rows[conversation.id])
            else:  # its request went away meanwhile: nobody will ever know this id
                self._unconfirmed.add(conversation.id)
        if stored.refused or stored.rejected_from:
            published = self._settle_chunks(batch.chunks, stored)
        else:  # the usual case: no test per chunk
            for chunk, owner in batch.chunks:
                owner.publish(chunk)
            published = [chunk for chunk, _ in batch.chunks]
        for ending, end_future in batch.ends:
            if not end_future.done():
                end_future.set_result(stored.ends.get(ending.conversation_id))
        if batch.chunks_done is not None and not batch.chunks_done.done():
            batch.chunks_done.set_result(True)
        if published:
            self._metrics.observe_batch(published, seconds)

    def _settle_chunks(self, chunks: list[tuple[Chunk, ChunkOwner]], stored: Stored) -> list[Chunk]:
        published: list[Chunk] = []
        for chunk, owner in chunks:
            conversation_id = chunk.conversation_id
            first_rejected = stored.rejected_from.get(conversation_id)
            if conversation_id in stored.refused:
                if not owner.storage_failed:
                    owner.fence()
            elif first_rejected is not None and chunk.seq >= first_rejected:
                if not owner.storage_failed:
                    owner.fail_storage(StopReason.STORAGE_REJECTED)
                    self._kept[conversation_id] = rejected_end(conversation_id)
            else:
                owner.publish(chunk)
                published.append(chunk)
        return published

    def _fail(self, batch: _Batch, exc: StorageUnavailable) -> None:
        """The batch could not be stored: every item fails `storage_unavailable`, and the
        ends its clients are told are kept, to be recorded once the database is back."""
        for _, future in batch.creates:
            if not future.done():
                future.set_exception(exc)
        for chunk, owner in batch.chunks:
            if not owner.storage_failed:
                owner.fail_storage(StopReason.STORAGE_UNAVAILABLE)
                self._kept[chunk.conversation_id] = unavailable_end(chunk.conversation_id)
        for ending, end_future in batch.ends:
            told = unavailable_end(ending.conversation_id)
            self._kept[told.conversation_id] = told
            if not end_future.done():
                end_future.set_result(told)
        if batch.chunks_done is not None and not batch.chunks_done.done():
            batch.chunks_done.set_result(False)
        self._keep_deliveries(batch.deliveries)

    def _keep_deliveries(self, deliveries: dict[UUID, DeliveryRecord]) -> None:
        for delivery_id, delivery in deliveries.items():
            self._kept_deliveries.setdefault(delivery_id, delivery)
        while len(self._kept_deliveries) > MAX_KEPT_DELIVERIES:
            given_up = next(iter(self._kept_deliveries))
            del self._kept_deliveries[given_up]
            log.warning("gave up recording delivery %s", given_up)

    async def _persist(self, batch: _Batch) -> Stored:
        """Write the batch (and the leftovers) in one transaction; on a connection problem
        retry with backoff; on any other error, write it again isolating the bad items.

        New conversations are not held through an outage: their requests get their
        error at once, since no client has seen anything of them yet.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._storage_timeout
        delay = RETRY_FIRST_SECONDS
        isolate = False
        while True:
            kept = list(self._kept.values())
            unconfirmed = list(self._unconfirmed)
            kept_deliveries = list(self._kept_deliveries)
            try:
                # A database that stops answering (a half-open socket) must not hold every
                # stream of the process for ever: an attempt gets what is left of the
                # timeout (psycopg then tries to cancel for up to 10 s before it closes).
                async with asyncio.timeout(max(deadline - loop.time(), RETRY_FIRST_SECONDS)):
                    stored = await self._transaction(batch, kept, unconfirmed, isolate)
            except Exception as exc:
                if _is_conflict(exc) and loop.time() < deadline:
                    # A deadlock (with some other transaction locking rows in another order) rolled
                    # the transaction back, and nothing else: try again at once.
                    log.warning("a batch met a conflict, retrying it: %s", exc.sqlstate)
                    continue
                if not (isinstance(exc, TimeoutError) or is_outage(exc, self._connection)):
                    if isolate:  # outside every savepoint: nothing left to isolate
                        log.error("could not store a batch (%s)", type(exc).__name__)
                        raise StorageUnavailable(str(exc)) from exc
                    # No text of the error: it may quote a prompt.
                    log.warning("the database refused part of a batch (%s)", type(exc).__name__)
                    isolate = True
                    continue
                await self._disconnect()
                self._fail_creates(batch, exc)
                if not (batch.chunks or batch.ends) or loop.time() + delay > deadline:
                    log.error("giving up on a batch: %s", str(exc) or type(exc).__name__)
                    raise StorageUnavailable(str(exc)) from exc
                log.warning(
                    "database unavailable, retrying a batch of %d chunks", len(batch.chunks)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            for ending in kept:  # recorded, or settled by another process
                self._kept.pop(ending.conversation_id, None)
            self._unconfirmed.difference_update(unconfirmed)
            for delivery_id in kept_deliveries:
                self._kept_deliveries.pop(delivery_id, None)
            return stored

    def _fail_creates(self, batch: _Batch, exc: Exception) -> None:
        if self._committing:
            # The COMMIT went out and no reply came back: the rows may exist, and their
            # requests are about to get an error. They are deleted once the database answers.
            self._unconfirmed.update(conversation.id for conversation, _ in batch.creates)
        for _, future in batch.creates:
            if not future.done():
                future.set_exception(StorageUnavailable(str(exc)))
        batch.creates = []

    async def _transaction(
        self, batch: _Batch, kept: list[Ending], unconfirmed: list[UUID], isolate: bool
    ) -> Stored:
        self._committing = False
        connection = await self._connect()
        stored = Stored()
        ends = [ending for ending, _ in batch.ends] + kept
        deliveries = {**self._kept_deliveries, **batch.deliveries}
        chunks = [chunk for chunk, _ in batch.chunks]
        owner_id = self._owner_id
        assert owner_id is not None, "the writer was not started"
        if not (batch.creates or ends or unconfirmed or isolate or deliveries):
            # One statement: no BEGIN needed.
            await batch_writes.insert_chunks(connection, chunks, owner_id, stored, isolate=False)
            return stored
        async with connection.transaction():
            if unconfirmed:
                await batch_writes.delete_unconfirmed(connection, unconfirmed, isolate)
            if batch.creates:
                new = [conversation for conversation, _ in batch.creates]
                await batch_writes.insert_conversations(connection, new, stored, isolate)
            if chunks:
                await batch_writes.insert_chunks(connection, chunks, owner_id, stored, isolate)
            if ends:
                await batch_writes.finish(connection, ends, owner_id, stored, isolate)
            if deliveries:
                rows = [delivery.row() for delivery in deliveries.values()]
                await batch_writes.write_deliveries(connection, rows, isolate)
            self._committing = True
        self._committing = False
        return stored

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._connection is None or self._connection.closed:
            # Named (pg_stat_activity) and probed like the lease's: each attempt is
            # bounded anyway, but keepalives find a dead peer while the writer is idle.
            connection = await psycopg.AsyncConnection.connect(
                self._database_url,
                autocommit=True,
                **connection_options(self._storage_timeout, "sse-llm writer"),
            )
            assert self._owner_id is not None, "the writer was not started"
            try:
                # The fence (lease.py): held for the connection's life, so no batch pays
                # for it; taken before the first write, so every write sees a settlement.
                await store.hold_fence(connection, self._owner_id)
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
        return self._connection

    async def _disconnect(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
