"""GET /export (SPEC 10): each format byte for byte, the filters, headers, errors, the cap,
a client that leaves, and an export that holds no snapshot between its pages.

Conversations are written with plain SQL (hostile text included), each test's under a
model of its own, so `model=` scopes an export to them on the shared database.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, expect
from psycopg.types.json import Jsonb

from sse_llm.config import Settings
from sse_llm.export import CSV_COLUMNS
from sse_llm.export_queries import APPLICATION_NAME, EXPORT_PAGE_ROWS
from tests.browser import BrowserPage
from tests.conftest import RunningServer, start_server, word
from tests.support import wait_until

START = datetime(2002, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
HOSTILE = 'He said "hi", then\nleft,\r\n\tback; <b>&amp;</b> é 😀 \u2028 \\ \u202e end'
V1_THREAD = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "=1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": [{"type": "text", "text": 'and 2+2, "quoted"?\n'}]},
]


def insert(
    db: psycopg.Connection,
    model: str,
    created_at: datetime,
    prompt: str,
    response: str,
    *,
    status: str = "completed",
    error: tuple[str, str] | None = None,
    messages: list[dict[str, Any]] | None = None,
) -> str:
    """An ended conversation, as the writer leaves one; its id."""
    conversation_id = str(uuid4())
    db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, created_at, first_chunk_at,
            completed_at, model, provider, chunk_count, error_code, error_message, messages)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'demo', %s, %s, %s, %s)
        """,
        [
            conversation_id,
            prompt,
            response,
            status,
            created_at,
            created_at + timedelta(milliseconds=150),
            created_at + timedelta(seconds=2),
            model,
            len(response.split()),
            error[0] if error else None,
            error[1] if error else None,
            Jsonb(messages) if messages is not None else None,
        ],
    )
    return conversation_id


def review(
    db: psycopg.Connection, conversation_id: str, reviewer: str, verdict: str, labels: list[str]
) -> None:
    db.execute(
        """
        INSERT INTO reviews (conversation_id, reviewer, verdict, labels, note,
                             conversation_created_at)
        SELECT c.id, %s, %s, %s, %s, c.created_at FROM conversations c WHERE c.id = %s
        """,
        [reviewer, verdict, labels, f"note by {reviewer}: =cmd()\n{HOSTILE}", conversation_id],
    )


@dataclass(frozen=True)
class Exported:
    """Five conversations an hour apart (ids[0] oldest) under one model, and their reviews."""

    model: str
    tag: str
    ids: list[str]
    alice: str
    label: str


@pytest.fixture
def exported(db: psycopg.Connection) -> Iterator[Exported]:
    tag = word()
    model = f"model-{tag}"
    at = [START + timedelta(minutes=int(tag[2:6], 36) % 50_000, hours=n) for n in range(5)]
    ids = [
        insert(db, model, at[0], f"{tag} {HOSTILE}", "-1+2 then\r\nmore 😀"),
        insert(
            db,
            model,
            at[1],
            "@SUM(A1)",
            "+cmd|' /C calc'!A0",
            status="failed",
            error=("upstream_error", "The provider said: =no"),
        ),
        insert(db, model, at[2], 'and 2+2, "quoted"?', "4, of course", messages=V1_THREAD),
        insert(db, model, at[3], "\tTabbed prompt", '=HYPERLINK("http://x")'),
        insert(db, model, at[4], "plain", "", status="cancelled"),
    ]
    alice, label = f"alice {tag} 😀", f"tone-{tag}"
    review(db, ids[0], alice, "good", [label])
    review(db, ids[0], f"bob {tag}", "good", [])
    review(db, ids[2], alice, "good", [])
    review(db, ids[3], alice, "bad", [label, "factual"])
    review(db, ids[3], f"bob {tag}", "good", [])
    db.execute(
        """
        INSERT INTO annotations (conversation_id, reviewer, field, start_offset, end_offset,
                                 label, note)
        VALUES (%s, %s, 'prompt', 0, 3, %s, %s), (%s, %s, 'response', 1, 2, 'sum', '')
        """,
        [ids[0], alice, label, HOSTILE, ids[0], alice],
    )
    yield Exported(model, tag, ids, alice, label)


