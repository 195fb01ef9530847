"""Agreement's routes: `GET /agreement` (SPEC 9's JSON) and the page `/reviews/agreement`.

Both take the history filters (which conversations) and `reviewers=a,b` (whose reviews
count); the figures are agreement.py's.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sse_llm import review_queries
from sse_llm.agreement import MAX_DISAGREEMENT_IDS, report_of
from sse_llm.contract import ErrorCode
from sse_llm.dashboard import html_errors, render
from sse_llm.review_slices import parse_slice, slice_sql
from sse_llm.reviews import reviewer_name
from sse_llm.service import service_of

_MAX_COUNTED = 100  # reviewers named in `reviewers`


def parse_reviewers(raw: str | None) -> list[str] | None:
    """`reviewers=a,b` as names (None: everyone's reviews count); ValueError if one is bad."""
    if raw is None or not raw.strip():
        return None
    names = list(dict.fromkeys(reviewer_name(part) for part in raw.split(",") if part.strip()))
    if len(names) > _MAX_COUNTED:
        raise ValueError(f"reviewers names at most {_MAX_COUNTED} reviewers.")
    return names or None


async def agreement_json(request: Request) -> Response:
    """GET /agreement: SPEC 9's agreement over a slice and a set of reviewers."""
    params = request.query_params
    try:
        slice_ = parse_slice(params, strict=True)
        counted = parse_reviewers(params.get("reviewers"))
    except ValueError as exc:
        body = {"error": {"code": ErrorCode.VALIDATION_ERROR, "message": str(exc)}}
        return JSONResponse(body, status_code=422)
    counts = await review_queries.agreement_input(
        service_of(request).query_pool, slice_sql(slice_), counted, max_ids=MAX_DISAGREEMENT_IDS
    )
    return JSONResponse(report_of(counts))


async def agreement_page(request: Request) -> Response:
    """GET /reviews/agreement: the figures, their method, and the disagreements, linked."""
    params = request.query_params
    slice_ = parse_slice(params, strict=False)
    error = None
    try:
        counted = parse_reviewers(params.get("reviewers"))
    except ValueError as exc:
        counted, error = None, str(exc)
    service = service_of(request)
    counts = await review_queries.agreement_input(
        service.query_pool, slice_sql(slice_), counted, max_ids=MAX_DISAGREEMENT_IDS
    )
    report = report_of(counts)
    disagreements = await review_queries.disagreements(service.pool, counts.ids, counted)
    context = {
        "active": "agreement",
        "report": report,
        "slice": slice_,
        "reviewers_text": ", ".join(counted or []),
        "error": error,
        "disagreements": disagreements,
    }
    return render(request, "agreement.html", context)


routes: list[BaseRoute] = [
    Route("/agreement", agreement_json, methods=["GET"]),
    Route("/reviews/agreement", html_errors(agreement_page), methods=["GET"], name="agreement"),
]
