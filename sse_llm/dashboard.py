"""The review dashboard: server-rendered HTML pages (SPEC 5).

`/` lists the history, `/conversations/{id}` shows one conversation, `/playground`
sends a prompt. The pages are complete without JavaScript; static/app.js only follows
a streaming conversation live and runs the playground.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import jinja2
import psycopg
from markupsafe import Markup
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from sse_llm import __version__, access, history_queries, passages, review_store
from sse_llm.contract import (
    MAX_OFFSET,
    MAX_QUERY_CHARS,
    PAGE_SIZE_DEFAULT,
    PAGE_SIZE_MAX,
    Status,
    Verdict,
)
from sse_llm.database import QueriesBusy, QueryTimeout
from sse_llm.delivery_timeline import build_timeline
from sse_llm.errors import QUERIES_BUSY_MESSAGE, QUERY_TIMEOUT_MESSAGE
from sse_llm.history_filters import HistoryFilter, parse_filter
from sse_llm.history_queries import HIT_START, HIT_STOP
from sse_llm.markdown import MAX_RENDER_CHARS, THREAD_ABOVE_CHARS, MarkdownRenderer
from sse_llm.providers.base import message_text
from sse_llm.resources import resource_dir
from sse_llm.service import service_of

log = logging.getLogger(__name__)

# Everything a page runs or wears comes from /static: no inline script, no style
# attributes, so injected markup could do nothing even if it slipped past escaping.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: browsers then send `Origin: null` on same-site form posts (sign-in).
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Cache-Control": "no-store",  # pages show live data (and, with a key set, private data)
}

Handler = Callable[[Request], Awaitable[Response]]

_MARKERS = re.compile(f"([{HIT_START}{HIT_STOP}])")


@dataclass(frozen=True)
class HistorySearch:
    """What the history page shows: the history filters of its URL, `limit` and `offset`."""

    filter: HistoryFilter = field(default_factory=HistoryFilter)
    limit: int = PAGE_SIZE_DEFAULT
    offset: int = 0

    @classmethod
    def from_request(cls, request: Request) -> HistorySearch:
        """Read the query string forgivingly: a person typed it, so out-of-range values are
        clamped and what cannot be read is ignored instead of answered with an error page."""
        params = request.query_params
        q = params.get("q", "").replace("\x00", "").strip()[:MAX_QUERY_CHARS]
        chosen = replace(parse_filter(params, strict=False), q=q or None)
        return cls(
            filter=chosen,
            limit=_clamped_int(params.get("limit"), PAGE_SIZE_DEFAULT, 1, PAGE_SIZE_MAX),
            offset=_clamped_int(params.get("offset"), 0, 0, MAX_OFFSET),
        )

    @property
    def q(self) -> str:
        """The search words, or ""."""
        return self.filter.q or ""

    @property
    def status(self) -> str:
        """The status filter, or ""."""
        return self.filter.status or ""

    def link(self, **changes: Any) -> str:
        """The URL of this page with some parameters changed (None or "" drops one).

        Any change starts from the newest conversation again unless it names `before`.
        """
        limit = changes.pop("limit", self.limit)
        offset = changes.pop("offset", self.offset) or 0
        fields: dict[str, Any] = {
            key: (value if value not in ("", None) else None) for key, value in changes.items()
        }
        fields.setdefault("before", None)
        if "labels" in fields:
            fields["labels"] = tuple(fields["labels"] or ())
        chosen = replace(self.filter, **fields)
        pairs = chosen.pairs()
        if limit != PAGE_SIZE_DEFAULT:
            pairs.append(("limit", str(limit)))
        if offset:
            pairs.append(("offset", str(offset)))
        return f"/?{urlencode(pairs)}" if pairs else "/"

    def with_label(self, label: str) -> str:
        """The URL of this page's first page, also asking for `label`."""
        return self.link(offset=0, labels=(*dict.fromkeys((*self.filter.labels, label)),))

    def chips(self) -> list[tuple[str, str]]:
        """Each active filter as (what it says, the URL without it)."""
        chosen = self.filter
        found: list[tuple[str, str]] = []
        for name, value in (
            ("search", chosen.q),
            ("status", chosen.status),
            ("verdict", chosen.verdict),
            ("consensus", chosen.consensus),
            ("reviewer", chosen.reviewer),
            ("model", chosen.model),
        ):
            if value:
                parameter = "q" if name == "search" else name
                found.append((f"{name}: {value}", self.link(offset=0, **{parameter: None})))
        for label in chosen.labels:
            rest = tuple(other for other in chosen.labels if other != label)
            found.append((f"label: {label}", self.link(offset=0, labels=rest)))
        if chosen.reviewed is not None:
            said = "reviewed" if chosen.reviewed else "not reviewed"
            found.append((said, self.link(offset=0, reviewed=None)))
        if chosen.from_ is not None:
            found.append(
                (f"from {format_utc(chosen.from_, True)}", self.link(offset=0, from_=None))
            )
        if chosen.to is not None:
            found.append((f"until {format_utc(chosen.to, True)}", self.link(offset=0, to=None)))
        if chosen.delivered:
            found.append(("no client was sent the end", self.link(offset=0, delivered=None)))
        return found


