"""Answers rendered as Markdown (sse_llm/markdown.py): hostile text renders as text, links
are allow-listed, images are never fetched, and the detail page's two views (issue 14)."""

from __future__ import annotations

import re
import time
import uuid
from typing import TypeVar

import httpx
import psycopg
import pytest

from sse_llm.markdown import MAX_RENDER_CHARS, MarkdownRenderer
from sse_llm.passages import split
from sse_llm.review_store import Annotation
from tests.conftest import create
from tests.support import run

T = TypeVar("T")


@pytest.fixture(scope="module")
def renderer() -> MarkdownRenderer:
    return MarkdownRenderer()


def html_of(renderer: MarkdownRenderer, text: str) -> str:
    return str(renderer.render_now(text))


def tags(html: str) -> set[str]:
    return set(re.findall(r"<([a-z0-9]+)[\s>/]", html))


def test_script_and_raw_html_blocks_render_as_text(renderer: MarkdownRenderer) -> None:
    html = html_of(
        renderer,
        '<script>window.pwned = 1</script>\n\n<div onclick="x()">\n<b>block</b>\n</div>\n\n'
        'inline <span style="color:red">span</span> <iframe src="http://evil/"></iframe>',
    )
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in html
    assert '&lt;div onclick="x()"&gt;' in html or "&lt;div onclick=&quot;x()&quot;&gt;" in html
    assert tags(html) <= {"p"}  # no element but the paragraphs markdown-it made
    assert "style=" not in html.replace("&lt;span style=", "")


def test_img_with_onerror_is_text(renderer: MarkdownRenderer) -> None:
    html = html_of(renderer, '<img src=x onerror="window.pwned = 1">')
    assert "<img" not in html
    assert "&lt;img src=x onerror=" in html


@pytest.mark.parametrize(
    "link",
    [
        "[x](javascript:alert(1))",
        "[x](JaVaScRiPt:alert(1))",
        "[x](  javascript:alert(1) )",
        "[x](java&#115;cript:alert(1))",
        "[x](vbscript:msgbox)",
        "[x](data:text/html;base64,PHNjcmlwdD4=)",
        "[x](file:///etc/passwd)",
        "[x](/logout)",
        "[x](relative/path)",
        "<javascript:alert(1)>",
        "[x]: javascript:alert(1)\n\n[x]",
        "![x](javascript:alert(1))",
    ],
)
def test_links_other_than_http_https_mailto_stay_text(
    renderer: MarkdownRenderer, link: str
) -> None:
    html = html_of(renderer, link)
    assert "<a" not in html
    assert "href" not in html


def test_links_get_nofollow_noopener(renderer: MarkdownRenderer) -> None:
    html = html_of(
        renderer,
        "[site](https://example.com/a?b=1&c=2) [mail](mailto:a@example.com) "
        '<http://example.org/x> [t](http://example.net "title")',
    )
    links = re.findall(r"<a [^>]*>", html)
    assert links == [
        '<a href="https://example.com/a?b=1&amp;c=2" rel="nofollow noopener">',
        '<a href="mailto:a@example.com" rel="nofollow noopener">',
        '<a href="http://example.org/x" rel="nofollow noopener">',
        '<a href="http://example.net" title="title" rel="nofollow noopener">',
    ]


def test_an_attribute_cannot_be_broken_out_of(renderer: MarkdownRenderer) -> None:
    html = html_of(renderer, '[x](http://e/"onmouseover="alert(1)) [y](<http://e/"><b>x</b>>)')
    assert "onmouseover=" not in html.replace("%22onmouseover=%22", "")
    assert "<b>" not in html


def test_images_become_links_and_are_never_fetched(renderer: MarkdownRenderer) -> None:
    html = html_of(renderer, '![a *chart*](http://evil/x.png "t") and ![](https://evil/y.gif)')
    assert "<img" not in html
    assert html == (
        '<p><a href="http://evil/x.png" rel="nofollow noopener" class="md-image">'
        "image: a chart</a> and "
        '<a href="https://evil/y.gif" rel="nofollow noopener" class="md-image">'
        "image: https://evil/y.gif</a></p>\n"
    )


