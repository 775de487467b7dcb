"""Reward-model evaluation (``alignforge rm eval``) and scoring (``alignforge rm score``).

Evaluation scores both responses of every held-out preference pair and reports (ChatGLM-RLHF
§1b / Figure 3):

* pairwise **accuracy** (a tie counts 0.5) with a seeded percentile-bootstrap 95% CI;
* accuracy per ``|len(chosen) - len(rejected)|`` bucket (token lengths; the length-balancing
  edges of ``data/balance.py`` plus an ``equal`` bucket), split into pairs where the longer
  response won and pairs where the shorter one won, and the share of pairs in which the RM
  prefers the longer response: a length-biased RM is accurate on "longer won" pairs and
  inaccurate on "shorter won" ones;
* Pearson and Spearman correlation between score and response length over all responses;
* score mean/std of chosen and rejected responses, and per-category accuracy and score
  distribution when the data has categories.

The statistics (:func:`evaluate_pairs`) are numpy and ``eval/stats.py`` (scipy) on arrays of scores, so they are tested
without a model. Scoring (:func:`score_pairs`) packs each pair into one sequence
(``models/packing.py``) and batches pairs of similar length; results come back in input order.

Scoring a file (:func:`score_file`) reads unlabeled ``{prompt, completion}`` (or
``{prompt, response}``) records, keeps every other field and adds ``score`` (and
``score_normalized = (score - mean) / std`` from the RM's ``reward_stats.json``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from alignforge.data.balance import DEFAULT_EDGES, bucket_index, bucket_labels
from alignforge.data.readers import read_unlabeled  # re-exported
from alignforge.eval import stats
from alignforge.eval.plots import plot_eval
from alignforge.eval.stats import pearson, rankdata, spearman  # re-exported

__all__ = [
    "score_pairs",
    "score_sequences",
    "evaluate_pairs",
    "plot_eval",
    "run_rm_eval",
    "score_preference_data",
    "ScoredPairs",
    "pair_outcomes",
    "score_file",
    "read_unlabeled",
    "pearson",
    "spearman",
    "rankdata",
    "bootstrap_ci",
    "bucket_labels",
    "format_eval",
]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
NO_CATEGORY = "(none)"


# --------------------------------------------------------------------------- statistics (numpy)


def pair_outcomes(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Per pair: 1 if chosen scored higher, 0.5 on a tie, 0 otherwise."""
    return np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95, chunk: int = 200
) -> list[float] | None:
    """Percentile bootstrap CI of the mean of ``values`` (seeded, so reproducible; :func:`eval.stats.bootstrap_ci`).

    ``None`` for no values or ``n_boot <= 0``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or n_boot <= 0:
        return None
    lo, hi = stats.bootstrap_ci(v, confidence=level, n_resamples=n_boot, seed=seed, method="percentile", batch=chunk)
    return [lo, hi]


def _std(x: np.ndarray) -> float | None:
    return float(x.std(ddof=1)) if x.size > 1 else (0.0 if x.size == 1 else None)


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def _score_summary(x: np.ndarray) -> dict:
    return {
        "mean": _mean(x),
        "std": _std(x),
        "quantiles": (
            {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES), strict=False)} if x.size else None
        ),
    }


def _acc(o: np.ndarray) -> float | None:
    return float(o.mean()) if o.size else None


def evaluate_pairs(
    chosen_scores: Sequence[float],
    rejected_scores: Sequence[float],
    pairs: Sequence,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    edges: Sequence[int] = DEFAULT_EDGES,
) -> dict:
    """Statistics of an RM's scores on preference pairs (JSON-serialisable; see module docstring).

    ``pairs`` are ``TokenizedPair``-like (``chosen_ids``, ``rejected_ids``, ``category``);
    lengths are response lengths in tokens. Undefined statistics (e.g. a correlation on constant
    input) are ``None``.
    """
    c = np.asarray(chosen_scores, dtype=np.float64)
    r = np.asarray(rejected_scores, dtype=np.float64)
    n = len(pairs)
    if c.shape != (n,) or r.shape != (n,):
        raise ValueError(f"need one chosen and one rejected score per pair: {c.shape}, {r.shape}, {n} pairs")
    edges = list(edges)
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bucket edges must start at 0 and increase: {edges}")
    lc = np.array([len(p.chosen_ids) for p in pairs], dtype=np.int64)
    lr = np.array([len(p.rejected_ids) for p in pairs], dtype=np.int64)
    out = pair_outcomes(c, r)
    d = lc - lr

    # the RM prefers the longer response (1), the shorter (0), ties 0.5; only for unequal lengths
    longer_s = np.where(d > 0, c, r)
    shorter_s = np.where(d > 0, r, c)
    prefers_longer = pair_outcomes(longer_s, shorter_s)

    labels = bucket_labels(edges)
    bidx = np.array([bucket_index(int(abs(x)), edges) if x != 0 else -1 for x in d], dtype=np.int64)
    buckets = []
    for k, label in [(-1, "equal")] + list(enumerate(labels)):
        m = bidx == k
        row: dict[str, Any] = {"bucket": label, "n": int(m.sum()), "accuracy": _acc(out[m])}
        if k >= 0:
            lw, sw = m & (d > 0), m & (d < 0)
            row.update(
                {
                    "n_longer_won": int(lw.sum()),
                    "accuracy_longer_won": _acc(out[lw]),
                    "n_shorter_won": int(sw.sum()),
                    "accuracy_shorter_won": _acc(out[sw]),
                    "rm_prefers_longer": _acc(prefers_longer[m]),
                }
            )
        buckets.append(row)

    scores = np.concatenate([c, r])
    lengths = np.concatenate([lc, lr]).astype(np.float64)
    neq = d != 0
    result: dict[str, Any] = {
        "n_pairs": n,
        "accuracy": _acc(out),
        "accuracy_ci95": bootstrap_ci(out, n_boot=n_boot, seed=seed),
        "n_ties": int((c == r).sum()),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "method": "percentile"},
        "accuracy_by_length_bucket": buckets,
        "accuracy_longer_won": _acc(out[d > 0]),
        "accuracy_shorter_won": _acc(out[d < 0]),
        "rm_prefers_longer": _acc(prefers_longer[neq]),
        "length_correlation": {
            "n": int(scores.size),
            "pearson": pearson(scores, lengths),
            "spearman": spearman(scores, lengths),
        },
        "score_chosen": _score_summary(c),
        "score_rejected": _score_summary(r),
        "margin_mean": _mean(c - r),
        "longer_chosen_share": _acc((d > 0).astype(np.float64)),
        "equal_length_share": _acc((d == 0).astype(np.float64)),
        "length_chosen_mean": _mean(lc.astype(np.float64)),
        "length_rejected_mean": _mean(lr.astype(np.float64)),
        "bucket_edges": edges,
    }
    cats = [getattr(p, "category", None) for p in pairs]
    if any(x is not None for x in cats):
        names = np.array([x if x is not None else NO_CATEGORY for x in cats], dtype=object)
        by_cat = {}
        for name in sorted(set(names.tolist())):
            m = names == name
            by_cat[name] = {
                "n": int(m.sum()),
                "accuracy": _acc(out[m]),
                "score_chosen": _score_summary(c[m]),
                "score_rejected": _score_summary(r[m]),
                "score_all": _score_summary(np.concatenate([c[m], r[m]])),
            }
        result["by_category"] = by_cat
    return result


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_eval(result: dict) -> str:
    """A short plain-text table of an :func:`evaluate_pairs` result."""
    ci = result.get("accuracy_ci95") or [None, None]
    lc = result["length_correlation"]
    lines = [
        f"pairs: {result['n_pairs']}   accuracy: {_fmt(result['accuracy'])} "
        f"(95% CI {_fmt(ci[0])}-{_fmt(ci[1])}, ties {result['n_ties']})",
        f"chosen score {_fmt(result['score_chosen']['mean'])} ± {_fmt(result['score_chosen']['std'])}   "
        f"rejected score {_fmt(result['score_rejected']['mean'])} ± {_fmt(result['score_rejected']['std'])}",
        f"score vs length: pearson {_fmt(lc['pearson'])}, spearman {_fmt(lc['spearman'])}   "
        f"longer response chosen in {_fmt(result['longer_chosen_share'])} of pairs; "
        f"RM prefers the longer in {_fmt(result['rm_prefers_longer'])}",
        "",
        f"  {'|len diff|':>10} {'n':>6} {'acc':>6} {'n long':>7} {'acc long':>8} "
        f"{'n short':>7} {'acc short':>9} {'prefers long':>12}",
    ]
    for b in result["accuracy_by_length_bucket"]:
        if not b["n"]:
            continue
        lines.append(
            f"  {b['bucket']:>10} {b['n']:>6} {_fmt(b['accuracy']):>6} "
            f"{b.get('n_longer_won', ''):>7} {_fmt(b.get('accuracy_longer_won')):>8} "
            f"{b.get('n_shorter_won', ''):>7} {_fmt(b.get('accuracy_shorter_won')):>9} "
            f"{_fmt(b.get('rm_prefers_longer')):>12}"
        )
    if result.get("by_category"):
        lines += ["", f"  {'category':>20} {'n':>6} {'acc':>6} {'chosen':>8} {'rejected':>8}"]
        for name, v in result["by_category"].items():
            lines.append(
                f"  {name[:20]:>20} {v['n']:>6} {_fmt(v['accuracy']):>6} "
                f"{_fmt(v['score_chosen']['mean'], '.2f'):>8} {_fmt(v['score_rejected']['mean'], '.2f'):>8}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- scoring (torch)

from alignforge.models.reward import score_pairs, score_sequences  # noqa: E402,F401  (re-exported)

# --------------------------------------------------------------------------- files


def _write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pad_id(tok) -> int:
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        from alignforge.errors import ModelError

        raise ModelError("the tokenizer has neither a pad nor an EOS token")
    return pid


def _to_device(rm, device: str | None):
    from alignforge.models.loading import resolve_device

    return rm.to(resolve_device(device))


def _load_limited(
    paths: list[str], tok, max_length: int, on_error: str, limit: int | None, overlong: str = "truncate_prompt"
):
    """``load_preference_dataset`` (RM tokenisation), but tokenizing only until ``limit`` pairs are produced."""
    from alignforge.data.readers import read_preference
    from alignforge.data.tokenize import DatasetReport, load_preference_dataset, tokenize_preference
    from alignforge.errors import DataError

    if limit is None:
        return load_preference_dataset(paths, tok, max_length, overlong=overlong, on_error=on_error, full_render=True)
    report = DatasetReport("preference", paths, max_length, overlong=overlong)
    pairs: list = []
    for path in paths:
        if len(pairs) >= limit:
            break
        res = read_preference(path, on_error)
        report.n_read += res.n_total
        report.dropped.extend(res.dropped)
        for rec in res.records:
            if len(pairs) >= limit:
                break
            try:
                pair, cut = tokenize_preference(rec, tok, max_length, overlong=overlong, full_render=True)
            except DataError as e:
                if on_error == "raise":
                    raise
                report.dropped.append(e)
                continue
            report.add(cut, pair is not None)
            if pair is not None:
                pairs.append(pair)
    report.n_out = len(pairs)
    return pairs, report


@dataclass
class ScoredPairs:
    """Preference pairs tokenised as in RM training, with the RM's score of each response (input order)."""

    pairs: list
    chosen: np.ndarray
    rejected: np.ndarray
    report: Any  # data/tokenize.py's DatasetReport: pairs read, cut, dropped
    rm_stats: dict


