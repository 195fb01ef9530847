"""The `sse-llm` command: `serve` runs the service, `migrate` applies the migrations alone,
`prune` deletes old conversations (SPEC 10, retention.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from types import FrameType
from typing import Any

import psycopg
import uvicorn

from sse_llm import retention
from sse_llm.config import ConfigError, Settings, check_days, parse_days
from sse_llm.database import EmbeddedPostgres, apply_migrations
from sse_llm.http_protocol import BoundedHttpToolsProtocol
from sse_llm.logs import logging_config

log = logging.getLogger("sse_llm")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env()
        if args.command == "serve":
            changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
            settings = settings.with_changes(**changes)
        if args.command == "prune":
            args.older_than = _older_than(args.older_than, settings)
    except ConfigError as exc:
        print(f"sse-llm: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_format))
    # uvicorn re-raises the signal that stopped it once it has shut down; as an exception
    # it unwinds through the ExitStack, which stops the embedded PostgreSQL cleanly.
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return _run(args, settings)
    except (_Stop, KeyboardInterrupt):
        return 0


class _Stop(Exception):
    """SIGTERM arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _run(args: argparse.Namespace, settings: Settings) -> int:
    with ExitStack() as stack:
        database_url = settings.database_url
        if database_url is None:
            database_url = stack.enter_context(EmbeddedPostgres(settings.data_dir)).url
        if args.command == "migrate":
            applied = apply_migrations(database_url)
            print(f"applied {len(applied)} migration(s)" if applied else "nothing to migrate")
            return 0
        if args.command == "prune":
            return prune(database_url, args.older_than, args.dry_run, args.include_reviewed)
        serve(settings.with_changes(database_url=database_url), workers=args.workers)
    return 0


def serve(settings: Settings, workers: int) -> None:
    """Run uvicorn; with several workers each one builds its app from the environment."""
    from sse_llm.app import create_app

    apply_migrations(settings.database_url or "")  # once, before any worker starts
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        # Ends streams still open once the shutdown grace is over (the app marks them).
        "timeout_graceful_shutdown": int(settings.shutdown_grace) + 5,
        "log_config": logging_config(settings.log_format),  # each worker configures its own
        "access_log": False,  # sse_llm.requests logs each request, with its request id
        "http": BoundedHttpToolsProtocol,
    }
    if workers > 1:
        os.environ["DATABASE_URL"] = settings.database_url or ""
        # --host and --port too: a worker's Host allow-list depends on where it listens.
        os.environ["SSE_LLM_HOST"] = settings.host
        os.environ["SSE_LLM_PORT"] = str(settings.port)
        # Workers share their metrics through files here (see metrics.py).
        metrics_dir = tempfile.mkdtemp(prefix="sse-llm-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            uvicorn.run(
                "sse_llm.app:create_app_from_environment", factory=True, workers=workers, **options
            )
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    else:
        # The migrations ran above: the app need not apply them again.
        uvicorn.run(create_app(settings, migrate=False), **options)


# `sse-llm prune`'s exit status when another pruner holds the lock (0: done; 1: failed;
# 2: a bad setting or option).
ANOTHER_PRUNER = 3


def prune(database_url: str, older_than: float, dry_run: bool, include_reviewed: bool) -> int:
    """Delete (or with `dry_run` count) the conversations older than `older_than` days."""
    try:
        if dry_run:
            _print_census(asyncio.run(retention.census(database_url, older_than)), include_reviewed)
            return 0
        result = asyncio.run(
            retention.prune(
                database_url, older_than, include_reviewed=include_reviewed, on_batch=_progress()
            )
        )
    except retention.AnotherPruner:
        print(
            "sse-llm: another pruner is running (a service's background pruner or another "
            "`sse-llm prune`): nothing deleted, try again later",
            file=sys.stderr,
        )
        return ANOTHER_PRUNER
    except retention.NotMigrated as exc:
        print(f"sse-llm: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:  # the database away, a batch over its timeout...
        print(f"sse-llm: pruning stopped, what was deleted stays deleted: {exc}", file=sys.stderr)
        return 1
    print(
        f"deleted {result.deleted} conversations created before {result.cutoff.isoformat()} "
        f"in {result.batches} batches ({result.seconds:.1f} s, "
        f"longest batch {result.longest_batch_seconds * 1000:.0f} ms)"
    )
    return 0


def _print_census(census: retention.Census, include_reviewed: bool) -> None:
    print(f"dry run, nothing deleted: conversations created before {census.cutoff.isoformat()}")
    for row in census.rows:
        reviewed = "reviewed" if row.reviewed else "unreviewed"
        if row.deleted(include_reviewed):
            verdict = "would delete"
        elif row.status == "streaming":
            verdict = "would keep (still streaming)"
        else:
            verdict = "would keep (reviewed; --include-reviewed deletes these too)"
        print(f"  {row.status:<12} {reviewed:<10} {row.conversations:>10}  {verdict}")
    print(f"would delete {census.would_delete(include_reviewed)} conversations")


def _progress() -> Callable[[retention.PruneResult], None]:
    """A progress callback that logs a line every 10 seconds of a long prune."""
    last = time.monotonic()

    def report(result: retention.PruneResult) -> None:
        nonlocal last
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            log.info("pruning: %d conversations deleted so far", result.deleted)

    return report


def _older_than(option: str | None, settings: Settings) -> float:
    """--older-than DAYS, or else SSE_LLM_RETENTION_DAYS; validated like the setting."""
    if option is None:
        if settings.retention_days is None:
            raise ConfigError("prune needs --older-than DAYS (or SSE_LLM_RETENTION_DAYS)")
        return settings.retention_days
    try:
        days = parse_days(option.strip())
    except ValueError:
        raise ConfigError(
            f"--older-than must be a number of days (fractions allowed), not {option!r}"
        ) from None
    check_days("--older-than", days)
    return days


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sse-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser(
        "serve", help="run the service (embedded PostgreSQL by default)"
    )
    serve_cmd.add_argument(
        "--host", help="address to listen on (default SSE_LLM_HOST or 127.0.0.1)"
    )
    serve_cmd.add_argument(
        "--port", type=int, help="port to listen on (default SSE_LLM_PORT or 8000)"
    )
    serve_cmd.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    commands.add_parser("migrate", help="apply the database migrations and exit")
    prune_cmd = commands.add_parser(
        "prune",
        help="delete conversations older than some days, with everything attached",
        description="Delete the conversations created more than DAYS days ago, with their "
        "chunks, deliveries, reviews and annotations; never a streaming one, and reviewed "
        "ones only with --include-reviewed. Exits with 3 if another pruner is running.",
    )
    prune_cmd.add_argument(
        "--older-than",
        metavar="DAYS",
        help="age in days, fractions allowed (default SSE_LLM_RETENTION_DAYS)",
    )
    prune_cmd.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    prune_cmd.add_argument(
        "--include-reviewed", action="store_true", help="delete reviewed conversations too"
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
