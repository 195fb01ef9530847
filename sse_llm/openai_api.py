"""The OpenAI-compatible front door: POST /v1/chat/completions and GET /v1/models.

Any OpenAI client (the official SDKs, LangChain, curl snippets) can point its base URL
here. Each call is a conversation like any other: persisted chunk by chunk before it is
sent, listed in the history, cancellable and resumable through /conversations/{id}.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sse_llm.contract import MAX_MODEL_CHARS, DeliveryEnd, DeliveryVia, ErrorCode, Status
from sse_llm.deliveries import Delivery
from sse_llm.errors import ApiError
from sse_llm.events import line_safe, ping_comment
from sse_llm.generation import Subscriber
from sse_llm.providers.base import last_user_text, message_text
from sse_llm.request_body import InvalidField, read_json_object
from sse_llm.service import service_of
from sse_llm.store import Chunk, Conversation, Outcome
from sse_llm.streaming import closing, sse_response, start_generation

ROLES = frozenset({"system", "developer", "user", "assistant"})
# Sampling parameters passed through to the provider, with their checks.
PASSED_THROUGH = ("temperature", "top_p", "max_tokens", "stop", "user")
# Accepted for compatibility; they change nothing here.
HARMLESS = frozenset({"stream", "stream_options", "model", "messages", "n"})
# How an ended generation maps to an HTTP status for a non-streaming call.
_STATUS_OF_ERROR: dict[str, int] = {
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.UPSTREAM_UNAVAILABLE: 502,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    # The database refused what the answer holds: the upstream's text, so a bad gateway.
    ErrorCode.STORAGE_REJECTED: 502,
    ErrorCode.CANCELLED: 409,
    ErrorCode.INTERRUPTED: 503,
}

# One encoder for all events: json.dumps with options builds a new one per call.
_encode_json = json.JSONEncoder(ensure_ascii=False).encode


class OpenAIError(Exception):
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def openai_errors(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Render every error of a /v1 route the way OpenAI clients expect."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except OpenAIError as exc:
            return exc.response()
        except InvalidField as exc:  # a value that cannot be stored, with its path
            return OpenAIError(400, exc.message, param=exc.path).response()
        except ApiError as exc:
            status = 400 if exc.status == 422 else exc.status
            kind = "invalid_request_error" if status < 500 else "api_error"
            if status == 429:
                kind = "rate_limit_error"
            return OpenAIError(
                status, exc.message, kind=kind, code=exc.code, headers=exc.headers
            ).response()

    handle.__name__ = handler.__name__
    return handle


async def models(request: Request) -> Response:
    """GET /v1/models: the configured model."""
    provider = service_of(request).provider
    model, owner = provider.model, provider.name
    return JSONResponse(
        {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": owner}],
        }
    )


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions, streamed (`"stream": true`) or not."""
    body = await read_json_object(request)
    call = parse_call(body, service_of(request).settings.max_prompt_chars)
    conversation, generation, subscriber = await start_generation(
        request,
        call.prompt,
        model=call.model,
        messages=call.messages,
        parameters=call.parameters,
    )
    headers = {"X-Conversation-Id": str(conversation.id)}
    delivery = Delivery.of(request, conversation.id, DeliveryVia.V1)
    if not call.stream:
        delivery.open()
        try:
            text, outcome = await collect(subscriber)
            # The answer goes out whole, or the error instead (with no text).
            if outcome.status == Status.COMPLETED:
                delivery.end_with(DeliveryEnd.DONE, outcome.chunks or None)
            else:
                delivery.end_with(DeliveryEnd.ERROR, None)
        finally:
            generation.unsubscribe(subscriber)
            delivery.close()
        return completion_response(conversation, call, text, outcome, headers)
    completion = CompletionStream(conversation, call)
    events = completion.events(delivery.watch(subscriber.updates()))
    return sse_response(
        request, closing(events, lambda: generation.unsubscribe(subscriber), delivery), headers
    )


