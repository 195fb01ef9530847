"""The Host allow-list (SPEC 8): no web page reaches this service through DNS rebinding.

A page on `evil.example` can point that name at 127.0.0.1 once the browser has loaded
it; its scripts then read `http://evil.example:8000/history` as their own origin, and
on an open service (the default) that is the whole history. The browser still sends
`Host: evil.example:8000`, so refusing names the service does not answer to stops it.

Which names are accepted:
- loopback names (`localhost`, `127.0.0.1`, `[::1]`, any port) always: a page can only
  make a browser send them from a loopback origin, which is not an attacker's;
- with `SSE_LLM_ALLOWED_HOSTS`, the names it lists too (`*`: any name);
- without it, on a loopback bind nothing else; on any other bind (a container, a LAN)
  any name, and the startup log says so, since the names are not known.

`/healthz` and `/readyz` answer whatever the Host: probes send an address.

Why not Starlette's TrustedHostMiddleware: it refuses with a plain-text `Invalid host
header`, not SPEC 8's JSON `invalid_host` (OpenAI-shaped on /v1), exempts no path, and
has no bind-dependent default; adapting it would mean replacing its whole `__call__`.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sse_llm.config import Settings
from sse_llm.contract import ErrorCode

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_PROBE_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True)
class HostPolicy:
    """The Host names this process answers to; `names` None means any."""

    names: frozenset[str] | None

    @classmethod
    def from_settings(cls, settings: Settings) -> HostPolicy:
        """SSE_LLM_ALLOWED_HOSTS if set, else loopback names on a loopback bind, else any."""
        if settings.allowed_hosts is not None:
            if "*" in settings.allowed_hosts:
                return cls(None)
            return cls(LOOPBACK_NAMES | frozenset(settings.allowed_hosts))
        return cls(LOOPBACK_NAMES if is_loopback(settings.host) else None)

    def allows(self, host: str | None) -> bool:
        """Whether a Host header (`name[:port]`) names this service."""
        if self.names is None:
            return True
        return host is not None and host_name(host) in self.names


def is_loopback(address: str) -> bool:
    """Whether a bind address only listens on this machine (`127.0.0.1`, `::1`, `localhost`)."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """`Example.COM:8000` → `example.com`, `[::1]:8000` → `[::1]`: the name without port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def warn_if_any_host(settings: Settings) -> None:
    """Log, at startup, that every Host is accepted when nobody said so."""
    if settings.allowed_hosts is None and HostPolicy.from_settings(settings).names is None:
        log.warning(
            "listening on %s without SSE_LLM_ALLOWED_HOSTS: any Host name is accepted, so a "
            "web page could reach this service through DNS rebinding; set "
            "SSE_LLM_ALLOWED_HOSTS to the names clients use (or * to accept any)",
            settings.host,
        )


class HostAllowList:
    """ASGI middleware: `400 invalid_host` for a Host this service does not answer to."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in _PROBE_PATHS
            or self.policy.allows(_host_header(scope))
        ):
            await self.app(scope, receive, send)
            return
        await _refusal(scope["path"])(scope, receive, send)


def _host_header(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"host":
            return str(value.decode("latin-1"))
    return None


def _refusal(path: str) -> JSONResponse:
    message = (
        "This service does not answer to that Host name. "
        "Its operator can allow it with SSE_LLM_ALLOWED_HOSTS."
    )
    if path == "/v1" or path.startswith("/v1/"):
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": ErrorCode.INVALID_HOST,
        }
    else:
        error = {"code": ErrorCode.INVALID_HOST, "message": message}
    return JSONResponse({"error": error}, status_code=400)
