"""create_app(settings): routes, error handlers, and the lifespan that builds the parts."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

from sse_starlette.sse import AppStatus
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sse_llm import (
    access,
    agreement_pages,
    api,
    dashboard,
    deliveries,
    export,
    insights_pages,
    openai_api,
    review_pages,
    review_queue,
    reviews_api,
    stats_api,
)
from sse_llm.access import AccessControl
from sse_llm.admission import Admission
from sse_llm.broadcast import Broadcast
from sse_llm.compaction import Compactor
from sse_llm.config import ConfigError, Settings, parse_rate
from sse_llm.dashboard import create_templates
from sse_llm.database import apply_migrations, open_pool, open_query_pool
from sse_llm.errors import EXCEPTION_HANDLERS
from sse_llm.generation import Generations
from sse_llm.hosts import HostAllowList, HostPolicy, warn_if_any_host
from sse_llm.lease import InstanceLease
from sse_llm.limits import RateLimiter
from sse_llm.metrics import Metrics
from sse_llm.openapi import openapi_endpoint
from sse_llm.providers import create_provider
from sse_llm.request_log import RequestLog
from sse_llm.resources import resource_dir
from sse_llm.service import Base, Lifecycle, Service
from sse_llm.writer import Writer

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, migrate: bool = True) -> Starlette:
    """The ASGI app. `settings.database_url` must be set (the CLI starts the embedded one).

    With `migrate`, pending migrations are applied at startup.
    """
    if not settings.database_url:
        raise ConfigError("create_app needs settings.database_url (sse-llm serve sets it)")
    metrics = Metrics()
    app = Starlette(
        routes=[
            *api.routes,
            *deliveries.routes,
            *export.routes,
            *dashboard.routes,
            *access.routes,
            *openai_api.routes,
            *reviews_api.routes,
            *review_pages.routes,
            *review_queue.routes,
            *agreement_pages.routes,
            *stats_api.routes,
            *insights_pages.routes,
            Route("/openapi.json", openapi_endpoint, methods=["GET"]),
            Mount("/static", StaticFiles(directory=resource_dir("static")), name="static"),
        ],
        middleware=[
            # Outermost first: every request is logged and counted, refused ones included.
            Middleware(RequestLog, metrics=metrics),
            Middleware(HostAllowList, policy=HostPolicy.from_settings(settings)),
            Middleware(AccessControl, api_key=settings.api_key),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.base = Base(
        settings=settings,
        metrics=metrics,
        rate_limiter=RateLimiter(*parse_rate(settings.rate_limit)) if settings.rate_limit else None,
        templates=create_templates(),
        lifecycle=Lifecycle(),
        migrate=migrate,
        exports=asyncio.Semaphore(settings.max_exports),
    )
    return app


def create_app_from_environment() -> Starlette:
    """The factory `sse-llm serve --workers N` runs in each worker (it migrated already)."""
    return create_app(Settings.from_env(), migrate=False)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Build the pools, provider, writer, generations, lease and broadcast; tear down in reverse."""
    base: Base = app.state.base
    settings = base.settings
    database_url = settings.database_url
    assert database_url is not None  # checked by create_app
    if base.migrate:
        await asyncio.to_thread(apply_migrations, database_url)
    pool = await open_pool(database_url)
    # The history's lists, searches and counts, apart: they never queue before a resume.
    query_pool = await open_query_pool(database_url, settings.query_timeout)
    provider = create_provider(settings)
    metrics = base.metrics
    writer = Writer(database_url, settings.storage_timeout, metrics)
    generations = Generations(provider, writer, pool, settings, metrics)
    admission = Admission(
        writer.lag, settings.overload_lag, settings.queue_timeout, metrics.waiting_streams
    )

    # What the lease's self-sweep must spare: streams running here, and those whose end
    # the writer still holds to retry (their clients were told; the row must say so).
    def unsettled() -> list[UUID]:
        return [*generations.ids(), *writer.unsettled_ids()]

    lease = InstanceLease(
        database_url,
        pool,
        unsettled,
        generations.cancel,
        settings.lease_interval,
        retention_days=settings.retention_days,
    )
    await lease.start()
    # Started once the instance id is final: the writer's chunks and ends are fenced by it.
    writer.start(lease.instance_id)
    broadcast = Broadcast(
        database_url,
        on_cancel=generations.cancel,
        on_connect=lease.apply_cancels,
        check_interval=settings.lease_interval,
    )
    broadcast.start()
    compactor = Compactor(pool, settings.compaction_interval, settings.compaction_batch, writer.lag)
    compactor.start()
    service = Service(
        **vars(base),
        pool=pool,
        query_pool=query_pool,
        provider=provider,
        writer=writer,
        generations=generations,
        admission=admission,
        lease=lease,
        broadcast=broadcast,
    )
    app.state.service = service
    drain = asyncio.create_task(_drain_on_exit(service), name="drain-on-exit")
    if not settings.api_key:
        log.warning("SSE_LLM_API_KEY is not set: anyone who can reach this service can use it")
    warn_if_any_host(settings)
    log.info("ready: provider=%s model=%s", provider.name, provider.model)
    # The ~70,000 objects of imports and startup live as long as the process: left to the
    # collector, every full collection walks them all and stalls every stream (60 ms
    # pauses, the p99 chunk latency at C=100); frozen, they are never walked again.
    gc.freeze()
    try:
        yield
    finally:
        if base.lifecycle.shutting_down:
            await drain  # started at the signal; it ends within the grace period
        else:
            drain.cancel()  # stopped without a signal (tests, embedding apps)
            base.lifecycle.shutting_down = True
            await generations.shutdown(settings.shutdown_grace)
        await compactor.close()
        await writer.close()
        await lease.release()
        await broadcast.close()
        await provider.aclose()
        await query_pool.close()
        await pool.close()


async def _drain_on_exit(service: Service) -> None:
    """On SIGTERM/SIGINT: refuse new streams, let running ones finish, interrupt the rest.

    uvicorn runs the lifespan shutdown only once every connection has closed; open SSE
    connections close when their generation ends, so the drain must start at the signal.
    """
    # uvicorn offers no shutdown hook before connections drain; sse-starlette's patch of
    # its exit handler sets AppStatus.should_exit, so a cheap poll is the simplest signal.
    lifecycle = service.lifecycle
    while not (AppStatus.should_exit or lifecycle.exit_requested):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    lifecycle.shutting_down = True
    await service.generations.shutdown(service.settings.shutdown_grace)
