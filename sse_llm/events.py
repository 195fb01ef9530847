"""The SSE wire format of a conversation's stream (start / chunk / done / error), in one place."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from uuid import UUID

from sse_llm.contract import Status
from sse_llm.store import Chunk, Conversation, Outcome

# No raw newline can appear in this JSON, so one `data:` line always suffices. One
# encoder for all: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode

# Line breaks to Python's str.splitlines() (so to httpx's iter_lines(), and to many
# line-based SSE clients) that JSON leaves raw: a client splitting a `data:` line on
# one loses the event. The other splitlines() breaks are control characters, which
# JSON always escapes.
_LINE_BREAKS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def line_safe(text: str) -> str:
    """`text` (JSON) with U+0085, U+2028 and U+2029 escaped, so it stays one line for everyone.

    The hot path: ASCII text (most chunks) costs one check; other text three scans, and
    a copy only when one of the three is really there.
    """
    if text.isascii():
        return text
    for char, escape in _LINE_BREAKS:
        if char in text:
            text = text.replace(char, escape)
    return text


def _json(value: object) -> str:
    return line_safe(_encode(value))


def start_event(conversation: Conversation) -> bytes:
    """`event: start` with the conversation's id, creation time and model."""
    data = {
        "id": str(conversation.id),
        "created_at": conversation.created_at.isoformat(),
        "model": conversation.model,
    }
    return f"event: start\ndata: {_json(data)}\n\n".encode()


def chunk_events(chunks: Iterable[Chunk]) -> bytes:
    """One unnamed event per chunk, its `id:` the chunk's sequence number (for Last-Event-ID)."""
    text = "".join(
        f"id: {chunk.seq}\ndata: {_encode({'text': chunk.text})}\n\n" for chunk in chunks
    )
    # Made line-safe once per batch, not per chunk; ASCII (most batches) needs nothing.
    return (text if text.isascii() else line_safe(text)).encode()


def end_event(conversation_id: UUID, outcome: Outcome) -> bytes:
    """`event: done` for a completed answer, else `event: error` with the code and message."""
    data: dict[str, object] = {
        "id": str(conversation_id),
        "status": outcome.status,
        "chunks": outcome.chunks,
    }
    if outcome.status == Status.COMPLETED:
        return f"event: done\ndata: {_json(data)}\n\n".encode()
    data["error"] = {"code": outcome.error_code, "message": outcome.error_message}
    return f"event: error\ndata: {_json(data)}\n\n".encode()


def ping_comment() -> bytes:
    """The keep-alive comment line that proxies and browsers ignore."""
    return b": ping\n\n"


async def live_events(
    conversation_id: UUID,
    updates: AsyncIterator[tuple[list[Chunk], Outcome | None]],
    first: bytes = b"",
) -> AsyncIterator[bytes]:
    """`first` (start event, replayed chunks), then the chunks as they come, then the end.

    Each wake-up sends what arrived since the last one in a single write: under load
    the batches the writer commits reach the socket as one piece, not one per chunk.
    An empty update means the stream has been idle for the ping interval: a ping.
    """
    if first:
        yield first
    async for chunks, outcome in updates:
        data = chunk_events(chunks) if chunks else b""
        if outcome is not None:
            data += end_event(conversation_id, outcome)
        yield data or ping_comment()
