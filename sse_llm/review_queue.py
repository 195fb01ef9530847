"""The review queue (issue 14): `/review` serves the next ended conversation to judge from
a slice of the history, claimed for a while so colleagues on the same slice get others.

The page's URL holds everything: the history filters choosing the slice, `mode` (`mine`:
not yet reviewed by me, `nobody`: not reviewed by anyone), `order` (`newest`, or
`sample`: a random sample that does not repeat), `blind=1`, and `after` (where a skip
moved the walk on). Verdicts and skips are plain form posts answered with a 303 to the
next conversation; static/review.js adds the keys.

Blind mode: until my verdict on a conversation is in, its page holds neither its model,
its provider nor anyone else's review, in any byte (the page loads no JSON or events).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode
from uuid import UUID

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from sse_llm import review_queries, review_store, reviews
from sse_llm.access import current_reviewer, read_form, same_origin
from sse_llm.contract import MAX_NOTE_CHARS, ErrorCode, Verdict
from sse_llm.dashboard import html_errors, render
from sse_llm.history_filters import HistoryFilter
from sse_llm.review_queries import QueueMode, QueueOrder
from sse_llm.review_slices import parse_slice, slice_sql
from sse_llm.service import service_of

_Choice = TypeVar("_Choice", QueueMode, QueueOrder)
_FORM_LIMIT = 64 * 1024  # a note of 4,000 characters, percent-encoded, and the queue's URL


@dataclass(frozen=True)
class Queue:
    """What a queue URL says: the slice, the mode, the order, blind, and the walk's point."""

    slice: HistoryFilter
    mode: QueueMode = QueueMode.MINE
    order: QueueOrder = QueueOrder.NEWEST
    blind: bool = False
    after: UUID | None = None

    @classmethod
    def from_params(cls, params: QueryParams) -> Queue:
        """Read a queue URL forgivingly (a person typed it): unknown values fall back."""
        return cls(
            slice=parse_slice(params, strict=False),
            mode=_member(QueueMode, params.get("mode"), QueueMode.MINE),
            order=_member(QueueOrder, params.get("order"), QueueOrder.NEWEST),
            blind=params.get("blind") in ("1", "on", "true"),
            after=_uuid(params.get("after")),
        )

    def query_string(self, *, after: UUID | None = None, **extra: str) -> str:
        """This queue's URL query, walking on from `after`."""
        params = self.slice.pairs()
        params += [("mode", self.mode), ("order", self.order)]
        if self.blind:
            params.append(("blind", "1"))
        if after is not None:
            params.append(("after", str(after)))
        params += list(extra.items())
        return urlencode(params)


def _member(kind: type[_Choice], raw: str | None, default: _Choice) -> _Choice:
    try:
        return kind(raw) if raw else default
    except ValueError:
        return default


def _uuid(raw: str | None) -> UUID | None:
    try:
        return UUID(raw) if raw else None
    except ValueError:
        return None


def contradictory(queue: Queue, reviewer: str) -> bool:
    """Whether the slice can hold nothing the mode serves, whatever the history: a filter
    that needs a review (a verdict, a label, a consensus, reviewed, a reviewer's own
    review) with `nobody`, or my own reviews with `mine`. Answered without a query (a
    walk would read the whole history to find nothing)."""
    f = queue.slice
    by_reviewer = f.reviewer is not None and f.reviewed is not False
    if queue.mode is QueueMode.NOBODY:
        return bool(f.verdict or f.consensus or f.labels or f.reviewed is True or by_reviewer)
    return by_reviewer and f.reviewer == reviewer


