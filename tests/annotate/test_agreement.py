"""Agreement statistics against textbook values and hand computations."""

from __future__ import annotations

import math

import pytest

from alignforge.annotate.agreement import (
    agreement_report,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha_ordinal,
    longer_won_share,
)


def _cohen_table(yy, yn, ny, nn):
    a = ["y"] * (yy + yn) + ["n"] * (ny + nn)
    b = ["y"] * yy + ["n"] * yn + ["y"] * ny + ["n"] * nn
    return a, b


def test_cohen_kappa_textbook():
    # Wikipedia "Cohen's kappa" worked examples: po=0.7, pe=0.5 -> 0.4; and 0.1304
    assert cohen_kappa(*_cohen_table(20, 5, 10, 15)) == pytest.approx(0.4)
    assert cohen_kappa(*_cohen_table(45, 15, 25, 15)) == pytest.approx(0.1304, abs=1e-4)
    assert cohen_kappa([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert cohen_kappa([1, 1], [1, 1]) == 1.0
    assert cohen_kappa([], []) is None
    # systematic disagreement is below chance
    assert cohen_kappa([1, 2, 1, 2], [2, 1, 2, 1]) == pytest.approx(-1.0)


FLEISS_1971 = [  # Wikipedia "Fleiss' kappa" example: 10 subjects, 14 raters, 5 categories
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_textbook():
    items = [[c for c, n in enumerate(row) for _ in range(n)] for row in FLEISS_1971]
    assert fleiss_kappa(items) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert fleiss_kappa([["a"]]) is None  # no item with 2+ ratings


def test_fleiss_equals_cohen_like_hand_value_for_two_raters():
    # two raters, 4 items: agreements on 3 -> P_bar = 0.75; shares a=5/8,b=3/8 -> Pe=34/64
    items = [["a", "a"], ["a", "a"], ["b", "b"], ["a", "b"]]
    pe = (5 / 8) ** 2 + (3 / 8) ** 2
    assert fleiss_kappa(items) == pytest.approx((0.75 - pe) / (1 - pe))


def test_krippendorff_alpha_ordinal_textbook():
    # Krippendorff (2011) "Computing Krippendorff's alpha-reliability": ordinal alpha = 0.815
    nan = None
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
    ratings = {j: {i: data[i][j] for i in range(4)} for j in range(12)}
    assert krippendorff_alpha_ordinal(ratings, domain=[1, 2, 3, 4, 5]) == pytest.approx(0.815, abs=1e-3)
    same = {0: {"x": 1, "y": 1}, 1: {"x": 1, "y": 1}}
    assert krippendorff_alpha_ordinal(same) == 1.0
    assert krippendorff_alpha_ordinal({0: {"x": 1}}) is None


def test_agreement_report_hand_computed():
    J = [
        ("i1", "ann", 2, False),
        ("i1", "bob", 1, False),
        ("i2", "ann", -1, False),
        ("i2", "bob", -1, False),
        ("i3", "ann", None, True),
        ("i3", "bob", None, True),
        ("i4", "ann", 0, False),
    ]
    rep = agreement_report(J)
    assert rep["annotators"] == ["ann", "bob"] and rep["items_with_2plus"] == 3
    (pair,) = rep["cohen"]
    # shared items: (2,1), (-1,-1), (bb,bb): po = 2/3; ann {2,-1,bb}, bob {1,-1,bb}: pe = 2/9
    assert pair["items"] == 3
    assert pair["kappa"] == pytest.approx((2 / 3 - 2 / 9) / (1 - 2 / 9))
    assert math.isfinite(rep["krippendorff_alpha_ordinal"])
    # Fleiss over the 3 doubly-rated items: P_bar = 2/3; category shares 1,1,2,2 of 6
    assert rep["fleiss_kappa"] == pytest.approx((2 / 3 - 10 / 36) / (1 - 10 / 36))


def test_longer_won_share():
    rows = [
        (2, False, "a b c", "a"),  # A longer, A won
        (-1, False, "a b c", "a"),  # A longer, B won
        (1, False, "a", "a b"),  # B longer, A won
        (0, False, "a", "a b"),  # tie: ignored
        (None, True, "a", "a b"),  # both bad: ignored
        (1, False, "a b", "c d"),
    ]  # equal length: ignored
    assert longer_won_share(rows) == {"pairs": 3, "longer_won": 1, "share": pytest.approx(1 / 3)}
