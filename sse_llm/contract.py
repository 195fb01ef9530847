"""The values clients and processes rely on, each defined once: statuses, stop reasons,
error codes, the request limits, and the NOTIFY channels.

`StrEnum`, not `Enum`: a member is a `str`, so psycopg stores it by its value (an `Enum`
member it dumps by name, which the `CHECK` constraints refuse), JSON encodes it as its
value, and rows read back compare equal to it.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Where a conversation stands (SPEC 4). The stored status is the end its clients saw."""

    STREAMING = "streaming"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class StopReason(StrEnum):
    """Why a generation was stopped before its provider finished (`Generation.stop`)."""

    CANCELLED = "cancelled"  # a user asked
    INTERRUPTED = "interrupted"  # this process is shutting down
    TIMEOUT = "timeout"  # the watchdog: the model went silent or took too long
    STORAGE_UNAVAILABLE = "storage_unavailable"  # the writer could not store its chunks
    STORAGE_REJECTED = "storage_rejected"  # the database refused one of its chunks
    FENCED = "fenced"  # another process settled the conversation


class ErrorCode(StrEnum):
    """Every `error.code` a client can see: in an error response (SPEC 6) or a stream's end."""

    # A request refused.
    ERROR = "error"  # an HTTP error with no more specific code
    BAD_REQUEST = "bad_request"
    INVALID_JSON = "invalid_json"
    INVALID_HOST = "invalid_host"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    ALREADY_ENDED = "already_ended"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION_ERROR = "validation_error"
    RATE_LIMITED = "rate_limited"
    CLIENT_CLOSED = "client_closed"
    SERVICE_UNAVAILABLE = "service_unavailable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    QUERY_TIMEOUT = "query_timeout"
    TOO_MANY_QUERIES = "too_many_queries"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"
    TOO_MANY_STREAMS = "too_many_streams"
    TOO_MANY_EXPORTS = "too_many_exports"
    INTERNAL_ERROR = "internal_error"
    # A stream's end (also stored in the conversation's row).
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    STORAGE_REJECTED = "storage_rejected"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


class Verdict(StrEnum):
    """A reviewer's judgement of a conversation (SPEC 9)."""

    GOOD = "good"
    BAD = "bad"
    UNSURE = "unsure"


class DeliveryVia(StrEnum):
    """How a client connection reached a conversation (SPEC 10, deliveries)."""

    STREAM = "stream"  # the POST /stream that started it
    ATTACH = "attach"  # GET /conversations/{id}/stream, with or without Last-Event-ID
    V1 = "v1"  # POST /v1/chat/completions
    DASHBOARD = "dashboard"  # the detail page's live view


class DeliveryEnd(StrEnum):
    """How a client connection ended (SPEC 10); NULL in the row while it is open."""

    DONE = "done"  # it sent the `done` event
    ERROR = "error"  # it sent the `error` event (the stream's end)
    CLIENT_LEFT = "client_left"  # the client disconnected
    DROPPED = "dropped"  # the client stopped reading (its queue overflowed)
    LOST = "lost"  # its process died with it open (marked by recovery)


# The end of a stream whose process stopped: said by the process itself or its settler.
INTERRUPTED_MESSAGE = "The service stopped while this answer was streaming."

# Request limits, shared by the routes, the dashboard and the OpenAPI description.
MAX_BODY_BYTES = 1024 * 1024
MAX_NESTING = 64  # JSON bodies nested deeper are refused before parsing
PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100
MAX_OFFSET = 1_000_000_000
MAX_QUERY_CHARS = 1000
MAX_MODEL_CHARS = 200
MAX_CHUNK_ID = 2**31 - 1  # chunks.seq is an int4: the largest Last-Event-ID

# Reviews (SPEC 9).
MAX_REVIEWER_CHARS = 64
MAX_LABELS = 20  # per review
MAX_LABEL_CHARS = 40
MAX_NOTE_CHARS = 4000
CLAIM_SECONDS = 600  # a review queue's soft claim on the conversation it served

# PostgreSQL NOTIFY channels between processes (store.py and recovery_store.py send,
# broadcast.py listens).
CHUNKS_CHANNEL = "sse_llm_chunks"  # payload: conversation ids with new chunks or an end
CANCEL_CHANNEL = "sse_llm_cancel"  # payload: a conversation id to cancel
