"""A request's JSON body, parsed and checked so that everything in it can be stored.

Why here, before anything is queued: the writer commits many streams' chunks in one
transaction, so one string PostgreSQL refuses (a NUL, a lone surrogate) or one value
its JSON types refuse (a non-finite number) would fail the batch of every stream
sharing it. Every string of a body, keys included, is checked up front by the same walk
for every route (skipped when the text provably holds no such thing); a route's own
checks then only decide what is allowed.

Why nesting is counted on the raw bytes: Python's parser gives up on deep nesting with
a RecursionError at a depth that differs between versions (and may take the process's
stack with it). A linear scan that refuses anything deeper than MAX_DEPTH before
parsing gives the same 400 on every version, at a few milliseconds for a 1 MiB body.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from starlette.requests import Request

from sse_llm.contract import MAX_BODY_BYTES, MAX_NESTING, ErrorCode
from sse_llm.errors import ApiError

# Deeper than any real request (an OpenAI chat with content parts is 4 deep).
MAX_DEPTH = MAX_NESTING

_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))
# +1 for an opening bracket, -1 for a closing one, indexed by the byte.
_STEP = [1 if byte in b"[{" else -1 for byte in range(256)]
# What PostgreSQL text and jsonb cannot hold, and the JSON escapes that can produce it.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
# A key shown as is in a field's path; any other key is shown JSON-escaped.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


class InvalidField(ApiError):
    """A 422 `validation_error` about one field; `path` names it (`messages[0].content`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(422, ErrorCode.VALIDATION_ERROR, message)
        self.path = path


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a storable JSON object, or the SPEC 6 error (415, 413, 400, 422)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "Send the body as Content-Type: application/json.",
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
    return ApiError(
        413, ErrorCode.PAYLOAD_TOO_LARGE, f"The body must be at most {MAX_BODY_BYTES} bytes."
    )


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object whose every value can be stored, or the SPEC 6 error."""
    try:
        # Strict UTF-8: json.loads would accept UTF-16, and encoded surrogates.
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ApiError(400, ErrorCode.INVALID_JSON, "The body is not valid UTF-8 JSON.") from None
    if too_deep(body):
        message = f"The body is not valid JSON: it is nested deeper than {MAX_DEPTH} levels."
        raise ApiError(400, ErrorCode.INVALID_JSON, message)
    overflowed = False

    def parse_float(number: str) -> float:
        nonlocal overflowed
        value = float(number)
        overflowed = overflowed or math.isinf(value)
        return value

    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=parse_float)
    except (ValueError, RecursionError):
        raise ApiError(400, ErrorCode.INVALID_JSON, "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "The body must be a JSON object.")
    # Decoded strictly, a string can hold NUL or a lone surrogate only through a \u
    # escape (the parser refuses raw control characters): without one, nothing to find.
    if overflowed or _SUSPECT_ESCAPE.search(text):
        check_storable(data)
    return data


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether brackets outside strings nest deeper than `limit` (the body is not parsed)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the usual case: too few brackets to nest that deep
    if b"\\" in body:
        # Escapes go in pairs from the left, so this leaves every string's quotes alone.
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(body.split(b'"')[::2])
    brackets = outside_strings.translate(None, _NOT_BRACKET)
    # The running depth at each bracket, up to the first past the limit; all in C.
    depths = itertools.accumulate(map(_STEP.__getitem__, brackets))
    return next(filter(limit.__lt__, depths), None) is not None


def check_storable(value: object, path: str = "") -> None:
    """Raise InvalidField for the first string (key or value) or number that cannot be stored.

    Recursion is bounded: parse_json_object refuses bodies nested deeper than MAX_DEPTH.
    """
    if isinstance(value, str):
        _check_text(value, path, "")
    elif isinstance(value, dict):
        for key, item in value.items():
            item_path = _key_path(path, key)
            _check_text(key, item_path, " (a key)")
            check_storable(item, item_path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_storable(item, f"{path}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        # 1e400 parses as infinity, which neither jsonb nor a JSON client can take.
        raise InvalidField(path, f"{_name(path)} must be a finite number.")


def _check_text(text: str, path: str, what: str) -> None:
    # ASCII text can only hold NUL; a regex scan is for the rest. No copy either way.
    bad = "\x00" in text if text.isascii() else _UNSTORABLE.search(text)
    if not bad:
        return
    if "\x00" in text:
        raise InvalidField(path, f"{_name(path)}{what} must not contain NUL characters.")
    message = f"{_name(path)}{what} must be valid Unicode text (it holds a lone surrogate)."
    raise InvalidField(path, message)


def _key_path(path: str, key: str) -> str:
    # An odd key is shown escaped (ASCII only, bounded): the error must be printable.
    name = key if _PLAIN_KEY.fullmatch(key) else json.dumps(key[:64])
    return f"{path}.{name}" if path else name


def _name(path: str) -> str:
    return path or "The body"


def _refuse_constant(name: str) -> object:
    """NaN, Infinity and -Infinity: Python reads them, but they are not JSON."""
    raise ValueError(f"{name} is not JSON")
