"""Time GET /stats on a seeded history (seed_history.py): p50/p99 per kind of request.

    DATABASE_URL=postgresql://... python benchmarks/stats_timing.py --requests 40

Starts `sse-llm serve` on that database and sends, per kind, `--requests` varied requests
(a random `to` over the past year, a random model or status) on a keep-alive connection
over loopback (the server's own time is this minus ~0.2 ms): by hour over 7 days, by day
over 90 days and over a year, with model and status filters (from the rollups), and with
filters only a sample answers (a search, a verdict, reviewed). The target (issue 15) is
under 100 ms at p50 and 250 ms at p99. Results go to benchmarks/results/stats-<time>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

from seed_history import sse_llm_server

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet", "llama-70b", "mistral-large"]
KINDS: dict[str, tuple[dict[str, str], timedelta]] = {
    "hour, 7 days": ({"bucket": "hour"}, timedelta(days=7)),
    "day, 90 days": ({"bucket": "day"}, timedelta(days=90)),
    "day, a year": ({"bucket": "day"}, timedelta(days=365)),
    "hour, 7 days, a model": ({"bucket": "hour", "model": "*"}, timedelta(days=7)),
    "day, a year, status failed": ({"bucket": "day", "status": "failed"}, timedelta(days=365)),
    "day, 90 days, a model + status": (
        {"bucket": "day", "model": "*", "status": "completed"},
        timedelta(days=90),
    ),
    "sample: search (day, 90 days)": ({"bucket": "day", "q": "quolo"}, timedelta(days=90)),
    "sample: verdict bad (day, 90 days)": ({"bucket": "day", "verdict": "bad"}, timedelta(days=90)),
    "sample: reviewed (hour, 7 days)": ({"bucket": "hour", "reviewed": "true"}, timedelta(days=7)),
}


def path_of(params: dict[str, str], span: timedelta, rng: random.Random) -> str:
    """A request of this kind: a random end over the past year, a random model."""
    end = datetime.now(UTC) - timedelta(hours=rng.randint(0, 24 * 300))
    chosen = {k: (rng.choice(MODELS) if v == "*" else v) for k, v in params.items()}
    chosen |= {"from": (end - span).isoformat(), "to": end.isoformat()}
    return "/stats?" + urllib.parse.urlencode(chosen)


def time_kinds(port: int, requests: int) -> dict[str, dict[str, float]]:
    """p50/p99/max milliseconds per kind, each over `requests` varied requests."""
    rng = random.Random(15)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    found = {}
    for kind, (params, span) in KINDS.items():
        times = []
        for _ in range(requests):
            path = path_of(params, span, rng)
            began = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            times.append((time.perf_counter() - began) * 1000)
            if response.status != 200:
                raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
        times.sort()
        found[kind] = {
            "p50": round(statistics.median(times), 1),
            "p99": round(times[min(len(times) - 1, int(0.99 * len(times)))], 1),
            "max": round(times[-1], 1),
        }
        print(f"  {kind}: {found[kind]}", flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per kind")
    args = parser.parse_args()
    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        print("set DATABASE_URL to a seeded database", file=sys.stderr)
        return 2
    with sse_llm_server(database_url) as port:
        timings = time_kinds(port, args.requests)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {"when": stamp, "load": os.getloadavg(), "timings": timings}
    (RESULTS / f"stats-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
