"""Dataset statistics in the style of ChatGLM-RLHF Table 2.

Rows are split into single-turn / multi-turn / all conversations, where *turns* is the
number of user turns in the prompt. Per row: count, average turns, and average token
lengths of the *history* (all prompt messages before the last user turn), the *prompt*
(the last user turn) and the *response* (chosen, rejected and both for pairs). Token
counts are ``len(tokenizer(content, add_special_tokens=False).input_ids)`` of message
contents (no chat template), computed in one batched call; with ``tokenizer=None`` they
are whitespace-separated words.

For pairs there is also a histogram of ``len(chosen) - len(rejected)`` in tokens, the
share of unequal-length pairs whose longer response was chosen, and the number of
equal-length pairs. Invalid records are skipped and counted (``records`` = all records
in the file, ``dropped`` = invalid ones; ``first_dropped`` is the first one's error,
``"FILE:LINE: field 'F': reason"`` as ``data validate`` prints it, or ``None``). The returned
dict is JSON-serialisable.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from alignforge.data.readers import detect_kind, read_any, reason_kind
from alignforge.data.records import Message

# bins are (lo, hi] on the integer difference; None = unbounded
DIFF_EDGES: tuple[int, ...] = (-256, -128, -64, -32, -16, -1, 0, 16, 32, 64, 128, 256)
GROUPS = ("single_turn", "multi_turn", "all")


def _bins() -> list[tuple[int | None, int | None]]:
    edges: list[int | None] = [None, *DIFF_EDGES, None]
    return list(zip(edges[:-1], edges[1:], strict=False))


def _bin_label(lo: int | None, hi: int | None) -> str:
    if lo is None:
        return f"<= {hi}"
    if hi is None:
        return f">= {lo + 1}"
    if lo + 1 == hi:
        return f"{hi}"
    return f"{lo + 1}..{hi}"


def diff_histogram(diffs: Sequence[int]) -> list[dict]:
    """``[{"lo", "hi", "label", "count"}]`` over the fixed bins (``lo`` exclusive, ``hi`` inclusive)."""
    out = []
    for lo, hi in _bins():
        n = sum(1 for d in diffs if (lo is None or d > lo) and (hi is None or d <= hi))
        out.append({"lo": lo, "hi": hi, "label": _bin_label(lo, hi), "count": n})
    return out


class _Counter:
    """Collects texts, then counts tokens for all of them in one batched call."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.index: dict[str, int] = {}

    def add(self, text: str) -> str:
        self.index.setdefault(text, len(self.index))
        return text

    def run(self) -> None:
        texts = list(self.index)
        if self.tokenizer is None:
            self.lengths = [len(t.split()) for t in texts]
        elif texts:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            self.lengths = [len(x) for x in ids]
        else:
            self.lengths = []

    def __call__(self, msgs: Sequence[Message]) -> int:
        return sum(self.lengths[self.index[m["content"]]] for m in msgs)


def _split_prompt(prompt: list[Message]) -> tuple[list[Message], list[Message], int]:
    """(history, last user turn, number of user turns)."""
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    if not users:
        return prompt, [], 0
    last = users[-1]
    return prompt[:last], [prompt[last]], len(users)


