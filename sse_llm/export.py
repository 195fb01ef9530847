"""GET /export (SPEC 10): the filtered history as a download, in JSONL, CSV or OpenAI's JSONL.

Choices worth knowing before changing them:
- The first page is read before the response starts, so a bad database, a timeout or a
  refused connection is still a SPEC 6 error with its status. Once the headers are out,
  a failure can only cut the download short: the connection is closed without the last
  (empty) chunk of the chunked body, which every HTTP client reports as an incomplete
  download, so a truncated file is never mistaken for a whole one.
- At most settings.max_exports downloads run at once on the database, across replicas
  (each holds a database connection for as long as its client reads, and on it one of
  max_exports advisory-lock slots); one more is told 429 with Retry-After at once rather
  than queued, since a download may last minutes. A process's own semaphore turns one
  away before it opens a connection.
- When the client leaves, Starlette cancels the body's iteration; ExportResponse then
  closes the export's connection and frees its slot, whatever happened in between.
- CSV cells that a spreadsheet would run as a formula (starting with = + - @, a tab or
  a carriage return: OWASP's list) get a leading apostrophe, the escape spreadsheets
  show as text. The export is data for people's tools, so every cell is treated alike.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from psycopg import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sse_llm.api import conversation_json
from sse_llm.contract import ErrorCode, Status
from sse_llm.errors import ApiError
from sse_llm.export_queries import (
    ExportPage,
    claim_export_slot,
    export_pages,
    open_export_connection,
)
from sse_llm.history_filters import HistoryFilter, parse_filter
from sse_llm.reviews_api import annotation_json, review_json
from sse_llm.service import service_of
from sse_llm.store import Conversation

log = logging.getLogger(__name__)

# How long a client told "too many exports" should wait: a download takes seconds to minutes.
RETRY_AFTER_SECONDS = 10


class ExportFormat(StrEnum):
    """What GET /export can write."""

    JSONL = "jsonl"
    CSV = "csv"
    OPENAI = "openai"


CSV_COLUMNS = (
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
    "reviews",
    "annotations",
)
# Where a spreadsheet starts a formula (OWASP, "CSV Injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

_MEDIA_TYPES = {
    ExportFormat.JSONL: "application/x-ndjson",
    ExportFormat.CSV: "text/csv; charset=utf-8",
    ExportFormat.OPENAI: "application/x-ndjson",
}
_SUFFIXES = {
    ExportFormat.JSONL: ".jsonl",
    ExportFormat.CSV: ".csv",
    ExportFormat.OPENAI: "-openai.jsonl",
}


def export_json(conversation: Conversation, page: ExportPage) -> dict[str, Any]:
    """A `<conversation>` as GET /history/{id} renders it, with its full reviews and annotations."""
    return conversation_json(conversation) | {
        "reviews": [review_json(review) for review in page.reviews.get(conversation.id, [])],
        "annotations": [
            annotation_json(annotation) for annotation in page.annotations.get(conversation.id, [])
        ],
    }


def _json_line(value: Any) -> str:
    # ensure_ascii=False: the text as written; a newline inside a string is escaped by JSON.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"


def jsonl_lines(page: ExportPage) -> str:
    """One JSON object per conversation, one per line."""
    return "".join(_json_line(export_json(c, page)) for c in page.conversations)


def openai_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The chat as OpenAI's fine-tuning and evals JSONL want it: the thread, then the answer."""
    # Through /v1 the whole thread was stored as it was asked (migration 0003).
    asked = conversation.messages or [{"role": "user", "content": conversation.prompt}]
    return [*asked, {"role": "assistant", "content": conversation.response}]


def openai_lines(page: ExportPage) -> str:
    """One `{"messages": [...]}` per completed conversation."""
    return "".join(
        _json_line({"messages": openai_messages(c)})
        for c in page.conversations
        if c.status == Status.COMPLETED
    )


def csv_cell(value: Any) -> str:
    """A CSV cell: nested values as JSON text, None empty, a formula start escaped."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def csv_rows(rows: Iterable[Iterable[Any]]) -> str:
    """Rows as RFC 4180 CSV (CRLF, quoted where needed), every cell through csv_cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows([csv_cell(value) for value in row] for row in rows)
    return buffer.getvalue()


def csv_lines(page: ExportPage) -> str:
    """One CSV row per conversation, in CSV_COLUMNS' order."""
    return csv_rows(
        [export_json(c, page).get(column) for column in CSV_COLUMNS] for c in page.conversations
    )


