"""Debian's Chromium, driven by Playwright, for the dashboard's browser tests.

Playwright cannot download browsers here, so it launches the system's /usr/bin/chromium
(`apt-get install chromium`; .ci/run does it). The `browser` and `tab` fixtures
(conftest.py) use what is here; every tab fails its test on a console error, an uncaught
exception or a Content-Security-Policy violation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Collects the page's CSP violations (Chromium also logs them as console errors).
RECORD_CSP_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolations.push(`${event.violatedDirective} blocked ${event.blockedURI}`);
});
"""


def require_chromium() -> None:
    """Skip without Chromium on a developer's machine; fail in CI (a skip would pass it)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's Chromium is not installed (.ci/run installs it)")
        pytest.skip("Debian's Chromium is not installed (apt-get install chromium)")


@dataclass
class BrowserPage:
    """A fresh page, and what went wrong in it: console errors and uncaught exceptions."""

    page: Page
    context: BrowserContext
    problems: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)  # problems a test causes on purpose

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def csp_violations(self) -> list[str]:
        violations: list[str] = self.page.evaluate("window.cspViolations")
        return violations
