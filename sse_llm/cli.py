"""The `sse-llm` command: `serve` runs the service, `migrate` applies the migrations alone."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import shutil
import signal
import sys
import tempfile
from contextlib import ExitStack
from types import FrameType
from typing import Any

import uvicorn

from sse_llm.config import ConfigError, Settings
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
    return parser


if __name__ == "__main__":
    sys.exit(main())
