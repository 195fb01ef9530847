"""Charts as SVG markup, drawn on the server (SPEC 5, 10): pure functions, figures in, markup out.

Deliberate choices, do not undo them without reading why:
- Server-side SVG, not a chart library: nothing to vendor, no script for the CSP to allow,
  and the charts are there without JavaScript.
- Every text goes through `escape`, every number through `_coordinate`/`format_compact`:
  a model name or an error code can never become markup, and a NaN never reaches an
  attribute. The result is `Markup` so templates need no `|safe`.
- No `style=` attribute (the CSP forbids inline style): a series names CSS classes
  (static/insights.css), whose colours follow `prefers-color-scheme`.
- The bars of one series are one `<path>` (a bar per subpath): 2,000 buckets stay a few
  kilobytes per series, not 2,000 elements each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 14, 30  # room for the y ticks and the x labels
MAX_X_LABELS = 6  # "12-01 14:00" is ~75 units at 12px: more would overlap at 720 wide
LABEL_CHAR_WIDTH = 6.8  # units per character of an axis label (12px system-ui digits)
MAX_DOTS = 48  # a dot on each point of a line up to this many buckets

_CLASSES = re.compile(r"[a-z][a-z0-9-]*( [a-z][a-z0-9-]*)*")
_ID = re.compile(r"[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class Series:
    """One series: its name (legend and table), a value per bucket (None: no figure), its
    CSS classes (lower-case words, e.g. "chart-c1 chart-dashed")."""

    name: str
    values: Sequence[float | None]
    css_class: str


@dataclass(frozen=True)
class Chart:
    """What a chart shows: `labels` names each bucket (x), `series` give its values (y)."""

    chart_id: str  # unique in the page: the SVG's ids derive from it
    title: str
    description: str
    labels: Sequence[str]
    series: Sequence[Series]
    unit: str = ""  # said after the y axis's top figure, e.g. "ms"


def stacked_bars(chart: Chart) -> Markup:
    """A bar per bucket, its series stacked bottom up in the order given."""
    columns = _cleaned(chart)
    count = len(chart.labels)
    positive = [[v if v and v > 0 else 0.0 for v in column] for column in columns]
    totals = [sum(stack) for stack in zip(*positive, strict=True)] if columns else [0.0] * count
    if count == 0 or max(totals, default=0.0) <= 0:
        return _frame(chart, [], empty=True)
    ticks = nice_ticks(max(totals), integer=_all_integers(columns))
    scale = _Scale(count, ticks[-1])
    band, floor, per_unit = scale.band, float(HEIGHT - BOTTOM), scale.per_unit
    width = band * 0.8 if band >= 3 else band  # thin bars touch rather than vanish
    offset = LEFT + (band - width) / 2
    base = [0.0] * count
    # Hot loop (2,000 buckets x series): each bar's x, width and bottom are formatted once
    # (a bar's bottom is the top of the one below it), its top per bar: one float a bar.
    xs = [f"{offset + i * band:.2f}" for i in range(count)]
    wide = f"{width:.2f}"
    bottoms = [f"{floor:.2f}"] * count
    parts: list[str] = []
    for series, column in zip(chart.series, columns, strict=True):
        segments: list[str] = []
        for i, value in enumerate(column):
            if not value or value < 0:
                continue
            base[i] += value
            top = f"{floor - base[i] * per_unit:.2f}"
            bottom = bottoms[i]
            segments.append(f"M{xs[i]} {bottom}V{top}h{wide}V{bottom}z")
            bottoms[i] = top
        if segments:
            parts.append(
                f'<path class="chart-bar {series.css_class}" d="{"".join(segments)}">'
                f"<title>{escape(series.name)}</title></path>"
            )
    return _frame(chart, [*_axes(chart, ticks, scale), *parts])


def lines(chart: Chart) -> Markup:
    """A line per series through its buckets' values; a missing value breaks the line."""
    columns = _cleaned(chart)
    count = len(chart.labels)
    present = [v for column in columns for v in column if v is not None]
    if count == 0 or not present:
        return _frame(chart, [], empty=True)
    ticks = nice_ticks(max(max(present), 0.0), integer=_all_integers(columns))
    scale = _Scale(count, ticks[-1])
    band, floor, per_unit = scale.band, float(HEIGHT - BOTTOM), scale.per_unit
    parts: list[str] = []
    for series, points in zip(chart.series, columns, strict=True):
        path: list[str] = []
        dots: list[str] = []
        for i, value in enumerate(points):
            if value is None:
                continue
            x, y = f"{LEFT + (i + 0.5) * band:.2f}", f"{floor - max(value, 0.0) * per_unit:.2f}"
            joined = i > 0 and points[i - 1] is not None
            path.append(f"{'L' if joined else 'M'}{x} {y}")
            alone = not joined and (i + 1 >= count or points[i + 1] is None)
            if alone or count <= MAX_DOTS:
                dots.append(
                    f'<circle class="chart-dot {series.css_class}" cx="{x}" cy="{y}" r="3"/>'
                )
        title = f"<title>{escape(series.name)}</title>"
        if path:
            parts.append(
                f'<path class="chart-line {series.css_class}" d="{"".join(path)}">{title}</path>'
            )
        parts.extend(dots)
    return _frame(chart, [*_axes(chart, ticks, scale), *parts])


