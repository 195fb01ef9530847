"""A stored text cut into segments at every annotation boundary, for the raw-text view.

Each segment becomes one element carrying its offsets in code points (what SPEC 9's
`start`/`end` count) and the annotations that cover it, so overlapping annotations
highlight correctly without nesting, and static/annotate.js can turn a selection back
into offsets by reading the segment it falls in.

Why every CR gets a segment of its own: the HTML parser turns CR LF and a lone CR into
one LF before the page's script sees the text (HTML's "normalize newlines"), so inside
such a segment the browser's text is shorter than the stored one. Cutting them out
keeps every other segment's browser text equal to its stored text; the script maps any
position inside a line-break segment to its start or its end.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from sse_llm.review_store import Annotation

_LINE_BREAKS = re.compile(r"\r\n?")
MAX_DEPTH_CLASS = 3  # highlights get darker with each covering annotation, up to this


@dataclass(frozen=True)
class Segment:
    """`text[start:end]`, with the annotations covering all of it (ordered by start)."""

    start: int
    end: int
    text: str
    annotations: tuple[Annotation, ...]

    @property
    def line_break(self) -> bool:
        """A CR LF or a lone CR: the browser shows (and counts) it as one LF."""
        return self.text.startswith("\r")


def split(text: str, annotations: Sequence[Annotation]) -> list[Segment]:
    """Cut `text` at each annotation's start and end and around each CR (LF)."""
    length = len(text)
    cuts = {0, length}
    for annotation in annotations:
        cuts.update((min(annotation.start, length), min(annotation.end, length)))
    for line_break in _LINE_BREAKS.finditer(text):
        cuts.update(line_break.span())
    bounds = sorted(cuts)
    segments = []
    for start, end in itertools.pairwise(bounds):
        covering = tuple(a for a in annotations if a.start <= start and a.end >= end)
        segments.append(Segment(start, end, text[start:end], covering))
    return segments


def render(text: str, annotations: Sequence[Annotation]) -> Markup:
    """The segments as HTML: a <span> each, a <mark> where annotations cover it.

    Built here rather than in a template so no whitespace slips between segments: the
    element's text must be exactly the stored text (bar the parser's CR handling).
    """
    parts = []
    for segment in split(text, annotations):
        attributes = f'data-start="{segment.start}" data-end="{segment.end}"'
        if segment.line_break:
            attributes += " data-line-break"
        if not segment.annotations:
            parts.append(f"<span {attributes}>{escape(segment.text)}</span>")
            continue
        depth = min(len(segment.annotations), MAX_DEPTH_CLASS)
        ids = " ".join(str(a.id) for a in segment.annotations)
        labels = ", ".join(dict.fromkeys(a.label for a in segment.annotations))
        parts.append(
            f'<mark class="annotated annotated--{depth}" {attributes} '
            f'data-annotations="{ids}" title="{escape(labels)}">{escape(segment.text)}</mark>'
        )
    return Markup("".join(parts))


def quote(text: str, annotation: Annotation, limit: int = 300) -> str:
    """The passage an annotation covers, shortened in the middle past `limit` characters."""
    passage = text[annotation.start : annotation.end]
    if len(passage) <= limit:
        return passage
    half = limit // 2
    return f"{passage[:half]} … {passage[-half:]}"
