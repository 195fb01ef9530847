"""What one writer batch writes, kind by kind, and how the items the database refuses are
found (writer.py runs these in its transaction, in this order: unconfirmed deletes, new
conversations, chunks, ends, deliveries).

Each kind is written in one statement (store.py, delivery_store.py). When a batch has
met an error that is not an outage, the writer writes it again with `isolate`: each kind
under a savepoint, halved down to the items refused, which each kind records in `Stored`
its own way (a refused chunk stops its conversation's later chunks, a refused end is
written again as a plain failed end).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

import psycopg

from sse_llm import delivery_store, store
from sse_llm.contract import ErrorCode, Status
from sse_llm.delivery_store import CUT_OFF, DeliveryRow
from sse_llm.store import Chunk, Conversation, Ending, NewConversation

log = logging.getLogger("sse_llm.writer")

# SQLSTATE classes that say nothing about the data: connection exceptions (08),
# transaction rollback (40: a deadlock, say), insufficient resources (53, a full disk),
# operator intervention (57: a shutdown, a cancel), system errors (58: I/O).
_NOT_THE_DATA = ("08", "40", "53", "57", "58")

STORAGE_UNAVAILABLE_MESSAGE = "The database could not store the answer; the stream was stopped."
STORAGE_REJECTED_MESSAGE = "The database refused this answer's text; the stream was stopped."

T = TypeVar("T")


def unavailable_end(conversation_id: UUID) -> Ending:
    """The end of a generation whose answer the database could not take in time."""
    return Ending(
        conversation_id, Status.FAILED, ErrorCode.STORAGE_UNAVAILABLE, STORAGE_UNAVAILABLE_MESSAGE
    )


def rejected_end(conversation_id: UUID) -> Ending:
    """The end of a generation some of whose text the database refused."""
    return Ending(
        conversation_id, Status.FAILED, ErrorCode.STORAGE_REJECTED, STORAGE_REJECTED_MESSAGE
    )


@dataclass
class Stored:
    """What one committed transaction did."""

    rows: dict[UUID, Conversation] = field(default_factory=dict)
    # Conversations whose chunks the fence turned away.
    refused: set[UUID] = field(default_factory=set)
    # Conversations whose create was refused, or the seq of their first chunk refused
    # (that chunk and every later one of the batch are not stored).
    rejected_creates: set[UUID] = field(default_factory=set)
    rejected_from: dict[UUID, int] = field(default_factory=dict)
    # Each end as recorded (a plain failed end if the database refused the first one);
    # an end missing here was fenced.
    ends: dict[UUID, Ending] = field(default_factory=dict)


def is_outage(exc: BaseException, connection: psycopg.AsyncConnection | None) -> bool:
    """Whether an error says the database is away (retry) rather than refusing data."""
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate:
        return exc.sqlstate.startswith(_NOT_THE_DATA)
    # No SQLSTATE: raised by psycopg itself; a connection problem if the connection broke.
    return isinstance(exc, psycopg.OperationalError) and (
        connection is None or connection.broken or connection.closed
    )


async def delete_unconfirmed(
    connection: psycopg.AsyncConnection, ids: list[UUID], isolate: bool
) -> None:
    """Delete the conversations a lost COMMIT reply may have created."""

    async def delete(part: list[UUID]) -> None:
        await store.delete_unconfirmed_conversations(connection, part)

    def give_up(conversation_id: UUID) -> None:
        log.error("could not delete unconfirmed conversation %s", conversation_id)

    await isolating(connection, ids, delete, give_up, isolate)


async def insert_conversations(
    connection: psycopg.AsyncConnection,
    new: list[NewConversation],
    stored: Stored,
    isolate: bool,
) -> None:
    """Insert the new conversations; their rows go to `stored.rows`."""

    async def insert(part: list[NewConversation]) -> None:
        for row in await store.insert_conversations(connection, part):
            stored.rows[row.id] = row

    def reject(conversation: NewConversation) -> None:
        stored.rejected_creates.add(conversation.id)

    await isolating(connection, new, insert, reject, isolate)


async def insert_chunks(
    connection: psycopg.AsyncConnection,
    chunks: list[Chunk],
    owner_id: UUID,
    stored: Stored,
    isolate: bool,
) -> None:
    """Insert the chunks the fence lets through (`stored.refused`: the others')."""

    async def insert(part: list[Chunk]) -> None:
        if stored.rejected_from:  # no chunk after a refused one: it would leave a gap
            part = [c for c in part if c.conversation_id not in stored.rejected_from]
        if part:
            stored.refused.update(await store.insert_chunks(connection, part, owner_id))

    def reject(chunk: Chunk) -> None:
        stored.rejected_from.setdefault(chunk.conversation_id, chunk.seq)

    await isolating(connection, chunks, insert, reject, isolate)


async def finish(
    connection: psycopg.AsyncConnection,
    ends: list[Ending],
    owner_id: UUID,
    stored: Stored,
    isolate: bool,
) -> None:
    """Record the ends the fence lets through, in `stored.ends`."""

    async def write(part: list[Ending]) -> None:
        recorded = set(await store.finish_conversations(connection, part, owner_id))
        stored.ends.update((e.conversation_id, e) for e in part if e.conversation_id in recorded)

    refused: list[Ending] = []
    await isolating(connection, ends, write, refused.append, isolate)
    if not refused:
        return
    # The end the database refused becomes a plain failed end: still what clients are
    # told, and the row stops streaming. Should that be refused too, the row is left
    # to the sweep of this process's own rows.
    plain = [rejected_end(ending.conversation_id) for ending in refused]
    abandoned: list[Ending] = []
    await isolating(connection, plain, write, abandoned.append, isolate=True)
    for ending in abandoned:
        log.error("the database refused even a plain end of %s", ending.conversation_id)
        stored.ends[ending.conversation_id] = ending


async def write_deliveries(
    connection: psycopg.AsyncConnection, rows: list[DeliveryRow], isolate: bool
) -> None:
    """Write the deliveries' rows as they stand now; keep `delivery_cut` true."""

    async def write(part: list[DeliveryRow]) -> None:
        refresh = await delivery_store.write_deliveries(connection, part)
        # Rare: a cut-off, or an end sent to a conversation flagged cut.
        refresh.extend(row.conversation_id for row in part if row.ended in CUT_OFF)
        if refresh:
            await delivery_store.refresh_delivery_cut(connection, sorted(set(refresh)))

    def give_up(row: DeliveryRow) -> None:
        log.error("the database refused delivery %s", row.id)

    await isolating(connection, rows, write, give_up, isolate)


async def isolating(
    connection: psycopg.AsyncConnection,
    items: list[T],
    write: Callable[[list[T]], Awaitable[None]],
    reject: Callable[[T], None],
    isolate: bool,
) -> None:
    """`write(items)`; with `isolate`, under a savepoint, halving what fails down to
    the items the database refuses, which go to `reject`, in order."""
    if not isolate:
        await write(items)
        return
    try:
        async with connection.transaction():  # a savepoint
            await write(items)
        return
    except Exception as exc:
        if is_outage(exc, connection):
            raise
        if len(items) == 1:
            reject(items[0])
            return
    middle = len(items) // 2
    await isolating(connection, items[:middle], write, reject, isolate)
    await isolating(connection, items[middle:], write, reject, isolate)
