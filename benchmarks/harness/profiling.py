"""py-spy of sse-llm while C streams run, and the hottest functions of its samples."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.config import PYTHON, RESULTS
from harness.measure import run_load
from harness.processes import Bench, start


def profile(bench: Bench, concurrency: int, log: Callable[[str], None]) -> dict[str, Any]:
    """py-spy the sse-llm process while C streams run; the hottest functions."""
    py_spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    server = bench.servers["sse-llm"]
    pid = server.server_processes()[-1].pid  # the worker when there are several
    raw = RESULTS / f"profile-sse-llm-c{concurrency}.txt"
    # Collapsed stacks: open them in speedscope, or flamegraph.pl for an SVG.
    command = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
    command += ["--format", "raw", "-o", str(raw)]
    log_path = bench.logs / f"py-spy-c{concurrency}.log"
    spy = start(command, log_path, bench.other_cpus, bench.config.nice)
    time.sleep(1)
    try:
        # No verification: the profile shows the streams, not the reads that check them.
        result = run_load(bench, server, concurrency, max(20, 4 * concurrency), verify=False)
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
    result["scenario"] = f"profiled C={concurrency}"
    top = hot_spots(raw)
    log(top["markdown"])
    return {"concurrency": concurrency, "run": result, "raw": str(raw), **top}


# Frames every stack goes through (the process's main chain): not worth listing.
_ROOT_FRAMES = (
    "<module>", "_run_code", "_run_module_as_main", "run (asyncio", "Runner.run",
    "asyncio_run", "Server.run", "Server.serve", "main (sse_llm", "serve (sse_llm",
    "_run (sse_llm", "run (uvicorn",
)  # fmt: skip


def count_samples(raw: Path) -> tuple[dict[str, int], dict[str, int], dict[str, int], int]:
    """(self samples by function, by package, inclusive by function, total) of a raw file."""
    own: dict[str, int] = {}
    packages: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        n = int(samples)
        total += n
        # py-spy names a frame "function (path/module.py:line)": drop the line number.
        names = [
            frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") and ":" in frame else frame
            for frame in stack.split(";")
            if frame
        ]
        if not names:
            continue
        own[names[-1]] = own.get(names[-1], 0) + n
        path = names[-1].rpartition("(")[2].rstrip(")")
        package = path.split("/")[0] if "/" in path else path.removesuffix(".py")
        packages[package] = packages.get(package, 0) + n
        for name in set(names):
            if not name.startswith(_ROOT_FRAMES):
                inclusive[name] = inclusive.get(name, 0) + n
    return own, packages, inclusive, total


def hot_spots(raw: Path, count: int = 25) -> dict[str, Any]:
    """Self share by function and by package, and inclusive share, from collapsed stacks.

    Percentages are of the samples where the thread was busy. With uvloop, time spent
    in the loop's C code (socket reads and writes, epoll, timers) shows as the self
    time of `Runner.run`: py-spy sees no Python frame there.
    """
    if not raw.exists():
        return {"markdown": f"(no profile: {raw} missing)", "self": [], "inclusive": []}
    own, packages, inclusive, total = count_samples(raw)

    def table(data: dict[str, int]) -> list[tuple[str, float]]:
        ordered = sorted(data.items(), key=lambda item: -item[1])[:count]
        return [(name, 100 * n / total) for name, n in ordered] if total else []

    own_top, inclusive_top, package_top = table(own), table(inclusive), table(packages)
    text = [
        f"Profile {raw.name}: {total} busy samples at 250 Hz.",
        "",
        "| self % | function (module) | inclusive % | function (module) | self % | package |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(max(len(own_top), len(inclusive_top))):
        cells = []
        for column in (own_top, inclusive_top, package_top):
            name, share = column[i] if i < len(column) else ("", None)
            cells += [f"{share:.1f}" if share is not None else "", name.replace("|", "\\|")]
        text.append(f"| {' | '.join(cells)} |")
    return {
        "markdown": "\n".join(text),
        "self": own_top,
        "inclusive": inclusive_top,
        "packages": package_top,
        "samples": total,
    }
