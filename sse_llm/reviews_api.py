"""The JSON routes of reviewers, reviews and passage annotations (SPEC 9).

Every route answers 404 for an unknown (or malformed) conversation id. Writes check who
may write as whom (access.check_may_write_as) and refuse anything SPEC 9 does not allow
with a 422 naming the field, before a row is touched: bad input creates nothing.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sse_llm import review_store, reviews
from sse_llm.access import check_may_write_as
from sse_llm.api import parse_conversation_id
from sse_llm.contract import MAX_CHUNK_ID, ErrorCode, Verdict
from sse_llm.errors import ApiError
from sse_llm.request_body import read_json_object
from sse_llm.review_store import Annotation, Review
from sse_llm.service import service_of

_REVIEW_FIELDS = frozenset({"verdict", "labels", "note"})
_ANNOTATION_FIELDS = frozenset({"reviewer", "field", "start", "end", "label", "note"})
# Offsets are stored as int4; anything larger is past the end of any text.
_MAX_OFFSET = MAX_CHUNK_ID
_NO_CONVERSATION = "No conversation has this id."


def _invalid(message: str) -> ApiError:
    return ApiError(422, ErrorCode.VALIDATION_ERROR, message)


def _not_found(message: str = _NO_CONVERSATION) -> ApiError:
    return ApiError(404, ErrorCode.NOT_FOUND, message)


def review_json(review: Review) -> dict[str, Any]:
    """The SPEC 9 `<review>` object."""
    return {
        "conversation_id": str(review.conversation_id),
        "reviewer": review.reviewer,
        "verdict": review.verdict,
        "labels": review.labels,
        "note": review.note,
        "created_at": review.created_at.isoformat(),
        "updated_at": review.updated_at.isoformat(),
    }


def annotation_json(annotation: Annotation) -> dict[str, Any]:
    """The SPEC 9 `<annotation>` object."""
    return {
        "id": str(annotation.id),
        "conversation_id": str(annotation.conversation_id),
        "reviewer": annotation.reviewer,
        "field": annotation.field,
        "start": annotation.start,
        "end": annotation.end,
        "label": annotation.label,
        "note": annotation.note,
        "created_at": annotation.created_at.isoformat(),
    }


def path_reviewer(request: Request) -> str:
    """The reviewer named in the URL (the server percent-decoded it), normalised, or 422."""
    try:
        return reviews.reviewer_name(request.path_params["reviewer"])
    except ValueError as exc:
        raise _invalid(f"reviewer: {exc}") from None


def _refuse_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed))
        raise _invalid(f"Unknown field: {unknown[0]!r}. Accepted: {accepted}.")


def review_fields(body: dict[str, Any]) -> tuple[Verdict, list[str], str]:
    """A review body's verdict, labels and note, normalised, or a 422 naming the field."""
    _refuse_unknown(body, _REVIEW_FIELDS)
    if "verdict" not in body:
        raise _invalid("verdict is required.")
    try:
        verdict = reviews.verdict(body["verdict"])
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    return verdict, label_list(body.get("labels", [])), note_text(body.get("note", ""))


def label_list(value: object) -> list[str]:
    """`labels` normalised (SPEC 9), or a 422 that names the label at fault."""
    if not isinstance(value, list):
        raise _invalid("labels must be a list of strings.")
    for index, item in enumerate(value):
        try:
            reviews.label(item)
        except ValueError as exc:
            raise _invalid(f"labels[{index}]: {exc}") from None
    try:
        return reviews.labels(value)
    except ValueError as exc:  # too many once duplicates are dropped
        raise _invalid(f"labels: {exc}") from None