def expected_json(client: httpx.Client, conversation_id: str) -> dict[str, Any]:
    """What the export must say of one conversation: as the JSON API renders its parts."""
    conversation = client.get(f"/history/{conversation_id}").json()
    reviews = client.get(f"/conversations/{conversation_id}/reviews").json()["items"]
    annotations = client.get(f"/conversations/{conversation_id}/annotations").json()["items"]
    return conversation | {"reviews": reviews, "annotations": annotations}


def export(client: httpx.Client, **params: Any) -> httpx.Response:
    response = client.get("/export", params=params)
    assert response.status_code == 200, response.text
    return response


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.text.endswith("\n") or response.text == ""
    return [json.loads(line) for line in response.text.split("\n")[:-1]]


def test_jsonl_is_each_conversation_as_the_api_renders_it_with_reviews_and_annotations(
    client: httpx.Client, exported: Exported
) -> None:
    response = export(client, model=exported.model)
    assert response.headers["content-type"] == "application/x-ndjson"
    got = lines(response)
    newest_first = list(reversed(exported.ids))
    assert got == [expected_json(client, conversation_id) for conversation_id in newest_first]
    # Full reviews (notes) and annotations, hostile text kept exactly.
    oldest = got[-1]
    assert oldest["prompt"] == f"{exported.tag} {HOSTILE}"
    assert all(r["note"].endswith(HOSTILE) for r in oldest["reviews"])
    assert [a["note"] for a in oldest["annotations"]] == [HOSTILE, ""]
    # One object per line: a newline inside the text never splits one.
    assert response.text.count("\n") == len(exported.ids)
    # The text as written, not \u-escaped.
    assert "😀" in response.text and "\\u" not in response.text.replace("\\u2028", "")


def test_the_default_format_is_jsonl(client: httpx.Client, exported: Exported) -> None:
    default = export(client, model=exported.model)
    assert default.content == export(client, model=exported.model, format="jsonl").content


