"""The JSON and SSE routes: stream a prompt's answer, read the history."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any
from uuid import UUID, uuid4

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Send

from sse_llm import store
from sse_llm.broadcast import follow_remote, outcome_of
from sse_llm.errors import ApiError
from sse_llm.events import chunk_events, live_events, start_event
from sse_llm.generation import Generation, Subscriber
from sse_llm.limits import client_key
from sse_llm.request_body import parse_json_object
from sse_llm.store import STATUSES, Chunk, Conversation, NewConversation, Outcome

# Sent first on attach: how long EventSource waits before reconnecting (ms).
RETRY_HINT = b"retry: 1000\n\n"

MAX_BODY_BYTES = 1024 * 1024
MAX_QUERY_CHARS = 1000
MAX_OFFSET = 1_000_000_000


async def stream(request: Request) -> Response:
    """POST /stream: start a generation and stream it as Server-Sent Events (SPEC 2)."""
    body = await read_json_object(request)
    prompt = validate_prompt(body, request.app.state.settings.max_prompt_chars)
    conversation, generation, subscriber = await start_generation(request, prompt)
    events = live_events(conversation.id, subscriber.updates(), start_event(conversation))
    return sse_response(
        request,
        closing(events, lambda: generation.unsubscribe(subscriber)),
        {"X-Conversation-Id": str(conversation.id)},
    )


async def start_generation(
    request: Request,
    prompt: str,
    *,
    model: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[Conversation, Generation, Subscriber]:
    """Admit a new stream, create its conversation, start it, and subscribe to it."""
    state = request.app.state
    admit_stream(request)  # from here on, this request holds a slot of SSE_LLM_MAX_STREAMS
    admission = state.admission
    try:
        waited = await admission.enter()  # waits while the process is overloaded
    except BaseException:
        state.generations.release()
        raise
    try:
        if waited:
            if await request.is_disconnected():
                raise ApiError(499, "client_closed", "The client went away while waiting.")
            admit_stream(request, again=True)
        # The row exists before the first byte is sent: the id in the headers is real.
        new = NewConversation(
            id=uuid4(),
            prompt=prompt,
            model=model or state.provider.model,
            provider=state.provider.name,
            owner_id=state.lease.instance_id,
            messages=messages,
            parameters=parameters,
        )
        conversation = await state.writer.create(new)
    except BaseException:
        admission.leave()
        state.generations.release()
        raise
    # No await from here on: the slot and the admission pass to the generation at once.
    generation: Generation = state.generations.start(
        conversation, request.scope.get("state", {}).get("request_id")
    )
    generation.task.add_done_callback(lambda _: admission.leave())  # type: ignore[union-attr]
    subscriber = generation.subscribe()  # before any await: no chunk can be missed
    return conversation, generation, subscriber


def admit_stream(request: Request, *, again: bool = False) -> None:
    """Refuse a new stream while shutting down, past the rate limit, or past the cap; else
    take one of the cap's slots (`generations.start()` takes it over, or `release()`).

    `again`: after waiting for admission, when the rate limit is paid and the slot taken.
    """
    state = request.app.state
    if state.shutting_down:
        raise ApiError(503, "shutting_down", "The service is shutting down. Try another replica.")
    if again:
        return
    if state.rate_limiter is not None:
        wait = state.rate_limiter.acquire(client_key(request))
        if wait is not None:
            retry_after = str(max(1, math.ceil(wait)))
            message = f"Too many streams started. Try again in {retry_after} s."
            raise ApiError(429, "rate_limited", message, {"Retry-After": retry_after})
    # Checked and taken in one step, with no await between: a burst cannot all pass.
    if not state.generations.reserve():
        message = "Too many streams are running. Try again shortly."
        raise ApiError(503, "too_many_streams", message, {"Retry-After": "1"})


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
    settings = request.app.state.settings
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


async def attach(request: Request) -> Response:
    """GET /conversations/{id}/stream: replay after Last-Event-ID, then follow live (SPEC 3)."""
    state = request.app.state
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    after = _last_event_id(request)
    generation: Generation | None = state.generations.get(conversation_id)
    # Subscribing before reading the database means no chunk can fall between the two.
    subscriber = generation.subscribe() if generation is not None else None
    on_close = partial(generation.unsubscribe, subscriber) if generation else _nothing
    try:
        conversation = await store.get_conversation(state.pool, conversation_id)
        if conversation is None:
            raise ApiError(404, "not_found", "No conversation has this id.")
        replay = await store.read_chunks(state.pool, conversation_id, after)
    except BaseException:
        on_close()
        raise
    last = replay[-1].seq if replay else after
    updates: AsyncIterator[tuple[list[Chunk], Outcome | None]]
    if subscriber is not None:
        updates = skip_seen(subscriber.updates(), last)
    elif conversation.status == "streaming":  # generated by another process
        updates = follow_remote(
            state.pool, state.broadcast, conversation_id, last, state.settings.ping_interval
        )
    elif replay:
        updates = _ended(outcome_of(conversation, last))
    else:
        return Response(status_code=204)  # ended, nothing new: EventSource stops reconnecting
    first = RETRY_HINT + (start_event(conversation) if after == 0 else b"") + chunk_events(replay)
    events = live_events(conversation_id, updates, first)
    headers = {"X-Conversation-Id": str(conversation.id)}
    return sse_response(request, closing(events, on_close), headers)


async def cancel(request: Request) -> Response:
    """POST /conversations/{id}/cancel: stop a running generation, in whichever process (SPEC 3)."""
    state = request.app.state
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    # Recorded in the row, the cancel survives a lost notification (see lease.py).
    status = await store.request_cancel(state.pool, conversation_id)
    if status is None:
        raise ApiError(404, "not_found", "No conversation has this id.")
    if status != "streaming":
        raise ApiError(409, "already_ended", f"The conversation has already ended ({status}).")
    state.generations.cancel(conversation_id)  # at once, if it runs here
    return JSONResponse({"id": str(conversation_id), "status": "cancelling"}, status_code=202)


async def skip_seen(
    updates: AsyncIterator[tuple[list[Chunk], Outcome | None]], last: int
) -> AsyncIterator[tuple[list[Chunk], Outcome | None]]:
    """Drop live chunks the replay already sent (they were committed during the replay read)."""
    async for chunks, outcome in updates:
        fresh = [chunk for chunk in chunks if chunk.seq > last]
        if chunks and not fresh and outcome is None:
            continue  # all replayed already; an empty update would read as a ping
        yield fresh, outcome


def _nothing() -> None:
    pass


async def _ended(outcome: Outcome) -> AsyncIterator[tuple[list[Chunk], Outcome | None]]:
    yield [], outcome


def _last_event_id(request: Request) -> int:
    """Where to resume: the Last-Event-ID header, else ?last_event_id=, else the start."""
    raw = request.headers.get("last-event-id")
    if raw is None:
        raw = request.query_params.get("last_event_id")
    if raw is None or raw.strip() == "":
        return 0
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= 2**31 - 1:
        raise ApiError(422, "validation_error", "Last-Event-ID must be a chunk number (0 or more).")
    return value


async def closing(
    events: AsyncIterator[bytes], on_close: Callable[[], None]
) -> AsyncIterator[bytes]:
    """Run `on_close` however the stream ends: finished, or the client went away."""
    try:
        async for data in events:
            yield data
    finally:
        on_close()


async def history(request: Request) -> Response:
    """GET /history: conversations newest first, with search and a status filter (SPEC 4)."""
    limit = _int_param(request, "limit", default=20, low=1, high=100)
    offset = _int_param(request, "offset", default=0, low=0, high=MAX_OFFSET)
    raw_query = request.query_params.get("q", "")
    query = raw_query.strip() or None
    if len(raw_query) > MAX_QUERY_CHARS or "\x00" in raw_query:
        raise ApiError(
            422, "validation_error", f"q must be at most {MAX_QUERY_CHARS} characters without NUL."
        )
    status = request.query_params.get("status", "").strip() or None
    if status is not None and status not in STATUSES:
        raise ApiError(422, "validation_error", f"status must be one of: {', '.join(STATUSES)}.")
    # Its cost grows with the history (a search, a deep page): the query pool, under a
    # statement timeout, so a flood of them queues there and not before a resume.
    page = await store.list_conversations(
        request.app.state.query_pool, limit=limit, offset=offset, query=query, status=status
    )
    return JSONResponse(
        {
            "items": [conversation_json(c) for c in page.items],
            "limit": limit,
            "offset": offset,
            "has_more": page.has_more,
        }
    )


async def history_item(request: Request) -> Response:
    """GET /history/{id}: one conversation; a streaming one shows what is persisted so far."""
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    # One row, read as attach reads it: the main pool. A client checking how its stream
    # ended must not be turned away because others flood the searches.
    conversation = await store.get_conversation(request.app.state.pool, conversation_id)
    if conversation is None:
        raise ApiError(404, "not_found", "No conversation has this id.")
    return JSONResponse(conversation_json(conversation))


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is up."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """GET /readyz: 200 when the database answers, else 503."""
    try:
        async with asyncio.timeout(2):  # a probe wants an answer, not a wait
            await store.ping_database(request.app.state.pool)
    except Exception:
        raise ApiError(503, "database_unavailable", "The database does not answer.") from None
    return JSONResponse({"status": "ready"})


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a storable JSON object, or the SPEC 6 error (415, 413, 400, 422)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "Send the body as Content-Type: application/json."
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()  # refused before reading a byte of it
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    # Parsed, and every string in it checked storable, before anything is queued.
    return parse_json_object(bytes(body))


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large", f"The body must be at most {MAX_BODY_BYTES} bytes.")


def validate_prompt(body: dict[str, Any], max_chars: int) -> str:
    """The trimmed prompt, or a 422 whose message names the field."""
    unknown = sorted(set(body) - {"prompt"})
    if unknown:
        raise ApiError(
            422, "validation_error", f"Unknown field: {unknown[0]!r}. Only 'prompt' is accepted."
        )
    if "prompt" not in body:
        raise ApiError(422, "validation_error", "prompt is required.")
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise ApiError(422, "validation_error", "prompt must be a string.")
    # NUL and lone surrogates were refused with the rest of the body (read_json_object).
    prompt = prompt.strip()
    if not prompt:
        raise ApiError(422, "validation_error", "prompt must not be empty.")
    if len(prompt) > max_chars:
        raise ApiError(422, "validation_error", f"prompt must be at most {max_chars} characters.")
    return prompt


def parse_conversation_id(raw: str) -> UUID:
    """A conversation id from a URL; anything that is not a UUID is simply not found."""
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(404, "not_found", "No conversation has this id.") from None


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    """The SPEC 4 `<conversation>` object."""
    error = None
    if conversation.error_code:
        error = {"code": conversation.error_code, "message": conversation.error_message}
    return {
        "id": str(conversation.id),
        "prompt": conversation.prompt,
        "response": conversation.response,
        "status": conversation.status,
        "created_at": conversation.created_at.isoformat(),
        "completed_at": conversation.completed_at.isoformat()
        if conversation.completed_at
        else None,
        "model": conversation.model,
        "provider": conversation.provider,
        "chunks": conversation.chunks,
        "error": error,
    }


def _int_param(request: Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ApiError(
            422, "validation_error", f"{name} must be a whole number from {low} to {high}."
        )
    return value


routes = [
    Route("/stream", stream, methods=["POST"]),
    Route("/conversations/{conversation_id}/stream", attach, methods=["GET"]),
    Route("/conversations/{conversation_id}/cancel", cancel, methods=["POST"]),
    Route("/history", history, methods=["GET"]),
    Route("/history/{conversation_id}", history_item, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
