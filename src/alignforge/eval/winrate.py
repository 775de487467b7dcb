"""``alignforge eval winrate``: win/tie/loss of model A against model B, raw and length-controlled.

Verdicts come from the pairwise LLM judge of :mod:`alignforge.eval.grading` (each pair judged twice
with the positions swapped, disagreement = tie) or from an alignforge reward model
(:func:`rm_outcomes`: A wins when ``r(A) - r(B) >= eps``, loses when ``<= -eps``, else a tie;
``r(A) = r(B)`` is always a tie).

Reported overall and per category (ChatGLM-RLHF Table 4 form): counts of win / tie / loss among the
scored pairs, their shares with bootstrap CIs (:func:`~alignforge.eval.stats.bootstrap_ci` of the
0/1 indicators), and the adjusted win rate ``(win + ½·tie) / scored`` (METHODS.md §5c) with its
bootstrap CI. Pairs whose verdict failed or could not be parsed are counted, never scored.

**Length-controlled win rate** (AlpacaEval's idea, METHODS.md §5c, reduced to one model pair): a
:class:`sklearn.linear_model.LogisticRegression` (default L2, ``C=1``) of P(A wins) on
``tanh(Δlen / std(Δlen))``, ``Δlen = len(A) - len(B)`` in whitespace words over all turns; a tie
enters as half a win and half a loss (two rows with sample weights ½). The LC win rate is the fitted
probability at ``Δlen = 0``. With one outcome class only (all wins or all losses) there is nothing
to fit and LC = the raw rate. No CI is given for LC. AlpacaEval's instruction and model terms are
left out (one pair of models, one answer per instruction).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from alignforge.errors import ConfigError


def _rate(ind: Sequence[float], n_resamples: int, seed: int) -> dict[str, Any]:
    from alignforge.eval.stats import bootstrap_ci

    if not len(ind):
        return {"value": None, "ci": None}
    lo, hi = bootstrap_ci(ind, n_resamples=n_resamples, seed=seed)
    return {"value": float(np.mean(ind)), "ci": [lo, hi]}


def wtl_summary(outcomes: Sequence[Any], n_resamples: int = 9999, seed: int = 0) -> dict[str, Any]:
    """Counts and shares (with bootstrap CIs) of win / tie / loss for A among ``outcomes`` that were scored."""
    scored = [o.outcome for o in outcomes if o.status == "ok"]
    out: dict[str, Any] = {
        "n": len(outcomes),
        "scored": len(scored),
        "unparsable": sum(o.status == "unparsable" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
    }
    for k in ("win", "tie", "loss"):
        out[k] = sum(s == k for s in scored)
    for k in ("win", "tie", "loss"):
        out[f"{k}_rate"] = _rate([float(s == k) for s in scored], n_resamples, seed)
    adj = [1.0 if s == "win" else 0.5 if s == "tie" else 0.0 for s in scored]
    out["win_rate_adjusted"] = _rate(adj, n_resamples, seed)
    return out


def length_controlled(outcomes: Sequence[str], len_a: Sequence[float], len_b: Sequence[float]) -> dict[str, Any]:
    """The length-controlled win rate of A (module docstring) from scored outcomes (win/tie/loss)."""
    from sklearn.linear_model import LogisticRegression

    if not (len(outcomes) == len(len_a) == len(len_b)):
        raise ValueError("outcomes and lengths differ in length")
    if not outcomes:
        return {"lc_win_rate": None, "raw": None, "slope": None, "intercept": None}
    raw = float(np.mean([1.0 if o == "win" else 0.5 if o == "tie" else 0.0 for o in outcomes]))
    d = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    sd = float(d.std())
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    xs, ys, ws = [], [], []
    for xi, o in zip(x, outcomes, strict=True):
        if o == "tie":
            xs += [xi, xi]
            ys += [1, 0]
            ws += [0.5, 0.5]
        else:
            xs.append(xi)
            ys.append(1 if o == "win" else 0)
            ws.append(1.0)
    if len(set(ys)) < 2:
        return {"lc_win_rate": raw, "raw": raw, "slope": None, "intercept": None, "note": "one outcome class: LC = raw"}
    lr = LogisticRegression(C=1.0)
    lr.fit(np.asarray(xs).reshape(-1, 1), np.asarray(ys), sample_weight=np.asarray(ws))
    lc = float(lr.predict_proba(np.zeros((1, 1)))[0, 1])
    return {"lc_win_rate": lc, "raw": raw, "slope": float(lr.coef_[0, 0]), "intercept": float(lr.intercept_[0])}


def _words(texts: Sequence[str]) -> int:
    return sum(len(t.split()) for t in texts)


def winrate_report(outcomes: Sequence[Any], pairs: Sequence[tuple[Any, Any]], n_resamples: int = 9999, seed: int = 0):
    """The report: ``overall`` and ``categories`` (:func:`wtl_summary`), ``length_controlled`` and ``items``.

    ``outcomes[i]`` (with ``id``, ``category``, ``outcome``, ``status``) belongs to ``pairs[i]`` (rows
    of A and B with ``responses``), whose lengths the LC win rate uses."""
    if len(outcomes) != len(pairs):
        raise ValueError("one outcome per pair")
    by_cat: dict[str, list] = defaultdict(list)
    for o in outcomes:
        by_cat[o.category].append(o)
    ok = [i for i, o in enumerate(outcomes) if o.status == "ok"]
    lc = length_controlled(
        [outcomes[i].outcome for i in ok],
        [_words(pairs[i][0].responses) for i in ok],
        [_words(pairs[i][1].responses) for i in ok],
    )
    items = []
    for o, (a, b) in zip(outcomes, pairs, strict=True):
        it = {k: v for k, v in vars(o).items()}
        it["len_a"], it["len_b"] = _words(a.responses), _words(b.responses)
        items.append(it)
    return {
        "overall": wtl_summary(outcomes, n_resamples, seed),
        "categories": {c: wtl_summary(v, n_resamples, seed) for c, v in sorted(by_cat.items())},
        "length_controlled": lc,
        "items": items,
    }


def rm_outcomes(
    pairs: Sequence[tuple[Any, Any]],
    rm_dir: str | Path,
    eps: float = 1e-6,
    batch_size: int = 8,
    device: str | None = None,
) -> list[Any]:
    """Verdicts from a reward model: each answer rendered like
    :meth:`~alignforge.inference.evaluators.RewardEvaluator.raw_score` (the conversation so far, then
    the last answer as the assistant turn, ``full_render``) and scored with
    :func:`~alignforge.models.reward.score_sequences`; A wins when ``r_A - r_B >= eps``, loses when
    ``r_A - r_B <= -eps``, ties otherwise (and when they are equal). ``score_a``/``score_b`` are
    kept on each outcome."""
    from alignforge.eval.grading import PairOutcome
    from alignforge.models.loading import resolve_device
    from alignforge.models.reward import load_reward_model, reward_input_ids, score_sequences

    if eps < 0:
        raise ConfigError(f"--tie-eps must be >= 0, got {eps}")
    model, tok, _ = load_reward_model(str(rm_dir))
    model.to(resolve_device(device))
    seqs = []
    for a, b in pairs:
        for row in (a, b):
            conv: list[dict[str, str]] = []
            for q, r in zip(a.questions[:-1], row.responses[:-1], strict=True):
                conv += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
            conv.append({"role": "user", "content": a.questions[-1]})
            last = row.responses[-1]
            seqs.append(reward_input_ids(conv, last, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = score_sequences(model, seqs, pad, batch_size=batch_size, progress=False)
    out = []
    for k, (a, _) in enumerate(pairs):
        sa, sb = float(scores[2 * k]), float(scores[2 * k + 1])
        d = sa - sb
        outcome = "win" if d >= eps and d > 0 else "loss" if d <= -eps and d < 0 else "tie"
        o = PairOutcome(a.id, a.category or "(none)", outcome, "ok")
        o.score_a, o.score_b = sa, sb  # type: ignore[attr-defined]
        out.append(o)
    return out


def run_winrate(
    a_path: str | Path,
    b_path: str | Path,
    judge: Any = None,
    data: str | Path | None = None,
    rm: str | Path | None = None,
    eps: float = 1e-6,
    max_tokens: int = 2048,
    n_resamples: int = 9999,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Win rate of the responses in ``a_path`` against ``b_path`` (matched by id), judged by ``judge``
    (with ``data``, the MT-Bench folder for the pair-v2 prompts) or by the reward model ``rm``."""
    from alignforge.eval.grading import judge_pairs, match_rows, read_judge_rows

    if (judge is None) == (rm is None):
        raise ConfigError("give exactly one verdict source: a judge (--judge-url/--local-judge) or --rm RM_DIR")
    if judge is not None and data is None:
        raise ConfigError("a judge needs --data (the MT-Bench folder with judge_prompts.jsonl)")
    pairs = match_rows(read_judge_rows(a_path), read_judge_rows(b_path))
    calls = None
    if judge is not None:
        outcomes, calls = judge_pairs(pairs, judge, data, max_tokens)
    else:
        outcomes = rm_outcomes(pairs, rm, eps=eps, device=device)
    rep = winrate_report(outcomes, pairs, n_resamples=n_resamples, seed=seed)
    rep.update(a=str(a_path), b=str(b_path), verdicts="rm" if rm is not None else "judge")
    if rm is not None:
        rep["rm"] = {"path": str(rm), "tie_eps": eps}
    else:
        rep["calls"] = calls
        rep["judge"] = {"model": getattr(judge, "model", None), "url": getattr(judge, "base_url", None)}
    return rep


def _fmt_rate(r: dict[str, Any]) -> str:
    if r["value"] is None:
        return "-"
    return f"{r['value']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"


def format_winrate(rep: dict[str, Any]) -> str:
    """A text table: win/tie/loss per category and overall, then raw vs length-controlled."""
    lines = [f"{'category':<24} {'n':>4} {'win':>4} {'tie':>4} {'loss':>4} {'unp':>4} {'fail':>4}  adjusted win rate"]
    rows = list(rep["categories"].items()) + [("overall", rep["overall"])]
    for c, v in rows:
        lines.append(
            f"{c:<24} {v['n']:>4} {v['win']:>4} {v['tie']:>4} {v['loss']:>4} {v['unparsable']:>4} {v['failed']:>4}  "
            f"{_fmt_rate(v['win_rate_adjusted'])}"
        )
    lc = rep["length_controlled"]
    f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines.append(f"win rate (raw) {f(lc['raw'])}   length-controlled {f(lc['lc_win_rate'])}")
    return "\n".join(lines)
