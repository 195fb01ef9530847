"""The JSON and SSE routes: stream a prompt's answer, read the history."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID, uuid4

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sse_llm import store
from sse_llm.errors import ApiError
from sse_llm.events import live_events, start_event
from sse_llm.generation import Generation
from sse_llm.store import STATUSES, Conversation

MAX_BODY_BYTES = 1024 * 1024
MAX_QUERY_CHARS = 1000
MAX_OFFSET = 1_000_000_000


async def stream(request: Request) -> Response:
    """POST /stream: start a generation and stream it as Server-Sent Events (SPEC 2)."""
    state = request.app.state
    body = await read_json_object(request)
    prompt = validate_prompt(body, state.settings.max_prompt_chars)
    if state.shutting_down:
        raise ApiError(503, "shutting_down", "The service is shutting down. Try another replica.")
    if len(state.generations) >= state.settings.max_streams:
        message = "Too many streams are running. Try again shortly."
        raise ApiError(503, "too_many_streams", message, {"Retry-After": "1"})
    # The row exists before the first byte is sent: the id in the headers is real.
    conversation = await store.create_conversation(
        state.pool,
        conversation_id=uuid4(),
        prompt=prompt,
        model=state.provider.model,
        provider=state.provider.name,
        owner_id=state.lease.instance_id,
    )
    generation: Generation = state.generations.start(conversation)
    subscriber = generation.subscribe()  # before any await: no chunk can be missed
    events = live_events(conversation.id, subscriber, start_event(conversation))
    return sse_response(
        request, conversation, _closing(events, lambda: generation.unsubscribe(subscriber))
    )


def sse_response(
    request: Request, conversation: Conversation, events: AsyncIterator[bytes]
) -> EventSourceResponse:
    """The SPEC 2 response: event-stream headers, the conversation id, keep-alive pings."""
    settings = request.app.state.settings
    return EventSourceResponse(
        events,
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "X-Conversation-Id": str(conversation.id),
        },
        ping=settings.ping_interval,
        ping_message_factory=lambda: ServerSentEvent(comment="ping"),
        sep="\n",
        # Keep streaming through a graceful shutdown, up to the grace period.
        shutdown_grace_period=settings.shutdown_grace,
    )


async def _closing(
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
    query = request.query_params.get("q", "").strip() or None
    if query is not None and (len(query) > MAX_QUERY_CHARS or "\x00" in query):
        raise ApiError(
            422, "validation_error", f"q must be at most {MAX_QUERY_CHARS} characters without NUL."
        )
    status = request.query_params.get("status", "").strip() or None
    if status is not None and status not in STATUSES:
        raise ApiError(422, "validation_error", f"status must be one of: {', '.join(STATUSES)}.")
    page = await store.list_conversations(
        request.app.state.pool, limit=limit, offset=offset, query=query, status=status
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
        await store.ping_database(request.app.state.pool)
    except Exception:
        raise ApiError(503, "database_unavailable", "The database does not answer.") from None
    return JSONResponse({"status": "ready"})


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or the SPEC 6 error (415, 413, 400, 422)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "Send the body as Content-Type: application/json."
        )
    too_large = ApiError(
        413, "payload_too_large", f"The body must be at most {MAX_BODY_BYTES} bytes."
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large  # refused before reading a byte of it
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        data = json.loads(body)
    except ValueError:  # also covers bytes that are not UTF-8
        raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "The body must be a JSON object.")
    return data


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
    if "\x00" in prompt:
        raise ApiError(422, "validation_error", "prompt must not contain NUL characters.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        message = "prompt must be valid Unicode text (it holds a lone surrogate)."
        raise ApiError(422, "validation_error", message) from None
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
    if raw is None or raw == "":
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
    Route("/history", history, methods=["GET"]),
    Route("/history/{conversation_id}", history_item, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
