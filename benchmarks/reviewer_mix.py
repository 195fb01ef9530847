"""The requests of reviewer_pages.py: a fixed-seed mix over every page and filter a
reviewer uses, drawn from what the seeded database holds, and the client that sends them.

Each request carries its own X-Request-Id (`pages-00042`) so its line in the server's
request log, and so its server time, is found again.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from seed_history import vocabulary
from seed_reviews import LABELS

NEXT_BEFORE = re.compile(r"before=([0-9a-f-]{36})")
# An invalid value per filter: a server that has the filter refuses it (422).
PROBES = {
    "verdict": "verdict=maybe", "consensus": "consensus=maybe", "reviewer": "reviewer=.",
    "label": "label=" + "x" * 41, "reviewed": "reviewed=maybe", "from": "from=soon",
    "before": "before=not-an-id", "model": "model=" + "m" * 300,
}  # fmt: skip


@dataclass
class Sample:
    """One request sent: what, and what the server's log said of it."""

    kind: str
    path: str
    request_id: str
    client_ms: float
    status: int
    server_ms: float | None = None
    route: str | None = None


@dataclass
class Run:
    """The client side: one keep-alive connection, numbered request ids."""

    port: int
    samples: list[Sample] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    connection: http.client.HTTPConnection | None = None

    def get(self, kind: str, path: str, cookie: str | None = None) -> tuple[int, bytes]:
        """GET `path`, recorded under `kind`; returns the status and the body."""
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        request_id = f"pages-{len(self.samples):05d}"
        headers = {"X-Request-Id": request_id}
        if cookie:
            headers["Cookie"] = cookie
        began = time.perf_counter()
        try:
            self.connection.request("GET", path, headers=headers)
            response = self.connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = None
            raise
        elapsed = (time.perf_counter() - began) * 1000
        self.samples.append(Sample(kind, path, request_id, round(elapsed, 2), response.status))
        return response.status, body


@dataclass(frozen=True)
class Seeded:
    """What the database holds that the requests are drawn from."""

    words: list[str]
    models: list[str]
    reviewers: list[str]
    reviewed_ids: list[str]
    annotated_ids: list[str]
    middle_ids: list[str]
    newest: datetime
    oldest: datetime


def seeded(database_url: str, rng: random.Random) -> Seeded:
    """Read the ids, names and time span to draw requests from (not timed)."""
    with psycopg.connect(database_url, autocommit=True) as conn:

        def column(query: str) -> list[Any]:
            return [row[0] for row in conn.execute(query).fetchall()]

        span = conn.execute(
            "SELECT (SELECT min(created_at) FROM conversations),"
            " (SELECT max(created_at) FROM conversations)"
        ).fetchone()
        assert span is not None and span[0] is not None, "the database holds no conversation"
        oldest, newest = span
        middle = []
        for _ in range(10):  # points spread over the older 3/4 of the history, by index
            at = newest - (newest - oldest) * (0.25 + 0.7 * rng.random())
            row = conn.execute(
                "SELECT id FROM conversations WHERE created_at < %s"
                " ORDER BY created_at DESC, id DESC LIMIT 1",
                (at,),
            ).fetchone()
            if row:
                middle.append(str(row[0]))
        return Seeded(
            words=vocabulary(),
            models=column("SELECT model FROM conversations GROUP BY model ORDER BY count(*) DESC"),
            reviewers=column("SELECT reviewer FROM reviews GROUP BY 1 ORDER BY count(*) DESC"),
            reviewed_ids=column(
                "SELECT conversation_id::text FROM reviews GROUP BY 1"
                " HAVING count(*) >= 2 ORDER BY md5(conversation_id::text) LIMIT 40"
            ),
            annotated_ids=column(
                "SELECT DISTINCT conversation_id::text FROM annotations ORDER BY 1 LIMIT 40"
            ),
            middle_ids=middle,
            newest=newest,
            oldest=oldest,
        )


def qs(*pairs: tuple[str, str]) -> str:
    return urllib.parse.urlencode(pairs)


