"""What a review is made of, checked and normalised as SPEC 9 says: reviewer names,
verdicts, labels and notes. Pure functions: the routes turn a ValueError into a 422."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from sse_llm.contract import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_NOTE_CHARS,
    MAX_REVIEWER_CHARS,
    Verdict,
)


def reviewer_name(text: str) -> str:
    """A reviewer's name as SPEC 9 has it (trimmed, NFC); ValueError says what is wrong."""
    name = unicodedata.normalize("NFC", text).strip()
    if not 1 <= len(name) <= MAX_REVIEWER_CHARS:
        raise ValueError(f"A reviewer name has 1 to {MAX_REVIEWER_CHARS} characters.")
    if name in (".", "..") or "/" in name:
        raise ValueError("A reviewer name cannot be . or .. or hold a /.")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in name):
        raise ValueError("A reviewer name cannot hold control characters.")
    return name


def verdict(value: object) -> Verdict:
    """`good`, `bad` or `unsure`; ValueError otherwise."""
    if isinstance(value, str):
        try:
            return Verdict(value)
        except ValueError:
            pass
    raise ValueError(f"verdict must be one of: {', '.join(Verdict)}.")


def label(value: object) -> str:
    """A label trimmed and case-folded (so `Tone` and `tone` are one label), 1-40
    characters with no comma (a comma separates labels in forms and URLs)."""
    if not isinstance(value, str):
        raise ValueError("A label must be text.")
    text = unicodedata.normalize("NFC", value.strip().casefold())
    if not 1 <= len(text) <= MAX_LABEL_CHARS:
        raise ValueError(f"A label has 1 to {MAX_LABEL_CHARS} characters.")
    if "," in text:
        raise ValueError("A label cannot hold a comma.")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in text):
        raise ValueError("A label cannot hold control characters.")
    return text


def labels(values: Iterable[object]) -> list[str]:
    """At most 20 labels, each normalised by `label`, duplicates dropped, order kept."""
    result = list(dict.fromkeys(label(value) for value in values))
    if len(result) > MAX_LABELS:
        raise ValueError(f"A review has at most {MAX_LABELS} labels.")
    return result


def note(value: object) -> str:
    """A note of at most 4,000 characters (kept as written, trimmed)."""
    if not isinstance(value, str):
        raise ValueError("note must be text.")
    text = value.strip()
    if len(text) > MAX_NOTE_CHARS:
        raise ValueError(f"note must be at most {MAX_NOTE_CHARS} characters.")
    return text
