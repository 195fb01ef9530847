"""The detail page's review panel and its plain HTML forms (SPEC 5, 9): no JavaScript needed.

`review_panel` is what templates/_reviews.html shows: every review of the conversation
and, for a reviewer with a name, their own review's form. The forms post here and are
answered with a 303 back to the page; a refused form is answered with the page itself
(422), the error shown beside the form and what was typed kept in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote
from uuid import UUID

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from sse_llm import dashboard, review_store, reviews
from sse_llm.access import current_reviewer
from sse_llm.contract import Verdict
from sse_llm.review_store import Review
from sse_llm.service import service_of

# A note of 4,000 characters of 4-byte UTF-8, percent-encoded, is 48 KB; with room to spare.
MAX_FORM_BYTES = 128 * 1024


@dataclass(frozen=True)
class ReviewForm:
    """What the review form shows: the saved review, or what was typed and why it was refused."""

    verdict: str = ""
    labels: str = ""  # comma-separated, as typed
    note: str = ""
    error: str | None = None

    @classmethod
    def of(cls, review: Review | None) -> ReviewForm:
        """The form filled in with a saved review (empty without one)."""
        if review is None:
            return cls()
        return cls(review.verdict, ", ".join(review.labels), review.note)


@dataclass(frozen=True)
class ReviewPanel:
    """Everything templates/_reviews.html needs."""

    conversation_id: UUID
    reviews: list[Review]
    reviewer: str | None  # who this browser reviews as; None: no name given yet
    ask_name: bool  # open mode without a name: show the "who are you?" form
    can_rename: bool  # open mode: the name is this browser's cookie, changed on /reviewer
    mine: Review | None
    form: ReviewForm
    labels_in_use: list[str]
    verdicts: list[Verdict]
    here: str  # this page, for the forms' way back


async def review_panel(request: Request, conversation_id: UUID) -> ReviewPanel:
    """The reviews of a conversation and this reviewer's form (a refused one kept as typed)."""
    pool = service_of(request).pool
    items = await review_store.list_reviews(pool, conversation_id) or []
    reviewer = current_reviewer(request)
    mine = next((review for review in items if review.reviewer == reviewer), None)
    refused: ReviewForm | None = getattr(request.state, "review_form", None)
    # Autocomplete only for someone who can use the form: a fixed, indexed read.
    labels = await review_store.labels_in_use(pool) if reviewer else []
    open_mode = not service_of(request).settings.api_key
    return ReviewPanel(
        conversation_id=conversation_id,
        reviews=items,
        reviewer=reviewer,
        ask_name=reviewer is None and open_mode,
        can_rename=reviewer is not None and open_mode,
        mine=mine,
        form=refused or ReviewForm.of(mine),
        labels_in_use=labels,
        verdicts=list(Verdict),
        here=f"/conversations/{conversation_id}",
    )


async def read_form(request: Request) -> dict[str, str] | None:
    """An urlencoded form's fields (first value of each), or None when it is too large."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_FORM_BYTES:
            return None
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def parse_form(fields: dict[str, str]) -> tuple[Verdict, list[str], str]:
    """The verdict, labels (comma-separated) and note of a review form; ValueError says why."""
    verdict = reviews.verdict(fields.get("verdict", ""))
    pieces = [piece for piece in fields.get("labels", "").split(",") if piece.strip()]
    labels = reviews.labels(pieces)
    note = fields.get("note", "")
    # A JSON body is checked storable by request_body; a form is checked here.
    if "\x00" in note:
        raise ValueError("note must not contain NUL characters.")
    return verdict, labels, reviews.note(note)


def _conversation_id(request: Request) -> UUID | None:
    try:
        return UUID(request.path_params["conversation_id"])
    except ValueError:
        return None


def _ask_name(conversation_id: UUID) -> Response:
    """A browser with no name yet is sent to "who are you?", then back to the page."""
    target = quote(f"/conversations/{conversation_id}#reviews", safe="")
    return RedirectResponse(f"/reviewer?next={target}", status_code=303)


def _back(conversation_id: UUID) -> Response:
    return RedirectResponse(f"/conversations/{conversation_id}#reviews", status_code=303)


async def _refused(request: Request, form: ReviewForm, status_code: int) -> Response:
    """The detail page again, with the form as typed and the error beside it."""
    request.state.review_form = form
    response = await dashboard.conversation_page(request)
    if response.status_code == 200:
        response.status_code = status_code
    return response


async def save_review(request: Request) -> Response:
    """POST /conversations/{id}/review: create or replace this reviewer's review."""
    conversation_id = _conversation_id(request)
    if conversation_id is None:
        return dashboard.not_found(request)
    reviewer = current_reviewer(request)
    if reviewer is None:
        return _ask_name(conversation_id)
    fields = await read_form(request)
    if fields is None:
        message = f"The form is too large (at most {MAX_FORM_BYTES // 1024} KiB)."
        return await _refused(request, ReviewForm(error=message), 413)
    try:
        verdict, labels, note = parse_form(fields)
    except ValueError as exc:
        typed = ReviewForm(
            fields.get("verdict", ""), fields.get("labels", ""), fields.get("note", ""), str(exc)
        )
        return await _refused(request, typed, 422)
    pool = service_of(request).pool
    saved = await review_store.put_review(pool, conversation_id, reviewer, verdict, labels, note)
    if saved is None:
        return dashboard.not_found(request)
    return _back(conversation_id)


async def remove_review(request: Request) -> Response:
    """POST /conversations/{id}/review/delete: delete this reviewer's review (if any)."""
    conversation_id = _conversation_id(request)
    if conversation_id is None:
        return dashboard.not_found(request)
    reviewer = current_reviewer(request)
    if reviewer is None:
        return _ask_name(conversation_id)
    pool = service_of(request).pool
    deleted = await review_store.delete_review(pool, conversation_id, reviewer)
    if not deleted and not await review_store.conversation_exists(pool, conversation_id):
        return dashboard.not_found(request)
    return _back(conversation_id)  # or already gone: the page shows that


routes: list[BaseRoute] = [
    Route(
        "/conversations/{conversation_id}/review",
        dashboard.html_errors(save_review),
        methods=["POST"],
    ),
    Route(
        "/conversations/{conversation_id}/review/delete",
        dashboard.html_errors(remove_review),
        methods=["POST"],
    ),
]
