"""The offline demo provider: a deterministic answer, paced like a model, that says what it is."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncGenerator

from sse_llm.providers.base import ModelRequest, last_user_text

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

    async def stream(self, request: ModelRequest) -> AsyncGenerator[str, None]:
        """Yield the answer to the last user message word by word, at the configured pace.

        Honours `max_tokens` (fewer words) and `stop` (ends before a stop sequence).
        """
        pause = 1 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        pieces = self.answer(last_user_text(request.messages))
        max_tokens = request.parameters.get("max_tokens")
        if max_tokens:
            pieces = pieces[:max_tokens]
        stops = request.parameters.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        if not stops:
            for piece in pieces:
                await asyncio.sleep(pause)
                yield piece
            return
        # Text that might be the start of a stop sequence waits until it is known not to be.
        pending = ""
        for piece in pieces:
            await asyncio.sleep(pause)
            pending += piece
            hit = min((i for i in (pending.find(stop) for stop in stops) if i >= 0), default=-1)
            if hit >= 0:
                if hit:
                    yield pending[:hit]
                return
            held = max(_overlap(pending, stop) for stop in stops)
            if len(pending) > held:
                yield pending[: len(pending) - held]
                pending = pending[len(pending) - held :]
        if pending:
            yield pending

    async def aclose(self) -> None:
        """Nothing to release."""


def _overlap(text: str, stop: str) -> int:
    """How many of text's last characters are the start of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0
