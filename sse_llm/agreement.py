"""Agreement between reviewers (SPEC 9): the share of agreement and kappa, per verdict and
per label, over a slice of the history and a set of reviewers.

Pure functions; the routes are in agreement_pages.py.

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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sse_llm.review_queries import JudgedItem

# Past this close to 1, chance agreement counts as 1 (floating sums of shares).
_EPSILON = 1e-12
MAX_DISAGREEMENT_IDS = 100

Method = Literal["cohen", "fleiss"]
# One item: reviewer -> the category of their rating.
Ratings = Mapping[str, str]


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


def cohen(pairs: Sequence[tuple[str, str]]) -> tuple[float | None, float | None]:
    """(p_o, Cohen's kappa) of two raters' categories, one pair per item."""
    if not pairs:
        return None, None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first = Counter(a for a, _ in pairs)
    second = Counter(b for _, b in pairs)
    chance = sum(first[k] * second[k] for k in first) / (n * n)
    return observed, _kappa(observed, chance, n)


def fleiss(items: Sequence[Sequence[str]]) -> tuple[float | None, float | None]:
    """(mean P_i, Fleiss' kappa) of items each rated by 2 or more raters (any number)."""
    rated = [item for item in items if len(item) >= 2]
    if not rated:
        return None, None
    totals: Counter[str] = Counter()
    per_item = []
    for item in rated:
        counts = Counter(item)
        totals.update(counts)
        n = len(item)
        per_item.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
    observed = sum(per_item) / len(per_item)
    ratings = sum(totals.values())
    chance = sum((count / ratings) ** 2 for count in totals.values())
    return observed, _kappa(observed, chance, len(rated))


def figure(items: Sequence[Ratings], method: Method) -> Figure:
    """The agreement and kappa of items by the given method."""
    if method == "cohen":
        pairs = []
        for item in items:
            first, second = sorted(item)  # the same two reviewers on every item
            pairs.append((item[first], item[second]))
        agreement, kappa = cohen(pairs)
    else:
        agreement, kappa = fleiss([list(item.values()) for item in items])
    return Figure(agreement, kappa, method)


def agreement_report(judged: Sequence[JudgedItem]) -> dict[str, Any]:
    """SPEC 9's `GET /agreement` body from the judged conversations of a slice."""
    reviewers = sorted({name for item in judged for name in item.reviewers})
    method: Method = "cohen" if len(reviewers) == 2 else "fleiss"
    verdicts = [dict(zip(item.reviewers, item.verdicts, strict=True)) for item in judged]
    label_sets = [
        {
            name: set(filter(None, text.split(",")))
            for name, text in zip(item.reviewers, item.labels, strict=True)
        }
        for item in judged
    ]
    labels = {}
    for label in sorted(
        {label for item in label_sets for chosen in item.values() for label in chosen}
    ):
        present = [
            {name: "present" if label in chosen else "absent" for name, chosen in item.items()}
            for item in label_sets
        ]
        labels[label] = figure(present, method).as_json()
    disagreeing = sorted(
        (
            item
            for item, ratings in zip(judged, verdicts, strict=True)
            if len(set(ratings.values())) > 1
        ),
        key=lambda item: (item.created_at, item.conversation_id),
        reverse=True,
    )
    return {
        "conversations": len(judged),
        "reviewers": reviewers,
        "verdict": figure(verdicts, method).as_json(),
        "labels": labels,
        "disagreements": {
            "count": len(disagreeing),
            "ids": [str(item.conversation_id) for item in disagreeing[:MAX_DISAGREEMENT_IDS]],
        },
    }
