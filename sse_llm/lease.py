"""This process's lease on its streams: a heartbeat, and recovery of dead processes' streams.

Every process registers an instance id and refreshes its heartbeat. A conversation left
`streaming` by an instance whose heartbeat stopped (the process crashed or was killed)
is marked `interrupted` by whichever process notices first, keeping every persisted chunk.
A live process's streams are never touched, so replicas can share one database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from uuid import UUID, uuid4

from psycopg_pool import AsyncConnectionPool

from sse_llm import store

log = logging.getLogger(__name__)


class InstanceLease:
    """Registers this process, keeps its heartbeat, and recovers orphaned streams."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        running_ids: Callable[[], list[UUID]],
        heartbeat_interval: float = 5.0,
        expiry: float = 20.0,
    ) -> None:
        self.instance_id = uuid4()
        self._pool = pool
        self._running_ids = running_ids
        self._interval = heartbeat_interval
        self._expiry = expiry
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Register, recover what dead processes left, and start the heartbeat."""
        await store.register_instance(self._pool, self.instance_id)
        await self._recover()
        self._task = asyncio.create_task(self._beat(), name="instance-heartbeat")

    async def release(self) -> None:
        """Stop the heartbeat; mark what this process still owns `interrupted`; unregister."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await store.interrupt_conversations(self._pool, owner_id=self.instance_id)
            await store.remove_instance(self._pool, self.instance_id)
        except Exception as exc:  # the database is gone; other processes will recover them
            log.warning("could not release instance %s: %s", self.instance_id, exc)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await store.beat_heart(self._pool, self.instance_id)
                await self._recover()
                # A stream this process owns but no longer runs (its end could not be
                # recorded during an outage) is settled here once the database is back.
                await store.interrupt_conversations(
                    self._pool,
                    owner_id=self.instance_id,
                    except_ids=self._running_ids(),
                    created_before_seconds=60,
                )
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _recover(self) -> None:
        recovered = await store.interrupt_conversations(
            self._pool, expired_after_seconds=self._expiry
        )
        if recovered:
            log.info("marked %d conversations of stopped processes interrupted", len(recovered))
