"""The history's counts (migration 0010) always equal a count of the conversations table.

Triggers keep them in the transaction of every statement that creates, ends, settles or
deletes conversations, whoever runs it; each test uses a model name of its own, so it
reads only its own counts.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from sse_llm import history_queries, recovery_store, rollup_store, store
from sse_llm.contract import ErrorCode, Status
from sse_llm.store import Ending, NewConversation
from tests.conftest import RunningServer, word
from tests.support import wait_until


def counted(db: psycopg.Connection, model: str) -> dict[str, int]:
    """The counts of `model`'s conversations, as the rollup has them (zeros left out)."""
    rows = db.execute(
        """
        SELECT status, sum(conversations)::int FROM conversation_counts WHERE model = %s
        GROUP BY status HAVING sum(conversations) <> 0
        """,
        (model,),
    ).fetchall()
    return dict(rows)


def actual(db: psycopg.Connection, model: str) -> dict[str, int]:
    """The counts of `model`'s conversations, counted in the table itself."""
    rows = db.execute(
        "SELECT status, count(*)::int FROM conversations WHERE model = %s GROUP BY status",
        (model,),
    ).fetchall()
    return dict(rows)


def new(model: str, owner_id: UUID) -> NewConversation:
    return NewConversation(uuid4(), "a prompt", model, "demo", owner_id)


def hold_instance_lock(db: psycopg.Connection, owner_id: UUID) -> None:
    """Hold `owner_id`'s instance lock on `db`, as a live process's lease does: the
    recovery sweeps of the session's servers (same database) then leave its rows alone."""
    db.execute(
        "SELECT pg_advisory_lock(%s, hashtext(%s::text))",
        (store.INSTANCE_LOCK_NAMESPACE, str(owner_id)),
    )


async def test_every_store_path_keeps_the_counts_equal_to_the_table(
    database_url: str, db: psycopg.Connection
) -> None:
    model, owner = f"counts-{word()}", uuid4()
    hold_instance_lock(db, owner)
    conversations = [new(model, owner) for _ in range(5)]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.insert_conversations(conn, conversations)
        # A retry after a lost acknowledgement finds the rows: they are not counted twice.
        await store.insert_conversations(conn, conversations)
        assert counted(db, model) == actual(db, model) == {"streaming": 5}
        ends = [
            Ending(conversations[0].id, Status.COMPLETED),
            Ending(conversations[1].id, Status.FAILED, ErrorCode.UPSTREAM_ERROR, "broken"),
        ]
        await store.finish_conversations(conn, ends, owner)
        # An end recorded again (a retry) changes no row, so no count either.
        await store.finish_conversations(conn, ends, owner)
        await store.delete_unconfirmed_conversations(conn, [conversations[2].id])
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        await recovery_store.interrupt_conversations(
            pool, owner_id=owner, except_ids=[conversations[3].id]
        )
    expected = {"completed": 1, "failed": 1, "interrupted": 1, "streaming": 1}
    assert actual(db, model) == expected
    assert counted(db, model) == expected


def test_sql_run_by_hand_keeps_the_counts_too(db: psycopg.Connection) -> None:
    model = f"counts-{word()}"
    db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, completed_at, model, provider)
        SELECT gen_random_uuid(), 'p', 'r', s, now(), %s, 'demo'
        FROM unnest(ARRAY['completed', 'completed', 'failed']) AS s
        """,
        (model,),
    )
    db.execute(
        "UPDATE conversations SET status = 'cancelled' WHERE model = %s AND status = 'failed'",
        (model,),
    )
    assert counted(db, model) == actual(db, model) == {"completed": 2, "cancelled": 1}
    db.execute("DELETE FROM conversations WHERE model = %s AND status = 'completed'", (model,))
    assert counted(db, model) == actual(db, model) == {"cancelled": 1}


async def test_a_dead_processs_streams_settled_by_another_are_counted_as_interrupted(
    database_url: str, db: psycopg.Connection
) -> None:
    model, dead, settler = f"counts-{word()}", uuid4(), uuid4()
    # Its lock was taken on this server start and is free now: it died.
    db.execute(
        "INSERT INTO instances (id, server_started_at) VALUES (%s, pg_postmaster_start_time())",
        (dead,),
    )
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await store.insert_conversations(conn, [new(model, dead) for _ in range(3)])
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        # `dead` never took an instance lock: no process holds it, so it is dead.
        settled = await recovery_store.interrupt_orphaned_conversations(
            pool, settler_id=settler, quiet_server=None
        )
    assert len(settled) >= 3
    assert counted(db, model) == actual(db, model) == {"interrupted": 3}


async def test_folding_past_hours_keeps_every_sum_and_merges_the_writers_rows(
    database_url: str, db: psycopg.Connection
) -> None:
    model = f"counts-{word()}"
    owners = [uuid4(), uuid4()]
    for owner in owners:
        hold_instance_lock(db, owner)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for owner in owners:
            conversations = [new(model, owner) for _ in range(2)]
            await store.insert_conversations(conn, conversations)
            await store.finish_conversations(
                conn, [Ending(conversations[0].id, Status.COMPLETED)], owner
            )
    # As if these were written three hours ago.
    db.execute(
        "UPDATE conversation_counts SET bucket = bucket - %s WHERE model = %s",
        (timedelta(hours=3), model),
    )
    before = counted(db, model)
    assert before == {"completed": 2, "streaming": 2}
    async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
        await rollup_store.fold_counts(pool)
    assert counted(db, model) == before
    writers = db.execute(
        "SELECT DISTINCT writer FROM conversation_counts WHERE model = %s", (model,)
    ).fetchall()
    assert writers == [(rollup_store.NO_WRITER,)]


async def test_the_dashboards_counts_come_from_the_rollup(
    database_url: str, db: psycopg.Connection
) -> None:
    model = f"counts-{word()}"
    db.execute(
        """
        INSERT INTO conversation_counts (bucket, model, provider, status, writer, conversations)
        VALUES (date_trunc('hour', now(), 'UTC'), %s, 'demo', 'cancelled', %s, 1000000)
        """,
        (model, uuid4()),
    )
    try:
        async with AsyncConnectionPool(database_url, kwargs={"autocommit": True}) as pool:
            counts = {c.status: c.count for c in await history_queries.count_by_status(pool)}
        # A million cancelled conversations that are not in the table: read, not counted.
        assert counts["cancelled"] >= 1_000_000
    finally:
        db.execute("DELETE FROM conversation_counts WHERE model = %s", (model,))


@pytest.mark.parametrize("cancel", [False, True])
def test_streams_through_a_real_server_keep_the_counts(
    openai_server: RunningServer, db: psycopg.Connection, cancel: bool
) -> None:
    model = f"counts-{word()}"
    with httpx.Client(base_url=openai_server.url, timeout=30) as client:
        for _ in range(3):
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
            if cancel:
                body["stream"] = True
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    conversation_id = response.headers["x-conversation-id"]
                    client.post(f"/conversations/{conversation_id}/cancel")
                    for _ in response.iter_lines():
                        pass
            else:
                assert client.post("/v1/chat/completions", json=body).status_code == 200
    # The last end commits just after its client is told.
    wait_until(lambda: "streaming" not in actual(db, model), message="streams did not end")
    assert counted(db, model) == actual(db, model)
    assert sum(actual(db, model).values()) == 3