def filters(data: Seeded, rng: random.Random) -> list[tuple[str, str, set[str]]]:
    """(kind, query, the filters it needs) for the history's list, drawn at random."""
    verdicts = ("good", "bad", "unsure")
    common, medium, uncommon, rare = (data.words[i] for i in (3, 20, 500, 40_000))

    def window(days: int) -> list[tuple[str, str]]:
        start = data.oldest + (data.newest - data.oldest - timedelta(days=days)) * rng.random()
        end = start + timedelta(days=days)
        return [
            ("from", start.strftime("%Y-%m-%dT%H:%M:%S")),
            ("to", end.strftime("%Y-%m-%dT%H:%M:%S")),
        ]

    def label() -> str:  # most often a common label, sometimes one of the rare ones
        return LABELS[min(len(LABELS) - 1, int(len(LABELS) * rng.random() ** 2))]

    reviewer, verdict = rng.choice(data.reviewers), rng.choice(verdicts)
    two = rng.sample(LABELS[:12], 2)
    return [
        ("newest", "", set()),
        ("status=failed", qs(("status", "failed")), set()),
        ("verdict", qs(("verdict", verdict)), {"verdict"}),
        ("consensus", qs(("consensus", rng.choice(verdicts))), {"consensus"}),
        ("reviewer", qs(("reviewer", reviewer)), {"reviewer"}),
        ("label", qs(("label", label())), {"label"}),
        ("label x2", qs(("label", two[0]), ("label", two[1])), {"label"}),
        ("reviewed=true", qs(("reviewed", "true")), {"reviewed"}),
        ("reviewed=false", qs(("reviewed", "false")), {"reviewed"}),
        ("reviewer+verdict", qs(("reviewer", reviewer), ("verdict", verdict)), {"reviewer", "verdict"}),  # noqa: E501
        ("reviewer+reviewed=false", qs(("reviewer", reviewer), ("reviewed", "false")), {"reviewer", "reviewed"}),  # noqa: E501
        ("model", qs(("model", rng.choice(data.models))), {"model"}),
        ("model (rarest)", qs(("model", data.models[-1])), {"model"}),
        ("from/to day", qs(*window(1)), {"from"}),
        ("from/to week", qs(*window(7)), {"from"}),
        ("from/to month", qs(*window(30)), {"from"}),
        ("q common", qs(("q", common)), set()),
        ("q rare", qs(("q", rare)), set()),
        ("q common+verdict", qs(("q", common), ("verdict", "bad")), {"verdict"}),
        ("q medium+reviewed=true", qs(("q", medium), ("reviewed", "true")), {"reviewed"}),
        ("q uncommon+model+month", qs(("q", uncommon), ("model", data.models[0]), *window(30)), {"model", "from"}),  # noqa: E501
        ("q rare+label", qs(("q", rare), ("label", label())), {"label"}),
    ]  # fmt: skip


def probe_filters(run: Run) -> set[str]:
    """The filters this server has: those whose invalid value it refuses."""
    have = set()
    for name, query in PROBES.items():
        status, _ = run.get("probe", f"/history?{query}")
        if status == 422:
            have.add(name)
    return have


def walk(
    run: Run, kind: str, first: str, pages: int, next_of: Callable[[bytes], str | None]
) -> None:
    """Follow `before=` from `first` for `pages` pages (fewer if the history ends)."""
    path = first
    for page in range(1, pages + 1):
        status, body = run.get(kind, path)
        before = next_of(body) if status == 200 else None
        if before is None:
            if page < pages:
                run.notes.append(f"{kind}: stopped at page {page} (HTTP {status}, no before=)")
            return
        base, _, query = path.partition("?")
        kept = [(k, v) for k, v in urllib.parse.parse_qsl(query) if k != "before"]
        path = f"{base}?{qs(*kept, ('before', before))}"


def api_next(body: bytes) -> str | None:
    page = json.loads(body)
    return page["items"][-1]["id"] if page.get("has_more") and page["items"] else None


def page_next(body: bytes) -> str | None:
    found = NEXT_BEFORE.findall(body.decode(errors="replace"))
    return found[-1] if found else None