async def review_page(request: Request) -> Response:
    """GET /review: the next conversation of the slice to judge, claimed for me."""
    queue = Queue.from_params(request.query_params)
    reviewer = current_reviewer(request)
    context: dict[str, Any] = {"active": "review", "queue": queue, "reviewer": reviewer}
    context.update(conversation=None, others=[], judged=None, judged_reviews=[], walked_on=None)
    context["max_note_chars"] = MAX_NOTE_CHARS
    if reviewer is None:
        return render(request, "review.html", context)
    service = service_of(request)
    judged_id = _uuid(request.query_params.get("done"))
    if judged_id is not None:
        judged_reviews = await review_queries.reviews_of(service.pool, judged_id)
        # Only once my verdict on it is in may its model and colleagues' reviews show
        # (`done` is in the URL: anyone can write any id there).
        if any(review.reviewer == reviewer for review in judged_reviews):
            context["judged"] = await review_queries.get_conversation(service.pool, judged_id)
            context["judged_reviews"] = judged_reviews
    if contradictory(queue, reviewer):
        return render(request, "review.html", context)  # nothing to review, at once
    conversation_id = await review_queries.next_to_review(
        service.pool,
        service.query_pool,
        reviewer=reviewer,
        slice_=slice_sql(queue.slice),
        mode=queue.mode,
        order=queue.order,
        after=queue.after,
    )
    if isinstance(conversation_id, review_queries.WalkedOn):
        # Nothing in this stretch of the slice: the page links on, past it.
        context["walked_on"] = queue.query_string(after=conversation_id.after)
        context["walk_limit"] = review_queries.WALK_LIMIT
    elif conversation_id is not None:
        context["conversation"] = await review_queries.get_conversation(
            service.pool, conversation_id
        )
        if not queue.blind:
            context["others"] = await review_queries.reviews_of(service.pool, conversation_id)
    return render(request, "review.html", context)


async def _posted(request: Request) -> tuple[str, UUID, Queue, dict[str, str]] | Response:
    """The reviewer, conversation and queue of a queue form, or the response refusing it."""
    # Every change from a page must come from this service's pages, in open mode too and
    # with no cookie at all (SPEC 8): the middleware refuses a foreign Origin; a browser
    # always names the origin of a form post, so one that names none is refused here.
    if not same_origin(request):
        return _refused(403, ErrorCode.FORBIDDEN, "Send the queue's forms from its own page.")
    reviewer = current_reviewer(request)
    if reviewer is None:
        return _refused(403, ErrorCode.FORBIDDEN, "Say who you are on /review first.")
    form = await read_form(request, _FORM_LIMIT)
    conversation_id = _uuid(form.get("conversation_id"))
    if conversation_id is None:
        return _refused(422, ErrorCode.VALIDATION_ERROR, "conversation_id must be an id.")
    queue = Queue.from_params(QueryParams(form.get("queue", "")))
    return reviewer, conversation_id, queue, form


async def submit_verdict(request: Request) -> Response:
    """POST /review/verdict: record my verdict (labels, note) and go on to the next."""
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    reviewer, conversation_id, queue, form = posted
    try:
        verdict: Verdict = reviews.verdict(form.get("verdict"))
        labels = reviews.labels(part for part in form.get("labels", "").split(",") if part.strip())
        note = reviews.note(form.get("note", ""))
    except ValueError as exc:
        return _refused(422, ErrorCode.VALIDATION_ERROR, str(exc))
    pool = service_of(request).pool
    if (
        await review_store.put_review(pool, conversation_id, reviewer, verdict, labels, note)
        is None
    ):
        return _refused(404, ErrorCode.NOT_FOUND, "No conversation has this id.")
    # Judged: the claim has done its work (were this lost, it would expire by itself).
    await review_queries.release_claim(pool, conversation_id, reviewer)
    # The walk goes on from the one just judged: each next page reads a few rows by index,
    # not again the run of conversations judged since the walk began.
    target = queue.query_string(after=conversation_id, done=str(conversation_id))
    return RedirectResponse(f"/review?{target}", status_code=303)


async def skip(request: Request) -> Response:
    """POST /review/skip: give the conversation back and walk on past it."""
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    reviewer, conversation_id, queue, _ = posted
    await review_queries.release_claim(service_of(request).pool, conversation_id, reviewer)
    return RedirectResponse(f"/review?{queue.query_string(after=conversation_id)}", status_code=303)


def _refused(status: int, code: ErrorCode, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


routes: list[BaseRoute] = [
    Route("/review", html_errors(review_page), methods=["GET"], name="review"),
    Route("/review/verdict", submit_verdict, methods=["POST"]),
    Route("/review/skip", skip, methods=["POST"]),
]
