"""Long-lived connections survive being lost or going silent (issue 12, point 3).

A real InstanceLease or Broadcast, with a short check interval, on a database of its own
(advisory locks are per database, so no other test's process can take part).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import uuid
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import psycopg
import pytest

from sse_llm.broadcast import Broadcast
from sse_llm.database import open_pool
from sse_llm.lease import InstanceLease
from sse_llm.recovery_store import interrupt_orphaned_conversations
from sse_llm.store import (
    FENCE_LOCK_NAMESPACE,
    INSTANCE_LOCK_NAMESPACE,
)
from tests.support import free_port, run, wait_until

T = TypeVar("T")


def lock_holder(conn: psycopg.Connection, instance_id: UUID) -> int | None:
    """The backend holding an instance's lock, if any."""
    row = conn.execute(
        """
        SELECT pid FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 2
          AND classid = %(namespace)s
          AND objid::bigint = (hashtext(%(id)s::text)::bigint & 4294967295)
        """,
        {"namespace": INSTANCE_LOCK_NAMESPACE, "id": instance_id},
    ).fetchone()
    return None if row is None else int(row[0])


def add_stream(conn: psycopg.Connection, owner_id: UUID) -> UUID:
    """A conversation streaming under `owner_id`."""
    conversation_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO conversations (id, prompt, model, provider, owner_id)"
        " VALUES (%s, 'still running', 'demo', 'demo', %s)",
        (conversation_id, owner_id),
    )
    return conversation_id


