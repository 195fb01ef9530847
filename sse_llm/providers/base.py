"""What a provider is: something that streams the pieces of an answer to a prompt."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class ProviderError(Exception):
    """The provider failed; `code` is one of the SPEC 2 error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UpstreamError(ProviderError):
    """The upstream answered with an error, or its stream broke off."""

    def __init__(self, message: str) -> None:
        super().__init__("upstream_error", message)


class UpstreamUnavailable(ProviderError):
    """The upstream could not be reached at all."""

    def __init__(self, message: str) -> None:
        super().__init__("upstream_unavailable", message)


class Provider(Protocol):
    """The interface every provider implements; the generation adds the timeouts."""

    name: str
    model: str

    def stream(self, prompt: str) -> AsyncIterator[str]:
        """Yield the pieces of the answer as the model emits them."""
        ...

    async def aclose(self) -> None:
        """Release connections; called once when the service stops."""
        ...


def clean_text(text: str) -> str:
    """Make upstream text storable: PostgreSQL text holds no NUL and no lone surrogate."""
    if text.isascii():
        return text.replace("\x00", "\ufffd") if "\x00" in text else text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