def test_code_blocks_are_kept_with_a_language_class_at_most(renderer: MarkdownRenderer) -> None:
    html = html_of(
        renderer,
        '```python" onclick="x\nprint("<b>hi</b>")\n```\n\n    indented <i>\n\n`inline <s>`',
    )
    assert '<pre><code class="language-python&quot;">print(&quot;&lt;b&gt;hi' in html
    assert "<pre><code>indented &lt;i&gt;\n</code></pre>" in html
    assert "<code>inline &lt;s&gt;</code>" in html
    assert "onclick=" not in html.replace("onclick=&quot;", "")


def test_table_alignment_is_a_class_never_a_style(renderer: MarkdownRenderer) -> None:
    html = html_of(renderer, "| a | b | c |\n|:--|--:|:-:|\n| 1 | 2 | 3 |")
    assert "style" not in html
    assert '<th class="align-left">a</th>' in html
    assert '<td class="align-right">2</td>' in html
    assert '<td class="align-center">3</td>' in html


def test_no_style_attribute_whatever_the_text(renderer: MarkdownRenderer) -> None:
    hostile = "\n\n".join(
        [
            "# h <em style=x>",
            "> quote\n> - list",
            "1. one\n2. ~~two~~",
            "***bold italic*** `code`",
            "| x |\n|:-:|\n| y |",
            "---",
            "line  \nbreak",
        ]
    )
    html = html_of(renderer, hostile)
    assert not re.search(r"<[^>]+\sstyle=", html)
    assert not re.search(r"<[^>]+\son[a-z]+=", html)


def test_a_large_text_is_shown_raw_and_a_rendered_one_is_cached() -> None:
    renderer = MarkdownRenderer()
    large = "word " * 10_001  # just over the documented 50,000 characters
    assert run(renderer.render(("id", "response", len(large)), large)) is None
    assert len(renderer) == 0
    at_cap = "w" * MAX_RENDER_CHARS
    assert run(renderer.render(("id", "prompt", len(at_cap)), at_cap)) is not None

    text = "**bold** " * 5_000  # 45,000 characters: rendered in a worker thread
    key = ("id", "response", len(text))
    started = time.perf_counter()
    first = run(renderer.render(key, text))
    cold = time.perf_counter() - started
    started = time.perf_counter()
    second = run(renderer.render(key, text))
    warm = time.perf_counter() - started
    assert first is not None and first == second
    assert first.count("<strong>bold</strong>") == 5_000
    assert warm < cold / 10, (cold, warm)


def test_the_cache_is_bounded_by_its_size() -> None:
    renderer = MarkdownRenderer(cache_chars=1_000)
    for index in range(50):
        text = f"paragraph {index} " * 5
        run(renderer.render((str(index), "response", len(text)), text))
    assert 0 < len(renderer) < 50
    assert sum(len(html) for html in renderer._cache.values()) <= 1_000


def test_segments_split_at_annotations_and_line_breaks() -> None:
    def annotation(start: int, end: int) -> Annotation:
        return Annotation(None, None, "r", "response", start, end, f"l{start}", "", None)  # type: ignore[arg-type]

    first, second = annotation(0, 4), annotation(2, 7)
    parts = split("ab😀d\r\nfg\rh", [first, second])
    assert [(s.start, s.end, s.text, len(s.annotations)) for s in parts] == [
        (0, 2, "ab", 1),
        (2, 4, "😀d", 2),
        (4, 6, "\r\n", 1),
        (6, 7, "f", 1),
        (7, 8, "g", 0),
        (8, 9, "\r", 0),
        (9, 10, "h", 0),
    ]
    assert [s.line_break for s in parts] == [False, False, True, False, False, True, False]


