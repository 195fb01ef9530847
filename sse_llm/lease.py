"""This process's claim on its streams, and recovery of the streams of dead processes.

Each process holds a PostgreSQL advisory lock named after its instance id for as long
as it lives, on a connection of its own. When a process dies, even by `kill -9`, its
connection closes and the database releases the lock at once. A conversation still
`streaming` whose owner's lock is free therefore belongs to a dead process: it is marked
`interrupted`, keeping every persisted chunk, at startup and then every few seconds by
whichever process looks first. A live process's streams are never touched, so replicas
can share one database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from uuid import UUID, uuid4

import psycopg
from psycopg_pool import AsyncConnectionPool

from sse_llm import store

log = logging.getLogger(__name__)


class InstanceLease:
    """Holds the instance lock and recovers orphaned streams periodically."""

    def __init__(
        self,
        database_url: str,
        pool: AsyncConnectionPool,
        running_ids: Callable[[], list[UUID]],
        interval: float = 5.0,
    ) -> None:
        self.instance_id = uuid4()
        self._database_url = database_url
        self._pool = pool
        self._running_ids = running_ids
        self._interval = interval
        self._connection: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take the instance lock, recover what dead processes left, start checking."""
        await self._lock()
        await self._recover()
        self._task = asyncio.create_task(self._watch(), name="instance-lease")

    async def release(self) -> None:
        """Mark what this process still owns `interrupted`, then let go of the lock."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await store.interrupt_conversations(self._pool, owner_id=self.instance_id)
        except Exception as exc:  # the database is away: others recover them later
            log.warning("could not mark this process's streams interrupted: %s", exc)
        if self._connection is not None:
            await self._connection.close()

    async def _lock(self) -> None:
        while True:
            self._connection = await psycopg.AsyncConnection.connect(
                self._database_url, autocommit=True, connect_timeout=5
            )
            if await store.lock_instance(self._connection, self.instance_id):
                return
            # A 32-bit hash clash with a live instance: pick another id.
            await self._connection.close()
            self.instance_id = uuid4()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._keep_lock()
                await self._recover()
                # A stream this process owns but no longer runs (its end could not be
                # recorded during a database outage) is settled once the database is back.
                await store.interrupt_conversations(
                    self._pool,
                    owner_id=self.instance_id,
                    except_ids=self._running_ids(),
                    created_before_seconds=60,
                )
            except Exception as exc:
                log.warning("lease check failed: %s", exc)

    async def _keep_lock(self) -> None:
        """Re-take the lock if its connection was lost (the database restarted)."""
        assert self._connection is not None
        try:
            await self._connection.execute("SELECT 1")
        except psycopg.Error:
            await self._connection.close()
            if not await self._relock():
                raise RuntimeError("could not re-take the instance lock") from None

    async def _relock(self) -> bool:
        self._connection = await psycopg.AsyncConnection.connect(
            self._database_url, autocommit=True, connect_timeout=5
        )
        return await store.lock_instance(self._connection, self.instance_id)

    async def _recover(self) -> None:
        recovered = await store.interrupt_conversations(self._pool)
        if recovered:
            log.info("marked %d streams of stopped processes interrupted", len(recovered))
