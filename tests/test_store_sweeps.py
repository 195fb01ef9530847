"""store.py's cancels, sweeps and sessions against the real PostgreSQL, said directly.

Helpers are test_store.py's. The sweeps act on every row of a database, so those tests
have a database of their own.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from psycopg import AsyncConnection

from sse_llm import recovery_store, session_store, store
from sse_llm.store import Chunk, Ending
from tests.support import run
from tests.test_store import connected, notifications, streaming


def test_a_cancel_is_recorded_once_for_its_owner_to_find_and_names_an_ended_status(
    database_url: str,
) -> None:
    async def scenario() -> dict[str, Any]:
        async with (
            connected(database_url) as (conn, pool),
            await AsyncConnection.connect(database_url, autocommit=True) as listener,
        ):
            await listener.execute("LISTEN sse_llm_cancel")
            owner_id = uuid4()
            cancelled, untouched, ended = [await streaming(conn, owner_id) for _ in "abc"]
            elsewhere = await streaming(conn, uuid4())
            await store.finish_conversations(conn, [Ending(ended, "failed")], owner_id)
            answers = [await store.request_cancel(pool, i) for i in (cancelled, ended, uuid4())]
            mine = {cancelled, untouched, ended, elsewhere}
            heard = await notifications(listener, about=mine, until={cancelled})
            await store.request_cancel(pool, elsewhere)
            first_at = await conn.execute(
                "SELECT cancel_requested_at FROM conversations WHERE id = %s", (cancelled,)
            )
            again = await store.request_cancel(pool, cancelled)
            second_at = await conn.execute(
                "SELECT cancel_requested_at FROM conversations WHERE id = %s", (cancelled,)
            )
            return {
                "answers": answers,
                "heard": heard,
                "again": again,
                "same time": await first_at.fetchone() == await second_at.fetchone(),
                "found": await store.cancel_requested(pool, owner_id),
                "ids": (cancelled, untouched),
            }

    result = run(scenario)
    cancelled, _ = result["ids"]
    assert result["answers"] == ["streaming", "failed", None]
    assert result["heard"] == [("sse_llm_cancel", [cancelled])]
    assert result["again"] == "streaming" and result["same time"]
    # Only this owner's streams whose cancel is recorded: not the other owner's.
    assert result["found"] == [cancelled]


def test_a_process_interrupts_its_own_rows_but_spares_the_excepted_and_the_newest(
    database_url: str,
) -> None:
    async def scenario() -> tuple[list[UUID], list[UUID], list[UUID], tuple]:
        async with connected(database_url) as (conn, pool):
            owner_id = uuid4()
            ids = [await streaming(conn, owner_id) for _ in range(3)]
            elsewhere = await streaming(conn, uuid4())
            await store.insert_chunks(conn, [Chunk(ids[0], 1, "partial")], owner_id)
            # Too new: a generation may be about to register it.
            spared = await recovery_store.interrupt_conversations(
                pool, owner_id=owner_id, created_before_seconds=60
            )
            settled = await recovery_store.interrupt_conversations(
                pool, owner_id=owner_id, except_ids=[ids[2]]
            )
            cursor = await conn.execute(
                "SELECT id, status, error_code, response, chunk_count, owner_id"
                " FROM conversations WHERE id = ANY(%s)",
                ([*ids, elsewhere],),
            )
            rows = {row[0]: row[1:] for row in await cursor.fetchall()}
            return ids, spared, settled, (elsewhere, rows)

    ids, spared, settled, (elsewhere, rows) = run(scenario)
    assert spared == []
    assert sorted(settled) == sorted(ids[:2])
    assert rows[ids[0]] == ("interrupted", "interrupted", "partial", 1, None)
    assert rows[ids[1]] == ("interrupted", "interrupted", "", 0, None)
    assert rows[ids[2]][0] == "streaming" and rows[elsewhere][0] == "streaming"


def test_only_dead_owners_rows_are_interrupted_and_dead_owners_forgotten(
    own_database: str,
) -> None:
    # Dead: its instance lock is free and was taken on this very server, or on an earlier
    # one once the settler has seen this server up past the re-lock grace (quiet_server).
    async def scenario() -> dict[str, Any]:
        async with (
            connected(own_database) as (conn, pool),
            await AsyncConnection.connect(own_database, autocommit=True) as live_session,
        ):
            settler, dead, alive, before_restart = uuid4(), uuid4(), uuid4(), uuid4()
            assert await recovery_store.lock_instance(live_session, alive) is not None
            await conn.execute(
                "INSERT INTO instances (id, server_started_at) VALUES"
                " (%s, pg_postmaster_start_time()), (%s, pg_postmaster_start_time()),"
                " (%s, pg_postmaster_start_time() - interval '1 hour')",
                (settler, dead, before_restart),
            )
            owners = (settler, dead, alive, before_restart)
            rows = {o: await streaming(conn, o, alive=False) for o in owners}
            await store.insert_chunks(conn, [Chunk(rows[dead], 1, "last words")], dead)
            first = await recovery_store.interrupt_orphaned_conversations(
                pool, settler_id=settler, quiet_server=None
            )
            quiet = await recovery_store.server_started_at(conn)
            second = await recovery_store.interrupt_orphaned_conversations(
                pool, settler_id=settler, quiet_server=quiet
            )
            cursor = await conn.execute("SELECT id FROM instances")
            instances = {row[0] for row in await cursor.fetchall()}
            cursor = await conn.execute(
                "SELECT status, response FROM conversations WHERE id = %s", (rows[dead],)
            )
            return {
                "first": first,
                "second": second,
                "rows": rows,
                "instances": instances,
                "dead row": await cursor.fetchone(),
                "owners": (settler, dead, alive, before_restart),
            }

    result = run(scenario)
    settler, dead, alive, before_restart = result["owners"]
    rows = result["rows"]
    assert result["first"] == [rows[dead]]
    assert result["dead row"] == ("interrupted", "last words")
    # Past the grace, a lock taken on an earlier server and never re-taken means dead too;
    # the live owner and the settler itself are never settled.
    assert result["second"] == [rows[before_restart]]
    assert result["instances"] == {settler, alive}


def test_a_session_is_found_until_it_expires_or_is_revoked_and_expired_ones_are_deleted(
    own_database: str,
) -> None:
    async def scenario() -> dict[str, Any]:
        async with connected(own_database) as (_, pool):
            live = await session_store.create_session(pool, b"live", "ann", 3600)
            revoked = await session_store.create_session(pool, b"revoked", "bob", 3600)
            await session_store.revoke_session(pool, revoked.token_hash)
            for n, seconds in enumerate((-300, -200, -100, 0)):
                await session_store.create_session(pool, b"expired %d" % n, "cy", seconds)
            found = {
                name: await session_store.find_session(pool, name)
                for name in (b"live", b"revoked", b"expired 3", b"unknown")
            }
            deleted = await session_store.delete_expired_sessions(pool, limit=2)
            async with pool.connection() as conn:
                cursor = await conn.execute("SELECT token_hash FROM sessions ORDER BY token_hash")
                left = [bytes(row[0]) for row in await cursor.fetchall()]
            return {"live": live, "found": found, "deleted": deleted, "left": left}

    result = run(scenario)
    live = result["live"]
    assert (live.reviewer, (live.expires_at - live.created_at).total_seconds()) == ("ann", 3600)
    assert result["found"] == {
        b"live": live,
        b"revoked": None,
        b"expired 3": None,
        b"unknown": None,
    }
    # Oldest first, up to the limit; a revoked session not yet expired stays.
    assert result["deleted"] == 2
    assert result["left"] == [b"expired 2", b"expired 3", b"live", b"revoked"]