def test_detail_page_renders_markdown_and_links_to_the_raw_text(client: httpx.Client) -> None:
    conversation_id = create(
        client, "# Title\n\n<script>window.pwned = 1</script> ![x](http://evil/x.png) `a<b`"
    )
    page = client.get(f"/conversations/{conversation_id}").text
    assert "<h1>Title</h1>" in page
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    assert "<img" not in page and "<script>window" not in page
    assert "<code>a&lt;b</code>" in page
    assert f'href="/conversations/{conversation_id}?view=raw"' in page
    assert "switch to raw text" in page
    assert "data-start" not in page  # no highlight can sit on rendered text

    raw = client.get(f"/conversations/{conversation_id}", params={"view": "raw"}).text
    assert "<h1>Title</h1>" not in raw
    assert "# Title\n\n&lt;script&gt;" in raw
    assert 'data-field="prompt"' in raw and 'data-field="response"' in raw
    assert f'href="/conversations/{conversation_id}"' in raw


def test_v1_thread_shows_every_turn_rendered(client: httpx.Client, db: psycopg.Connection) -> None:
    body = {
        "model": "demo",
        "messages": [
            {"role": "system", "content": "You are **terse**."},
            {"role": "user", "content": "first *question*"},
            {"role": "assistant", "content": "an `answer`"},
            {"role": "user", "content": "second question"},
        ],
    }
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    conversation_id = (
        reply.headers.get("x-conversation-id")
        or db.execute(
            "SELECT id FROM conversations WHERE prompt = 'second question' "
            "ORDER BY created_at DESC LIMIT 1"
        ).fetchone()[0]
    )
    page = client.get(f"/conversations/{conversation_id}").text
    for html in ("<strong>terse</strong>", "<em>question</em>", "<code>answer</code>"):
        assert html in page
    assert page.index("transcript__message--system") < page.index("transcript__message--user")
    raw = client.get(f"/conversations/{conversation_id}", params={"view": "raw"}).text
    assert "Annotations apply to that message (the stored prompt) and to the answer only" in raw
    assert raw.count('data-field="prompt"') == 1
    assert re.search(r'data-field="prompt"[^>]*><span [^>]*>second question</span>', raw)


def test_an_answer_too_large_to_render_is_shown_raw(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    conversation_id = uuid.uuid4()
    answer = "**not bold** <b>x</b> " * 3_000  # 66,000 characters: over the cap
    db.execute(
        "INSERT INTO conversations (id, prompt, response, status, completed_at, model, provider)"
        " VALUES (%s, '*small*', %s, 'completed', now(), 'demo', 'demo')",
        (conversation_id, answer),
    )
    page = client.get(f"/conversations/{conversation_id}").text
    assert "<em>small</em>" in page  # the prompt is small enough
    assert "Over 50,000 characters: shown as raw text, not rendered." in page
    assert "<strong>" not in page
    assert '<div class="text text--response">**not bold** &lt;b&gt;x&lt;/b&gt; **not' in page


def test_hostile_annotations_are_escaped_in_the_raw_view(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    conversation_id = create(client, 'a "quoted" <b>prompt</b>')
    hostile = '"><script>window.pwned = 1</script>'
    db.execute(
        "INSERT INTO annotations (conversation_id, reviewer, field, start_offset, end_offset,"
        " label, note) VALUES (%s, %s, 'prompt', 2, 10, %s, %s)",
        (conversation_id, hostile[:30], hostile[:40], hostile),
    )
    page = client.get(f"/conversations/{conversation_id}", params={"view": "raw"}).text
    assert "<script>window" not in page
    assert 'title="&#34;&gt;&lt;script&gt;window.pwned = 1&lt;/script&gt;"' in page
    assert '<mark class="annotated annotated--1" data-start="2" data-end="10"' in page
    assert ">&#34;quoted&#34;</mark>" in page or ">&quot;quoted&quot;</mark>" in page
