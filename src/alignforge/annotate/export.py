"""Export judgments: TRL preference pairs (aggregated), raw per-annotator rows, point-wise.

Aggregation per item (only judgments of that item; gold items included):

* ``majority``: each judgment votes A (overall > 0), B (< 0), tie (0) or both-bad; the
  plurality wins, and a draw between the top outcomes is a tie.
* ``bt``: Bradley-Terry on the item's two responses. With one pair the maximum-likelihood
  strength difference is the log-odds of A's (weighted) win share; "≫" counts as two wins,
  a tie as half a win for each side, and a Jeffreys prior of 0.5 wins per side keeps it
  finite. ``|log-odds| < bt_tie_margin`` is a tie; the item is both-bad when both-bad
  judgments outnumber the decisive ones. The log-odds is written as ``margin``.

Ties and both-bad items are left out of the TRL file, or written to ``ties_path`` (with a
``label`` of ``"tie"`` or ``"both_bad"`` and the two responses as ``response_a/response_b``).

The point-wise file (ULMA) has one row per response: the winner ``label: true`` and the
loser ``label: false``; both responses of a both-bad item are ``label: false``; ties are
left out.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from alignforge.annotate.service import CRITERIA, judged_rows
from alignforge.data.convert import write_jsonl
from alignforge.errors import AlignforgeError

METHODS = ("majority", "bt")


def majority(votes: list[tuple[int | None, bool]]) -> str:
    c: Counter = Counter()
    for overall, both_bad in votes:
        c["both_bad" if both_bad else "a" if overall > 0 else "b" if overall < 0 else "tie"] += 1
    if not c:
        return "none"
    top = max(c.values())
    winners = [k for k, v in c.items() if v == top]
    if len(winners) > 1:
        return "tie"
    return winners[0]


def bradley_terry(votes: list[tuple[int | None, bool]], tie_margin: float = 0.1) -> tuple[str, float]:
    wa = wb = 0.5  # Jeffreys prior
    n_decisive = n_bad = 0
    for overall, both_bad in votes:
        if both_bad:
            n_bad += 1
            continue
        n_decisive += 1
        if overall > 0:
            wa += abs(overall)
        elif overall < 0:
            wb += abs(overall)
        else:
            wa += 0.5
            wb += 0.5
    margin = math.log(wa / wb)
    if n_bad > n_decisive:
        return "both_bad", margin
    if abs(margin) < tie_margin:
        return "tie", margin
    return ("a" if margin > 0 else "b"), margin


def _items(S: sessionmaker[Session]) -> dict[int, dict]:
    items: dict[int, dict] = {}
    for r in judged_rows(S):
        it, j = r["item"], r["judgment"]
        d = items.setdefault(it.id, {"item": it, "votes": []})
        d["votes"].append((j.overall, j.both_bad))
    return items


def _asst(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def aggregate(
    S: sessionmaker[Session], method: str = "majority", min_judgments: int = 1, bt_tie_margin: float = 0.1
) -> list[dict]:
    """``[{item, outcome ("a", "b", "tie", "both_bad"), n, margin?}]`` in item order."""
    if method not in METHODS:
        raise AlignforgeError(f"unknown aggregation {method!r} (expected one of {', '.join(METHODS)})")
    out = []
    for _, d in sorted(_items(S).items()):
        votes = d["votes"]
        if len(votes) < min_judgments:
            continue
        if method == "majority":
            outcome, margin = majority(votes), None
        else:
            outcome, margin = bradley_terry(votes, bt_tie_margin)
        out.append({"item": d["item"], "outcome": outcome, "n": len(votes), "margin": margin})
    return out


def export_trl(
    S: sessionmaker[Session],
    out: str | Path,
    method: str = "majority",
    ties_path: str | Path | None = None,
    min_judgments: int = 1,
    bt_tie_margin: float = 0.1,
) -> dict:
    """TRL conversational preference JSONL; returns counts."""
    agg = aggregate(S, method, min_judgments, bt_tie_margin)
    pairs, ties = [], []
    for a in agg:
        it = a["item"]
        prompt = json.loads(it.prompt_json)
        if a["outcome"] in ("a", "b"):
            ch, rj = (it.response_a, it.response_b) if a["outcome"] == "a" else (it.response_b, it.response_a)
            rec: dict[str, Any] = {"prompt": prompt, "chosen": _asst(ch), "rejected": _asst(rj)}
            if it.category is not None:
                rec["category"] = it.category
            if a["margin"] is not None:
                rec["margin"] = round(a["margin"], 6)
            rec["id"] = it.uid
            rec["n_judgments"] = a["n"]
            pairs.append(rec)
        else:
            ties.append(
                {
                    "id": it.uid,
                    "label": a["outcome"],
                    "prompt": prompt,
                    "response_a": it.response_a,
                    "response_b": it.response_b,
                    "n_judgments": a["n"],
                }
            )
    n = write_jsonl(pairs, out)
    n_ties = write_jsonl(ties, ties_path) if ties_path is not None else 0
    return {
        "pairs": n,
        "ties_and_both_bad": len(ties),
        "ties_written": n_ties,
        "ties": sum(t["label"] == "tie" for t in ties),
        "both_bad": sum(t["label"] == "both_bad" for t in ties),
    }


def export_raw(S: sessionmaker[Session], out: str | Path) -> int:
    """One row per judgment, per annotator, in the items' own A/B orientation."""
    rows = []
    for r in judged_rows(S):
        j, it = r["judgment"], r["item"]
        rows.append(
            {
                "judgment_id": j.id,
                "item_id": it.uid,
                "annotator": r["annotator"],
                "overall": j.overall,
                "both_bad": j.both_bad,
                "shown_overall": j.shown_overall,
                "swapped": j.swapped,
                **{c: getattr(j, c) for c in CRITERIA},
                "prompt_quality": j.prompt_quality,
                "comment": j.comment,
                "late": j.late,
                "created_at": j.created_at.isoformat() + "Z",
                "is_gold": it.is_gold,
                "prompt": json.loads(it.prompt_json),
                "response_a": it.response_a,
                "response_b": it.response_b,
            }
        )
    return write_jsonl(rows, out)


def export_pointwise(
    S: sessionmaker[Session],
    out: str | Path,
    method: str = "majority",
    min_judgments: int = 1,
    bt_tie_margin: float = 0.1,
) -> dict:
    """Point-wise (ULMA) JSONL: ``{prompt, completion, label}`` rows."""
    rows = []
    counts: dict[str, int] = defaultdict(int)
    for a in aggregate(S, method, min_judgments, bt_tie_margin):
        it = a["item"]
        prompt = json.loads(it.prompt_json)
        counts[a["outcome"]] += 1
        if a["outcome"] == "tie":
            continue
        if a["outcome"] == "both_bad":
            labels = [(it.response_a, False), (it.response_b, False)]
        else:
            win_a = a["outcome"] == "a"
            labels = [(it.response_a, win_a), (it.response_b, not win_a)]
        for text, lab in labels:
            rec: dict[str, Any] = {"prompt": prompt, "completion": _asst(text), "label": lab}
            if it.category is not None:
                rec["category"] = it.category
            rows.append(rec)
    n = write_jsonl(rows, out)
    return {"rows": n, **counts}