def _avg(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


def _rows(items: list[dict], fields: tuple[str, ...]) -> dict:
    rows = {}
    for g in GROUPS:
        sel = [it for it in items if g == "all" or (g == "single_turn") == (it["turns"] <= 1)]
        row: dict[str, Any] = {"count": len(sel), "avg_turns": _avg([it["turns"] for it in sel])}
        for f in fields:
            row[f"avg_{f}_tokens"] = _avg([it[f] for it in sel])
        if "chosen" in fields:
            row["avg_response_tokens"] = _avg([it[k] for it in sel for k in ("chosen", "rejected")])
        rows[g] = row
    return rows


def compute_stats(path: str | Path, tokenizer: Any, kind: str | None = None) -> dict:
    """Statistics of one data file (kind auto-detected when ``None``); see module docstring."""
    kind = kind or detect_kind(path)
    res = read_any(path, kind, on_error="skip", lenient=True)
    tc = _Counter(tokenizer)
    convs: list[tuple[list[Message], dict[str, list[Message]]]] = []
    for r in res.records:
        if kind == "preference":
            prompt, parts = r.prompt, {"chosen": r.chosen, "rejected": r.rejected}
        elif kind == "pointwise":
            prompt, parts = r.prompt, {"response": r.completion}
        elif kind == "sft":
            users = [i for i, m in enumerate(r.messages) if m["role"] == "user"]
            cut = users[-1] + 1 if users else 0
            prompt, parts = r.messages[:cut], {"response": r.messages[cut:]}
        else:
            prompt, parts = r.prompt, {}
        for m in prompt:
            tc.add(m["content"])
        for msgs in parts.values():
            for m in msgs:
                tc.add(m["content"])
        convs.append((prompt, parts))
    tc.run()
    items = []
    for prompt, parts in convs:
        hist, last, turns = _split_prompt(prompt)
        it = {"turns": turns, "history": tc(hist), "prompt": tc(last)}
        it.update({k: tc(v) for k, v in parts.items()})
        items.append(it)
    fields = {"preference": ("history", "prompt", "chosen", "rejected"), "prompt": ("history", "prompt")}.get(
        kind, ("history", "prompt", "response")
    )
    stats: dict[str, Any] = {
        "path": str(path),
        "kind": kind,
        "token_unit": "words" if tokenizer is None else "tokens",
        "records": res.n_total,
        "valid": len(res.records),
        "dropped": len(res.dropped),
        "dropped_reasons": dict(Counter(reason_kind(e) for e in res.dropped).most_common()),
        "first_dropped": str(res.dropped[0]) if res.dropped else None,
    }
    if kind == "preference":
        stats["pairs"] = len(res.records)
        stats["empty_response_pairs"] = sum(
            1 for r in res.records if any(not m["content"].strip() for m in r.chosen + r.rejected)
        )
        stats["identical_pairs"] = sum(1 for r in res.records if r.chosen == r.rejected)
        # who labelled the pairs (the records' optional "source" field; "(none)" when unset)
        stats["label_sources"] = dict(Counter(r.label_source or "(none)" for r in res.records).most_common())
    stats["rows"] = _rows(items, fields)
    if kind == "preference":
        diffs = [it["chosen"] - it["rejected"] for it in items]
        unequal = [d for d in diffs if d != 0]
        stats["length_diff_histogram"] = diff_histogram(diffs)
        stats["equal_length_pairs"] = len(diffs) - len(unequal)
        stats["longer_chosen_share"] = round(sum(d > 0 for d in unequal) / len(unequal), 4) if unequal else None
    if kind == "pointwise":
        labels = [r.label for r in res.records]
        pos = sum(1 for x in labels if x is True or (not isinstance(x, bool) and x == 1.0))
        neg = sum(1 for x in labels if x is False or (not isinstance(x, bool) and x == 0.0))
        stats["labels"] = {"positive": pos, "negative": neg, "other": len(labels) - pos - neg}
    return stats


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}"
    return str(x)


def format_stats(stats: dict) -> str:
    """A plain-text table of :func:`compute_stats` output."""
    unit = stats.get("token_unit", "tokens")
    lines = [
        f"{stats['path']}  ({stats['kind']})",
        f"records: {stats['records']}  valid: {stats['valid']}  dropped: {stats['dropped']}"
        + (f"  pairs: {stats['pairs']}" if "pairs" in stats else ""),
    ]
    if stats.get("empty_response_pairs") or stats.get("identical_pairs"):
        lines.append(
            f"pairs that training would reject: {stats['empty_response_pairs']} with an empty response, "
            f"{stats['identical_pairs']} with chosen identical to rejected"
        )
    if stats.get("dropped_reasons"):
        lines.append("dropped: " + ", ".join(f"{n}× {k}" for k, n in stats["dropped_reasons"].items()))
        if stats.get("first_dropped"):
            lines.append(f"first dropped: {stats['first_dropped']}")
    rows = stats["rows"]
    cols = [c for c in rows["all"].keys()]
    heads = ["", *[c.replace("avg_", "avg ").replace("_tokens", "").replace("_", " ") for c in cols]]
    table = [heads] + [[g.replace("_", "-"), *[_fmt(rows[g][c]) for c in cols]] for g in GROUPS]
    widths = [max(len(r[i]) for r in table) for i in range(len(heads))]
    lines.append(f"average lengths in {unit}:")
    for r in table:
        lines.append(
            "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        )
    if "length_diff_histogram" in stats:
        h = stats["length_diff_histogram"]
        top = max((b["count"] for b in h), default=0) or 1
        lw = max(len(b["label"]) for b in h)
        lines.append(f"len(chosen) - len(rejected) in {unit}:")
        for b in h:
            bar = "#" * round(40 * b["count"] / top)
            lines.append(f"  {b['label'].rjust(lw)} | {str(b['count']).rjust(6)} {bar}")
        share = stats["longer_chosen_share"]
        lines.append(
            f"longer response chosen: {'-' if share is None else f'{100 * share:.1f}%'} "
            f"of unequal-length pairs; equal-length pairs: {stats['equal_length_pairs']}"
        )
    if stats.get("label_sources"):
        lines.append("labelled by: " + ", ".join(f"{k} {n}" for k, n in stats["label_sources"].items()))
    if "labels" in stats:
        lb = stats["labels"]
        lines.append(f"labels: {lb['positive']} positive, {lb['negative']} negative, {lb['other']} other")
    return "\n".join(lines)