_WRITERS: dict[ExportFormat, Callable[[ExportPage], str]] = {
    ExportFormat.JSONL: jsonl_lines,
    ExportFormat.CSV: csv_lines,
    ExportFormat.OPENAI: openai_lines,
}


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII `filename` and its RFC 5987 `filename*` twin."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def export_filename(chosen: ExportFormat, now: datetime) -> str:
    """sse-llm-history-<UTC time>.jsonl, .csv or -openai.jsonl."""
    return f"sse-llm-history-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}{_SUFFIXES[chosen]}"


def parse_format(request: Request) -> ExportFormat:
    """The `format` parameter (default jsonl), or a 422 naming it."""
    raw = request.query_params.get("format", "").strip() or ExportFormat.JSONL
    try:
        return ExportFormat(raw)
    except ValueError:
        message = f"format must be one of: {', '.join(ExportFormat)}."
        raise ApiError(422, ErrorCode.VALIDATION_ERROR, message) from None


def exported_filter(request: Request, chosen: ExportFormat) -> HistoryFilter | None:
    """The history filters of the request (strict), `openai`'s limited to completed ones;
    None when nothing can match (openai asked for another status)."""
    history_filter = parse_filter(request.query_params, strict=True)
    if chosen != ExportFormat.OPENAI:
        return history_filter
    if history_filter.status not in (None, Status.COMPLETED):
        return None
    return replace(history_filter, status=Status.COMPLETED)


class ExportResponse(StreamingResponse):
    """A streamed download that, however it ends, closes its connection and frees its slot."""

    def __init__(
        self, body: AsyncIterator[str], release: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(body, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the download; then (finished, failed or its client gone) release it."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Outside the body's cancelled task group: these awaits are not cancelled.
            await self._release()


async def _body(
    header: str,
    first: ExportPage | None,
    pages: AsyncIterator[ExportPage] | None,
    write: Callable[[ExportPage], str],
) -> AsyncIterator[str]:
    """The download: the header, then one piece per page (the first one read already)."""
    if header:
        yield header
    if first is None or pages is None:
        return
    yield write(first)
    try:
        async for page in pages:
            yield write(page)
    except Exception:
        # The headers are out: all that is left is to cut the download short (see above).
        log.warning("export stopped by an error after its first page", exc_info=True)
        raise


async def export(request: Request) -> Response:
    """GET /export: every conversation the history filters choose, as a download (SPEC 10)."""
    chosen = parse_format(request)
    history_filter = exported_filter(request, chosen)
    headers = {
        "Content-Disposition": content_disposition(export_filename(chosen, datetime.now(UTC))),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    if request.method == "HEAD":  # the headers only: no slot, no connection, no pages
        return Response(media_type=_MEDIA_TYPES[chosen], headers=headers)
    service = service_of(request)
    slots = service.exports
    if slots.locked():
        raise _too_many(service.settings.max_exports)
    await slots.acquire()  # at once: locked() said a slot is free, and nothing awaited since
    conn: AsyncConnection | None = None
    pages: AsyncIterator[ExportPage] | None = None
    first: ExportPage | None = None
    try:
        if history_filter is not None:
            assert service.settings.database_url is not None  # create_app checked it
            conn = await open_export_connection(
                service.settings.database_url, service.settings.query_timeout
            )
            if not await claim_export_slot(conn, service.settings.max_exports):
                raise _too_many(service.settings.max_exports)
            pages = export_pages(conn, history_filter)
            first = await anext(pages, None)
    except BaseException:
        await _release(conn, slots)
        raise
    header = csv_rows([CSV_COLUMNS]) if chosen == ExportFormat.CSV else ""
    return ExportResponse(
        _body(header, first, pages, _WRITERS[chosen]),
        lambda: _release(conn, slots),
        media_type=_MEDIA_TYPES[chosen],
        headers=headers,
    )


def _too_many(max_exports: int) -> ApiError:
    return ApiError(
        429,
        ErrorCode.TOO_MANY_EXPORTS,
        f"{max_exports} exports are running already. Try again shortly.",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _release(conn: AsyncConnection | None, slots: asyncio.Semaphore) -> None:
    """Close the export's connection (its server process ends) and free its slot."""
    try:
        if conn is not None:
            await conn.close()
    finally:
        slots.release()


routes = [Route("/export", export, methods=["GET"])]
