"""Prompts and answers as Markdown, rendered so that nothing in them can act (SPEC 5).

An answer is text a model wrote, so it is untrusted: the renderer is markdown-it-py
(CommonMark, plus tables and strikethrough, the two extensions answers use most) with
deliberate choices, do not relax them without reading why:

- `html=False`: raw HTML (`<script>`, `<img onerror>`, whole HTML blocks) is shown as text.
- Links only for http, https and mailto: anything else (`javascript:`, `data:`, relative
  paths that would point into this dashboard) stays literal text, never an `<a>`.
- Every link carries `rel="nofollow noopener"`: a model must not vouch for a site.
- Images become links to their address: an `<img>` would make the reviewer's browser
  fetch whatever address the model wrote (a tracking pixel), and the page promises that
  nothing in an answer sends a request.
- No `style` attribute anywhere (the Content-Security-Policy blocks inline styles): table
  alignment becomes a class.
- Texts over MAX_RENDER_CHARS are not rendered (the page shows them raw): markdown-it-py
  renders about 330,000 characters a second here (3,000: 6 ms; 20,000: 45 ms; 100,000:
  300 ms), so the cap bounds a first view to about 150 ms, under the detail page's p99
  budget of 250 ms, and puts it in a worker thread so the event loop never waits for it.
- Rendered HTML is cached (least recently used first out, bounded by total size): an
  ended conversation's text never changes, so its id, field and length name it exactly.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from markupsafe import Markup, escape

MAX_RENDER_CHARS = 50_000
# Rendering below this (about 25 ms at most) is not worth a thread hop.
THREAD_ABOVE_CHARS = 10_000
CACHE_CHARS = 8_000_000  # about 16 MB of str at worst: 80 texts at the cap, thousands of usual ones
LINK_SCHEMES = ("http:", "https:", "mailto:")
LINK_REL = "nofollow noopener"

CacheKey = tuple[str, str, int]  # (conversation id, field, length of the text)


def _link_allowed(url: str) -> bool:
    """Only absolute http, https and mailto addresses become links."""
    return url.strip().lower().startswith(LINK_SCHEMES)


def _link_open(
    renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    token = tokens[idx]
    token.attrSet("rel", LINK_REL)
    rendered: str = renderer.renderToken(tokens, idx, options, env)
    return rendered


def _image(
    renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    """An image as a link to it, named by its alt text: shown, never fetched."""
    token = tokens[idx]
    source = str(token.attrGet("src") or "")
    alt = renderer.renderInlineAsText(token.children or [], options, env) or source
    return (
        f'<a href="{escape(source)}" rel="{LINK_REL}" class="md-image">'
        f"{escape('image: ' + alt)}</a>"
    )


def _cell_open(
    renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    """A table cell with its alignment as a class, not a style attribute."""
    token = tokens[idx]
    style = str(token.attrGet("style") or "")
    if style:
        token.attrs.pop("style", None)
        align = style.removeprefix("text-align:")
        if align in ("left", "right", "center"):
            token.attrSet("class", f"align-{align}")
    rendered: str = renderer.renderToken(tokens, idx, options, env)
    return rendered


def create_parser() -> MarkdownIt:
    """markdown-it-py set up as the module docstring says."""
    parser = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    parser.enable(["table", "strikethrough"])
    # markdown-it's own check refuses javascript:, vbscript:, file: and most data:; ours
    # is an allow-list instead, so a scheme nobody thought of is refused too.
    # markdown-it-py documents replacing validateLink as the way to change the check.
    parser.validateLink = _link_allowed  # type: ignore[method-assign]  # a method, by design
    parser.add_render_rule("link_open", _link_open)
    parser.add_render_rule("image", _image)
    parser.add_render_rule("th_open", _cell_open)
    parser.add_render_rule("td_open", _cell_open)
    return parser


class MarkdownRenderer:
    """Renders texts to safe HTML and keeps the recent results (built once per app)."""

    def __init__(self, cache_chars: int = CACHE_CHARS) -> None:
        self.parser = create_parser()
        self.cache_chars = cache_chars
        self._cache: OrderedDict[CacheKey, Markup] = OrderedDict()
        self._cached_chars = 0

    def render_now(self, text: str) -> Markup:
        """The HTML of one text (no cache, no size check): for tests and small texts."""
        return Markup(self.parser.render(text))

    async def render(self, key: CacheKey, text: str) -> Markup | None:
        """The cached or freshly rendered HTML of `text`, or None when it is too large."""
        if len(text) > MAX_RENDER_CHARS:
            return None
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if len(text) > THREAD_ABOVE_CHARS:
            html = await asyncio.to_thread(self.render_now, text)
        else:
            html = self.render_now(text)
        self._remember(key, html)
        return html

    def _remember(self, key: CacheKey, html: Markup) -> None:
        if key in self._cache or len(html) > self.cache_chars:
            return
        self._cache[key] = html
        self._cached_chars += len(html)
        while self._cached_chars > self.cache_chars:
            _, dropped = self._cache.popitem(last=False)
            self._cached_chars -= len(dropped)

    def __len__(self) -> int:
        return len(self._cache)