def nice_ticks(maximum: float, *, integer: bool = False) -> list[float]:
    """Round y-axis ticks from 0 to at least `maximum`: steps of 1, 2, 2.5 or 5 times 10^n."""
    if not math.isfinite(maximum) or maximum <= 0:
        return [0.0, 1.0]
    raw = maximum / 4
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    top = math.ceil(maximum / step - 1e-9) * step
    return [round(step * k, 12) for k in range(round(top / step) + 1)]


def format_compact(value: float) -> str:
    """A figure for an axis: 950, 2.5, 12k, 3.4M, 1.2B."""
    if not math.isfinite(value):
        return "—"
    magnitude = abs(value)
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return _trimmed(f"{value / limit:.1f}") + suffix
    return _trimmed(f"{value:.2f}")


def format_number(value: int | float | None, decimals: int = 1) -> str:
    """A figure for a table: 12,345 for whole numbers, 12.3 otherwise, a dash for none."""
    if type(value) is int:  # most figures are counts: the short way
        return f"{value:,}"
    value = _finite(value)
    if value is None:
        return "—"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{decimals}f}"


class _Scale:
    """Bucket index → x, value → y, inside the plot area."""

    def __init__(self, count: int, top: float) -> None:
        self.band = (WIDTH - LEFT - RIGHT) / count
        self.top = top
        self.per_unit = (HEIGHT - TOP - BOTTOM) / top  # the ticks' top is at least every value

    def left_of(self, index: int) -> float:
        return LEFT + index * self.band

    def center_of(self, index: int) -> float:
        return self.left_of(index) + self.band / 2

    def y(self, value: float) -> float:
        plot = HEIGHT - TOP - BOTTOM
        return HEIGHT - BOTTOM - plot * min(value / self.top, 1.0)


def _axes(chart: Chart, ticks: list[float], scale: _Scale) -> list[str]:
    """Grid lines with the y figures, and a readable subset of the bucket labels."""
    parts = ['<g class="chart-grid">']
    for tick in ticks:
        y = _coordinate(scale.y(tick))
        figure = format_compact(tick)
        if tick == ticks[-1] and chart.unit:
            figure = f"{figure} {chart.unit}"
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}"/>')
        parts.append(
            f'<text class="chart-tick" x="{LEFT - 6}" y="{y}" text-anchor="end" '
            f'dominant-baseline="middle">{escape(figure)}</text>'
        )
    parts.append("</g>")
    count = len(chart.labels)
    every = math.ceil(count / MAX_X_LABELS)
    parts.append('<g class="chart-labels">')
    # Each label in the middle of the buckets it stands for, so neighbours keep apart.
    for i in range(every // 2, count, every):
        label = chart.labels[i]
        # Kept inside the frame: half the label's width, guessed from its characters.
        half = len(label) * LABEL_CHAR_WIDTH / 2
        x = min(max(scale.center_of(i), LEFT + half), WIDTH - RIGHT - half)
        parts.append(
            f'<text class="chart-tick" x="{_coordinate(x)}" y="{HEIGHT - BOTTOM + 18}" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
    parts.append("</g>")
    return parts


def _frame(chart: Chart, parts: list[str], *, empty: bool = False) -> Markup:
    """The <svg> around the parts: its title, description and role for assistive tech."""
    ident = chart.chart_id
    title, description = escape(chart.title), escape(chart.description)
    if empty:
        parts = [
            f'<text class="chart-empty" x="{WIDTH / 2:g}" y="{HEIGHT / 2:g}" '
            'text-anchor="middle">No figures in this range.</text>'
        ]
    body = "".join(parts)
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{title}" aria-describedby="{ident}-desc" focusable="false">'
        f'<title id="{ident}-title">{title}</title><desc id="{ident}-desc">{description}</desc>'
        f"{body}</svg>"
    )


def _cleaned(chart: Chart) -> list[list[float | None]]:
    """Each series' values as floats (None for missing, NaN or infinite ones), once checked:
    what could not be an id or a class, and series of the wrong length, are refused."""
    if not _ID.fullmatch(chart.chart_id):
        raise ValueError(f"chart_id must be lower-case words joined by '-': {chart.chart_id!r}")
    columns = []
    for series in chart.series:
        if not _CLASSES.fullmatch(series.css_class):
            raise ValueError(f"css_class must be lower-case class names: {series.css_class!r}")
        if len(series.values) != len(chart.labels):
            raise ValueError(f"series {series.name!r} has a value per label, and only that")
        columns.append([_finite(value) for value in series.values])
    return columns


def _finite(value: float | None) -> float | None:
    """The value as a float, or None for a missing, NaN or infinite one."""
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _all_integers(columns: list[list[float | None]]) -> bool:
    """Whether every figure is whole (counts): the axis then steps by whole numbers."""
    return all(v is None or v.is_integer() for column in columns for v in column)


def _coordinate(value: float) -> str:
    """A coordinate for an attribute: two decimals at most, never NaN (callers keep it finite)."""
    return _trimmed(f"{value:.2f}")


def _trimmed(text: str) -> str:
    """ "2.50" → "2.5", "3.00" → "3"."""
    return text.rstrip("0").rstrip(".") if "." in text else text
