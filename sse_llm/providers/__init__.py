"""LLM providers behind one small interface (see base.Provider)."""

from sse_llm.config import Settings
from sse_llm.providers.base import Provider, ProviderError
from sse_llm.providers.demo import DemoProvider
from sse_llm.providers.openai import OpenAIProvider

__all__ = ["Provider", "ProviderError", "create_provider"]


def create_provider(settings: Settings) -> Provider:
    """The provider LLM_PROVIDER names, configured from the settings."""
    if settings.provider == "openai":
        return OpenAIProvider(
            settings.openai_base_url,
            settings.openai_api_key,
            settings.model,
            max_connections=settings.max_streams,
        )
    return DemoProvider(settings.model, settings.demo_tokens, settings.demo_tokens_per_second)