def _clamped_int(raw: str | None, default: int, low: int, high: int) -> int:
    try:
        value = int(raw) if raw else default
    except ValueError:
        return default
    return min(max(value, low), high)


def _local_input(moment: datetime | None) -> str:
    """A time as a datetime-local input's value, in UTC (the form says so)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M") if moment else ""


async def history_page(request: Request) -> Response:
    """GET /: the history, newest first, with search, the history filters, counts and paging."""
    if any(value.strip() == "" for _, value in request.query_params.multi_items()):
        # A submitted form sends its empty fields too: answer with the short URL, the
        # one worth bookmarking.
        return RedirectResponse(HistorySearch.from_request(request).link(), status_code=303)
    search = HistorySearch.from_request(request)
    # Both reads grow with the history: the query pool, under its statement timeout.
    pool = service_of(request).query_pool
    page = await history_queries.list_history_rows(
        pool, limit=search.limit, offset=search.offset, history_filter=search.filter
    )
    counts = await history_queries.count_by_status(pool)
    by_status = {count.status: count.count for count in counts}
    context = {
        "active": "history",
        "search": search,
        "rows": page.items,
        "reviews": page.reviews,
        "has_more": page.has_more,
        "counts": [(status, by_status.get(status, 0)) for status in Status],
        "total": sum(by_status.values()),
        "statuses": list(Status),
        "verdicts": list(Verdict),
        "default_limit": PAGE_SIZE_DEFAULT,
        "max_query_chars": MAX_QUERY_CHARS,
        "from_value": _local_input(search.filter.from_),
        "to_value": _local_input(search.filter.to),
    }
    return render(request, "history.html", context)


async def conversation_page(request: Request) -> Response:
    """GET /conversations/{id}: one conversation, as Markdown or (`?view=raw`) as raw text
    with its annotations; app.js follows it live while it streams."""
    try:
        conversation_id = UUID(request.path_params["conversation_id"])
    except ValueError:
        return not_found(request)
    # One row, as bounded as attach's read of it: the main pool, never queued behind
    # searches (a flood of them must not hide how a conversation ended).
    service = service_of(request)
    conversation = await history_queries.get_conversation_detail(service.pool, conversation_id)
    if conversation is None:
        return not_found(request)
    duration = None
    if conversation.completed_at is not None:
        duration = (conversation.completed_at - conversation.created_at).total_seconds()
    ended = conversation.status != Status.STREAMING
    # A streaming answer is shown raw (it grows live, and a half-written Markdown table
    # or fence would render wrongly); it is rendered once it has ended.
    view = "raw" if request.query_params.get("view") == "raw" or not ended else "rendered"
    # Imported here: review_pages builds on this module (render, not_found, this page).
    from sse_llm.review_pages import review_panel

    context: dict[str, Any] = {
        "conversation": conversation,
        "duration": duration,
        "ended": ended,
        "view": view,
        "thread": thread_of(conversation),
        "reviewer": access.current_reviewer(request) or "",
        "review_panel": await review_panel(request, conversation),
        "timeline": await build_timeline(service.pool, conversation),
    }
    if view == "rendered":
        context.update(await rendered_texts(request, conversation))
    else:
        context.update(await annotated_texts(request, conversation, ended))
    return render(request, "conversation.html", context)


@dataclass(frozen=True)
class ThreadMessage:
    """One turn of a /v1 conversation's message thread, as the page shows it."""

    role: str
    name: str
    text: str
    is_prompt: bool  # the last user message: the stored `prompt`, which annotations cover


def thread_of(conversation: history_queries.ConversationDetail) -> list[ThreadMessage]:
    """The messages a /v1 call sent (empty for /stream), the last user turn marked."""
    messages = conversation.messages or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return [
        ThreadMessage(
            role=str(message.get("role", "")),
            name=str(message.get("name") or ""),
            text=message_text(message.get("content")),
            is_prompt=index == last_user,
        )
        for index, message in enumerate(messages)
    ]


def markdown_renderer(request: Request) -> MarkdownRenderer:
    """The app's one renderer (and its cache), kept with the templates it serves."""
    renderer = service_of(request).templates.env.globals["markdown_renderer"]
    assert isinstance(renderer, MarkdownRenderer)
    return renderer


async def rendered_texts(
    request: Request, conversation: history_queries.ConversationDetail
) -> dict[str, Any]:
    """The prompt, the answer and each thread message as Markdown (None: too large)."""
    renderer = markdown_renderer(request)
    key = str(conversation.id)
    thread = thread_of(conversation)
    return {
        "prompt_html": await renderer.render(
            (key, "prompt", len(conversation.prompt)), conversation.prompt
        ),
        "response_html": await renderer.render(
            (key, "response", len(conversation.response)), conversation.response
        ),
        "thread_html": [
            await renderer.render((key, f"message-{i}", len(m.text)), m.text)
            for i, m in enumerate(thread)
        ],
        "max_render_chars": MAX_RENDER_CHARS,
    }


