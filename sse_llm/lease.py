"""This process's claim on its streams, and the settling of the streams of dead processes.

Ownership. Each process holds a PostgreSQL advisory lock named after its instance id for
as long as it lives, on a connection of its own (`application_name` `sse-llm lease`),
and records in `instances` the start time of the server it took it on. When a process
dies, even by `kill -9`, its connection closes and the database frees the lock at once.
Each of its streaming conversations (`owner_id` = its id) must then be settled: marked
`interrupted`, keeping every persisted chunk. Every process sweeps for such streams at
startup and every `SSE_LLM_LEASE_INTERVAL` seconds (5).

Who is dead. A free lock alone does not prove its owner died: a restart of PostgreSQL
drops every lock, and the live owners take theirs back only at their next check. So a
sweep settles an owner whose lock is free only if
  - its lock was taken on this very server, since it last started
    (`instances.server_started_at = pg_postmaster_start_time()`): the session that held
    it has ended, so the process died (or lost its lease connection: see below). This is
    how a `kill -9` is recovered at the next sweep; or
  - the settler has itself seen this server up for the re-lock grace (3 intervals, at
    least 5 s) and the owner has not re-locked meanwhile. Every live owner checks its
    lock each interval and re-takes it within one interval of the server coming back,
    so after a restart live owners re-lock before anyone may settle them. The grace is
    counted from when the settler first saw the server, not from its start time, so a
    long crash recovery does not use it up; after a failover the new server's start time
    differs from the one recorded, so the grace applies there too. (Replicas should
    share the interval.)
The owner's lock is taken in the settler's transaction (a transaction-level advisory
lock), so it cannot re-lock half-way through being settled.

Fencing: the rule, and why no client is told an end other than the one stored. A
conversation's writes and its settling are serialised by the owner's fence lock (an
advisory lock in its own key space, keyed by the owner's id):
  - the owner's writer holds it shared for as long as its connection lives, taken
    (`store.hold_fence`) before that connection's first write; it inserts chunks only
    for rows still `streaming` and still its own, and records an end with
    `UPDATE ... WHERE status = 'streaming' AND owner_id = me`; a fenced owner ends its
    clients with the outcome recorded in the row;
  - the settler, in one transaction of three statements, each a new snapshot in READ
    COMMITTED: finds the orphaned rows, takes each owner's fence lock exclusively with a
    try-lock (granted only if no writer of that owner is connected; an owner whose writer
    is connected is left for a later sweep), then sets `interrupted`, `owner_id = NULL`
    and assembles `response` from the chunks.
So while an owner's writer is connected its rows are never settled, whatever the
advisory locks of the lease say. Once its connection is gone (its process died, or the
database restarted), every chunk it committed is visible to the settler's third
statement; a writer that connects again waits in `hold_fence` until the settler has
committed, so its every later statement sees the row settled and writes nothing, and its
clients never see those chunks. The same holds for the owner's end. So a settling UPDATE
and an owner's later chunk or end write can never both succeed, and the settled row holds
exactly the chunks any client could have been sent. The fence costs no statement per
batch: row locks (the foreign key's once per chunk, or one per conversation and batch)
cost PostgreSQL 0.05-0.10 ms per chunk at 1,000 streams, where the whole insert now costs
0.016 (benchmarks/run.py, C=1000). The grace is for liveness only: if a live owner is
settled anyway (its lease and writer connections were both lost, or it did not re-lock
in time), the fence keeps the row and its clients in agreement: they are all told
`interrupted`. A process settling its own leftover rows (below, and at shutdown) skips
the fence: its writer holds it, and those rows have no generation and no write left in
the writer.

The lease itself. `holds_lock` says whether the process holds its lock. A check that
finds the lease connection broken reconnects and re-locks under the same id; a failed
re-lock is retried at every check. The sweep of this process's own streams that it no
longer runs, and the settling of others, run only while it holds its lock (and a sweep
never counts its own process as dead). Every check runs under a timeout, and the lease
connection has TCP keepalives and `tcp_user_timeout`, so a half-open socket cannot hang
it: a check that does not answer in time closes the connection and re-locks on a new
one at the next check.

Cancels. A cancel is recorded in its row (`cancel_requested_at`) and notified; each
check also looks for the cancels of streams this process runs (an indexed query), as
does the broadcast listener after it reconnects, so a missed notification delays a
cancel by at most one interval.

Retention. With SSE_LLM_RETENTION_DAYS set, a check starts a prune every PRUNE_SECONDS
as a task of the lease's (retention.py): its lock lets one process of all prune at a
time, the others skip their turn; release() cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from uuid import UUID, uuid4

import psycopg
from psycopg_pool import AsyncConnectionPool

from sse_llm import recovery_store, retention, rollup_store, store
from sse_llm.database import connection_options

log = logging.getLogger(__name__)

# A stream this young may not be registered with its generation yet: the self-sweep spares it.
NEW_STREAM_SECONDS = 60
# How often a process folds the history counts of past hours (rollup_store.fold_counts).
FOLD_SECONDS = 300
# How often a process with SSE_LLM_RETENTION_DAYS set tries to prune (one wins the lock).
PRUNE_SECONDS = 300


class InstanceLease:
    """Holds the instance lock, settles the streams of dead processes, applies recorded cancels."""

    def __init__(
        self,
        database_url: str,
        pool: AsyncConnectionPool,
        running_ids: Callable[[], list[UUID]],
        cancel: Callable[[UUID], None] = lambda _: None,
        interval: float = 5.0,
        retention_days: float | None = None,
    ) -> None:
        self.instance_id = uuid4()
        self.holds_lock = False
        self._database_url = database_url
        self._pool = pool
        self._running_ids = running_ids
        self._cancel = cancel
        self._interval = interval
        self._grace = max(3 * interval, 5.0)
        self._timeout = max(2 * interval, 5.0)
        self._connection: psycopg.AsyncConnection | None = None
        # The server this process sees, and since when (loop time): see "Who is dead".
        self._server: datetime | None = None
        self._server_seen_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._folded_at = float("-inf")
        self._retention_days = retention_days
        self._pruner: asyncio.Task[None] | None = None
        self._pruned_at = float("-inf")

    async def start(self) -> None:
        """Take the instance lock, recover what dead processes left, start checking."""
        async with asyncio.timeout(self._timeout):
            await self._lock()
        await self._recover()
        self._task = asyncio.create_task(self._watch(), name="instance-lease")

    async def release(self) -> None:
        """Mark what this process still owns `interrupted`, then let go of the lock."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pruner is not None:  # its transaction rolls back with its connection
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
        try:
            async with asyncio.timeout(self._timeout):
                await recovery_store.interrupt_conversations(self._pool, owner_id=self.instance_id)
                if self._connection is not None and not self._connection.closed:
                    await recovery_store.forget_instance(self._connection, self.instance_id)
        except Exception as exc:  # the database is away: others recover them later
            log.warning("could not mark this process's streams interrupted: %s", exc)
        await self._disconnect()

    async def check(self) -> None:
        """Keep the lock (re-taking it if lost), apply recorded cancels, settle orphans."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._keep_lock()
        except Exception as exc:  # TimeoutError included: a silent connection
            log.warning("instance lock not held, retrying at the next check: %r", exc)
            await self._disconnect()
        try:
            async with asyncio.timeout(self._timeout):
                await self.apply_cancels()
                if self.holds_lock:
                    await self._recover()
                    await self._settle_own()
                    await rollup_store.fold_pending_stats(self._pool)
                    await self._fold_counts()
                    self._start_pruner()
        except Exception as exc:
            log.warning("lease check failed: %r", exc)

    async def _fold_counts(self) -> None:
        """Now and then, merge the history counts' rows of past hours (rollup_store.fold_counts)."""
        now = asyncio.get_running_loop().time()
        if now - self._folded_at >= FOLD_SECONDS:
            self._folded_at = now
            await rollup_store.fold_counts(self._pool)

    def _start_pruner(self) -> None:
        """Now and then, with retention set, prune in the background (retention.py).

        A task of its own, owned here: a run can take minutes, the check must not wait."""
        if self._retention_days is None or (self._pruner and not self._pruner.done()):
            return
        now = asyncio.get_running_loop().time()
        if now - self._pruned_at >= PRUNE_SECONDS:
            self._pruned_at = now
            self._pruner = asyncio.create_task(
                retention.prune_in_background(self._database_url, self._retention_days),
                name="pruner",
            )

    async def apply_cancels(self) -> None:
        """Stop the streams this process runs whose cancel is recorded (its notice may be lost)."""
        for conversation_id in await store.cancel_requested(self._pool, self.instance_id):
            self._cancel(conversation_id)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def _lock(self) -> None:
        """At startup: take a lock under a fresh id (another on a hash clash)."""
        while not await self._relock():
            # A 32-bit hash clash with a live instance: pick another id.
            self.instance_id = uuid4()

    async def _keep_lock(self) -> None:
        """A working lease connection holds the lock; a broken one is replaced and re-locked."""
        if self._connection is not None and not self._connection.closed:
            try:
                self._see_server(await recovery_store.server_started_at(self._connection))
                return
            except psycopg.Error as exc:
                log.warning("lost the lease connection (did the database restart?): %s", exc)
                await self._disconnect()
        if not await self._relock():
            # A settler holds it for a moment (its transaction ends soon), or, very
            # rarely, a 32-bit hash clash: the rows are ours, so keep the id and retry.
            raise RuntimeError("the instance lock is held by another session")
        log.info("instance lock re-taken")

    async def _relock(self) -> bool:
        connection = await psycopg.AsyncConnection.connect(
            self._database_url,
            autocommit=True,
            **connection_options(self._interval, "sse-llm lease"),
        )
        try:
            server = await recovery_store.lock_instance(connection, self.instance_id)
        except BaseException:
            await connection.close()
            raise
        if server is None:
            await connection.close()
            return False
        self._connection = connection
        self.holds_lock = True
        self._see_server(server)
        return True

    async def _disconnect(self) -> None:
        self.holds_lock = False
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def _see_server(self, started_at: datetime) -> None:
        if started_at != self._server:
            self._server = started_at
            self._server_seen_since = asyncio.get_running_loop().time()

    async def _recover(self) -> None:
        """Settle the streams of dead processes (see "Who is dead")."""
        seen_for = asyncio.get_running_loop().time() - self._server_seen_since
        quiet_server = self._server if seen_for >= self._grace else None
        recovered = await recovery_store.interrupt_orphaned_conversations(
            self._pool, settler_id=self.instance_id, quiet_server=quiet_server
        )
        if recovered:
            log.info("marked %d streams of stopped processes interrupted", len(recovered))

    async def _settle_own(self) -> None:
        """Settle the streams this process owns but no longer runs.

        Their end could not be recorded during a database outage, say; `running_ids`
        names every stream whose generation, or whose end, this process still holds.
        """
        await recovery_store.interrupt_conversations(
            self._pool,
            owner_id=self.instance_id,
            except_ids=self._running_ids(),
            created_before_seconds=NEW_STREAM_SECONDS,
        )