class Call:
    """A validated chat completion request."""

    def __init__(
        self,
        messages: list[dict[str, Any]],
        model: str | None,
        parameters: dict[str, Any],
        stream: bool,
        include_usage: bool,
    ) -> None:
        self.messages = messages
        self.model = model
        self.parameters = parameters
        self.stream = stream
        self.include_usage = include_usage
        self.prompt = last_user_text(messages).strip()


def parse_call(body: dict[str, Any], max_prompt_chars: int) -> Call:
    """Check a request body the way OpenAI does; a clear 400 names what is wrong."""
    unsupported = sorted(set(body) - HARMLESS - set(PASSED_THROUGH) - {"max_completion_tokens"})
    if unsupported:
        raise OpenAIError(
            400,
            f"Unsupported parameter: '{unsupported[0]}'. sse-llm passes through only "
            f"{', '.join(PASSED_THROUGH)}.",
            param=unsupported[0],
            code="unsupported_parameter",
        )
    # NUL, lone surrogates and non-finite numbers anywhere in the body were refused
    # when it was read (read_json_object): what is left here can all be stored.
    if body.get("n", 1) != 1:
        raise OpenAIError(400, "Only n=1 is supported.", param="n", code="unsupported_value")
    messages = _messages(body.get("messages"), max_prompt_chars)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise OpenAIError(400, "'model' must be a non-empty string.", param="model")
    if model is not None and len(model) > MAX_MODEL_CHARS:
        message = f"'model' must be at most {MAX_MODEL_CHARS} characters."
        raise OpenAIError(400, message, param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool | None)
    ):
        raise OpenAIError(
            400, "Only stream_options.include_usage is supported.", param="stream_options"
        )
    call = Call(messages, model, _parameters(body), stream, bool(options.get("include_usage")))
    if not call.prompt:
        raise OpenAIError(400, "The last user message has no text.", param="messages")
    if len(call.prompt) > max_prompt_chars:
        message = f"The last user message is longer than {max_prompt_chars} characters."
        raise OpenAIError(400, message, param="messages", code="context_length_exceeded")
    return call


def _messages(messages: object, max_chars: int) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise OpenAIError(
                400, f"{param} needs a role: system, developer, user or assistant.", param=param
            )
        if set(message) - {"role", "content", "name"}:
            raise OpenAIError(400, f"{param}: tool calls are not supported.", param=param)
        if not isinstance(message.get("name", ""), str):
            raise OpenAIError(400, f"{param}.name must be a string.", param=param)
        content = message.get("content")
        if isinstance(content, list):
            for number, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise OpenAIError(400, f"{param}: only text content is supported.", param=param)
                if not isinstance(part.get("text"), str):
                    part_param = f"{param}.content[{number}].text"
                    raise OpenAIError(400, f"{part_param} must be a string.", param=part_param)
        elif not isinstance(content, str):
            raise OpenAIError(400, f"{param}.content must be text.", param=param)
        if len(message_text(content)) > max_chars:
            message = f"{param}.content is longer than {max_chars} characters."
            raise OpenAIError(400, message, param=param, code="context_length_exceeded")
    if not any(message["role"] == "user" for message in messages):
        raise OpenAIError(400, "'messages' needs at least one user message.", param="messages")
    return messages


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    parameters: dict[str, Any] = {}
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = body.get(name)
        if value is not None:
            if not _number(value) or not low <= value <= high:
                raise OpenAIError(
                    400, f"'{name}' must be a number from {low} to {high}.", param=name
                )
            parameters[name] = value
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        # JSON has one number type: 5.0 is a whole number too.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OpenAIError(400, f"'{name}' must be a whole number of at least 1.", param=name)
        parameters.setdefault("max_tokens", value)  # max_tokens wins when both are given
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= 4
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise OpenAIError(400, "'stop' must be a string or up to 4 strings.", param="stop")
        parameters["stop"] = stop
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise OpenAIError(400, "'user' must be a string.", param="user")
        parameters["user"] = user
    return parameters


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def collect(subscriber: Subscriber) -> tuple[str, Outcome]:
    """The whole answer, once the generation has ended."""
    parts: list[str] = []
    async for chunks, outcome in subscriber.updates():
        parts.extend(chunk.text for chunk in chunks)
        if outcome is not None:
            return "".join(parts), outcome
    raise RuntimeError("a subscriber ended without an outcome")