async def annotated_texts(
    request: Request, conversation: history_queries.ConversationDetail, ended: bool
) -> dict[str, Any]:
    """The prompt and the answer cut into segments at their annotations, and the list."""
    service = service_of(request)
    found = await review_store.list_annotations(service.pool, conversation.id)
    annotations = found or []
    by_field = {
        field: [a for a in annotations if a.field == field] for field in ("prompt", "response")
    }
    texts = {"prompt": conversation.prompt, "response": conversation.response}
    listed = [(a, passages.quote(texts.get(a.field, ""), a)) for a in annotations]
    # Labels already in use, for the label field's autocomplete (a bounded read).
    labels = await review_store.labels_in_use(service.query_pool) if ended else []
    return {
        "prompt_segments": await segments(conversation.prompt, by_field["prompt"]),
        "response_segments": await segments(conversation.response, by_field["response"]),
        "annotations": listed,
        "label_choices": sorted({*labels, *(a.label for a in annotations)}),
    }


async def segments(text: str, annotations: list[review_store.Annotation]) -> Markup:
    """passages.render, in a worker thread for a long text (about 8 ms per 10,000
    characters of CR LF text): the raw view has no size cap, the event loop must not wait."""
    if len(text) > THREAD_ABOVE_CHARS:
        return await asyncio.to_thread(passages.render, text, annotations)
    return passages.render(text, annotations)


async def playground_page(request: Request) -> Response:
    """GET /playground: a prompt form; app.js streams the answer into the page."""
    service = service_of(request)
    context = {
        "active": "playground",
        "provider": service.provider.name,
        "model": service.provider.model,
        "max_prompt_chars": service.settings.max_prompt_chars,
    }
    return render(request, "playground.html", context)


def not_found(request: Request) -> Response:
    """The HTML 404 page for a conversation id that is unknown or not an id at all."""
    context = {
        "heading": "Conversation not found",
        "message": "No conversation has this id. It may be mistyped.",
    }
    return render(request, "error.html", context, status_code=404)


def html_errors(handler: Handler) -> Handler:
    """Answer a database outage or a refused query with an HTML page, not the API's JSON
    (the page is for people)."""

    @functools.wraps(handler)
    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except QueryTimeout as exc:  # before OperationalError, its base
            log.warning("query cancelled during GET %s: %s", request.url.path, exc)
            return error_page(request, "Query took too long", QUERY_TIMEOUT_MESSAGE)
        except QueriesBusy as exc:  # before PoolTimeout, its base
            log.warning("queries busy during GET %s: %s", request.url.path, exc)
            heading = "History busy"
            return error_page(request, heading, QUERIES_BUSY_MESSAGE, {"Retry-After": "1"})
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("database unavailable during GET %s: %s", request.url.path, exc)
            message = "The history cannot be read right now. Try again in a few seconds."
            return error_page(request, "Database unavailable", message, {"Retry-After": "5"})

    return handle


def error_page(
    request: Request, heading: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """The HTML 503 page: what went wrong and what to do, never its technical details."""
    context = {"heading": heading, "message": message}
    return render(request, "error.html", context, 503, headers)


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """A page from `templates/`, with the security headers every page carries."""
    return service_of(request).templates.TemplateResponse(
        request,
        template,
        context,
        status_code=status_code,
        headers={**SECURITY_HEADERS, **(headers or {})},
    )


def create_templates() -> Jinja2Templates:
    """The Jinja environment: autoescaping on for every template, undefined names are errors."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(resource_dir("templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.globals["version"] = __version__
    environment.globals["markdown_renderer"] = MarkdownRenderer()  # one per app, with its cache
    environment.filters["hits"] = split_hits
    environment.filters["utc"] = format_utc
    environment.filters["seconds"] = format_seconds
    environment.filters["thousands"] = "{:,}".format
    environment.filters["message_text"] = message_text
    return Jinja2Templates(env=environment)


def split_hits(text: str) -> list[tuple[str, bool]]:
    """Split a search excerpt into (text, is_hit) parts at the HIT_START/HIT_STOP markers.

    The template wraps hits in <mark> and escapes every part, so highlighting needs no
    trusted HTML; store.py removes the markers from stored text before marking the hits.
    """
    parts: list[tuple[str, bool]] = []
    hit = False
    for piece in _MARKERS.split(text):
        if piece in (HIT_START, HIT_STOP):
            hit = piece == HIT_START
        elif piece:
            parts.append((piece, hit))
    return parts


def format_utc(moment: datetime, short: bool = False) -> str:
    """A time in UTC, to the minute (`short`) or to the second."""
    pattern = "%Y-%m-%d %H:%M UTC" if short else "%Y-%m-%d %H:%M:%S UTC"
    return moment.astimezone(UTC).strftime(pattern)


def format_seconds(seconds: float | None) -> str:
    """A duration for people: 245 ms, 3.2 s, 4 min 5 s; a dash when unknown."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


routes: list[BaseRoute] = [
    Route("/", html_errors(history_page), methods=["GET"], name="history_page"),
    Route(
        "/conversations/{conversation_id}",
        html_errors(conversation_page),
        methods=["GET"],
        name="conversation_page",
    ),
    Route("/playground", html_errors(playground_page), methods=["GET"], name="playground"),
]
