"""Agreement between reviewers (SPEC 9): the share of agreement and kappa, per verdict and
per label, over a slice of the history and a set of reviewers.

Pure functions; the routes are in agreement_pages.py, the counting in review_queries.py.

- Exactly two reviewers count: Cohen's kappa. `agreement` is the observed share of items
  both judged alike, p_o; chance p_e = sum over categories of p_A(k) * p_B(k), each
  reviewer's own proportions; kappa = (p_o - p_e) / (1 - p_e).
- Otherwise: Fleiss' kappa, generalised to unequal raters per item (each item has its
  own n_i >= 2 ratings). Per item P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)), the share
  of agreeing ordered pairs of its ratings; `agreement` is their mean P; chance P_e =
  sum_j p_j^2 with p_j the share of category j among all ratings (sum_i n_ij / sum_i n_i);
  kappa = (P - P_e) / (1 - P_e). With n_i equal for every item this is Fleiss (1971).
- `null`: agreement with no item; kappa with fewer than 2 items or chance agreement 1
  (every rating in one category: kappa is 0/0).
- Verdicts have three categories (`unsure` is one); a label has two per review: present
  or absent.

Items come weighted: (ratings, how many conversations were rated exactly so), since the
database counts identical profiles (a team has a few hundred, whatever the history).
With everyone's reviews counted and not exactly two reviewers, Fleiss needs no names:
the profiles are counts per category from review_summaries (`summary_report`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sse_llm.review_queries import RATING_SEPARATOR, AgreementCounts, SummaryCounts

# Past this close to 1, chance agreement counts as 1 (floating sums of shares).
_EPSILON = 1e-12
MAX_DISAGREEMENT_IDS = 100

Method = Literal["cohen", "fleiss"]
# One item: reviewer -> the category of their rating.
Ratings = Mapping[str, str]
# (agreement, kappa), each None where undefined.
Figures = tuple[float | None, float | None]


@dataclass(frozen=True)
class Figure:
    """The agreement and kappa of one question (the verdict, or one label)."""

    agreement: float | None
    kappa: float | None
    method: Method

    def as_json(self) -> dict[str, Any]:
        """SPEC 9's `{agreement, kappa, method}`."""
        return {"agreement": self.agreement, "kappa": self.kappa, "method": self.method}


def _kappa(observed: float, chance: float, items: int) -> float | None:
    if items < 2 or 1 - chance < _EPSILON:
        return None
    return (observed - chance) / (1 - chance)


def cohen(pairs: Sequence[tuple[str, str]]) -> Figures:
    """(p_o, Cohen's kappa) of two raters' categories, one pair per item."""
    return cohen_weighted([(pair, 1) for pair in pairs])


def cohen_weighted(
    pairs: Sequence[tuple[tuple[str, str], int]],
) -> Figures:
    """`cohen` of pairs each standing for `weight` items."""
    n = sum(weight for _, weight in pairs)
    if n == 0:
        return None, None
    observed = sum(weight for (a, b), weight in pairs if a == b) / n
    first: Counter[str] = Counter()
    second: Counter[str] = Counter()
    for (a, b), weight in pairs:
        first[a] += weight
        second[b] += weight
    chance = sum(first[k] * second[k] for k in first) / (n * n)
    return observed, _kappa(observed, chance, n)


def fleiss(items: Sequence[Sequence[str]]) -> Figures:
    """(mean P_i, Fleiss' kappa) of items each rated by 2 or more raters (any number)."""
    return fleiss_weighted([(item, 1) for item in items])


def fleiss_weighted(
    items: Sequence[tuple[Sequence[str], int]],
) -> Figures:
    """`fleiss` of items each standing for `weight` items."""
    rated = [(item, weight) for item, weight in items if len(item) >= 2 and weight > 0]
    count = sum(weight for _, weight in rated)
    if count == 0:
        return None, None
    totals: Counter[str] = Counter()
    agreeing = 0.0
    for item, weight in rated:
        counts = Counter(item)
        for category, n_ij in counts.items():
            totals[category] += n_ij * weight
        n = len(item)
        agreeing += weight * sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))
    observed = agreeing / count
    ratings = sum(totals.values())
    chance = sum((total / ratings) ** 2 for total in totals.values())
    return observed, _kappa(observed, chance, count)


