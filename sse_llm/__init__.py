"""sse-llm: stream a language model's answer as Server-Sent Events and keep it in PostgreSQL."""

__version__ = "0.1.0"
