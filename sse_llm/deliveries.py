"""What each client connection to a conversation was sent (SPEC 10, "Deliveries").

A `Delivery` follows one connection: the first `POST /stream`, an attach or resume, a
`/v1` call, the dashboard's live view. It is written twice at most, in the writer's
batches: its open, then its end (once, if the open had not been written yet). What it
sent in between is kept in memory, per wake-up of its stream and never per chunk:

- `watch` wraps the updates its events are made of, and notes the last chunk and the
  end (if any) of the update being turned into bytes;
- `sent` (called by `streaming.closing` when the stream asks for its next piece, so the
  last one went out) makes that the last chunk sent, and the end sent;
- `close` ends it: `done` or `error` if that event went out, else `dropped` if the HTTP
  protocol dropped the client for not reading, else `client_left`.

"Sent" means handed to the socket while the connection was up (http_protocol.py marks a
request's scope when its connection goes): bytes the kernel took and the client never
read cannot be told apart from read ones. A process that dies leaves its open rows to
recovery, which marks them `lost` (recovery_store.lose_deliveries).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sse_llm import delivery_store
from sse_llm.contract import DeliveryEnd, DeliveryVia, ErrorCode, Status
from sse_llm.delivery_store import DeliveryRow
from sse_llm.errors import ApiError
from sse_llm.http_protocol import CLIENT_STALLED, CONNECTION_LOST
from sse_llm.service import service_of
from sse_llm.store import Chunk, Outcome
from sse_llm.writer import Writer

Updates = AsyncIterator[tuple[list[Chunk], Outcome | None]]


class Delivery:
    """One client connection to a conversation, from its first byte to its end."""

    __slots__ = (
        "_next_end",
        "_next_seq",
        "_scope",
        "_writer",
        "conversation_id",
        "ended",
        "ended_at",
        "from_seq",
        "id",
        "instance_id",
        "last_seq",
        "started_at",
        "via",
    )  # fmt: skip

    def __init__(
        self,
        writer: Writer,
        scope: MutableMapping[str, Any],
        conversation_id: UUID,
        via: DeliveryVia,
        instance_id: UUID,
        from_seq: int = 1,
    ) -> None:
        self.id = uuid4()
        self.conversation_id = conversation_id
        self.via = via
        self.instance_id = instance_id
        self.from_seq = from_seq
        self.started_at: datetime | None = None  # set by open()
        self.ended_at: datetime | None = None
        self.last_seq: int | None = None
        self.ended: DeliveryEnd | None = None
        self._next_seq: int | None = None  # in the piece being sent
        self._next_end: DeliveryEnd | None = None
        self._writer = writer
        self._scope = scope

    @classmethod
    def of(
        cls, request: Request, conversation_id: UUID, via: DeliveryVia, from_seq: int = 1
    ) -> Delivery:
        """A delivery of this request's connection (not recorded until `open`)."""
        service = service_of(request)
        return cls(
            service.writer, request.scope, conversation_id, via, service.lease.instance_id, from_seq
        )

    def open(self) -> None:
        """The connection starts being served: queue its row."""
        if self.started_at is None:
            self.started_at = datetime.now(UTC)
            self._writer.record_delivery(self)

    def replayed(self, last_seq: int | None) -> None:
        """The first piece sent holds the replay up to `last_seq` (None: no chunk)."""
        self._next_seq = last_seq

    async def watch(self, updates: Updates) -> Updates:
        """`updates`, noting what each one will send (one assignment per wake-up)."""
        async for chunks, outcome in updates:
            if chunks:
                self._next_seq = chunks[-1].seq
            if outcome is not None:
                completed = outcome.status == Status.COMPLETED
                self._next_end = DeliveryEnd.DONE if completed else DeliveryEnd.ERROR
            yield chunks, outcome

    def sent(self) -> None:
        """The last piece went out: what it held was sent (unless the connection had gone)."""
        if self._scope.get(CONNECTION_LOST):
            return
        if self._next_seq is not None:
            self.last_seq = self._next_seq
        if self._next_end is not None:
            self.ended = self._next_end

    def end_with(self, ended: DeliveryEnd, last_seq: int | None) -> None:
        """A whole answer sent at once (a non-streaming /v1 call), unless the client left."""
        if not self._scope.get(CONNECTION_LOST):
            self.ended, self.last_seq = ended, last_seq

    def close(self) -> None:
        """The connection is over: queue its end (once)."""
        if self.started_at is None or self.ended_at is not None:
            return
        if self.ended is None:
            stalled = self._scope.get(CLIENT_STALLED)
            self.ended = DeliveryEnd.DROPPED if stalled else DeliveryEnd.CLIENT_LEFT
        self.ended_at = datetime.now(UTC)
        self._writer.record_delivery(self)

    def row(self) -> DeliveryRow:
        """The row as it stands (the writer reads it when it writes its batch)."""
        assert self.started_at is not None, "a delivery is written once opened"
        return DeliveryRow(
            id=self.id,
            conversation_id=self.conversation_id,
            via=self.via,
            instance_id=self.instance_id,
            started_at=self.started_at,
            ended_at=self.ended_at,
            from_seq=self.from_seq,
            last_seq=self.last_seq,
            ended=self.ended,
        )


def attach_via(request: Request) -> DeliveryVia:
    """`dashboard` for the detail page's live view (its EventSource asks `?via=dashboard`),
    else `attach`; any other value is a 422, like a bad Last-Event-ID."""
    raw = request.query_params.get("via")
    if raw is None or raw == DeliveryVia.ATTACH:
        return DeliveryVia.ATTACH
    if raw == DeliveryVia.DASHBOARD:
        return DeliveryVia.DASHBOARD
    raise ApiError(422, ErrorCode.VALIDATION_ERROR, "via must be attach or dashboard.")


def delivery_json(row: DeliveryRow) -> dict[str, Any]:
    """The SPEC 10 delivery object."""
    return {
        "started_at": row.started_at.isoformat(),
        "ended_at": row.ended_at.isoformat() if row.ended_at else None,
        "via": row.via,
        "from_seq": row.from_seq,
        "last_seq": row.last_seq,
        "ended": row.ended,
    }


async def list_route(request: Request) -> Response:
    """GET /conversations/{id}/deliveries: every client connection to it, oldest first."""
    try:
        conversation_id = UUID(request.path_params["conversation_id"])
    except ValueError:
        raise ApiError(404, ErrorCode.NOT_FOUND, "No conversation has this id.") from None
    # One conversation's rows by index: the main pool, like GET /history/{id}.
    rows = await delivery_store.list_deliveries(service_of(request).pool, conversation_id)
    if rows is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, "No conversation has this id.")
    return JSONResponse({"items": [delivery_json(row) for row in rows]})


routes = [Route("/conversations/{conversation_id}/deliveries", list_route, methods=["GET"])]
