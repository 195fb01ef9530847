"""GET /stats (SPEC 10): the history's figures by hour or day, as JSON.

Parameters: `bucket=hour|day` and the history filters, strictly (a bad value is a 422
naming it). The figures come from the rollups (stats_queries.py); a filter they cannot
answer is computed over a bounded sample and the body says `"estimate": true`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sse_llm import stats_queries
from sse_llm.contract import ErrorCode
from sse_llm.errors import ApiError
from sse_llm.history_filters import parse_filter
from sse_llm.service import service_of
from sse_llm.stats_queries import MAX_BUCKETS, BucketSize


def bucket_size(request: Request) -> BucketSize:
    """The `bucket` parameter: hour (the default) or day."""
    raw = (request.query_params.get("bucket") or "").strip()
    if not raw:
        return BucketSize.HOUR
    try:
        return BucketSize(raw)
    except ValueError:
        raise ApiError(
            422, ErrorCode.VALIDATION_ERROR, "bucket must be one of: hour, day."
        ) from None


async def stats(request: Request) -> Response:
    """GET /stats: conversations, statuses, errors, timings, chunks, tokens and reviews."""
    size = bucket_size(request)
    chosen = parse_filter(request.query_params, strict=True)
    try:
        start, end = stats_queries.stats_range(size, chosen.from_, chosen.to, datetime.now(UTC))
    except OverflowError:  # a range reaching past year 1 or 9999
        raise ApiError(
            422, ErrorCode.VALIDATION_ERROR, "from: the range must lie within years 1..9999."
        ) from None
    if stats_queries.bucket_count(size, start, end) > MAX_BUCKETS:
        raise ApiError(
            422,
            ErrorCode.VALIDATION_ERROR,
            f"from: from..to spans more than {MAX_BUCKETS:,} buckets of an {size};"
            " narrow the range or use bucket=day.",
        )
    # Bounded by the rollups' rows or the sample, but it reads history: the query pool.
    body = await stats_queries.stats(service_of(request).query_pool, chosen, size, start, end)
    return JSONResponse(body)


routes = [Route("/stats", stats, methods=["GET"])]
