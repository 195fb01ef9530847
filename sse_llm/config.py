"""Settings: every knob of the service, read from the environment and validated once.

Why not pydantic-settings: it would make pydantic a dependency of the service (importing
it takes 116 ms, this module 19 ms), and the checks that matter (ranges, the rate syntax,
host names) would still be ours, as validators, their messages wrapped in pydantic's.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PROVIDERS = ("demo", "openai")


class ConfigError(ValueError):
    """A setting has a value the service cannot run with; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Build it with `Settings.from_env()`; tests use `replace()`."""

    database_url: str | None = None
    data_dir: Path = Path(".sse-llm")
    provider: str = "demo"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    first_chunk_timeout: float = 30.0
    chunk_timeout: float = 30.0
    total_timeout: float = 600.0
    api_key: str | None = field(default=None, repr=False)
    max_prompt_chars: int = 32_000
    host: str = "127.0.0.1"
    port: int = 8000
    demo_tokens_per_second: float = 20.0
    demo_tokens: int = 60
    ping_interval: float = 15.0
    storage_timeout: float = 10.0
    shutdown_grace: float = 30.0
    max_streams: int = 1000
    overload_lag: float = 0.1  # 0: never hold new streams
    queue_timeout: float = 30.0
    lease_interval: float = 5.0  # how often each process checks its lock (see lease.py)
    rate_limit: str | None = None  # "60/minute": POST /stream per client
    # Host names accepted besides the loopback ones; ("*",) for any; None: by the bind.
    allowed_hosts: tuple[str, ...] | None = None
    log_format: str = "text"
    query_timeout: float = 5.0  # history lists, searches, counts: per statement
    # Folding ended conversations' chunk rows into their compact form (compaction.py).
    compaction_interval: float = 5.0  # seconds between batches; 0: no compaction here
    compaction_batch: int = 200  # conversations per batch (one transaction)
    max_exports: int = 2  # GET /export downloads at once on the database (all replicas)
    retention_days: float | None = None  # None: keep every conversation (see retention.py)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the SPEC 1 variables; raise ConfigError naming a bad one."""
        env = os.environ if environ is None else environ
        settings = cls(
            database_url=env.get("DATABASE_URL") or None,
            data_dir=Path(env.get("SSE_LLM_DATA_DIR") or ".sse-llm"),
            provider=_read(env, "LLM_PROVIDER", str, "demo").lower(),
            openai_base_url=_read(env, "OPENAI_BASE_URL", str, cls.openai_base_url),
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            model=env.get("LLM_MODEL") or None,
            first_chunk_timeout=_read(env, "LLM_FIRST_CHUNK_TIMEOUT", float, 30.0),
            chunk_timeout=_read(env, "LLM_CHUNK_TIMEOUT", float, 30.0),
            total_timeout=_read(env, "LLM_TOTAL_TIMEOUT", float, 600.0),
            api_key=env.get("SSE_LLM_API_KEY") or None,
            max_prompt_chars=_read(env, "SSE_LLM_MAX_PROMPT_CHARS", int, 32_000),
            host=_read(env, "SSE_LLM_HOST", str, "127.0.0.1"),
            port=_read(env, "SSE_LLM_PORT", int, 8000),
            demo_tokens_per_second=_read(env, "DEMO_TOKENS_PER_SECOND", float, 20.0),
            demo_tokens=_read(env, "DEMO_TOKENS", int, 60),
            ping_interval=_read(env, "SSE_LLM_PING_INTERVAL", float, 15.0),
            storage_timeout=_read(env, "SSE_LLM_STORAGE_TIMEOUT", float, 10.0),
            shutdown_grace=_read(env, "SSE_LLM_SHUTDOWN_GRACE", float, 30.0),
            max_streams=_read(env, "SSE_LLM_MAX_STREAMS", int, 1000),
            overload_lag=_read(env, "SSE_LLM_OVERLOAD_LAG", float, 0.1),
            queue_timeout=_read(env, "SSE_LLM_QUEUE_TIMEOUT", float, 30.0),
            lease_interval=_read(env, "SSE_LLM_LEASE_INTERVAL", float, 5.0),
            rate_limit=env.get("SSE_LLM_RATE_LIMIT") or None,
            allowed_hosts=parse_allowed_hosts(env.get("SSE_LLM_ALLOWED_HOSTS")),
            log_format=_read(env, "SSE_LLM_LOG_FORMAT", str, "text").lower(),
            query_timeout=_read(env, "SSE_LLM_QUERY_TIMEOUT", float, 5.0),
            compaction_interval=_read(env, "SSE_LLM_COMPACTION_INTERVAL", float, 5.0),
            compaction_batch=_read(env, "SSE_LLM_COMPACTION_BATCH", int, 200),
            max_exports=_read(env, "SSE_LLM_MAX_EXPORTS", int, 2),
            retention_days=_read(env, "SSE_LLM_RETENTION_DAYS", parse_days, None),
        )
        settings.validate()
        return settings

    def with_changes(self, **changes: Any) -> Settings:
        """A validated copy with some fields changed (for tests and the CLI flags)."""
        settings = replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError if a value is out of range."""
        if self.provider not in PROVIDERS:
            raise ConfigError(
                f"LLM_PROVIDER must be one of {', '.join(PROVIDERS)}, not {self.provider!r}"
            )
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("DATABASE_URL must start with postgresql:// (or postgres://)")
        if not self.openai_base_url.startswith(("http://", "https://")):
            raise ConfigError("OPENAI_BASE_URL must be an http:// or https:// URL")
        positive = {
            "LLM_FIRST_CHUNK_TIMEOUT": self.first_chunk_timeout,
            "LLM_CHUNK_TIMEOUT": self.chunk_timeout,
            "LLM_TOTAL_TIMEOUT": self.total_timeout,
            "SSE_LLM_MAX_PROMPT_CHARS": self.max_prompt_chars,
            "DEMO_TOKENS": self.demo_tokens,
            "SSE_LLM_STORAGE_TIMEOUT": self.storage_timeout,
            "SSE_LLM_MAX_STREAMS": self.max_streams,
            "SSE_LLM_QUEUE_TIMEOUT": self.queue_timeout,
            "SSE_LLM_QUERY_TIMEOUT": self.query_timeout,
            "SSE_LLM_LEASE_INTERVAL": self.lease_interval,
            "SSE_LLM_COMPACTION_BATCH": self.compaction_batch,
            "SSE_LLM_MAX_EXPORTS": self.max_exports,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be greater than 0, not {value}")
        not_negative = {
            "DEMO_TOKENS_PER_SECOND": self.demo_tokens_per_second,
            "SSE_LLM_PING_INTERVAL": self.ping_interval,
            "SSE_LLM_SHUTDOWN_GRACE": self.shutdown_grace,
            "SSE_LLM_OVERLOAD_LAG": self.overload_lag,
            "SSE_LLM_COMPACTION_INTERVAL": self.compaction_interval,
        }
        for name, value in not_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must be 0 or more, not {value}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"SSE_LLM_LOG_FORMAT must be text or json, not {self.log_format!r}")
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
        if self.retention_days is not None:
            check_days("SSE_LLM_RETENTION_DAYS", self.retention_days)
        if not 0 < self.port < 65536:
            raise ConfigError(f"SSE_LLM_PORT must be between 1 and 65535, not {self.port}")


def parse_days(text: str) -> float:
    """`"30"`, `"0.5"` → a number of days (fractions allowed), for SSE_LLM_RETENTION_DAYS
    and `sse-llm prune --older-than`."""
    return float(text)


def check_days(name: str, days: float) -> None:
    """Raise ConfigError unless `days` is a finite number of days greater than 0."""
    if not math.isfinite(days) or days <= 0:
        raise ConfigError(
            f"{name} must be a number of days greater than 0 (fractions allowed), not {days}"
        )


_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def parse_rate(text: str) -> tuple[int, float]:
    """`"60/minute"` → (60, 60.0): that many requests per that many seconds."""
    count, _, period = text.strip().lower().partition("/")
    seconds = _PERIODS.get(period.strip().removesuffix("s"))
    if not count.strip().isdigit() or int(count) <= 0 or seconds is None:
        raise ConfigError(
            f"SSE_LLM_RATE_LIMIT must look like 60/minute (per second, minute, hour or day), "
            f"not {text!r}"
        )
    return int(count), float(seconds)


def parse_allowed_hosts(text: str | None) -> tuple[str, ...] | None:
    """`"a.example, ::1"` → ("a.example", "[::1]"): names without scheme or port, or `*`."""
    entries = [entry.strip().lower() for entry in (text or "").split(",")]
    names = [_host_name(entry, text or "") for entry in entries if entry]
    return tuple(dict.fromkeys(names)) or None


# A DNS name or an IPv4 address (an IPv6 address is checked by ipaddress).
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def _host_name(name: str, text: str) -> str:
    """One entry of SSE_LLM_ALLOWED_HOSTS as a Host header names it (IPv6 in brackets)."""
    if name == "*" or _HOST_NAME.fullmatch(name):
        return name
    try:
        return f"[{ipaddress.IPv6Address(name.removeprefix('[').removesuffix(']'))}]"
    except ValueError:
        raise ConfigError(
            "SSE_LLM_ALLOWED_HOSTS must list host names (no scheme, no port) separated by "
            f"commas, or *, not {text!r}"
        ) from None


def _read(env: Mapping[str, str], name: str, kind: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be {_describe(kind)}, not {raw!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {raw!r}")
    return value


def _describe(kind: Callable[..., object]) -> str:
    if kind is int:
        return "a whole number"
    if kind is parse_days:
        return "a number of days (fractions allowed)"
    return "a number" if kind is float else "text"
