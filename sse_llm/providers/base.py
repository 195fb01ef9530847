"""What a provider is: something that streams the pieces of an answer to a prompt."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from sse_llm.contract import ErrorCode


@dataclass(frozen=True)
class ModelRequest:
    """What to ask the model: a chat (OpenAI-style messages), a model, sampling parameters."""

    messages: list[dict[str, Any]]
    model: str
    # Only these pass through: temperature, top_p, max_tokens, stop, user.
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_prompt(cls, prompt: str, model: str) -> ModelRequest:
        """A one-message chat: what POST /stream asks."""
        return cls([{"role": "user", "content": prompt}], model)


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens of one answer: the model's own counts, or sse-llm's estimate."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False


# The estimate's rule of thumb, OpenAI's for English text: a token is about 4 characters.
CHARACTERS_PER_TOKEN = 4


def estimate_usage(messages: list[dict[str, Any]], completion_characters: int) -> Usage:
    """Estimated counts, for an answer whose model reported none: characters / 4,
    rounded up, of every message's text (the prompt) and of the answer's text."""
    prompt_characters = sum(len(message_text(m.get("content"))) for m in messages)
    return Usage(
        math.ceil(prompt_characters / CHARACTERS_PER_TOKEN),
        math.ceil(completion_characters / CHARACTERS_PER_TOKEN),
        estimated=True,
    )


class ProviderError(Exception):
    """The provider failed; `code` is one of the SPEC 2 error codes."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        # Stored as the conversation's error_message and sent to its clients: it must be
        # storable whatever text a provider put in it.
        message = clean_text(message)
        super().__init__(message)
        self.code = code
        self.message = message


class UpstreamError(ProviderError):
    """The upstream answered with an error, or its stream broke off."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UPSTREAM_ERROR, message)


class UpstreamUnavailable(ProviderError):
    """The upstream could not be reached at all."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UPSTREAM_UNAVAILABLE, message)


class Provider(Protocol):
    """The interface every provider implements; the generation adds the timeouts."""

    name: str
    model: str

    def stream(self, request: ModelRequest) -> AsyncGenerator[str | Usage, None]:
        """Yield the pieces of the answer as the model emits them, then, if the model
        reported them, its token counts (a `Usage`, never a piece of the answer)."""
        ...

    async def aclose(self) -> None:
        """Release connections; called once when the service stops."""
        ...


def clean_text(text: str) -> str:
    """Make upstream text storable: PostgreSQL text holds no NUL and no lone surrogate."""
    if text.isascii():
        return text.replace("\x00", "\ufffd") if "\x00" in text else text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (text parts joined): what the answer is to."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def message_text(content: object) -> str:
    """A message's content as text: a string, or the `text` of its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""