def note_text(value: object) -> str:
    """`note` trimmed and bounded, or a 422."""
    try:
        return reviews.note(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


async def put_review(request: Request) -> Response:
    """PUT /conversations/{id}/reviews/{reviewer}: create or replace a review."""
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    reviewer = path_reviewer(request)
    check_may_write_as(request, reviewer)
    verdict, labels, note = review_fields(await read_json_object(request))
    review = await review_store.put_review(
        service_of(request).pool, conversation_id, reviewer, verdict, labels, note
    )
    if review is None:
        raise _not_found()
    return JSONResponse(review_json(review))


async def delete_review(request: Request) -> Response:
    """DELETE /conversations/{id}/reviews/{reviewer}: 204, or 404 if there is none."""
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    reviewer = path_reviewer(request)
    check_may_write_as(request, reviewer)
    pool = service_of(request).pool
    if await review_store.delete_review(pool, conversation_id, reviewer):
        return Response(status_code=204)
    if not await review_store.conversation_exists(pool, conversation_id):
        raise _not_found()
    raise _not_found("This reviewer has no review of this conversation.")


async def list_reviews(request: Request) -> Response:
    """GET /conversations/{id}/reviews: every review of a conversation."""
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    items = await review_store.list_reviews(service_of(request).pool, conversation_id)
    if items is None:
        raise _not_found()
    return JSONResponse({"items": [review_json(review) for review in items]})


async def list_reviewers(request: Request) -> Response:
    """GET /reviewers: everyone who holds a review, with a count and the latest time."""
    # Its cost grows with the reviews (13.5 ms at 100,000): the query pool, under its timeout.
    items = await review_store.list_reviewers(service_of(request).query_pool)
    return JSONResponse(
        {
            "items": [
                {
                    "reviewer": item.reviewer,
                    "reviews": item.reviews,
                    "last_review_at": item.last_review_at.isoformat(),
                }
                for item in items
            ]
        }
    )


def _offset(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    # bool is an int in Python, not in JSON: true is not an offset.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_OFFSET:
        raise _invalid(f"{name} must be a whole number of code points, 0 or more.")
    return value


async def add_annotation(request: Request) -> Response:
    """POST /conversations/{id}/annotations: label one passage of the prompt or answer."""
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    body = await read_json_object(request)
    _refuse_unknown(body, _ANNOTATION_FIELDS)
    raw_reviewer = body.get("reviewer")
    if not isinstance(raw_reviewer, str):
        raise _invalid("reviewer is required (a name).")
    try:
        reviewer = reviews.reviewer_name(raw_reviewer)
    except ValueError as exc:
        raise _invalid(f"reviewer: {exc}") from None
    check_may_write_as(request, reviewer)
    field = body.get("field")
    if field not in ("prompt", "response"):
        raise _invalid("field must be one of: prompt, response.")
    start, end = _offset(body, "start"), _offset(body, "end")
    if start >= end:
        raise _invalid("start must be less than end (offsets in code points, end exclusive).")
    if "label" not in body:
        raise _invalid("label is required.")
    try:
        label = reviews.label(body["label"])
    except ValueError as exc:
        raise _invalid(f"label: {exc}") from None
    note = note_text(body.get("note", ""))
    pool = service_of(request).pool
    try:
        annotation = await review_store.add_annotation(
            pool, conversation_id, reviewer, str(field), start, end, label, note
        )
    except ValueError as exc:  # the span runs past the end of the text
        raise _invalid(str(exc)) from None
    if annotation is None:
        raise _not_found()
    return JSONResponse(annotation_json(annotation), status_code=201)


async def list_annotations(request: Request) -> Response:
    """GET /conversations/{id}/annotations: the passages labelled, ordered by start."""
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    items = await review_store.list_annotations(service_of(request).pool, conversation_id)
    if items is None:
        raise _not_found()
    return JSONResponse({"items": [annotation_json(item) for item in items]})


async def delete_annotation(request: Request) -> Response:
    """DELETE /conversations/{id}/annotations/{annotation_id}: 204; only by its author
    when the request comes from a named browser."""
    conversation_id = parse_conversation_id(request.path_params["conversation_id"])
    try:
        annotation_id = UUID(request.path_params["annotation_id"])
    except ValueError:
        raise _not_found("This conversation has no annotation with this id.") from None
    pool = service_of(request).pool
    annotation = await review_store.find_annotation(pool, conversation_id, annotation_id)
    if annotation is None:
        if not await review_store.conversation_exists(pool, conversation_id):
            raise _not_found()
        raise _not_found("This conversation has no annotation with this id.")
    check_may_write_as(request, annotation.reviewer)
    await review_store.delete_annotation(pool, conversation_id, annotation_id)
    return Response(status_code=204)


routes = [
    Route("/reviewers", list_reviewers, methods=["GET"]),
    Route("/conversations/{conversation_id}/reviews", list_reviews, methods=["GET"]),
    Route("/conversations/{conversation_id}/reviews/{reviewer}", put_review, methods=["PUT"]),
    Route("/conversations/{conversation_id}/reviews/{reviewer}", delete_review, methods=["DELETE"]),
    Route("/conversations/{conversation_id}/annotations", add_annotation, methods=["POST"]),
    Route("/conversations/{conversation_id}/annotations", list_annotations, methods=["GET"]),
    Route(
        "/conversations/{conversation_id}/annotations/{annotation_id}",
        delete_annotation,
        methods=["DELETE"],
    ),
]
