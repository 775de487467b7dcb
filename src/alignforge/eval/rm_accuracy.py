"""``alignforge eval rm-accuracy``: a reward model's agreement with human preference labels (ChatGLM-RLHF Table 5).

The labels are any preference file alignforge reads (the annotation app's export, TRL
formats, raw HH-RLHF). Scoring is ``rm eval``'s (:func:`alignforge.eval.rm_eval.score_preference_data`:
the same tokenisation, truncation and batched scoring), and so is the per-pair outcome
(:func:`alignforge.eval.rm_eval.pair_outcomes`: 1 if the chosen response scores higher, 0.5 on a
tie, 0 otherwise). Accuracy is the mean outcome, overall and per group, each with a seeded
percentile-bootstrap 95% CI (:func:`alignforge.eval.stats.bootstrap_ci`, as ``rm eval``).

Groups: ``by`` names a field of the labels' records (default ``category``), read from the
record itself or, failing that, from its ``metadata`` object. Pairs without it are grouped
under ``(none)``; when no pair has it there is only the overall row.

The JSON result carries a ``table`` (``{"title", "columns", "rows"}``), the generic form that
``alignforge report`` renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from alignforge.eval.rm_eval import NO_CATEGORY, bootstrap_ci, pair_outcomes, score_preference_data

ALL = "all"


def _group_value(obj: Any, by: str) -> str | None:
    if not isinstance(obj, dict):
        return None
    v = obj.get(by)
    if v is None and isinstance(obj.get("metadata"), dict):
        v = obj["metadata"].get(by)
    if v is None or isinstance(v, (dict, list)):
        return None
    return str(v)


def group_keys(pairs: Sequence, by: str | None) -> list[str | None]:
    """The group of every pair: the record's ``by`` field (or ``metadata[by]``); ``None`` where absent.

    ``by="category"`` uses the category the reader parsed; other fields (and ``metadata``) are read
    from the source records (``pair.source``: file and record index)."""
    if by is None:
        return [None] * len(pairs)
    keys: list[str | None] = [p.category if by == "category" else None for p in pairs]
    missing = {p.source.file for p, k in zip(pairs, keys, strict=True) if k is None and p.source.file}
    if missing:
        from alignforge.data.readers import iter_entries

        raw: dict[tuple[str, int], Any] = {}
        for f in missing:
            for idx, obj in iter_entries(f):
                raw[(f, idx)] = obj
        keys = [
            k if k is not None else _group_value(raw.get((p.source.file, p.source.line)), by)
            for p, k in zip(pairs, keys, strict=True)
        ]
    return keys


def _row(name: str, outcomes: np.ndarray, ties: np.ndarray, n_boot: int, seed: int) -> dict:
    ci = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed) or [None, None]
    return {
        "n": int(outcomes.size),
        "accuracy": float(outcomes.mean()),
        "ci95": ci,
        "n_ties": int(ties.sum()),
        "name": name,
    }


def accuracy_by_group(
    chosen: Sequence[float],
    rejected: Sequence[float],
    keys: Sequence[str | None],
    *,
    by: str | None = "category",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Accuracy (ties 0.5) with bootstrap CIs, overall and per group key (JSON-serialisable)."""
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape or c.shape != (len(keys),):
        raise ValueError(f"need one chosen score, one rejected score and one key per pair: {c.shape}, {r.shape}")
    out = pair_outcomes(c, r)
    ties = c == r
    overall = _row(ALL, out, ties, n_boot, seed)
    groups: dict[str, dict] = {}
    if any(k is not None for k in keys):
        names = np.array([k if k is not None else NO_CATEGORY for k in keys], dtype=object)
        for name in sorted(set(names.tolist())):
            m = names == name
            groups[name] = _row(name, out[m], ties[m], n_boot, seed)
    col = by or "group"
    rows = [
        {
            col: g["name"],
            "n": g["n"],
            "accuracy": g["accuracy"],
            "ci95_low": g["ci95"][0],
            "ci95_high": g["ci95"][1],
            "ties": g["n_ties"],
        }
        for g in [*groups.values(), overall]
    ]
    strip = [{k: v for k, v in g.items() if k != "name"} for g in groups.values()]
    return {
        "n_pairs": overall["n"],
        "accuracy": overall["accuracy"],
        "accuracy_ci95": overall["ci95"],
        "n_ties": overall["n_ties"],
        "by": by,
        "by_group": dict(zip(groups, strip, strict=True)),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "method": "percentile"},
        "table": {
            "title": "RM accuracy vs preference labels (ties 0.5; 95% bootstrap CI)" + (f" by {by}" if groups else ""),
            "columns": [col, "n", "accuracy", "ci95_low", "ci95_high", "ties"],
            "rows": rows,
        },
    }


def rm_accuracy(
    rm_path: str | Path,
    labels: str | Path | Sequence[str | Path],
    *,
    by: str | None = "category",
    max_length: int = 512,
    batch_size: int = 8,
    limit: int | None = None,
    on_error: str = "skip",
    n_boot: int = 1000,
    seed: int = 0,
    device: str | None = None,
    overlong: str = "truncate_prompt",
    progress: bool = True,
    out_path: str | Path | None = None,
) -> dict:
    """Score the labels' pairs with the RM (as ``rm eval``) and report accuracy overall and per ``by`` group.

    Writes the result as JSON to ``out_path`` atomically when given; returns it."""
    from alignforge.eval.rm_eval import _write_json_atomic

    paths = [str(labels)] if isinstance(labels, (str, Path)) else [str(p) for p in labels]
    sp = score_preference_data(rm_path, paths, max_length, batch_size, limit, on_error, progress, device, overlong)
    keys = group_keys(sp.pairs, by)
    res = accuracy_by_group(sp.chosen, sp.rejected, keys, by=by, n_boot=n_boot, seed=seed)
    result = {
        "kind": "rm_accuracy",
        "rm": str(rm_path),
        "labels": paths,
        **res,
        "data_report": {**sp.report.counts(), "first_errors": [str(e) for e in sp.report.dropped[:5]]},
        "config": {"max_length": max_length, "batch_size": batch_size, "limit": limit, "overlong": overlong},
    }
    if out_path is not None:
        _write_json_atomic(result, Path(out_path))
    return result


def format_rm_accuracy(result: dict) -> str:
    """The result's table as plain text."""
    t = result["table"]
    col = t["columns"][0]
    w = max([len(col)] + [len(str(r[col])) for r in t["rows"]])

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{col:<{w}} {'n':>6} {'accuracy':>8}  95% CI        ties"]
    for r in t["rows"]:
        lines.append(
            f"{r[col]:<{w}} {r['n']:>6} {f(r['accuracy']):>8}  {f(r['ci95_low'])}-{f(r['ci95_high'])}  {r['ties']:>5}"
        )
    return "\n".join(lines)
