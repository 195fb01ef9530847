"""The service's parts, typed, in one place: what create_app makes, and what the lifespan adds.

Routes reach them through `service_of(request)`, never through untyped `app.state`
attributes: a renamed or missing part is a type error, not an AttributeError at 3 a.m.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

from psycopg_pool import AsyncConnectionPool
from starlette.requests import HTTPConnection
from starlette.templating import Jinja2Templates

from sse_llm.admission import Admission
from sse_llm.broadcast import Broadcast
from sse_llm.config import Settings
from sse_llm.generation import Generations
from sse_llm.lease import InstanceLease
from sse_llm.limits import RateLimiter
from sse_llm.metrics import Metrics
from sse_llm.providers import Provider
from sse_llm.writer import Writer


@dataclass
class Lifecycle:
    """The flags that change while the process runs (all else here is fixed once built)."""

    shutting_down: bool = False  # refuse new streams; running ones drain (app._drain_on_exit)
    exit_requested: bool = False  # set by tests that stop a server without a signal


@dataclass(frozen=True)
class Base:
    """Made by create_app, before the event loop runs: settings and what needs no I/O."""

    settings: Settings
    metrics: Metrics
    rate_limiter: RateLimiter | None
    templates: Jinja2Templates  # compiled once, for every page
    lifecycle: Lifecycle
    migrate: bool  # apply pending migrations at startup
    exports: asyncio.Semaphore  # one slot per GET /export running (settings.max_exports)


@dataclass(frozen=True)
class Service(Base):
    """Made by the lifespan: the pools, the provider and the streaming path's parts."""

    pool: AsyncConnectionPool  # the streaming path's reads: attach, resume, cancel, one row
    query_pool: AsyncConnectionPool  # the history's lists and searches, under a timeout
    provider: Provider
    writer: Writer
    generations: Generations
    admission: Admission
    lease: InstanceLease
    broadcast: Broadcast


def service_of(connection: HTTPConnection) -> Service:
    """The running service's parts (the lifespan sets them before any request is served)."""
    return cast(Service, connection.app.state.service)
