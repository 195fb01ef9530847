"""The OpenAPI 3.1 description of the JSON and SSE API, served at GET /openapi.json."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sse_llm import __version__
from sse_llm.config import Settings
from sse_llm.contract import (
    MAX_BODY_BYTES,
    MAX_CHUNK_ID,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_MODEL_CHARS,
    MAX_NOTE_CHARS,
    MAX_OFFSET,
    MAX_QUERY_CHARS,
    MAX_REVIEWER_CHARS,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    ErrorCode,
    Status,
    Verdict,
)
from sse_llm.service import service_of
from sse_llm.stats_queries import MAX_BUCKETS as MAX_STATS_BUCKETS
from sse_llm.stats_queries import SAMPLE_SIZE as STATS_SAMPLE_SIZE


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
        },
    }


_EVENT_STREAM = {
    "description": (
        "Server-Sent Events: `start`, one unnamed event per chunk (`id:` = its sequence "
        'number, data `{"text": ...}`), then `done` or `error`. `: ping` comments keep '
        "an idle connection open."
    ),
    "headers": {
        "X-Conversation-Id": {"schema": {"type": "string", "format": "uuid"}},
    },
    "content": {
        "text/event-stream": {
            # One server-sent event (what EventSource hands to its listeners).
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "event": {"enum": ["start", "message", "done", "error"]},
                    "id": {"type": "string", "pattern": "^[0-9]+$"},
                    "retry": {"type": "integer"},
                    "data": {"type": "string", "contentMediaType": "application/json"},
                },
            }
        }
    },
}

_ID_PARAMETER = {
    "name": "conversation_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "A conversation id (a UUID; anything else is simply not found).",
}

_UNAVAILABLE = _error(
    "The database is unavailable, the service is shutting down, or it is overloaded "
    "(`overloaded`: the stream could not start within SSE_LLM_QUEUE_TIMEOUT)."
)


def build_openapi(settings: Settings) -> dict[str, Any]:
    """The document; it declares the bearer key only when one is configured."""
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "sse-llm",
            "version": __version__,
            "description": "Stream a language model's answer as Server-Sent Events; "
            "every conversation is kept in PostgreSQL.",
        },
        "paths": _with_access_errors({**_paths(settings), **_review_paths()}),
        "components": {"schemas": _SCHEMAS},
    }
    if settings.api_key:
        document["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"apiKey": []}]
    return document


# Probes answer whatever the Host (SPEC 8): a load balancer sends an address.
_ANY_HOST = frozenset({"/healthz", "/readyz"})
_INVALID_HOST = "Or `invalid_host`: the Host header is not one this service answers to."


def _with_access_errors(paths: dict[str, Any]) -> dict[str, Any]:
    """Add the errors of the access layer (hosts.py, access.py) every route can answer."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path not in _ANY_HOST:
                described = responses.get("400")
                if described is None:
                    shape = _openai_error if path.startswith("/v1/") else _error
                    responses["400"] = shape(_INVALID_HOST)
                else:
                    described["description"] += " " + _INVALID_HOST
            if method != "get":
                responses.setdefault(
                    "403",
                    _error("A browser's change sent from another origin (SPEC 8)."),
                )
    return paths


