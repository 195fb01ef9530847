"""What a report says about where it ran: the CPU, the disk's fsync, the code measured."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from pathlib import Path


def git_describe(checkout: Path) -> str:
    """The checkout's short commit, and whether its sse_llm/ has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sse_llm"],
            cwd=checkout,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + (" (sse_llm/ modified)" if dirty else "")
    except OSError:
        return "unknown"


def fsync_ms(folder: Path, seconds: float = 10.0) -> dict[str, float]:
    """p50 / p99 / max of an 8 kB write + fdatasync here, every 5 ms for `seconds`, and
    how many took over 50 ms: what one commit costs at least, and how often the disk
    stalls (a few hundred samples miss stalls that come every few seconds)."""
    path = folder / "fsync-probe"
    timings = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"x" * 8192
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            timings.append((time.perf_counter() - began) * 1000)
            time.sleep(0.005)
    finally:
        os.close(fd)
        path.unlink()
    timings.sort()
    count = len(timings)
    return {
        "p50": round(timings[count // 2], 3),
        "p99": round(timings[int(count * 0.99)], 3),
        "max": round(timings[-1], 3),
        "over_50_ms": sum(1 for t in timings if t > 50),
        "seconds": seconds,
    }


def cpu_model() -> str:
    """The CPU's model name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