def status_of(conn: psycopg.Connection, conversation_id: UUID) -> str:
    row = conn.execute(
        "SELECT status FROM conversations WHERE id = %s", (conversation_id,)
    ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.slow
def test_a_failed_relock_is_retried_and_never_settles_the_processs_own_streams(
    own_database: str,
) -> None:
    async def scenario() -> tuple[str, int | None, int]:
        pool = await open_pool(own_database)
        running: list[UUID] = []
        lease = InstanceLease(own_database, pool, lambda: running, interval=0.2)
        await lease.start()
        try:
            with psycopg.connect(own_database, autocommit=True) as db:
                stream = add_stream(db, lease.instance_id)
                running.append(stream)
                old = lock_holder(db, lease.instance_id)
                assert old is not None
                # The lease connection drops, and for a while another session holds the
                # lock key (a settler's transaction, say): re-locking fails, check after check.
                db.execute("SELECT pg_terminate_backend(%s, 5000)", (old,))
                with psycopg.connect(own_database, autocommit=True) as other:
                    other.execute(
                        "SELECT pg_advisory_lock(%s, hashtext(%s::text))",
                        (INSTANCE_LOCK_NAMESPACE, lease.instance_id),
                    )
                    await asyncio.sleep(1.5)
                # Free again: the next checks re-lock, and nothing was settled meanwhile.
                await asyncio.sleep(1.5)
                return status_of(db, stream), lock_holder(db, lease.instance_id), old
        finally:
            await lease.release()
            await pool.close()

    status, holder, old = run(scenario)
    assert status == "streaming"
    assert holder is not None and holder != old


class SilentProxy:
    """A TCP proxy to PostgreSQL that can go silent: it stops passing bytes either way on
    the connections it has, as a dead network path would, while new ones work."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        if host.startswith("/"):
            self._target: tuple[int, Any] = (
                socket.AF_UNIX,
                f"{host}/.s.PGSQL.{parts.port or 5432}",
            )
        else:
            self._target = (socket.AF_INET, (host, parts.port or 5432))
        self.port = free_port()
        name = parts.path.lstrip("/")
        self.url = (
            f"postgresql://{parts.username}:{parts.password or ''}@127.0.0.1:{self.port}/{name}"
        )
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._silenced: list[socket.socket] = []
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        """From now on, the connections open now pass nothing (but still close)."""
        with self._lock:
            self._silenced = list(self._open)

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.socket(self._target[0], socket.SOCK_STREAM)
                server.connect(self._target[1])
                with self._lock:
                    self._open += [client, server]
                threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        with client, server, contextlib.suppress(OSError):
            while True:
                readable, _, _ = select.select(list(peers), [], [])
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return  # one side closed: close the other
                    if sock not in self._silenced:
                        peers[sock].sendall(data)


@pytest.mark.slow
def test_a_lease_connection_gone_silent_is_replaced_and_the_lock_retaken(
    own_database: str,
) -> None:
    proxy = SilentProxy(own_database)

    async def scenario() -> tuple[int | None, int | None]:
        pool = await open_pool(own_database)
        lease = InstanceLease(proxy.url, pool, lambda: [], interval=0.2)
        await lease.start()
        try:
            with psycopg.connect(own_database, autocommit=True) as db:
                old = lock_holder(db, lease.instance_id)
                proxy.silence()  # the lease's connection, half-open from now on

                def relocked() -> bool:
                    return lock_holder(db, lease.instance_id) not in (None, old)

                await asyncio.to_thread(wait_until, relocked, 30, 0.05, "no new lock holder")
                return old, lock_holder(db, lease.instance_id)
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await lease.release()
            await pool.close()

    try:
        old, holder = run(scenario)
    finally:
        proxy.close()
    assert old is not None
    assert holder is not None and holder != old


@pytest.mark.slow
def test_a_listening_connection_gone_silent_is_replaced(own_database: str) -> None:
    proxy = SilentProxy(own_database)

    async def scenario() -> tuple[int, list[UUID]]:
        heard: list[UUID] = []
        connections: list[int] = []
        reconnected, cancel_heard = asyncio.Event(), asyncio.Event()

        def on_cancel(conversation_id: UUID) -> None:
            heard.append(conversation_id)
            cancel_heard.set()

        async def on_connect() -> None:
            connections.append(1)
            if len(connections) == 2:
                reconnected.set()

        broadcast = Broadcast(
            proxy.url, on_cancel=on_cancel, on_connect=on_connect, check_interval=0.2
        )
        broadcast.start()
        try:
            await asyncio.wait_for(broadcast.connected.wait(), 10)
            proxy.silence()  # the listening connection, half-open from now on
            await asyncio.wait_for(reconnected.wait(), 30)
            # The new connection hears what is notified.
            conversation_id = uuid.uuid4()
            async with await psycopg.AsyncConnection.connect(own_database) as conn:
                await conn.execute(
                    "SELECT pg_notify('sse_llm_cancel', %s)", (str(conversation_id),)
                )
                await conn.commit()
            await asyncio.wait_for(cancel_heard.wait(), 10)
            return len(connections), heard
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await broadcast.close()

    try:
        connections, heard = run(scenario)
    finally:
        proxy.close()
    assert connections == 2
    assert len(heard) == 1


def test_an_owner_whose_writer_is_connected_is_not_settled_and_then_keeps_its_chunks(
    own_database: str,
) -> None:
    dead_owner = uuid.uuid4()
    with psycopg.connect(own_database, autocommit=True) as db:
        # A process that took its lock on this server, and whose lock is free: dead.
        db.execute(
            "INSERT INTO instances (id, server_started_at) VALUES (%s, pg_postmaster_start_time())",
            (dead_owner,),
        )
        stream = add_stream(db, dead_owner)

        async def settle() -> list[UUID]:
            pool = await open_pool(own_database)
            try:
                return await interrupt_orphaned_conversations(
                    pool, settler_id=uuid.uuid4(), quiet_server=None
                )
            finally:
                await pool.close()

        with psycopg.connect(own_database) as writer:
            # The owner's writer as the service makes it: its connection holds the fence
            # lock shared (store.hold_fence) and writes a chunk, committed.
            writer.execute(
                "SELECT pg_advisory_lock_shared(%s, hashtext(%s::text))",
                (FENCE_LOCK_NAMESPACE, dead_owner),
            )
            writer.execute(
                "INSERT INTO chunks (conversation_id, seq, text) VALUES (%s, 1, 'seen')",
                (stream,),
            )
            writer.commit()  # its clients may now be sent chunk 1
            # Its lease lock is free, but its writer is connected: not settled.
            assert run(settle) == []
        # The writer's connection is gone too: now it is settled, with every chunk.
        assert run(settle) == [stream]
        row = db.execute(
            "SELECT status, response, chunk_count, owner_id FROM conversations WHERE id = %s",
            (stream,),
        ).fetchone()
        assert row == ("interrupted", "seen", 1, None)
        # A later fenced insert finds the row settled, so inserts nothing.
        later = db.execute(
            "SELECT id FROM conversations WHERE id = %s AND owner_id = %s AND status = 'streaming'",
            (stream, dead_owner),
        ).fetchall()
        assert later == []
        # The dead process owns nothing any more: it is forgotten.
        assert db.execute("SELECT count(*) FROM instances").fetchone() == (0,)
