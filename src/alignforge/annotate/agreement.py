"""Inter-annotator agreement and length bias.

* Cohen's κ (per annotator pair, over the items both judged) and Fleiss' κ are computed
  here (small, dependency-free implementations, tested against textbook values: Cohen
  1960 / the Wikipedia worked example, and Fleiss 1971's table). Fleiss' κ accepts a
  varying number of raters per item (the usual generalisation: per-item agreement
  ``sum n_ij (n_ij - 1) / (n_i (n_i - 1))`` and category shares over all ratings); for a
  constant number of raters it is exactly Fleiss' κ. Items with fewer than two ratings
  are left out.
* Krippendorff's α (ordinal) comes from the maintained ``krippendorff`` package, on the
  overall scale -2..+2 with the whole value domain given, and "both bad" as missing.

Both κ treat the six overall choices (−2, −1, 0, +1, +2, both bad) as nominal categories.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import combinations
from typing import Hashable, Iterable, Mapping, Sequence

BOTH_BAD = "both_bad"
SCALE = (-2, -1, 0, 1, 2)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's κ of two raters' labels on the same items; None if undefined (< 1 item).

    When both raters use one and the same category throughout (expected agreement 1),
    κ is 1.0 (complete agreement) by convention.
    """
    if len(a) != len(b):
        raise ValueError("the two raters must label the same items")
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b, strict=False)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[c] * cb[c] for c in ca) / (n * n)
    if pe >= 1.0:
        return 1.0 if po >= 1.0 else None
    return (po - pe) / (1 - pe)


def fleiss_kappa(items: Iterable[Sequence[Hashable]]) -> float | None:
    """Fleiss' κ from each item's list of labels (one per rater); None if undefined."""
    per_item = [Counter(x) for x in items if len(x) >= 2]
    if not per_item:
        return None
    totals: Counter = Counter()
    n_ratings = 0
    p_bar = 0.0
    for c in per_item:
        ni = sum(c.values())
        p_bar += sum(v * (v - 1) for v in c.values()) / (ni * (ni - 1))
        totals.update(c)
        n_ratings += ni
    p_bar /= len(per_item)
    pe = sum((v / n_ratings) ** 2 for v in totals.values())
    if pe >= 1.0:
        return 1.0 if p_bar >= 1.0 else None
    return (p_bar - pe) / (1 - pe)


def krippendorff_alpha_ordinal(
    ratings: Mapping[Hashable, Mapping[Hashable, float | None]], domain: Sequence[float] = SCALE
) -> float | None:
    """Krippendorff's α (ordinal) from ``{item: {rater: value or None}}``; None if undefined."""
    import krippendorff
    import numpy as np

    raters = sorted({r for row in ratings.values() for r in row}, key=str)
    items = [i for i, row in ratings.items() if sum(v is not None for v in row.values()) >= 2]
    if len(items) < 1 or len(raters) < 2:
        return None
    data = np.full((len(raters), len(items)), np.nan)
    for j, it in enumerate(items):
        for i, r in enumerate(raters):
            v = ratings[it].get(r)
            if v is not None:
                data[i, j] = v
    values = {v for v in data.ravel().tolist() if not math.isnan(v)}
    if len(values) < 2:
        return 1.0  # everybody gave the same value: complete agreement, no variation
    try:
        a = krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal", value_domain=list(domain))
    except (ValueError, ZeroDivisionError):
        return None
    return None if a is None or math.isnan(a) else float(a)


def label(overall: int | None, both_bad: bool) -> Hashable:
    return BOTH_BAD if both_bad else overall


def agreement_report(judgments: Iterable[tuple[Hashable, str, int | None, bool]]) -> dict:
    """From ``(item, annotator, overall, both_bad)`` tuples: Cohen's κ per annotator pair
    (with the number of shared items), Fleiss' κ and Krippendorff's α (ordinal)."""
    by_item: dict = defaultdict(dict)
    for item, who, overall, both_bad in judgments:
        by_item[item][who] = (overall, both_bad)
    annotators = sorted({w for row in by_item.values() for w in row})
    pairs = []
    for x, y in combinations(annotators, 2):
        shared = [row for row in by_item.values() if x in row and y in row]
        k = cohen_kappa([label(*r[x]) for r in shared], [label(*r[y]) for r in shared])
        if shared:
            pairs.append({"a": x, "b": y, "items": len(shared), "kappa": k})
    fleiss = fleiss_kappa([[label(*v) for v in row.values()] for row in by_item.values()])
    alpha = krippendorff_alpha_ordinal(
        {it: {w: (None if bb else ov) for w, (ov, bb) in row.items()} for it, row in by_item.items()}
    )
    multi = sum(1 for row in by_item.values() if len(row) >= 2)
    return {
        "annotators": annotators,
        "cohen": pairs,
        "fleiss_kappa": fleiss,
        "krippendorff_alpha_ordinal": alpha,
        "items_with_2plus": multi,
    }


def longer_won_share(rows: Iterable[tuple[int | None, bool, str, str]]) -> dict:
    """Length bias: of the ``(overall, both_bad, response_a, response_b)`` judgments that prefer
    one response (not tie, not both bad) and whose responses differ in length (words), the
    share where the longer response won."""
    n = longer = 0
    for overall, both_bad, a, b in rows:
        if both_bad or overall is None or overall == 0:
            continue
        la, lb = len(a.split()), len(b.split())
        if la == lb:
            continue
        n += 1
        longer += (overall > 0) == (la > lb)
    return {"pairs": n, "longer_won": longer, "share": (longer / n) if n else None}
