"""Any OpenAI-compatible Chat Completions API (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM...)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from http.cookiejar import CookieJar
from typing import Any

import httpx
from httpx_aiohttp import AiohttpTransport

from sse_llm.providers.base import (
    ModelRequest,
    UpstreamError,
    UpstreamUnavailable,
    Usage,
    clean_text,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"
# An upstream's error body can name internal hosts, carry proxy traces or echo a key:
# clients and the history get fixed text with the status, the log at most this much
# of the body, secrets masked (read a little more, so a secret cut at the edge is
# still recognised and masked).
_LOGGED_ERROR_BYTES = 500
_READ_ERROR_BYTES = 4096
_SECRETS = (
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), r"\1***"),
    (re.compile(r"(?<![A-Za-z0-9])sk-[\w*.-]+"), "sk-***"),
    (re.compile(r"(?i)(api[_-]?key[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;}]+"), r"\1***"),
)
# Anything that would break the log line (or a terminal showing it).
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
# Asked of every upstream: the token counts, in one last event before [DONE] (OpenAI,
# vLLM >= 0.5, llama.cpp, Ollama >= 0.5.2). Servers that predate it refuse the field:
# OpenAI-style proxies answer 400 "Unknown parameter: 'stream_options'" (older Azure
# API versions "Unrecognized request argument supplied: stream_options"), pydantic
# servers with extra fields forbidden (vLLM < 0.5, Mistral's API) 400 or 422
# "extra_forbidden" at ('body', 'stream_options'); older Ollama ignores it.
_STREAM_OPTIONS = {"include_usage": True}
_REFUSAL_STATUSES = (400, 422)


class OpenAIProvider:
    """Streams `POST {base_url}/chat/completions` with `"stream": true`.

    Timeouts between chunks are the generation's job; this client only bounds connecting.
    It asks for the token counts (`stream_options.include_usage`); an upstream that
    refuses the field gets the request again without it, and from then on, for this
    process's life, never gets it (one provider per base URL).
    """

    name = "openai"

    def __init__(
        self, base_url: str, api_key: str | None, model: str | None, max_connections: int
    ) -> None:
        self.model = model or DEFAULT_MODEL
        # Parsed once: httpx parses a URL given as text on every request.
        self._url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
        # Identity: the stream is read as raw bytes, and compressing SSE only delays it.
        headers = {
            "Accept": "text/event-stream",
            "Accept-Encoding": "identity",
            "Content-Type": "application/json",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Set only when the upstream refused stream_options and took the same request
        # without it: a property of the server, not of one client's request.
        self.refuses_usage = False
        # httpx's API on aiohttp's connection pool: httpx's own pool costs several times
        # more CPU per chunk at high concurrency (see the shared PERFORMANCE.md).
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=100)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(None, connect=10.0),
            # One client serves every user: a cookie the model server sets on one user's
            # request must never ride along on another's.
            cookies=_NoCookies(),
            # One connection per concurrent stream: a smaller pool would queue streams silently.
            transport=AiohttpTransport(limits=limits),
        )

    async def stream(self, request: ModelRequest) -> AsyncGenerator[str | Usage, None]:
        """Yield each `delta.content` of the upstream's SSE stream until `[DONE]`, then
        the upstream's token counts if it sent them."""
        try:
            response = await self._open(request)
            try:
                async for piece in _read_pieces(response):
                    yield piece
            finally:
                await _close(response)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            log.warning("cannot reach the model server: %s", masked(str(exc)))
            raise UpstreamUnavailable(
                f"Cannot reach the model server: {type(exc).__name__}."
            ) from exc
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise UpstreamError(
                f"The connection to the model server broke off: {type(exc).__name__}."
            ) from exc

    async def _open(self, request: ModelRequest) -> httpx.Response:
        """The upstream's streamed 200 answer; raise UpstreamError for any other.

        A refusal of stream_options is retried once without it, before any chunk was
        read (a refusal comes instead of the stream). It is remembered only if that
        retry is accepted: a 400 that merely quotes the field (an upstream echoing a
        client's request in its error, say) fails the retry too and changes nothing.
        """
        ask_usage = not self.refuses_usage
        response = await self._send(request, ask_usage)
        if response.status_code == 200:
            return response
        body = await _failure_body(response)
        if ask_usage and _refuses_stream_options(response.status_code, body):
            retried = await self._send(request, ask_usage=False)
            if retried.status_code == 200:
                self._remember_refusal(response.status_code)
                return retried
            response, body = retried, await _failure_body(retried)
        log.warning("the model server answered HTTP %d: %s", response.status_code, masked(body))
        raise UpstreamError(f"The model server answered HTTP {response.status_code}.")

    async def _send(self, request: ModelRequest, ask_usage: bool) -> httpx.Response:
        body = {
            **request.parameters,
            "model": request.model,
            "messages": request.messages,
            "stream": True,
        }
        if ask_usage:
            body["stream_options"] = _STREAM_OPTIONS
        post = self._client.build_request("POST", self._url, content=_encode(body))
        return await self._client.send(post, stream=True)

    def _remember_refusal(self, status: int) -> None:
        if self.refuses_usage:
            return  # concurrent requests each found out; one line says so
        self.refuses_usage = True
        where = self._url.copy_with(username=None, password=None)
        log.warning(
            "the model server at %s refuses stream_options (HTTP %d): not asking it for "
            "token counts again; they will be estimated",
            masked(str(where)),
            status,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


async def _read_pieces(response: httpx.Response) -> AsyncIterator[str | Usage]:
    """The `delta.content` of each `data:` line until `[DONE]`, then the last `usage`
    the stream carried (its own event with no choices, or on the finishing one).

    Lines are split from the raw bytes and JSON is parsed from bytes: httpx's text and
    line decoders cost about a tenth of the server's CPU at high concurrency.
    """
    finished = False
    usage: Usage | None = None
    tail = b""
    async for data in response.aiter_raw():
        *lines, tail = (tail + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # comments, event names, blank separators
            payload = line[5:].strip()
            if payload == b"[DONE]":
                if usage is not None:
                    yield usage
                return
            # The parsed event is dropped before yielding: a suspended generator keeps
            # its locals, and a parsed event was ~2.5 KiB per open stream.
            pieces, done, counts = _pieces_of(_parse_event(payload))
            finished = finished or done
            usage = counts or usage
            for piece in pieces:
                yield piece
    if not finished:
        raise UpstreamError("The model server ended the stream before the answer was complete.")
    if usage is not None:
        yield usage


class _NoCookies(CookieJar):
    """A cookie jar that keeps nothing (and skips parsing Set-Cookie headers)."""

    def extract_cookies(self, response: object, request: object) -> None:
        return


# Compact, and UTF-8 as is: what httpx's json= would send, built by one shared encoder.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _encode(body: dict[str, Any]) -> bytes:
    return _encode_json(body).encode()


def _unbind(response: httpx.Response) -> None:
    """Break the cycle between a streamed response and its stream once it is closed.

    httpx's stream refers back to its response: left alone, the pair and the aiohttp
    response they hold live on as garbage until a full collection, tens of KiB per
    finished stream.
    """
    response.stream = _NO_STREAM


_NO_STREAM = httpx.ByteStream(b"")


def _pieces_of(event: dict[str, Any]) -> tuple[list[str], bool, Usage | None]:
    """An event's non-empty `delta.content`s, whether it has a `finish_reason`, and
    the token counts it carries (OpenAI sends `"usage": null` on every other event)."""
    if "error" in event:
        # Only the log gets what it said (see _LOGGED_ERROR_BYTES).
        details = json.dumps(event, ensure_ascii=False)[:_READ_ERROR_BYTES]
        log.warning("the model server reported an error mid-stream: %s", masked(details))
        raise UpstreamError("The model server reported an error in the middle of the answer.")
    pieces = []
    finished = False
    for choice in event.get("choices") or ():
        content = (choice.get("delta") or {}).get("content")
        if content:
            pieces.append(clean_text(content))
        if choice.get("finish_reason"):
            finished = True
    if pieces and not finished:
        # The counts come on an event of their own (no choices) or on the finishing one:
        # an event of the answer is not searched for them.
        return pieces, False, None
    usage = event.get("usage")
    return pieces, finished, _usage_of(usage) if usage else None


def _usage_of(usage: object) -> Usage | None:
    """The counts of a `usage` object, if it has both as whole numbers."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    # Whole numbers an integer column holds (bool is an int to Python, not to JSON).
    if type(prompt) is not int or type(completion) is not int:
        return None
    if not (0 <= prompt < 2**31 and 0 <= completion < 2**31):
        return None
    return Usage(prompt, completion)


def _parse_event(data: bytes) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise UpstreamError("The model server sent an event that is not JSON.") from None
    if not isinstance(event, dict):
        raise UpstreamError("The model server sent an event that is not a JSON object.")
    return event


async def _failure_body(response: httpx.Response) -> str:
    """The start of an error answer's body (for the log only once masked); closes it."""
    raw = b""
    try:
        async for part in response.aiter_bytes():
            raw += part
            if len(raw) >= _READ_ERROR_BYTES:
                break
    except (httpx.TransportError, httpx.StreamError):
        pass  # the status is what matters; the body is only a hint for the operator
    finally:
        await _close(response)
    return raw[:_READ_ERROR_BYTES].decode("utf-8", "replace")


def _refuses_stream_options(status: int, body: str) -> bool:
    """Whether an error answer reads as a server refusing the stream_options field."""
    return status in _REFUSAL_STATUSES and "stream_options" in body.lower()


async def _close(response: httpx.Response) -> None:
    await response.aclose()
    _unbind(response)


def masked(text: str) -> str:
    """`text` fit for the log: secrets masked, one line, at most _LOGGED_ERROR_BYTES."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    text = _CONTROL.sub(" ", clean_text(text)).strip()
    return text.encode()[:_LOGGED_ERROR_BYTES].decode("utf-8", "ignore")
