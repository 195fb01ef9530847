"""The repeatable check of issue 15 point 3: every history page, filter and chart route on
a big seeded history, by server time.

    python benchmarks/history_check.py --data-dir /work/data/history-1m [--checkout DIR]

Like reviewer_pages.py (whose server, log reader and report it reuses): it starts the
embedded PostgreSQL of `--data-dir` (seeded by seed_history.py) and `sse-llm serve` from
`--checkout` with JSON request logs, sends a fixed-seed shuffled mix of requests, each with
its own X-Request-Id, and takes each one's server time from its request-log line. The mix
(≥ 200 requests): the history page `/` with its counts and `GET /history` under every
filter of SPEC 9 and `delivered=incomplete` (SPEC 10), alone and combined; searches from
very common to absent words, phrases and exclusions; deep pages by keyset (`before=`
walked 50 pages deep and jumps into the middle of the history); the detail page and
`GET /conversations/{id}/deliveries`; `GET /stats` and `/insights` by hour and by day,
over default and long ranges, sliced by what the rollups answer (model, status) and by
what they cannot (a search, a verdict, a label, `delivered`: sample estimates).

Routes a checkout does not have yet (`/stats`, `/insights`, deliveries: a probe answers
404) and filters it ignores (an invalid value is not refused) are skipped with a
"not available" line, not failed, so the check runs on any checkout and measures
everything once the parts are merged. Target: p50 < 100 ms and p99 < 250 ms per kind and
overall. Results: benchmarks/results/history-check-<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from reviewer_mix import (
    Run,
    Sample,
    Seeded,
    api_next,
    filters,
    page_next,
    probe_filters,
    qs,
    seeded,
    walk,
)
from reviewer_pages import RESULTS, markdown, read_log, report, server

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Routes of issue 15 that may not be on the checkout yet: (kind prefix, probe path).
NEW_ROUTES = {"stats": "/stats", "insights": "/insights"}
NEW_PARTS = {*NEW_ROUTES, "delivered", "deliveries"}
Add = Callable[..., None]


def extra_ids(database_url: str) -> dict[str, list[str]]:
    """Conversations whose client left before the end, and failed ones (not timed)."""
    with psycopg.connect(database_url, autocommit=True) as conn:

        def column(query: str) -> list[str]:
            return [str(row[0]) for row in conn.execute(query).fetchall()]

        has_deliveries = conn.execute("SELECT to_regclass('deliveries') IS NOT NULL").fetchone()
        left = []
        if has_deliveries and has_deliveries[0]:
            left = column(
                "SELECT conversation_id FROM deliveries WHERE ended = 'client_left'"
                " ORDER BY md5(id::text) LIMIT 20"
            )
        failed = column(
            "SELECT id FROM conversations WHERE status = 'failed' ORDER BY created_at DESC LIMIT 10"
        )
    return {"left": left, "failed": failed}


def probe_routes(run: Run) -> set[str]:
    """The new routes this checkout has (a probe that does not answer 404)."""
    have = set()
    for name, path in NEW_ROUTES.items():
        status, _ = run.get("probe", path)
        if status != 404:
            have.add(name)
        else:
            run.missing[f"GET {path} (all kinds)"] = f"not available: GET {path} answered 404"
    status, _ = run.get("probe", "/history?delivered=maybe")
    if status == 422:
        have.add("delivered")
    else:
        run.missing["delivered=incomplete (all kinds)"] = (
            f"not available: delivered=maybe answered {status}, not 422 (filter ignored)"
        )
    return have


def history_requests(add: Add, data: Seeded, rng: random.Random) -> None:
    """The history page and `GET /history` under every SPEC 9 filter, searches, deliveries."""
    words = data.words
    searches = [
        ("q absent", qs(("q", "zyzzyvaqua"))),
        ("q phrase", qs(("q", f'"{words[0]} {words[3]}"'))),
        ("q exclusion", qs(("q", f"{words[20]} -{words[3]}"))),
        ("q two words", qs(("q", f"{words[20]} {words[500]}"))),
        ("q or", qs(("q", f"{words[500]} or {words[40_000]}"))),
    ]
    for _ in range(4):  # four draws of every filter, on the API and on the page
        for kind, query, needs in filters(data, rng):
            add(f"GET /history {kind}", f"/history?{query}".rstrip("?"), needs)
            add(f"page / {kind}", f"/?{query}".rstrip("?"), needs)
    for kind, query in searches:
        for _ in range(2):
            add(f"GET /history {kind}", f"/history?{query}")
            add(f"page / {kind}", f"/?{query}")
    delivered = [
        ("delivered=incomplete", qs(("delivered", "incomplete"))),
        ("delivered+status", qs(("delivered", "incomplete"), ("status", "completed"))),
        ("delivered+model", qs(("delivered", "incomplete"), ("model", data.models[-1]))),
        ("delivered+q", qs(("delivered", "incomplete"), ("q", words[20]))),
        ("delivered+reviewed", qs(("delivered", "incomplete"), ("reviewed", "true"))),
    ]
    for kind, query in delivered:
        for _ in range(3):
            add(f"GET /history {kind}", f"/history?{query}", {"delivered"})
            add(f"page / {kind}", f"/?{query}", {"delivered"})


def keyset_requests(run: Run, todo: list[Callable[[], None]], add: Add, data: Seeded) -> None:
    """Deep pages by keyset: walks 50 pages deep, and jumps into the middle."""
    todo.append(lambda: walk(run, "GET /history before= walk", "/history", 50, api_next))
    todo.append(lambda: walk(run, "page / before= walk", "/", 50, page_next))
    todo.append(
        lambda: walk(run, "GET /history status before= walk", "/history?status=failed", 20,
                     api_next)
    )  # fmt: skip
    for conversation_id in data.middle_ids:
        add("GET /history before=<middle>", f"/history?{qs(('before', conversation_id))}")
        add("page / before=<middle>", f"/?{qs(('before', conversation_id))}")


def chart_requests(add: Add, data: Seeded, rng: random.Random) -> None:
    """`GET /stats` and `/insights`: hour and day, ranges, rollup slices and estimates."""
    day = data.newest - timedelta(days=rng.randint(10, 300))

    def span(days: int) -> tuple[tuple[str, str], tuple[str, str]]:
        return (("from", (day - timedelta(days=days)).strftime("%Y-%m-%dT%H:00:00")),
                ("to", day.strftime("%Y-%m-%dT%H:00:00")))  # fmt: skip

    slices = [
        ("hour default", qs(("bucket", "hour")), set()),
        ("day default", qs(("bucket", "day")), set()),
        ("hour 60 days", qs(("bucket", "hour"), *span(60)), {"from"}),
        ("day year", qs(("bucket", "day"), *span(365)), {"from"}),
        ("day model", qs(("bucket", "day"), ("model", rng.choice(data.models))), {"model"}),
        ("hour status", qs(("bucket", "hour"), ("status", "failed")), set()),
        (
            "day model+status",
            qs(("bucket", "day"), ("model", data.models[0]), ("status", "completed")),
            {"model"},
        ),
        ("estimate q", qs(("bucket", "day"), ("q", data.words[20])), set()),
        ("estimate verdict", qs(("bucket", "day"), ("verdict", "bad")), {"verdict"}),
        ("estimate label", qs(("bucket", "hour"), ("label", "hallucination")), {"label"}),
        ("estimate delivered", qs(("bucket", "day"), ("delivered", "incomplete")), {"delivered"}),
        ("estimate q+month", qs(("bucket", "hour"), ("q", data.words[3]), *span(30)), {"from"}),
    ]
    for kind, query, needs in slices:
        for _ in range(3):
            add(f"GET /stats {kind}", f"/stats?{query}", needs | {"stats"})
            add(f"page /insights {kind}", f"/insights?{query}", needs | {"insights"})


def conversation_requests(add: Add, data: Seeded, ids: dict[str, list[str]]) -> None:
    """The detail page (its timeline) and the deliveries route of some conversations."""
    for conversation_id in ids["left"][:10] + ids["failed"][:5] + data.reviewed_ids[:5]:
        add("page /conversations/{id}", f"/conversations/{conversation_id}")
    for conversation_id in ids["left"][10:20] + ids["failed"][5:10]:
        add("GET /conversations/{id}/deliveries", f"/conversations/{conversation_id}/deliveries",
            {"deliveries"})  # fmt: skip


def all_jobs(
    run: Run, data: Seeded, ids: dict[str, list[str]], rng: random.Random, have: set[str]
) -> list[Callable[[], None]]:
    """Every request (or walk) to send, as thunks, to be shuffled."""
    todo: list[Callable[[], None]] = []

    def add(kind: str, path: str, needs: set[str] | None = None) -> None:
        lacking = (needs or set()) - have
        if lacking:
            # The new routes and `delivered` have one "(all kinds)" line of their own.
            if lacking - NEW_PARTS:
                run.missing.setdefault(kind, "not available: " + ",".join(sorted(lacking)))
            return

        def send() -> None:
            for attempt in range(2):
                try:
                    run.get(kind, path)
                    return
                except (OSError, http.client.HTTPException) as exc:
                    # A server closes a keep-alive connection after a 500: once more, on a
                    # new one; a second failure counts as an error of this kind.
                    if attempt:
                        run.samples.append(Sample(kind, path, "", 0.0, 599))
                        run.notes.append(f"{kind}: GET {path} failed: {type(exc).__name__}")

        todo.append(send)

    history_requests(add, data, rng)
    if "before" in have:
        keyset_requests(run, todo, add, data)
    else:
        run.missing["before= walks and jumps"] = "not available: before= ignored"
    chart_requests(add, data, rng)
    conversation_requests(add, data, ids)
    return todo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default="/work/data/history-1m", help="seeded embedded PostgreSQL folder"
    )
    parser.add_argument("--checkout", default=str(REPO), help="the sse-llm checkout to serve")
    parser.add_argument("--seed", type=int, default=15, help="the random draws' seed")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    checkout = Path(args.checkout).resolve()
    log_path = RESULTS / f"history-check-{stamp}.log"
    rng = random.Random(args.seed)
    from sse_llm.database import EmbeddedPostgres

    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(EmbeddedPostgres(Path(args.data_dir)))
        port = stack.enter_context(server(checkout, postgres.url, log_path))  # it migrates
        data, ids = seeded(postgres.url, rng), extra_ids(postgres.url)
        run = Run(port)
        have = probe_filters(run) | probe_routes(run)
        # The deliveries route answers 404 for an unknown id too: probe a real one.
        probe_id = (ids["left"] or ids["failed"] or [""])[0]
        if run.get("probe", f"/conversations/{probe_id}/deliveries")[0] == 200:
            have.add("deliveries")
        else:
            run.missing["GET /conversations/{id}/deliveries"] = "not available: it answered 404"
        todo = all_jobs(run, data, ids, rng, have)
        for _ in range(3):  # warm-up, not counted: the pools' first connections
            run.get("probe", "/history")
        rng.shuffle(todo)
        for job in todo:
            try:
                job()
            except (OSError, http.client.HTTPException) as exc:  # a walk's page: noted
                run.notes.append(f"a walk stopped: {type(exc).__name__}")
        time.sleep(0.5)  # the last lines reach the log
    read_log(log_path, run.samples)
    result = report(run, started, checkout, args.seed)
    result["data_dir"] = args.data_dir
    text = markdown(result).replace("# Reviewer pages", "# History check (issue 15 point 3)", 1)
    text += f"\nDatabase: `{args.data_dir}`.\n"
    (RESULTS / f"history-check-{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"history-check-{stamp}.md").write_text(text)
    print(text)
    return 0 if result["overall"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
