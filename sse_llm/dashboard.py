"""The review dashboard: server-rendered HTML pages (SPEC 5)."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