def completion_id(conversation: Conversation) -> str:
    """OpenAI-style id that still names the conversation."""
    return f"chatcmpl-{conversation.id.hex}"


def finish_reason(call: Call, chunks: int) -> str:
    """`length` when the answer used up max_tokens (chunks count as tokens), else `stop`."""
    max_tokens = call.parameters.get("max_tokens")
    return "length" if max_tokens and chunks >= max_tokens else "stop"


def usage(outcome: Outcome) -> dict[str, int] | None:
    """The token counts the generation's end recorded: the upstream's, or where it
    reported none the stored estimate (characters / 4); None if nothing was counted."""
    if outcome.prompt_tokens is None or outcome.completion_tokens is None:
        return None
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def completion_response(
    conversation: Conversation,
    call: Call,
    text: str,
    outcome: Outcome,
    headers: dict[str, str],
) -> Response:
    """A `chat.completion` object, or the error that ended the generation."""
    if outcome.status != Status.COMPLETED:
        raise_outcome(outcome, headers)
    body = {
        "id": completion_id(conversation),
        "object": "chat.completion",
        "created": int(conversation.created_at.timestamp()),
        "model": conversation.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(call, outcome.chunks),
            }
        ],
        "usage": usage(outcome),
    }
    return JSONResponse(body, headers=headers)


def raise_outcome(outcome: Outcome, headers: dict[str, str]) -> None:
    """Raise the OpenAI error of a generation that did not complete."""
    code = outcome.error_code or ErrorCode.ERROR
    raise OpenAIError(
        _STATUS_OF_ERROR.get(code, 500),
        outcome.error_message or "The generation failed.",
        kind="api_error",
        code=code,
        headers=headers,
    )


class CompletionStream:
    """Turns a generation's updates into `chat.completion.chunk` events."""

    def __init__(self, conversation: Conversation, call: Call) -> None:
        self.call = call
        self.head = {
            "id": completion_id(conversation),
            "object": "chat.completion.chunk",
            "created": int(conversation.created_at.timestamp()),
            "model": conversation.model,
        }

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = _encode_json({**self.head, "choices": choices, **extra})
        # Raw U+2028 and co. would split the line for line-based clients (see events.py).
        return f"data: {data if data.isascii() else line_safe(data)}\n\n".encode()

    def deltas(self, chunks: list[Chunk]) -> bytes:
        return b"".join(
            self.event([{"index": 0, "delta": {"content": chunk.text}, "finish_reason": None}])
            for chunk in chunks
        )

    async def events(
        self, updates: AsyncIterator[tuple[list[Chunk], Outcome | None]]
    ) -> AsyncIterator[bytes]:
        """The role chunk, content chunks, the finish chunk, usage if asked, `[DONE]`."""
        yield self.event(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
        async for chunks, outcome in updates:
            data = self.deltas(chunks) if chunks else b""
            if outcome is not None:
                data += self.ending(outcome)
            yield data or ping_comment()  # nothing new: the stream was idle

    def ending(self, outcome: Outcome) -> bytes:
        if outcome.status != Status.COMPLETED:
            # How OpenAI reports an error in the middle of a stream; there is no [DONE].
            error = {
                "message": outcome.error_message,
                "type": "api_error",
                "param": None,
                "code": outcome.error_code,
            }
            # ASCII-escaped, so line-safe as it is.
            return f"data: {json.dumps({'error': error})}\n\n".encode()
        reason = finish_reason(self.call, outcome.chunks)
        data = self.event([{"index": 0, "delta": {}, "finish_reason": reason}])
        if self.call.include_usage:
            data += self.event([], usage=usage(outcome))
        return data + b"data: [DONE]\n\n"


routes = [
    Route("/v1/chat/completions", openai_errors(chat_completions), methods=["POST"]),
    Route("/v1/models", openai_errors(models), methods=["GET"]),
]
