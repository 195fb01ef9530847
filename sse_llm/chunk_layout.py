"""The compact form of an ended conversation's chunks: boundaries and times beside `response`.

`chunk_layouts.layout` (migration 0015): a version byte, then per chunk two
varints (7 bits a byte, low first): its length in characters (code points, as
PostgreSQL's `char_length` and Python's `len` count them) and its time in whole
milliseconds after the previous chunk's (the first's: after the conversation's
created_at), zigzag-encoded since clocks may step back. A 60-chunk answer of 430
characters takes ~121-181 bytes, where its chunk rows took ~7,600.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

COMPACT = 1
# Chunks kept as rows on purpose (they did not match the response): decodes to nothing.
KEPT_AS_ROWS = bytes([0])


@dataclass(frozen=True, slots=True)
class LaidOutChunk:
    """One chunk as the compact form knows it: number, text, milliseconds after created_at."""

    seq: int
    text: str
    milliseconds: int


def encode(lengths: Sequence[int], milliseconds: Sequence[int]) -> bytes:
    """The layout of chunks 1..n of these lengths (characters), at these times (whole ms
    after created_at)."""
    out = bytearray([COMPACT])
    previous = 0
    for length, at in zip(lengths, milliseconds, strict=True):
        _put(out, length)
        delta = at - previous
        _put(out, delta * 2 if delta >= 0 else -delta * 2 - 1)
        previous = at
    return bytes(out)


def decode(layout: bytes, response: str) -> list[LaidOutChunk]:
    """The chunks `layout` cuts `response` into, in order (none for KEPT_AS_ROWS)."""
    if not layout or layout[0] != COMPACT:
        return []
    chunks: list[LaidOutChunk] = []
    position, start, at = 1, 0, 0
    while position < len(layout):
        length, position = _get(layout, position)
        delta, position = _get(layout, position)
        at += _unzigzag(delta)
        chunks.append(LaidOutChunk(len(chunks) + 1, response[start : start + length], at))
        start += length
    return chunks


def timeline(layout: bytes) -> list[tuple[int, float, int]]:
    """Each chunk as (seq, ms after created_at, characters), without the text."""
    if not layout or layout[0] != COMPACT:
        return []
    chunks: list[tuple[int, float, int]] = []
    position, at = 1, 0
    while position < len(layout):
        length, position = _get(layout, position)
        delta, position = _get(layout, position)
        at += _unzigzag(delta)
        chunks.append((len(chunks) + 1, float(at), length))
    return chunks


def _unzigzag(value: int) -> int:
    return value >> 1 if value % 2 == 0 else -((value + 1) >> 1)


def _put(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _get(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position