def _paths(settings: Settings) -> dict[str, Any]:
    return {
        "/stream": {
            "post": {
                "summary": "Start a generation and stream its answer",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _stream_request(settings.max_prompt_chars)}
                    },
                },
                "responses": {
                    "200": _EVENT_STREAM,
                    "400": _error("The body is not valid JSON."),
                    "401": _error("The API key is missing or wrong."),
                    "413": _error(f"The body is over {MAX_BODY_BYTES // 2**20} MiB."),
                    "415": _error("The body is not application/json."),
                    "422": _error("The prompt is missing, not text, blank or too long."),
                    "429": _error("Too many streams started; see Retry-After."),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/conversations/{conversation_id}/stream": {
            "get": {
                "summary": "Replay a conversation after Last-Event-ID, then follow it live",
                "parameters": [
                    _ID_PARAMETER,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "Resume after this chunk (wins over last_event_id).",
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_CHUNK_ID},
                    },
                ],
                "responses": {
                    "200": _EVENT_STREAM,
                    "204": {"description": "Ended, and nothing after Last-Event-ID."},
                    "401": _error("The API key is missing or wrong."),
                    "404": _error("No conversation has this id."),
                    "422": _error("Last-Event-ID is not a chunk number."),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/conversations/{conversation_id}/cancel": {
            "post": {
                "summary": "Cancel a running generation, on whichever process runs it",
                "parameters": [_ID_PARAMETER],
                "responses": {
                    "202": _json("Cancelling", "The generation is being stopped."),
                    "401": _error("The API key is missing or wrong."),
                    "404": _error("No conversation has this id."),
                    "409": _error("The conversation has already ended."),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/history": {
            "get": {
                "summary": "Conversations, newest first, with full-text search",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": PAGE_SIZE_MAX,
                            "default": PAGE_SIZE_DEFAULT,
                        },
                    },
                    {
                        "name": "offset",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                    },
                    {
                        "name": "q",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "maxLength": MAX_QUERY_CHARS,
                            "pattern": _NO_NUL,
                        },
                        "description": 'Web search syntax: words, "phrases", -excluded, or.',
                    },
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"enum": [*Status, ""]},
                        "description": "Only this status; empty means any.",
                    },
                    *_HISTORY_FILTERS,
                ],
                "responses": {
                    "200": _json("HistoryPage", "A page of conversations."),
                    "401": _error("The API key is missing or wrong."),
                    "422": _error(
                        "A parameter is out of range or unknown (the message names it),"
                        " or `from` is later than `to`."
                    ),
                    "503": _error(
                        "The database is unavailable, the search ran past SSE_LLM_QUERY_TIMEOUT "
                        "(`query_timeout`), or too many are running (`too_many_queries`)."
                    ),
                },
            }
        },
        "/history/{conversation_id}": {
            "get": {
                "summary": "One conversation (a streaming one shows what is persisted so far)",
                "parameters": [_ID_PARAMETER],
                "responses": {
                    "200": _json("Conversation", "The conversation."),
                    "401": _error("The API key is missing or wrong."),
                    "404": _error("No conversation has this id."),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/agreement": _AGREEMENT_PATH,
        "/stats": _STATS_PATH,
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI-compatible chat completions, streamed or not",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _chat_request(settings.max_prompt_chars)}
                    },
                },
                "responses": {
                    "200": {
                        "description": "A `chat.completion` object, or with `stream: true` "
                        "`chat.completion.chunk` events ending with `data: [DONE]`.",
                        "headers": {
                            "X-Conversation-Id": {"schema": {"type": "string", "format": "uuid"}}
                        },
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {"type": "object"}},
                        },
                    },
                    "400": _openai_error(
                        "The request is invalid or asks for something unsupported."
                    ),
                    "401": _error("The API key is missing or wrong."),
                    "413": _openai_error(f"The body is over {MAX_BODY_BYTES // 2**20} MiB."),
                    "415": _openai_error("The body is not application/json."),
                    "429": _openai_error("Too many streams started; see Retry-After."),
                    "502": _openai_error("The model server failed."),
                    "503": _openai_error(
                        "Unavailable, shutting down, overloaded, or the answer was interrupted."
                    ),
                    "504": _openai_error("The model server timed out."),
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "OpenAI-compatible list of models (the configured one)",
                "responses": {
                    "200": {
                        "description": "An OpenAI `list` of `model` objects.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": _error("The API key is missing or wrong."),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: 200 while the process runs",
                "security": [],
                "responses": {"200": _json("Health", "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: 200 when the database answers",
                "responses": {
                    "200": _json("Health", "Ready."),
                    "401": _error("The API key is missing or wrong."),
                    "503": _error("The database does not answer."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _error("The API key is missing or wrong."),
                },
            }
        },
    }


_REVIEWER_PARAMETER = {
    "name": "reviewer",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": (
        f"A reviewer's name, percent-encoded: 1-{MAX_REVIEWER_CHARS} characters once "
        "trimmed and NFC-normalised, case-sensitive, no control character, no `/`, "
        "not `.` or `..` (else 422)."
    ),
}

_ANNOTATION_ID_PARAMETER = {
    "name": "annotation_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "An annotation id (a UUID; anything else is simply not found).",
}

_NO_CONVERSATION = _error("No conversation has this id.")
_FORBIDDEN_NAME = _error(
    "A browser named by its session (or, without a key, its reviewer cookie) may only "
    "write as that name; or a change from another origin."
)
_BODY_ERRORS = {
    "400": _error("The body is not valid JSON."),
    "413": _error(f"The body is over {MAX_BODY_BYTES // 2**20} MiB."),
    "415": _error("The body is not application/json."),
}


def _review_paths() -> dict[str, Any]:
    """SPEC 9: reviewers, reviews and annotations (sse_llm/reviews_api.py)."""
    unauthorized = _error("The API key is missing or wrong.")
    return {
        "/reviewers": {
            "get": {
                "summary": "Everyone who holds a review, with a count and the latest time",
                "responses": {
                    "200": _json("ReviewerList", "The reviewers, by name."),
                    "401": unauthorized,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/conversations/{conversation_id}/reviews": {
            "get": {
                "summary": "Every review of a conversation",
                "parameters": [_ID_PARAMETER],
                "responses": {
                    "200": _json("ReviewList", "The reviews, oldest first."),
                    "401": unauthorized,
                    "404": _NO_CONVERSATION,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/conversations/{conversation_id}/reviews/{reviewer}": {
            "put": {
                "summary": "Create or replace a reviewer's review (created_at kept)",
                "parameters": [_ID_PARAMETER, _REVIEWER_PARAMETER],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _REVIEW_REQUEST}},
                },
                "responses": {
                    "200": _json("Review", "The review as stored."),
                    **_BODY_ERRORS,
                    "401": unauthorized,
                    "403": _FORBIDDEN_NAME,
                    "404": _NO_CONVERSATION,
                    "422": _error("The reviewer, verdict, a label or the note is not allowed."),
                    "503": _UNAVAILABLE,
                },
            },
            "delete": {
                "summary": "Delete a reviewer's review",
                "parameters": [_ID_PARAMETER, _REVIEWER_PARAMETER],
                "responses": {
                    "204": {"description": "Deleted."},
                    "401": unauthorized,
                    "403": _FORBIDDEN_NAME,
                    "404": _error("No conversation has this id, or this reviewer no review."),
                    "422": _error("The reviewer name is not allowed."),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/conversations/{conversation_id}/annotations": {
            "get": {
                "summary": "A conversation's passage annotations, ordered by start",
                "parameters": [_ID_PARAMETER],
                "responses": {
                    "200": _json("AnnotationList", "The annotations."),
                    "401": unauthorized,
                    "404": _NO_CONVERSATION,
                    "503": _UNAVAILABLE,
                },
            },
            "post": {
                "summary": "Label one passage of the prompt or the response",
                "parameters": [_ID_PARAMETER],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ANNOTATION_REQUEST}},
                },
                "responses": {
                    "201": _json("Annotation", "The annotation, with its id."),
                    **_BODY_ERRORS,
                    "401": unauthorized,
                    "403": _FORBIDDEN_NAME,
                    "404": _NO_CONVERSATION,
                    "422": _error(
                        "A field is missing or not allowed, or not 0 <= start < end <= the "
                        "text's length in code points."
                    ),
                    "503": _UNAVAILABLE,
                },
            },
        },
        "/conversations/{conversation_id}/annotations/{annotation_id}": {
            "delete": {
                "summary": "Delete an annotation",
                "parameters": [_ID_PARAMETER, _ANNOTATION_ID_PARAMETER],
                "responses": {
                    "204": {"description": "Deleted."},
                    "401": unauthorized,
                    "403": _FORBIDDEN_NAME,
                    "404": _error("No conversation has this id, or no annotation this id."),
                    "503": _UNAVAILABLE,
                },
            }
        },
    }


def _stream_request(max_chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompt"],
        "properties": {
            "prompt": {
                "type": "string",
                "minLength": 1,
                "maxLength": max_chars,
                "pattern": _NOT_BLANK,
            }
        },
    }


def _openai_error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}},
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Optional fields may also be sent as null (OpenAI clients do)."""
    return {"oneOf": [schema, {"type": "null"}]}


def _chat_request(max_chars: int) -> dict[str, Any]:
    text = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": _NOT_BLANK}
    message = {
        "type": "object",
        "additionalProperties": False,
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": text,
            "name": {"type": "string", "pattern": _NO_NUL},
        },
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": 50,
                "items": message,
                "contains": {"type": "object", "properties": {"role": {"const": "user"}}},
            },
            "model": _nullable(
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_MODEL_CHARS,
                    "pattern": _NOT_BLANK,
                }
            ),
            "stream": {"type": "boolean"},
            "stream_options": _nullable(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"include_usage": _nullable({"type": "boolean"})},
                }
            ),
            "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
            "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "max_tokens": _nullable({"type": "integer", "minimum": 1}),
            "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
            "stop": {
                "oneOf": [
                    {"type": "null"},
                    {"type": "string", "minLength": 1, "pattern": _NO_NUL},
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 4,
                        "items": {"type": "string", "minLength": 1, "pattern": _NO_NUL},
                    },
                ]
            },
            "user": _nullable({"type": "string", "pattern": _NO_NUL}),
            "n": {"const": 1},
        },
    }


# Not blank and no NUL (the service trims and checks both).
# Python's str.strip() also strips U+001C-U+001F and U+0085, which \s does not match.
_NOT_BLANK = "^[^\\u0000]*[^\\s\\u0000\\u001c-\\u001f\\u0085][^\\u0000]*$"

_NO_NUL = "^[^\\u0000]*$"


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


# No /, no control characters (SPEC 9's names; `.` and `..` are refused too).
_REVIEWER_PATTERN = "^[^/\\u0000-\\u001f\\u007f-\\u009f]*$"
_NO_CONTROL_CHARACTERS = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
_VERDICT_OR_EMPTY = {"enum": [*Verdict, ""]}
_TIME_PARAMETER = {"type": "string", "format": "date-time"}
# SPEC 9's history filters, AND between parameters; an empty value means the filter is off.
_HISTORY_FILTERS = [
    _query("verdict", _VERDICT_OR_EMPTY, "Some review has this verdict (with `reviewer`: theirs)."),
    _query("consensus", _VERDICT_OR_EMPTY, "It has reviews, and all have this verdict."),
    _query(
        "reviewer",
        {"type": "string", "maxLength": MAX_REVIEWER_CHARS, "pattern": _REVIEWER_PATTERN},
        "This reviewer reviewed it; with `verdict`/`label`, their own review has them.",
    ),
    {
        "name": "label",
        "in": "query",
        "style": "form",
        "explode": True,
        "schema": {
            "type": "array",
            "maxItems": MAX_LABELS,
            # Trimmed and case-folded before the length is checked (ß becomes ss): the
            # schema bounds what is sent loosely, the route decides.
            "items": {"type": "string", "pattern": _NO_CONTROL_CHARACTERS},
        },
        "description": (
            "Some review has this label (normalised like labels: trimmed, case-folded);"
            " repeat it, or separate labels by commas, for all of them."
        ),
    },
    _query(
        "reviewed",
        {"enum": ["true", "false", ""]},
        "Has a review / has none; with `reviewer`, by them / not by them (then `verdict`"
        " and `label` are anyone's).",
    ),
    _query(
        "model",
        {"type": "string", "maxLength": MAX_MODEL_CHARS, "pattern": _NO_NUL},
        "Only this model.",
    ),
    _query(
        "from",
        _TIME_PARAMETER,
        "ISO 8601; created at or after it. Without a zone: UTC.",
    ),
    _query(
        "to",
        _TIME_PARAMETER,
        "ISO 8601; created before it (exclusive). Without a zone: UTC. Not before `from`.",
    ),
    _query(
        "before",
        {"type": "string", "format": "uuid"},
        "Keyset paging: the page after this conversation (the last item's `id`), in the"
        " same order; as fast deep in the history as at its start. An id that names no"
        " conversation (deleted) gives an empty page.",
    ),
]
# Labels are trimmed and case-folded before their length is checked (case-folding can
# lengthen one: ß is ss), so the schema bounds what is sent loosely; the route decides.
_LABEL = {"type": "string", "minLength": 1, "pattern": "^[^,\\u0000-\\u001f\\u007f-\\u009f]*$"}
_NOTE = {"type": "string", "maxLength": MAX_NOTE_CHARS, "pattern": _NO_NUL}

_REVIEW_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["verdict"],
    "properties": {
        "verdict": {"enum": list(Verdict)},
        "labels": {"type": "array", "maxItems": MAX_LABELS, "items": _LABEL},
        "note": _NOTE,
    },
}

_ANNOTATION_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["reviewer", "field", "start", "end", "label"],
    "properties": {
        "reviewer": {"type": "string", "minLength": 1, "maxLength": MAX_REVIEWER_CHARS},
        "field": {"enum": ["prompt", "response"]},
        "start": {"type": "integer", "minimum": 0},
        "end": {"type": "integer", "minimum": 1},
        "label": _LABEL,
        "note": _NOTE,
    },
}

_TIMESTAMP = {"type": "string", "format": "date-time"}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {"code": {"enum": list(ErrorCode)}, "message": {"type": "string"}},
            }
        },
    },
    "Conversation": {
        "type": "object",
        "required": [
            "id",
            "prompt",
            "response",
            "status",
            "created_at",
            "completed_at",
            "model",
            "provider",
            "chunks",
            "error",
        ],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "prompt": {"type": "string"},
            "response": {"type": "string"},
            "status": {"enum": list(Status)},
            "created_at": _TIMESTAMP,
            "completed_at": {"oneOf": [_TIMESTAMP, {"type": "null"}]},
            "model": {"type": "string"},
            "provider": {"type": "string"},
            "chunks": {"type": "integer", "minimum": 0},
            "reviews": {
                "description": "Its reviews (in GET /history's items), notes left out.",
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["reviewer", "verdict", "labels"],
                    "additionalProperties": False,
                    "properties": {
                        "reviewer": {"type": "string", "maxLength": MAX_REVIEWER_CHARS},
                        "verdict": {"enum": list(Verdict)},
                        "labels": {
                            "type": "array",
                            "maxItems": MAX_LABELS,
                            "items": {"type": "string", "maxLength": MAX_LABEL_CHARS},
                        },
                    },
                },
            },
            "error": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"enum": list(ErrorCode)},
                            "message": {"type": ["string", "null"]},
                        },
                    },
                ]
            },
        },
    },
    "HistoryPage": {
        "type": "object",
        "required": ["items", "limit", "offset", "has_more"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Conversation"}},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "has_more": {"type": "boolean"},
        },
    },
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Review": {
        "type": "object",
        "required": [
            "conversation_id",
            "reviewer",
            "verdict",
            "labels",
            "note",
            "created_at",
            "updated_at",
        ],
        "additionalProperties": False,
        "properties": {
            "conversation_id": {"type": "string", "format": "uuid"},
            "reviewer": {"type": "string"},
            "verdict": {"enum": list(Verdict)},
            "labels": {
                "type": "array",
                "maxItems": MAX_LABELS,
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARS},
            },
            "note": {"type": "string", "maxLength": MAX_NOTE_CHARS},
            "created_at": _TIMESTAMP,
            "updated_at": _TIMESTAMP,
        },
    },
    "ReviewList": {
        "type": "object",
        "required": ["items"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Review"}}
        },
    },
    "Annotation": {
        "type": "object",
        "required": [
            "id",
            "conversation_id",
            "reviewer",
            "field",
            "start",
            "end",
            "label",
            "note",
            "created_at",
        ],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "conversation_id": {"type": "string", "format": "uuid"},
            "reviewer": {"type": "string"},
            "field": {"enum": ["prompt", "response"]},
            "start": {"type": "integer", "minimum": 0},
            "end": {"type": "integer", "minimum": 1},
            "label": {"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARS},
            "note": {"type": "string", "maxLength": MAX_NOTE_CHARS},
            "created_at": _TIMESTAMP,
        },
    },
    "AnnotationList": {
        "type": "object",
        "required": ["items"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Annotation"}}
        },
    },
    "ReviewerList": {
        "type": "object",
        "required": ["items"],
        "additionalProperties": False,
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["reviewer", "reviews", "last_review_at"],
                    "additionalProperties": False,
                    "properties": {
                        "reviewer": {"type": "string"},
                        "reviews": {"type": "integer", "minimum": 1},
                        "last_review_at": _TIMESTAMP,
                    },
                },
            }
        },
    },
    "Cancelling": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {"id": {"type": "string"}, "status": {"const": "cancelling"}},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}


# GET /agreement (SPEC 9): the history filters choose the conversations, `reviewers` whose
# reviews count.
_FIGURE = {
    "type": "object",
    "required": ["agreement", "kappa", "method"],
    "additionalProperties": False,
    "properties": {
        "agreement": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "kappa": {"type": ["number", "null"]},
        "method": {"enum": ["cohen", "fleiss"]},
    },
}
_SCHEMAS["Agreement"] = {
    "type": "object",
    "required": ["conversations", "reviewers", "verdict", "labels", "disagreements"],
    "additionalProperties": False,
    "properties": {
        "conversations": {"type": "integer", "minimum": 0},
        "reviewers": {"type": "array", "items": {"type": "string"}},
        "verdict": _FIGURE,
        "labels": {"type": "object", "additionalProperties": _FIGURE},
        "disagreements": {
            "type": "object",
            "required": ["count", "ids"],
            "additionalProperties": False,
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "ids": {
                    "type": "array",
                    "maxItems": 100,
                    "items": {"type": "string", "format": "uuid"},
                },
            },
        },
    },
}
_AGREEMENT_PATH = {
    "get": {
        "summary": "Agreement between reviewers: share and kappa per verdict and per label",
        "description": "Cohen's kappa when exactly two reviewers count, else Fleiss' kappa "
        "generalised to unequal raters per conversation; null where undefined.",
        "parameters": [
            _query(
                "q",
                {"type": "string", "maxLength": MAX_QUERY_CHARS, "pattern": _NO_NUL},
                'Web search syntax: words, "phrases", -excluded, or.',
            ),
            _query("status", {"enum": [*Status, ""]}, "Only this status; empty means any."),
            *(f for f in _HISTORY_FILTERS if f["name"] != "before"),
            _query(
                "reviewers",
                {"type": "string", "pattern": _NO_NUL},
                "Comma-separated names: only their reviews count (empty: everyone's).",
            ),
        ],
        "responses": {
            "200": _json("Agreement", "The figures, and the conversations they disagree on."),
            "401": _error("The API key is missing or wrong."),
            "422": _error("A filter or a reviewer name is invalid."),
            "503": _UNAVAILABLE,
        },
    }
}


# GET /stats (SPEC 10): the history's figures by bucket, from the rollups (migration 0013).
_PERCENTILES = {
    "type": "object",
    "required": ["p50", "p95"],
    "additionalProperties": False,
    "properties": {
        "p50": {"type": ["number", "null"], "minimum": 0},
        "p95": {"type": ["number", "null"], "minimum": 0},
    },
}
_COUNT = {"type": "integer"}
_STATS_FIGURES: dict[str, Any] = {
    "conversations": _COUNT,
    "by_status": {
        "type": "object",
        "required": list(Status),
        "additionalProperties": False,
        "properties": {status: _COUNT for status in Status},
    },
    "errors": {"type": "object", "additionalProperties": _COUNT},
    "ttfc_ms": _PERCENTILES,
    "duration_ms": _PERCENTILES,
    "chunks": {
        "type": "object",
        "required": ["mean"],
        "additionalProperties": False,
        "properties": {"mean": {"type": ["number", "null"]}},
    },
    "tokens": {
        "type": "object",
        "required": ["prompt", "completion", "estimated"],
        "additionalProperties": False,
        "properties": {"prompt": _COUNT, "completion": _COUNT, "estimated": _COUNT},
    },
    "reviews": {
        "type": "object",
        "required": ["reviewed", "good", "bad", "unsure"],
        "additionalProperties": False,
        "properties": {name: _COUNT for name in ("reviewed", "good", "bad", "unsure")},
    },
}
_SCHEMAS["StatsFigures"] = {
    "type": "object",
    "required": list(_STATS_FIGURES),
    "additionalProperties": False,
    "properties": _STATS_FIGURES,
}
_SCHEMAS["StatsBucket"] = {
    "type": "object",
    "required": ["start", *_STATS_FIGURES],
    "additionalProperties": False,
    "properties": {"start": {"type": "string", "format": "date-time"}, **_STATS_FIGURES},
}
_SCHEMAS["Stats"] = {
    "type": "object",
    "required": ["buckets", "totals", "estimate"],
    "additionalProperties": False,
    "properties": {
        "buckets": {
            "type": "array",
            "maxItems": MAX_STATS_BUCKETS,
            "items": {"$ref": "#/components/schemas/StatsBucket"},
        },
        "totals": {"$ref": "#/components/schemas/StatsFigures"},
        "estimate": {"type": "boolean"},
    },
}
_STATS_PATH = {
    "get": {
        "summary": "Conversations, statuses, errors, timings, chunks, tokens and reviews by bucket",
        "description": (
            "UTC buckets from `from` (default: 7 days before `to` by hour, 90 by day) to"
            " `to` (default: now), widened to whole buckets; at most"
            f" {MAX_STATS_BUCKETS:,}. Figures come from rollups when the filter is only"
            " status, model and time; any other filter is computed over the newest"
            f" {STATS_SAMPLE_SIZE:,} matching conversations and `estimate` is true."
            " Percentiles are within 9.05% (log-spaced histogram bins)."
        ),
        "parameters": [
            _query("bucket", {"enum": ["hour", "day", ""]}, "Bucket width (default hour)."),
            _query(
                "q",
                {"type": "string", "maxLength": MAX_QUERY_CHARS, "pattern": _NO_NUL},
                'Web search syntax: words, "phrases", -excluded, or (an estimate).',
            ),
            _query("status", {"enum": [*Status, ""]}, "Only this status; empty means any."),
            *_HISTORY_FILTERS,
        ],
        "responses": {
            "200": _json("Stats", "The figures per bucket and in total."),
            "401": _error("The API key is missing or wrong."),
            "422": _error(
                "A parameter is invalid (the message names it), `from` is later than `to`,"
                f" or the range holds more than {MAX_STATS_BUCKETS:,} buckets."
            ),
            "503": _error(
                "The database is unavailable, the query ran past SSE_LLM_QUERY_TIMEOUT"
                " (`query_timeout`), or too many are running (`too_many_queries`)."
            ),
        },
    }
}


async def openapi_endpoint(request: Request) -> Response:
    """GET /openapi.json."""
    return JSONResponse(build_openapi(service_of(request).settings))
