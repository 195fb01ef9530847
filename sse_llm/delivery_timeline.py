"""The detail page's timeline: the chunks over time and each client connection as a bar.

Laid out here as numbers (SVG coordinates in a fixed viewBox), drawn by
templates/_timeline.html as SVG elements with CSS classes only: no inline style or
script, so the page's strict CSP holds and the colours follow light and dark mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from psycopg_pool import AsyncConnectionPool

from sse_llm import delivery_store, store
from sse_llm.contract import DeliveryEnd
from sse_llm.delivery_store import DeliveryRow
from sse_llm.store import Conversation

WIDTH = 720.0  # the viewBox's width; the SVG scales to the page
CHART_TOP = 8.0
CHART_HEIGHT = 90.0
BARS_TOP = 132.0
BAR_HEIGHT = 12.0
ROW_HEIGHT = 34.0  # a bar and the label above it
MAX_POINTS = 400  # the chunk line is thinned to this many points, however long the answer
TICKS = 5

_ENDED_SAYS = {
    DeliveryEnd.DONE: "sent the end (done)",
    DeliveryEnd.ERROR: "sent the end (error)",
    DeliveryEnd.CLIENT_LEFT: "client left",
    DeliveryEnd.DROPPED: "dropped: the client stopped reading",
    DeliveryEnd.LOST: "lost: its process died",
}


@dataclass(frozen=True)
class Bar:
    """One connection: where its bar goes and what it says."""

    x: float
    width: float
    y: float
    label_y: float
    css: str  # delivery--done, delivery--client_left, ..., delivery--open
    label: str
    resumed: bool  # from a Last-Event-ID: its left end is marked


@dataclass(frozen=True)
class Row:
    """One connection as the table beside the chart says it."""

    via: str
    started_ms: float
    ended_ms: float | None
    chunks: str  # "1-60" (an en dash), "8-20", or "none"
    ended: str


@dataclass(frozen=True)
class Timeline:
    """What _timeline.html draws; `empty` when there is nothing recorded to draw."""

    height: float
    span_ms: float
    chunk_count: int
    characters: int
    points: str  # the polyline of characters received over time
    ticks: list[tuple[float, str]]
    bars: list[Bar]
    rows: list[Row]
    truncated: bool  # more connections than listed

    @property
    def empty(self) -> bool:
        return not self.chunk_count and not self.rows


async def build_timeline(pool: AsyncConnectionPool, conversation: Conversation) -> Timeline:
    """Read the conversation's chunk times and deliveries; lay them out."""
    async with pool.connection() as conn:
        chunks = await store.chunk_timeline(conn, conversation.id)
    deliveries = await delivery_store.list_deliveries(pool, conversation.id) or []
    return lay_out(conversation, chunks, deliveries, datetime.now(UTC))


def lay_out(
    conversation: Conversation,
    chunks: list[tuple[int, float, int]],
    deliveries: list[DeliveryRow],
    now: datetime,
) -> Timeline:
    """The timeline's geometry (a pure function, for the page and its tests)."""
    created = conversation.created_at

    def offset(moment: datetime | None) -> float:
        return max(0.0, (moment - created).total_seconds() * 1000) if moment else 0.0

    ends = [offset(d.ended_at or now) for d in deliveries]
    last_chunk_ms = chunks[-1][1] if chunks else 0.0
    span = max([last_chunk_ms, offset(conversation.completed_at), *ends, 1.0])

    def x(ms: float) -> float:
        return round(ms / span * WIDTH, 2)

    bars: list[Bar] = []
    rows: list[Row] = []
    for index, delivery in enumerate(deliveries):
        start, end = offset(delivery.started_at), ends[index]
        y = BARS_TOP + index * ROW_HEIGHT
        said = _ENDED_SAYS[delivery.ended] if delivery.ended else "still open"
        sent = _chunk_range(delivery)
        resumed = delivery.from_seq > 1
        label = f"{delivery.via} · chunks {sent} · {said}"
        if resumed:
            label = f"{delivery.via}, resumed after chunk {delivery.from_seq - 1} · {sent} · {said}"
        bars.append(
            Bar(
                x=x(start),
                width=max(x(end) - x(start), 2.0),
                y=y,
                label_y=y - 4,
                css=f"delivery--{delivery.ended or 'open'}",
                label=label,
                resumed=resumed,
            )
        )
        ended_ms = offset(delivery.ended_at) if delivery.ended_at else None
        rows.append(Row(delivery.via, start, ended_ms, sent, said))
    height = BARS_TOP + max(len(deliveries), 1) * ROW_HEIGHT
    return Timeline(
        height=height,
        span_ms=span,
        chunk_count=len(chunks),
        characters=sum(chars for _, _, chars in chunks),
        points=_points(chunks, x),
        ticks=[(x(ms), _duration(ms)) for ms in (span * i / (TICKS - 1) for i in range(TICKS))],
        bars=bars,
        rows=rows,
        truncated=len(deliveries) >= delivery_store.MAX_DELIVERIES_LISTED,
    )


def _chunk_range(delivery: DeliveryRow) -> str:
    if delivery.last_seq is None or delivery.last_seq < delivery.from_seq:
        return "none"
    return f"{delivery.from_seq}\N{EN DASH}{delivery.last_seq}"


def _points(chunks: list[tuple[int, float, int]], x: Callable[[float], float]) -> str:
    """Characters received so far at each chunk's time, as polyline points."""
    if not chunks:
        return ""
    total = sum(chars for _, _, chars in chunks) or 1
    step = max(1, len(chunks) // MAX_POINTS)
    points = [f"0,{CHART_TOP + CHART_HEIGHT}"]
    received = 0
    for index, (_, ms, chars) in enumerate(chunks):
        received += chars
        if index % step == 0 or index == len(chunks) - 1:
            y = CHART_TOP + CHART_HEIGHT * (1 - received / total)
            points.append(f"{x(ms)},{round(y, 2)}")
    return " ".join(points)


def _duration(ms: float) -> str:
    """A tick's label: 0, 250 ms, 1.5 s, 2 min 5 s."""
    if ms == 0:
        return "0"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"
