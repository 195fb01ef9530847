"""ApiError and the handlers that turn every failure into the SPEC 6 JSON shape."""

from __future__ import annotations

import logging

import psycopg
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sse_llm.contract import ErrorCode
from sse_llm.database import QueriesBusy, QueryTimeout

log = logging.getLogger(__name__)

_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.VALIDATION_ERROR,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}


class ApiError(Exception):
    """An error a client should see: raise it anywhere, one handler renders it."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class StorageUnavailable(Exception):
    """The database could not store a batch within the storage timeout (the writer's)."""


class StorageRejected(ApiError):
    """The database refused what a request asked to store (the writer isolated it).

    Validation should refuse such input first; should some slip through, the request
    fails alone, with a 422 (retrying the same text cannot succeed), not the batch.
    """

    def __init__(self) -> None:
        message = "The database refused to store this request's text."
        super().__init__(422, ErrorCode.STORAGE_REJECTED, message)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """`{"error": {"code": ..., "message": ...}}` with its status."""
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    """Render an ApiError."""
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Render Starlette's own errors (unknown route 404, wrong method 405) in our shape."""
    assert isinstance(exc, HTTPException)
    code = _CODES.get(exc.status_code, ErrorCode.ERROR)
    if exc.status_code == 404:
        message = "Nothing here. See the README for the endpoints."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, message, headers)


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """The database is unreachable: 503, and the details only in the log."""
    log.warning("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    message = "The database is unavailable. Try again shortly."
    return error_response(503, ErrorCode.DATABASE_UNAVAILABLE, message, {"Retry-After": "5"})


# The texts of the two ways a history query is refused, shared with the dashboard's pages.
QUERY_TIMEOUT_MESSAGE = "The query took too long; narrow the search."
QUERIES_BUSY_MESSAGE = "The history is busy with other queries. Try again shortly."


async def handle_query_timeout(request: Request, exc: Exception) -> Response:
    """A history query ran past SSE_LLM_QUERY_TIMEOUT and PostgreSQL cancelled it: 503."""
    # An OperationalError, but the database is fine: saying it is unavailable would be
    # a lie, and retrying the same search would only time out again.
    log.warning("query cancelled during %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, ErrorCode.QUERY_TIMEOUT, QUERY_TIMEOUT_MESSAGE)


async def handle_queries_busy(request: Request, exc: Exception) -> Response:
    """Every query connection stayed busy: 503, and try again in a moment."""
    log.warning("queries busy during %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503, ErrorCode.TOO_MANY_QUERIES, QUERIES_BUSY_MESSAGE, {"Retry-After": "1"}
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Anything else: a generic 500; the traceback goes to the log, never to the client."""
    log.error("unhandled error during %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, ErrorCode.INTERNAL_ERROR, "Something went wrong on our side.")


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    StorageUnavailable: handle_database_error,
    HTTPException: handle_http_exception,
    # Starlette takes the handler of the nearest class in the exception's MRO, so these
    # two win over their bases below.
    QueryTimeout: handle_query_timeout,
    QueriesBusy: handle_queries_busy,
    psycopg.OperationalError: handle_database_error,
    PoolTimeout: handle_database_error,
    Exception: handle_unexpected,
}
