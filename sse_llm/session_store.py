"""The SQL of browser sessions (SPEC 8; sse_llm/access.py): a row per sign-in, keyed by a
hash of the cookie's token. Times come from the database's clock, the one every replica
shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who, and until when."""

    token_hash: bytes
    reviewer: str
    created_at: datetime
    expires_at: datetime


async def create_session(
    pool: AsyncConnectionPool, token_hash: bytes, reviewer: str, seconds: int
) -> Session:
    """Record a new session that lasts `seconds` from now."""
    query = """
        INSERT INTO sessions (token_hash, reviewer, expires_at)
        VALUES (%(hash)s, %(reviewer)s, now() + make_interval(secs => %(seconds)s))
        RETURNING token_hash, reviewer, created_at, expires_at
    """
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Session))
        await cursor.execute(query, {"hash": token_hash, "reviewer": reviewer, "seconds": seconds})
        session = await cursor.fetchone()
        assert session is not None
        return session


async def find_session(pool: AsyncConnectionPool, token_hash: bytes) -> Session | None:
    """The session with this hash, unless it has expired or been revoked."""
    query = """
        SELECT token_hash, reviewer, created_at, expires_at FROM sessions
        WHERE token_hash = %s AND revoked_at IS NULL AND expires_at > now()
    """
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Session))
        await cursor.execute(query, (token_hash,))
        return await cursor.fetchone()


async def revoke_session(pool: AsyncConnectionPool, token_hash: bytes) -> None:
    """End a session (sign-out): from now on no replica accepts its cookie."""
    query = "UPDATE sessions SET revoked_at = now() WHERE token_hash = %s AND revoked_at IS NULL"
    async with pool.connection() as conn:
        await conn.execute(query, (token_hash,))


async def delete_expired_sessions(pool: AsyncConnectionPool, limit: int = 100) -> int:
    """Delete up to `limit` expired sessions, oldest first; return how many."""
    query = """
        DELETE FROM sessions WHERE token_hash IN (
            SELECT token_hash FROM sessions WHERE expires_at <= now()
            ORDER BY expires_at LIMIT %s
        )
    """
    async with pool.connection() as conn:
        cursor = await conn.execute(query, (limit,))
        return cursor.rowcount