def cell(value: Any) -> str:
    """A cell as the CSV must hold it: JSON text for nested values, formulas escaped."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def test_csv_is_a_row_per_conversation_nested_values_as_json_formulas_escaped(
    client: httpx.Client, exported: Exported
) -> None:
    response = export(client, model=exported.model, format="csv")
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    table = list(csv.reader(io.StringIO(response.text, newline="")))
    assert table[0] == list(CSV_COLUMNS)
    newest_first = list(reversed(exported.ids))
    expected = [expected_json(client, conversation_id) for conversation_id in newest_first]
    assert table[1:] == [[cell(item[column]) for column in CSV_COLUMNS] for item in expected]
    rows = {row[0]: dict(zip(CSV_COLUMNS, row, strict=True)) for row in table[1:]}
    # Each formula start, by hand: = + - @ and tab; a JSON cell starts with [ or {.
    assert rows[exported.ids[1]]["prompt"] == "'@SUM(A1)"
    assert rows[exported.ids[1]]["response"] == "'+cmd|' /C calc'!A0"
    assert rows[exported.ids[0]]["response"] == "'-1+2 then\r\nmore 😀"
    assert rows[exported.ids[3]]["prompt"] == "'\tTabbed prompt"
    assert rows[exported.ids[3]]["response"] == '\'=HYPERLINK("http://x")'
    assert json.loads(rows[exported.ids[1]]["error"]) == {
        "code": "upstream_error",
        "message": "The provider said: =no",
    }
    assert rows[exported.ids[4]]["completed_at"] != "" and rows[exported.ids[0]]["error"] == ""
    assert json.loads(rows[exported.ids[0]]["reviews"])[0]["reviewer"] == exported.alice
    # RFC 4180: CRLF between rows; a newline inside a cell is quoted, not a new row.
    assert response.text.startswith(",".join(CSV_COLUMNS) + "\r\n")
    assert len(table) == 1 + len(exported.ids)


def test_openai_is_completed_conversations_as_chat_messages(
    client: httpx.Client, exported: Exported
) -> None:
    response = export(client, model=exported.model, format="openai")
    assert response.headers["content-type"] == "application/x-ndjson"
    ids = exported.ids
    prompt_of = {i: client.get(f"/history/{i}").json()["prompt"] for i in ids}
    # Completed only (not the failed ids[1] or the cancelled ids[4]), newest first; the /v1
    # conversation as its stored thread, the others as the prompt; then the answer.
    assert lines(response) == [
        {
            "messages": [
                {"role": "user", "content": prompt_of[ids[3]]},
                {"role": "assistant", "content": '=HYPERLINK("http://x")'},
            ]
        },
        {"messages": [*V1_THREAD, {"role": "assistant", "content": "4, of course"}]},
        {
            "messages": [
                {"role": "user", "content": prompt_of[ids[0]]},
                {"role": "assistant", "content": "-1+2 then\r\nmore 😀"},
            ]
        },
    ]


def test_openai_with_consensus_good_is_a_fine_tuning_set(
    client: httpx.Client, exported: Exported
) -> None:
    # ids[3] has a bad review too; ids[1] is failed (reviewless anyway).
    got = lines(export(client, model=exported.model, format="openai", consensus="good"))
    assert [line["messages"][-1]["content"] for line in got] == [
        "4, of course",
        "-1+2 then\r\nmore 😀",
    ]
    # Another status asked of openai: nothing (it exports completed ones only).
    assert export(client, model=exported.model, format="openai", status="failed").text == ""


def exported_ids(client: httpx.Client, **params: Any) -> list[str]:
    return [line["id"] for line in lines(export(client, **params))]


def test_every_history_filter_chooses_what_gets_exported(
    client: httpx.Client, exported: Exported
) -> None:
    ids = exported.ids
    scope = {"model": exported.model}
    assert exported_ids(client, **scope, status="failed") == [ids[1]]
    assert exported_ids(client, **scope, verdict="bad") == [ids[3]]
    assert exported_ids(client, **scope, consensus="good") == [ids[2], ids[0]]
    assert exported_ids(client, **scope, reviewer=exported.alice) == [ids[3], ids[2], ids[0]]
    assert exported_ids(client, **scope, label=exported.label.upper()) == [ids[3], ids[0]]
    assert exported_ids(client, **scope, label=[exported.label, "factual"]) == [ids[3]]
    assert exported_ids(client, **scope, reviewer=exported.alice, verdict="good") == [
        ids[2],
        ids[0],
    ]
    assert exported_ids(client, **scope, reviewed="false") == [ids[4], ids[1]]
    assert exported_ids(client, q=exported.tag) == [ids[0]]
    second = client.get(f"/history/{ids[1]}").json()["created_at"]
    fourth = client.get(f"/history/{ids[3]}").json()["created_at"]
    assert exported_ids(client, **scope, **{"from": second, "to": fourth}) == [ids[2], ids[1]]
    assert exported_ids(client, **scope, before=ids[2]) == [ids[1], ids[0]]
    # limit and offset are the history's paging, not the export's: ignored.
    assert exported_ids(client, **scope, limit=1, offset=3) == list(reversed(ids))


def test_the_download_is_an_attachment_named_in_ascii_and_rfc_5987(
    client: httpx.Client, exported: Exported
) -> None:
    for chosen, suffix in (("jsonl", ".jsonl"), ("csv", ".csv"), ("openai", "-openai.jsonl")):
        response = export(client, model=exported.model, format=chosen)
        disposition = response.headers["content-disposition"]
        match = re.fullmatch(
            r'attachment; filename="(sse-llm-history-\d{8}T\d{6}Z[-a-z.]+)"; '
            r"filename\*=UTF-8''(sse-llm-history-\d{8}T\d{6}Z[-a-z.]+)",
            disposition,
        )
        assert match, disposition
        assert match[1] == match[2] and match[1].endswith(suffix)
        stamp = datetime.strptime(match[1][16:32], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert abs(stamp - datetime.now(UTC)) < timedelta(minutes=1)
        assert response.headers["cache-control"] == "no-store"
    # HEAD: the same headers, no body, and no export run for nothing.
    head = client.head("/export", params={"format": "csv"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-disposition"].startswith("attachment; filename=")


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"format": "xml"}, "format"),
        ({"format": "JSON"}, "format"),
        ({"status": "done"}, "status"),
        ({"verdict": "great"}, "verdict"),
        ({"reviewed": "maybe"}, "reviewed"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-02-01", "to": "2026-01-01"}, "from"),
        ({"label": "a" * 41}, "label"),
        ({"before": "not-an-id"}, "before"),
    ],
)
def test_bad_parameters_are_a_422_naming_them(
    client: httpx.Client, params: dict[str, str], names: str
) -> None:
    response = client.get("/export", params=params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error" and names in error["message"]
    assert "content-disposition" not in response.headers


@pytest.fixture(scope="module")
def many(database_url: str) -> Iterator[tuple[str, list[str]]]:
    """Enough rows under one model (4 KB answers, 20 pages, 40 MB) that a download outruns
    the socket buffers: an export whose client stops reading waits between pages."""
    model = f"model-{word()}"
    count = EXPORT_PAGE_ROWS * 20
    db = psycopg.connect(database_url, autocommit=True)
    rows = db.execute(
        """
        INSERT INTO conversations (id, prompt, response, status, created_at, completed_at,
                                   model, provider, chunk_count)
        SELECT gen_random_uuid(), 'many ' || n, repeat('x', 4000), 'completed',
               %s::timestamptz - n * interval '1 second', %s::timestamptz, %s, 'demo', 1
        FROM generate_series(1, %s) AS n
        RETURNING id
        """,
        [START, START, model, count],
    ).fetchall()
    yield model, [str(row[0]) for row in rows]
    db.execute("DELETE FROM conversations WHERE model = %s", [model])
    db.close()


def export_backends(db: psycopg.Connection) -> list[tuple[str, str | None]]:
    """The export connections of the database: (state, backend_xmin)."""
    rows = db.execute(
        """
        SELECT state, backend_xmin::text FROM pg_stat_activity
        WHERE application_name = %s AND datname = current_database()
        """,
        [APPLICATION_NAME],
    ).fetchall()
    return [(row[0], row[1]) for row in rows]


def stalled(db: psycopg.Connection) -> bool:
    """The one export connection stays idle, holding no snapshot, for a second."""
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        if export_backends(db) != [("idle", None)]:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_a_slow_download_holds_no_snapshot_and_sees_rows_committed_since(
    demo_server: RunningServer, db: psycopg.Connection, many: tuple[str, list[str]]
) -> None:
    model, ids = many
    with (
        httpx.Client(base_url=demo_server.url, timeout=30) as client,
        client.stream("GET", "/export", params={"model": model}) as response,
    ):
        body = response.iter_bytes()
        received = [next(body)]
        # The client has stopped reading: the server waits, between two pages, for the
        # socket. Its connection is there, idle, holding no snapshot (VACUUM may go on).
        wait_until(lambda: stalled(db), 30, 0.05, "the export did not wait for its client")
        # A row committed now, in a page not read yet (older than all): it is exported.
        late = insert(db, model, START - timedelta(days=1), "late", "arrived during the export")
        received.extend(body)
    exported = [json.loads(line)["id"] for line in b"".join(received).decode().splitlines()]
    assert exported == [*ids, late]
    wait_until(lambda: export_backends(db) == [], 10, 0.05, "the export's connection stayed")


def test_a_client_that_leaves_stops_the_export_and_its_connection_closes(
    demo_server: RunningServer, db: psycopg.Connection, many: tuple[str, list[str]]
) -> None:
    model, _ = many
    with (
        httpx.Client(base_url=demo_server.url, timeout=30) as client,
        client.stream("GET", "/export", params={"model": model, "format": "csv"}) as response,
    ):
        next(response.iter_bytes())
        wait_until(lambda: len(export_backends(db)) == 1, 10, 0.05, "no export connection")
    # The client closed its socket mid-download: the server's connection goes too.
    wait_until(lambda: export_backends(db) == [], 10, 0.05, "the export's connection stayed")


def test_a_failure_after_the_first_page_cuts_the_download_short(
    demo_server: RunningServer, db: psycopg.Connection, many: tuple[str, list[str]]
) -> None:
    """The status is out already: the body ends without its last chunk, an error for
    every HTTP client, never a file that looks whole."""
    model, ids = many
    with (
        httpx.Client(base_url=demo_server.url, timeout=30) as client,
        client.stream("GET", "/export", params={"model": model}) as response,
    ):
        body = response.iter_bytes()
        received = [next(body)]
        wait_until(lambda: stalled(db), 30, 0.05, "the export did not wait for its client")
        # The database ends the export's session between two pages.
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [APPLICATION_NAME],
        )
        with pytest.raises(httpx.RemoteProtocolError):
            received.extend(body)
    assert len(b"".join(received).splitlines()) < len(ids)
    wait_for_no_export(db)


def wait_for_no_export(db: psycopg.Connection) -> None:
    wait_until(lambda: export_backends(db) == [], 10, 0.05, "the export's connection stayed")


def serve_one_export(base_settings: Settings) -> Iterator[RunningServer]:
    """A server whose cap is one export at once, stopped after."""
    running = start_server(base_settings.with_changes(max_exports=1))
    yield running
    running.stop()


@pytest.fixture
def one_export_server(base_settings: Settings) -> Iterator[RunningServer]:
    yield from serve_one_export(base_settings)


def test_over_the_cap_an_export_is_a_429_with_retry_after_until_one_ends(
    one_export_server: RunningServer, db: psycopg.Connection, many: tuple[str, list[str]]
) -> None:
    model, _ = many
    with httpx.Client(base_url=one_export_server.url, timeout=30) as client:
        with client.stream("GET", "/export", params={"model": model}) as slow:
            # Kept: a body iterator dropped at once closes the response (GeneratorExit), and
            # with it the export whose slot this test needs held.
            body = slow.iter_bytes()
            next(body)
            refused = client.get("/export", params={"model": "nothing-matches"})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_exports"
            assert int(refused.headers["retry-after"]) > 0
            # The cap is on exports only: the history still answers.
            assert client.get("/history", params={"limit": 1}).status_code == 200
        # The slow one's client left; its slot is free again, so is the next one's.
        for _ in range(3):
            response = wait_for_slot(client)
            assert response.status_code == 200 and response.text == ""


@pytest.fixture
def other_one_export_server(base_settings: Settings) -> Iterator[RunningServer]:
    """A second replica on the same database, with the same cap."""
    yield from serve_one_export(base_settings)


def test_the_cap_is_shared_by_the_replicas_of_one_database(
    one_export_server: RunningServer,
    other_one_export_server: RunningServer,
    db: psycopg.Connection,
    many: tuple[str, list[str]],
) -> None:
    """A download on one replica takes the slot the other would use: the cap bounds the
    database's export connections, not each process's."""
    model, _ = many
    with (
        httpx.Client(base_url=one_export_server.url, timeout=30) as first,
        httpx.Client(base_url=other_one_export_server.url, timeout=30) as second,
    ):
        with first.stream("GET", "/export", params={"model": model}) as slow:
            body = slow.iter_bytes()  # kept, as above
            next(body)
            refused = second.get("/export", params={"model": "nothing-matches"})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_exports"
            # Refused, it keeps no connection: only the running download's stays open.
            wait_until(
                lambda: len(export_backends(db)) == 1, 10, 0.05, "the refused one's connection"
            )
        response = wait_for_slot(second)
        assert response.status_code == 200 and response.text == ""
    wait_for_no_export(db)


def wait_for_slot(client: httpx.Client) -> httpx.Response:
    """An export of nothing, once the server has freed the slot of one that just ended."""
    found: list[httpx.Response] = []

    def answered() -> bool:
        response = client.get("/export", params={"model": "nothing-matches"})
        found.append(response)
        return response.status_code != 429

    wait_until(answered, 10, 0.05, "the slot was not freed")
    return found[-1]


def test_exports_leave_streams_and_history_reads_alone(
    demo_server: RunningServer, many: tuple[str, list[str]]
) -> None:
    """Two stalled downloads (the cap) take no connection a stream or a history page needs."""
    model, _ = many
    with httpx.Client(base_url=demo_server.url, timeout=30) as client:
        streams = [client.stream("GET", "/export", params={"model": model}) for _ in range(2)]
        try:
            bodies = [stalled.__enter__().iter_bytes() for stalled in streams]
            for body in bodies:  # kept: a dropped iterator closes its download
                next(body)
            # Both hold their slot: the cap is reached.
            refused = client.get("/export", params={"model": "nothing-matches"})
            assert refused.status_code == 429
            started = time.monotonic()
            assert client.get("/history", params={"limit": 5}).status_code == 200
            created = client.post("/stream", json={"prompt": "while exports stall"})
            assert created.status_code == 200 and "event: done" in created.text
            assert time.monotonic() - started < 5
        finally:
            for stalled in streams:
                stalled.__exit__(None, None, None)


def test_the_export_setting_is_read_and_checked() -> None:
    assert Settings.from_env({}).max_exports == 2
    assert Settings.from_env({"SSE_LLM_MAX_EXPORTS": "5"}).max_exports == 5
    with pytest.raises(ValueError, match="SSE_LLM_MAX_EXPORTS"):
        Settings.from_env({"SSE_LLM_MAX_EXPORTS": "0"})


def test_access_rules_are_the_historys(base_settings: Settings) -> None:
    running = start_server(base_settings.with_changes(api_key="export-key"))
    try:
        with httpx.Client(base_url=running.url) as client:
            refused = client.get("/export", params={"model": "nothing-matches"})
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthorized"
            allowed = client.get(
                "/export",
                params={"model": "nothing-matches"},
                headers={"Authorization": "Bearer export-key"},
            )
            assert allowed.status_code == 200 and allowed.text == ""
    finally:
        running.stop()


def test_an_unknown_before_exports_nothing(client: httpx.Client) -> None:
    assert export(client, before=str(UUID(int=0))).text == ""


@pytest.mark.browser
def test_the_history_pages_links_download_the_current_filter_in_each_format(
    tab: BrowserPage, browser: Browser, demo_server: RunningServer, exported: Exported
) -> None:
    page = tab.page
    # A keyset page of the filtered history: the links download the whole filter.
    page.goto(f"{demo_server.url}/?model={exported.model}&before={exported.ids[4]}")
    expect(page.locator(".conversation")).to_have_count(4)
    links = page.get_by_role("navigation", name="Download the filtered history")
    with httpx.Client(base_url=demo_server.url) as client:
        for name, chosen in (("JSONL", "jsonl"), ("CSV", "csv"), ("OpenAI JSONL", "openai")):
            with page.expect_download() as started:
                links.get_by_role("link", name=name, exact=True).click()
            download = started.value
            assert download.failure() is None
            assert re.fullmatch(
                r"sse-llm-history-\d{8}T\d{6}Z[-a-z.]+", download.suggested_filename
            )
            content = Path(download.path()).read_bytes()
            # The same bytes as the API's export of the whole filter.
            assert content == export(client, model=exported.model, format=chosen).content
    assert tab.csp_violations() == []
    # Plain links: without JavaScript too.
    context = browser.new_context(java_script_enabled=False, accept_downloads=True)
    try:
        quiet = context.new_page()
        quiet.goto(f"{demo_server.url}/?model={exported.model}")
        with quiet.expect_download() as started:
            quiet.get_by_role("link", name="CSV", exact=True).click()
        assert Path(started.value.path()).read_text().startswith(",".join(CSV_COLUMNS))
    finally:
        context.close()