def figure(items: Sequence[tuple[Ratings, int]], method: Method) -> Figure:
    """The agreement and kappa of weighted items by the given method."""
    if method == "cohen":
        pairs = []
        for ratings, weight in items:
            first, second = sorted(ratings)  # the same two reviewers on every item
            pairs.append(((ratings[first], ratings[second]), weight))
        agreement, kappa = cohen_weighted(pairs)
    else:
        agreement, kappa = fleiss_weighted([(list(r.values()), w) for r, w in items])
    return Figure(agreement, kappa, method)


def _label_items(counts: AgreementCounts, label: str) -> list[tuple[Ratings, int]]:
    """Every judged item as present/absent ratings of one label, weighted."""
    items: list[tuple[Ratings, int]] = []
    with_label: Counter[tuple[str, ...]] = Counter()
    for name, panel, holders, weight in counts.labels:
        if name == label:
            held = set(holders)
            items.append(({r: "present" if r in held else "absent" for r in panel}, weight))
            with_label[tuple(panel)] += weight
    # The items where nobody gave the label: all absent.
    for panel, weight in counts.panels:
        rest = weight - with_label[tuple(panel)]
        if rest:
            items.append(({r: "absent" for r in panel}, rest))
    return items


def agreement_report(counts: AgreementCounts) -> dict[str, Any]:
    """SPEC 9's `GET /agreement` body from the counted profiles of a slice."""
    reviewers = sorted({name for panel, _ in counts.panels for name in panel})
    method: Method = "cohen" if len(reviewers) == 2 else "fleiss"
    verdicts = [
        (dict(rating.split(RATING_SEPARATOR, 1) for rating in ratings), weight)
        for ratings, weight in counts.verdicts
    ]
    labels = {
        label: figure(_label_items(counts, label), method).as_json()
        for label in sorted({label for label, *_ in counts.labels})
    }
    return {
        "conversations": sum(weight for _, weight in counts.panels),
        "reviewers": reviewers,
        "verdict": figure(verdicts, method).as_json(),
        "labels": labels,
        "disagreements": {
            "count": counts.disagreements,
            "ids": [str(conversation_id) for conversation_id in counts.ids],
        },
    }


def _fleiss_figure(items: Sequence[tuple[Sequence[str], int]]) -> dict[str, Any]:
    agreement, kappa = fleiss_weighted(items)
    return Figure(agreement, kappa, "fleiss").as_json()


def summary_report(counts: SummaryCounts) -> dict[str, Any]:
    """`agreement_report` by Fleiss from per-conversation counts (not exactly two reviewers).

    A label's absent ratings on a conversation are its reviews less those giving it; the
    conversations where nobody gave it are all absent."""
    verdicts = [
        (["good"] * good + ["bad"] * bad + ["unsure"] * unsure, n)
        for _, good, bad, unsure, n in counts.verdicts
    ]
    panels = dict(counts.panels)
    labels: dict[str, Any] = {}
    for label in sorted({label for label, *_ in counts.labels}):
        items: list[tuple[Sequence[str], int]] = []
        with_label: Counter[int] = Counter()
        for name, reviews, present, n in counts.labels:
            if name == label:
                items.append((["present"] * present + ["absent"] * (reviews - present), n))
                with_label[reviews] += n
        for reviews, n in panels.items():
            if n - with_label[reviews]:
                items.append((["absent"] * reviews, n - with_label[reviews]))
        labels[label] = _fleiss_figure(items)
    return {
        "conversations": sum(panels.values()),
        "reviewers": counts.reviewers,
        "verdict": _fleiss_figure(verdicts),
        "labels": labels,
        "disagreements": {
            "count": counts.disagreements,
            "ids": [str(conversation_id) for conversation_id in counts.ids],
        },
    }


def report_of(counts: AgreementCounts | SummaryCounts) -> dict[str, Any]:
    """SPEC 9's agreement body from either kind of counts."""
    if isinstance(counts, SummaryCounts):
        return summary_report(counts)
    return agreement_report(counts)