def jobs(run: Run, data: Seeded, rng: random.Random, have: set[str]) -> list[Callable[[], None]]:
    """Every request (or walk) to send, as thunks, to be shuffled."""
    todo: list[Callable[[], None]] = []

    def add(kind: str, path: str, needs: set[str] | None = None, cookie: str | None = None) -> None:
        needs = needs or set()
        if needs - have:
            run.missing.setdefault(kind, "filter ignored: " + ",".join(sorted(needs - have)))
            return

        def send() -> None:
            run.get(kind, path, cookie)

        todo.append(send)

    for _ in range(4):  # four draws of every filter, on the API and on the page
        for kind, query, needs in filters(data, rng):
            add(f"GET /history {kind}", f"/history?{query}".rstrip("?"), needs)
            add(f"page / {kind}", f"/?{query}".rstrip("?"), needs)
    if "before" in have:
        todo.append(lambda: walk(run, "GET /history before= walk", "/history", 50, api_next))
        todo.append(lambda: walk(run, "page / before= walk", "/", 50, page_next))
        if "verdict" in have:
            todo.append(
                lambda: walk(
                    run,
                    "GET /history verdict=bad before= walk",
                    "/history?verdict=bad",
                    20,
                    api_next,
                )
            )
        for conversation_id in data.middle_ids:
            add("GET /history before=<middle>", f"/history?{qs(('before', conversation_id))}")
            add("page / before=<middle>", f"/?{qs(('before', conversation_id))}")
    else:
        run.missing["before= walks and jumps"] = "filter ignored: before"
    for conversation_id in data.reviewed_ids[:20] + data.annotated_ids[:10]:
        add("page /conversations/{id}", f"/conversations/{conversation_id}")
    for conversation_id in data.reviewed_ids[20:35]:
        add("GET /conversations/{id}/reviews", f"/conversations/{conversation_id}/reviews")
    for conversation_id in data.annotated_ids[10:25]:
        add("GET /conversations/{id}/annotations", f"/conversations/{conversation_id}/annotations")
    for _ in range(5):
        add("GET /reviewers", "/reviewers")
    queue(add, data, rng)
    agreement(add, data, rng)
    return todo


def queue(add: Callable[..., None], data: Seeded, rng: random.Random) -> None:
    """The review queue: both modes, both orders, with and without a slice, as several reviewers."""
    slices = [("whole", "", set()), ("slice model", qs(("model", data.models[1])), {"model"}),
              ("slice label", qs(("label", "hallucination")), {"label"}),
              ("slice q", qs(("q", data.words[20])), set())]  # fmt: skip
    for mode, order, (sliced, query, needs), _ in itertools.product(
        ("mine", "nobody"), ("newest", "sample"), slices, range(2)
    ):
        reviewer = urllib.parse.quote(rng.choice(data.reviewers))
        path = f"/review?{qs(('mode', mode), ('order', order))}" + (f"&{query}" if query else "")
        add(f"page /review {order} {mode} {sliced}", path, needs, f"sse_llm_reviewer={reviewer}")


def agreement(add: Callable[..., None], data: Seeded, rng: random.Random) -> None:
    """Agreement over the whole history and slices, for 2, 3 and all reviewers."""
    for route in ("GET /agreement", "page /reviews/agreement"):
        base = "/agreement" if route.startswith("GET") else "/reviews/agreement"
        for _ in range(2):
            two = ",".join(rng.sample(data.reviewers, 2))
            three = ",".join(rng.sample(data.reviewers, 3))
            month = data.newest - timedelta(days=30 * rng.randint(1, 11))
            window = (
                ("from", month.strftime("%Y-%m-%d")),
                ("to", (month + timedelta(days=30)).strftime("%Y-%m-%d")),
            )
            add(f"{route} whole", base)
            add(f"{route} 2 reviewers", f"{base}?{qs(('reviewers', two))}")
            add(f"{route} 3 reviewers", f"{base}?{qs(('reviewers', three))}")
            add(f"{route} slice month", f"{base}?{qs(*window)}", {"from"})
            add(
                f"{route} slice model+2",
                f"{base}?{qs(('model', rng.choice(data.models)), ('reviewers', two))}",
                {"model"},
            )
            add(
                f"{route} slice label+3",
                f"{base}?{qs(('label', 'too-long'), ('reviewers', three))}",
                {"label"},
            )
