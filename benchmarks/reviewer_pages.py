"""Time every page and filter a reviewer uses on a big seeded history, by server time.

    python benchmarks/reviewer_pages.py --data-dir /work/data/history-1m [--checkout DIR]

Starts the embedded PostgreSQL of `--data-dir` (seeded by seed_history.py) and
`sse-llm serve` from `--checkout` (default: this project; its own .venv's python if it
has one) with SSE_LLM_LOG_FORMAT=json, then sends a fixed-seed random mix of requests
(the history page and `GET /history` with each SPEC 9 filter, `before=` walks 50 pages
deep and jumps into the middle, detail pages, reviews, annotations, reviewers, the
review queue, agreement), each with its own X-Request-Id. The server time of each is the
`duration_ms` of its line in the request log (sse_llm/request_log.py). Routes the
checkout does not have (the log's route is `unmatched`) and filters it ignores (a probe
with an invalid value is not refused) are reported as missing, not failed.
Target (issue 14 point 8): p50 < 100 ms and p99 < 250 ms per kind and overall.
Results: benchmarks/results/reviewer-pages-<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reviewer_mix import Run, Sample, jobs, probe_filters, seeded

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.append(str(REPO))  # the project root: tests.support
from tests.support import free_port, wait_until  # noqa: E402

RESULTS = HERE / "results"
P50_MS, P99_MS = 100.0, 250.0


@contextlib.contextmanager
def server(checkout: Path, database_url: str, log_path: Path) -> Iterator[int]:
    """`sse-llm serve` from `checkout` on the database, JSON logs to `log_path`; its port."""
    port = free_port()
    python = checkout / ".venv" / "bin" / "python"
    env = {**os.environ, "DATABASE_URL": database_url, "LLM_PROVIDER": "demo",
           "SSE_LLM_LOG_FORMAT": "json"}  # fmt: skip
    env.pop("SSE_LLM_API_KEY", None)  # open mode: the reviewer is a cookie
    env.pop("VIRTUAL_ENV", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(python if python.exists() else sys.executable), "-m", "sse_llm.cli", "serve",
             "--port", str(port)],
            env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"sse-llm exited; see {log_path}")
                with contextlib.suppress(OSError, http.client.HTTPException):
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    connection.request("GET", "/readyz")
                    return connection.getresponse().status == 200
                return False

            # Migrations run at start: on a million rows a new index takes a while.
            wait_until(ready, 900, 0.5, "sse-llm did not start", error=RuntimeError)
            yield port
        finally:
            process.terminate()
            process.wait(30)


def read_log(log_path: Path, samples: list[Sample]) -> None:
    """Fill each sample's server time and route from its request-log line."""
    lines: dict[str, dict[str, Any]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("message") == "request":
                lines[str(entry.get("request_id"))] = entry
    for sample in samples:
        entry = lines.get(sample.request_id)
        if entry:
            sample.server_ms = float(entry["duration_ms"])
            sample.route = entry.get("route")


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    return values[max(0, math.ceil(share * len(values)) - 1)]


def summary(samples: list[Sample]) -> dict[str, Any]:
    times = sorted(s.server_ms for s in samples if s.server_ms is not None)
    if not times:
        return {
            "count": len(samples),
            "p50_ms": None,
            "p99_ms": None,
            "max_ms": None,
            "pass": False,
        }
    p50, p99 = percentile(times, 0.5), percentile(times, 0.99)
    errors = sum(1 for s in samples if s.status >= 400)
    return {"count": len(samples), "errors": errors, "p50_ms": p50, "p99_ms": p99,
            "max_ms": times[-1], "pass": p50 < P50_MS and p99 < P99_MS and not errors}  # fmt: skip


def report(run: Run, started: datetime, checkout: Path, seed: int) -> dict[str, Any]:
    """Per kind and overall figures; unmatched routes become missing kinds."""
    measured = [s for s in run.samples if s.kind != "probe"]
    for sample in measured:
        if sample.route == "unmatched":
            run.missing.setdefault(sample.kind, "route missing (404, unmatched)")
    counted = [s for s in measured if s.kind not in run.missing]
    kinds: dict[str, list[Sample]] = {}
    for sample in counted:
        kinds.setdefault(sample.kind, []).append(sample)
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    slowest = sorted(counted, key=lambda s: -(s.server_ms or 0))[:5]
    return {
        "started": started.isoformat(timespec="seconds"),
        "checkout": str(checkout),
        "commit": commit,
        "seed": seed,
        "target": {"p50_ms": P50_MS, "p99_ms": P99_MS},
        "overall": summary(counted),
        "kinds": {kind: summary(items) for kind, items in sorted(kinds.items())},
        "missing": run.missing,
        "notes": run.notes,
        "slowest": [
            {"kind": s.kind, "path": s.path, "server_ms": s.server_ms, "status": s.status}
            for s in slowest
        ],
        "requests": [vars(s) for s in measured],
    }


def markdown(result: dict[str, Any]) -> str:
    overall = result["overall"]
    mark = {True: "yes", False: "NO"}
    lines = [
        f"# Reviewer pages — {result['started']}, {result['checkout']} @ {result['commit']}", "",
        f"Overall: {overall['count']} requests, p50 {overall['p50_ms']} ms, p99 "
        f"{overall['p99_ms']} ms, max {overall['max_ms']} ms of server time (target p50 < "
        f"{P50_MS:g}, p99 < {P99_MS:g}): {'PASS' if overall['pass'] else 'FAIL'}.", "",
        "| kind | n | errors | p50 ms | p99 ms | max ms | pass |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for kind, s in result["kinds"].items():
        lines.append(f"| {kind} | {s['count']} | {s.get('errors', 0)} | {s['p50_ms']} | "
                     f"{s['p99_ms']} | {s['max_ms']} | {mark[s['pass']]} |")  # fmt: skip
    lines += ["", "Slowest:", ""]
    lines += [
        f"- {s['server_ms']} ms `{s['path']}` ({s['kind']}, {s['status']})"
        for s in result["slowest"]
    ]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    if result["missing"]:
        lines += ["", "Missing (skipped, not failed):", ""]
        lines += [f"- {kind}: {why}" for kind, why in sorted(result["missing"].items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default="/work/data/history-1m", help="seeded embedded PostgreSQL folder"
    )
    parser.add_argument("--checkout", default=str(REPO), help="the sse-llm checkout to serve")
    parser.add_argument("--seed", type=int, default=14, help="the random draws' seed")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    checkout = Path(args.checkout).resolve()
    log_path = RESULTS / f"reviewer-pages-{stamp}.log"
    rng = random.Random(args.seed)
    from sse_llm.database import EmbeddedPostgres

    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(EmbeddedPostgres(Path(args.data_dir)))
        port = stack.enter_context(server(checkout, postgres.url, log_path))  # it migrates
        data = seeded(postgres.url, rng)
        run = Run(port)
        have = probe_filters(run)
        todo = jobs(run, data, rng, have)
        for _ in range(3):  # warm-up, not counted: the pools' first connections
            run.get("probe", "/history")
        rng.shuffle(todo)
        for job in todo:
            job()
        time.sleep(0.5)  # the last lines reach the log
    read_log(log_path, run.samples)
    result = report(run, started, checkout, args.seed)
    text = markdown(result)
    (RESULTS / f"reviewer-pages-{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"reviewer-pages-{stamp}.md").write_text(text)
    print(text)
    return 0 if result["overall"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
