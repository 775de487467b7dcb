"""``alignforge eval lengths``: response lengths per file and per category (ChatGLM-RLHF Table 6 form).

A length is the number of tokens of a response under a tokenizer (``add_special_tokens=False``),
or, without one, the number of whitespace-separated words (meaningless for Chinese text such
as AlignBench answers: pass the model's tokenizer there). Every response of a row counts (an
MT-Bench row has one per turn), so ``n`` is the number of responses, not of prompts. Rows
without a category are grouped under ``(none)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from alignforge.errors import DataError
from alignforge.eval.responses import read_responses

NO_CATEGORY = "(none)"


def is_degenerate(text: str, min_words: int = 12, min_distinct: float = 0.5) -> bool:
    """A degenerate answer: empty after stripping, or a repetition loop (at least ``min_words``
    whitespace words and fewer than ``min_distinct`` of its word 3-grams distinct). The rule of the
    DPO/ULMA-on-HH results (``benchmarks/dpo_ulma_hh_result.py``, ``benchmarks/alignment_hh.py``)."""
    words = text.split()
    if not words:
        return True
    if len(words) < min_words:
        return False
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) < min_distinct


def word_count(text: str) -> int:
    return len(text.split())


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _summary(x: list[int]) -> dict:
    a = np.asarray(x, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(np.median(a))}


def length_report(paths: Sequence[str | Path], tokenizer: Any = None) -> dict:
    """Per file: ``{n, mean, median, by_category: {cat: {n, mean, median}}}``; ``unit`` is tokens or words."""
    count = token_counter(tokenizer) if tokenizer is not None else word_count
    files = []
    for path in paths:
        all_: list[int] = []
        by_cat: dict[str, list[int]] = {}
        for row in read_responses(path):
            lens = [count(r) for r in row.responses]
            all_ += lens
            by_cat.setdefault(row.category if row.category is not None else NO_CATEGORY, []).extend(lens)
        if not all_:
            raise DataError("no responses", file=str(path))
        files.append(
            {"file": str(path), **_summary(all_), "by_category": {c: _summary(v) for c, v in sorted(by_cat.items())}}
        )
    return {"unit": "tokens" if tokenizer is not None else "words", "files": files}


def format_lengths(report: dict) -> str:
    """One table: a row per (file, category) and an ``all`` row per file; columns n, mean, median."""
    names = [Path(f["file"]).name for f in report["files"]]
    w = max([len("file")] + [len(n) for n in names])
    cw = max([len("category"), len("all")] + [len(c) for f in report["files"] for c in f["by_category"]])
    unit = report["unit"]
    lines = [f"{'file':<{w}}  {'category':<{cw}} {'n':>6} {'mean ' + unit:>12} {'median':>8}"]
    for name, f in zip(names, report["files"], strict=True):
        for cat, s in f["by_category"].items():
            lines.append(f"{name:<{w}}  {cat:<{cw}} {s['n']:>6} {s['mean']:>12.1f} {s['median']:>8.1f}")
        lines.append(f"{name:<{w}}  {'all':<{cw}} {f['n']:>6} {f['mean']:>12.1f} {f['median']:>8.1f}")
    return "\n".join(lines)
