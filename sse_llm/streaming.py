"""How a stream starts and is served, for both front doors (api.py and openai_api.py).

`may_start` is the one decision "may this stream start?"; `start_generation` takes the
stream from there to a running generation with its first subscriber; `sse_response`
serves what a subscriber hears as Server-Sent Events.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.types import Message, Send

from sse_llm.contract import ErrorCode
from sse_llm.deliveries import Delivery
from sse_llm.errors import ApiError
from sse_llm.generation import Generation, Subscriber
from sse_llm.limits import client_key
from sse_llm.service import Service, service_of
from sse_llm.store import Conversation, NewConversation

# Sent first on attach: how long EventSource waits before reconnecting (ms).
RETRY_HINT = b"retry: 1000\n\n"


async def may_start(request: Request) -> None:
    """Admit a new stream, or raise the refusal (SPEC 6): shutting down (503), past the rate
    limit (429), past SSE_LLM_MAX_STREAMS (503), or gone while waiting out an overload.

    On return the request holds one of the cap's slots and an admission pass, both handed
    to its generation by `start_generation` (or given back if it fails first).
    """
    service = service_of(request)
    _refuse_if_shutting_down(service)
    _take_rate_limit(request, service)
    # Checked and taken in one step, with no await between: a burst cannot all pass.
    if not service.generations.reserve():
        message = "Too many streams are running. Try again shortly."
        raise ApiError(503, ErrorCode.TOO_MANY_STREAMS, message, {"Retry-After": "1"})
    try:
        waited = await service.admission.enter()  # waits while the process is overloaded
        if waited:
            try:
                if await request.is_disconnected():
                    message = "The client went away while waiting."
                    raise ApiError(499, ErrorCode.CLIENT_CLOSED, message)
                _refuse_if_shutting_down(service)  # the rate limit is paid, the slot taken
            except BaseException:
                service.admission.leave()
                raise
    except BaseException:
        service.generations.release()
        raise


def _refuse_if_shutting_down(service: Service) -> None:
    if service.lifecycle.shutting_down:
        message = "The service is shutting down. Try another replica."
        raise ApiError(503, ErrorCode.SHUTTING_DOWN, message)


def _take_rate_limit(request: Request, service: Service) -> None:
    if service.rate_limiter is None:
        return
    wait = service.rate_limiter.acquire(client_key(request))
    if wait is not None:
        retry_after = str(max(1, math.ceil(wait)))
        message = f"Too many streams started. Try again in {retry_after} s."
        raise ApiError(429, ErrorCode.RATE_LIMITED, message, {"Retry-After": retry_after})


async def start_generation(
    request: Request,
    prompt: str,
    *,
    model: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[Conversation, Generation, Subscriber]:
    """Admit a new stream, create its conversation, start it, and subscribe to it."""
    service = service_of(request)
    await may_start(request)  # from here on, a slot and an admission pass are held
    try:
        # The row exists before the first byte is sent: the id in the headers is real.
        new = NewConversation(
            id=uuid4(),
            prompt=prompt,
            model=model or service.provider.model,
            provider=service.provider.name,
            owner_id=service.lease.instance_id,
            messages=messages,
            parameters=parameters,
        )
        conversation = await service.writer.create(new)
    except BaseException:
        service.admission.leave()
        service.generations.release()
        raise
    # No await from here on: the slot and the admission pass to the generation at once.
    generation = service.generations.start(
        conversation, request.scope.get("state", {}).get("request_id")
    )
    admission = service.admission
    assert generation.task is not None  # start() made it
    generation.task.add_done_callback(lambda _: admission.leave())
    subscriber = generation.subscribe()  # before any await: no chunk can be missed
    return conversation, generation, subscriber


class EventStream(EventSourceResponse):
    """sse-starlette's response, minus the timeout scope it opens around every send.

    A client that stops reading is dropped by the HTTP protocol instead (see
    http_protocol.py), at no cost per send. Should sse-starlette rename this hook, the
    override just stops applying: with `send_timeout=None` its own version is correct too.
    """

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        await send(message)


def sse_response(
    request: Request, events: AsyncIterator[bytes], headers: dict[str, str]
) -> EventSourceResponse:
    """The SPEC 2 response: event-stream headers and `headers`."""
    settings = service_of(request).settings
    return EventStream(
        events,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        # Keep-alive comments come from the event iterators, when a stream has been idle
        # (SPEC 2): sse-starlette's ping would cost a task per stream.
        ping=0,
        sep="\n",
        send_timeout=None,
        # A graceful shutdown ends each stream with its generation (see app._drain_on_exit);
        # this is only a backstop should one hang.
        shutdown_grace_period=settings.shutdown_grace + 5,
    )


async def closing(
    events: AsyncIterator[bytes], on_close: Callable[[], None], delivery: Delivery | None = None
) -> AsyncIterator[bytes]:
    """Run `on_close` however the stream ends: finished, or the client went away.

    With `delivery`, record it: opened with the first piece (a response never started
    sends nothing), each piece sent once the next is asked for, ended here.
    """
    if delivery is not None:
        delivery.open()
    try:
        async for data in events:
            yield data
            if delivery is not None:
                delivery.sent()
    finally:
        on_close()
        if delivery is not None:
            delivery.close()
