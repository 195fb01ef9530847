"""The offline demo provider: a deterministic answer, paced like a model, that says what it is."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

_WORDS = [
    "stream",
    "token",
    "event",
    "chunk",
    "answer",
    "server",
    "client",
    "browser",
    "database",
    "history",
    "prompt",
    "replay",
    "resume",
    "reviewer",
    "latency",
    "persist",
    "commit",
    "batch",
    "subscriber",
    "cursor",
    "index",
    "search",
    "dashboard",
    "model",
    "provider",
    "request",
    "response",
    "sequence",
    "order",
    "connection",
    "minute",
    "second",
]


class DemoProvider:
    """Streams `tokens` words at `tokens_per_second` (0: as fast as possible)."""

    name = "demo"

    def __init__(self, model: str | None, tokens: int, tokens_per_second: float) -> None:
        self.model = model or "demo"
        self.tokens = tokens
        self.tokens_per_second = tokens_per_second

    def answer(self, prompt: str) -> list[str]:
        """The whole answer to `prompt` as its pieces; the same prompt gives the same answer."""
        seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8", "replace")).digest()[:8])
        rng = random.Random(seed)
        subject = " ".join(prompt.split()[:6])
        opening = (
            "[demo] This is sse-llm's built-in demo provider, not a language model. "
            f"You asked about: {subject}."
        )
        words = opening.split()
        while len(words) < self.tokens:
            words.append(rng.choice(_WORDS))
        words = words[: self.tokens]
        return [words[0]] + [" " + word for word in words[1:]]

    async def stream(self, prompt: str) -> AsyncIterator[str]:
        """Yield the answer word by word at the configured pace."""
        pause = 1 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        for piece in self.answer(prompt):
            await asyncio.sleep(pause)
            yield piece

    async def aclose(self) -> None:
        """Nothing to release."""