def score_preference_data(
    rm_path: str | Path,
    paths: Sequence[str | Path],
    max_length: int = 512,
    batch_size: int = 8,
    limit: int | None = None,
    on_error: str = "skip",
    progress: bool = True,
    device: str | None = None,
    overlong: str = "truncate_prompt",
) -> ScoredPairs:
    """Load the RM, tokenise the preference files and score both responses of every pair (what ``rm eval``
    scores; arguments as :func:`run_rm_eval`). No valid pair raises ``DataError`` naming the first file."""
    from alignforge.errors import ConfigError, DataError
    from alignforge.models.reward import load_reward_model

    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    paths = [str(p) for p in paths]
    rm, tok, stats = load_reward_model(str(rm_path))
    rm = _to_device(rm, device)
    pairs, report = _load_limited(paths, tok, max_length, on_error, limit, overlong)
    if not pairs:
        raise DataError(f"no valid preference pairs to evaluate ({report.summary()})", file=paths[0])
    chosen, rejected = score_pairs(rm, pairs, _pad_id(tok), batch_size=batch_size, progress=progress)
    return ScoredPairs(pairs, chosen, rejected, report, stats)  # float64 arrays, input order


def run_rm_eval(
    rm_path: str | Path,
    data_path: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    max_length: int = 512,
    batch_size: int = 8,
    limit: int | None = None,
    on_error: str = "skip",
    n_boot: int = 1000,
    seed: int = 0,
    plots: bool = True,
    progress: bool = True,
    device: str | None = None,
    overlong: str = "truncate_prompt",
) -> dict:
    """Evaluate a saved RM on preference data; writes ``summary.json``, ``scores.jsonl`` and PNGs.

    ``limit``: evaluate the first ``limit`` valid pairs only. ``overlong``: pairs longer than
    ``max_length`` as in training (``data/tokenize.py``; default: cut the prompt, drop a pair
    whose response would be cut); ``data_report`` counts the pairs cut and dropped. Returns the summary.
    """
    from alignforge.data.convert import write_jsonl

    paths = [str(data_path)] if isinstance(data_path, (str, Path)) else [str(p) for p in data_path]
    out = Path(out_dir)
    sp = score_preference_data(rm_path, paths, max_length, batch_size, limit, on_error, progress, device, overlong)
    pairs, chosen, rejected, report, stats = sp.pairs, sp.chosen, sp.rejected, sp.report, sp.rm_stats
    result = evaluate_pairs(chosen, rejected, pairs, n_boot=n_boot, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    scores_path = out / "scores.jsonl"
    write_jsonl(
        (
            {
                "file": p.source.file,
                "line": p.source.line,
                "category": p.category,
                "chosen": float(c),
                "rejected": float(r),
                "len_chosen": len(p.chosen_ids),
                "len_rejected": len(p.rejected_ids),
                "len_prompt": len(p.prompt_ids),
            }
            for p, c, r in zip(pairs, chosen, rejected, strict=False)
        ),
        scores_path,
    )
    plot_paths = plot_eval(result, chosen, rejected, pairs, out) if plots else []
    summary = {
        "rm": str(rm_path),
        "data": paths,
        "config": {
            "max_length": max_length,
            "batch_size": batch_size,
            "limit": limit,
            "on_error": on_error,
            "overlong": overlong,
        },
        "rm_stats": stats,
        "data_report": {**report.counts(), "first_errors": [str(e) for e in report.dropped[:5]]},
        **result,
        "files": {
            "summary": str(out / "summary.json"),
            "scores": str(scores_path),
            "plots": [str(p) for p in plot_paths],
        },
    }
    _write_json_atomic(summary, out / "summary.json")
    return summary


# --------------------------------------------------------------------------- score a file


def score_file(
    rm_path: str | Path,
    in_path: str | Path,
    out_path: str | Path,
    batch_size: int = 8,
    max_length: int = 1024,
    normalize: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Add ``score`` (and ``score_normalized`` with ``normalize``) to every record of ``in_path``;
    write JSONL (``.gz`` → gzip) atomically to ``out_path``. Every record is validated before
    the model runs; a bad one raises ``DataError`` (FILE:LINE: field ...). Prompt + completion
    longer than ``max_length`` tokens is truncated (prompt from the left first; every record gets
    a score, so a response is cut rather than dropped: ``n_response_truncated`` counts those).
    Returns ``{n, n_truncated, n_response_truncated, score_mean, score_std, out}``."""
    from alignforge.data.convert import write_jsonl
    from alignforge.data.records import Source
    from alignforge.data.tokenize import starts_with_bos, tokenize_prompt_completion, truncate_prompt_responses
    from alignforge.errors import DataError, ModelError
    from alignforge.models.reward import load_reward_model

    rm, tok, stats = load_reward_model(str(rm_path))
    mean, std = stats.get("mean"), stats.get("std")
    if normalize and (mean is None or not std):
        raise ModelError(
            f"{rm_path}: cannot normalise scores: the reward model has no reference "
            "statistics (reward_stats.json with mean and a non-zero std)"
        )
    records, seqs, n_trunc, n_resp = [], [], 0, 0
    for line, obj, prompt, completion in read_unlabeled(in_path):
        p, c = tokenize_prompt_completion(prompt, completion, tok, Source(str(in_path), line), full_render=True)
        n_c = len(c)
        p, (c,), cut = truncate_prompt_responses(p, [c], max_length, keep_first=starts_with_bos(tok, p))
        n_trunc += int(cut)
        n_resp += int(len(c) < n_c)
        records.append(obj)
        seqs.append(p + c)
    if not records:
        raise DataError("no records to score", file=str(in_path))
    rm = _to_device(rm, device)
    scores = score_sequences(rm, seqs, _pad_id(tok), batch_size=batch_size, progress=progress)

    def rows():
        for obj, s in zip(records, scores, strict=False):
            row = dict(obj)
            row["score"] = float(s)
            if normalize:
                row["score_normalized"] = (float(s) - mean) / std
            yield row

    write_jsonl(rows(), out_path)
    return {
        "n": len(records),
        "n_truncated": n_trunc,
        "n_response_truncated": n_resp,
        "score_mean": float(scores.mean()),
        "score_std": _std(scores),
        "out": str(out_path),
    }
