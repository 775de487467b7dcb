"""``alignforge eval judge``: grade response files with an LLM judge (METHODS.md §1e, §5c).

Three modes, all on a judge with :class:`~alignforge.eval.judge.JudgeClient`'s ``complete``
(an OpenAI-compatible endpoint, cached on disk, or :class:`~alignforge.eval.judge.LocalJudge`):

* ``mtbench``: FastChat's single-answer grading with the prompts of ``judge_prompts.jsonl``.
  Turn 1 is graded with ``single-v1``, turn 2 with ``single-v1-multi-turn``; the categories
  math, reasoning and coding use the ``single-math-v1`` variants with the GPT-4 reference answer
  (``mt_bench/reference_answer/gpt-4.jsonl``, by ``question_id``). The score is the first
  ``[[x]]`` (:func:`~alignforge.eval.judge.parse_rating`), kept only in [1, 10]. Reported: the
  mean score per category, per turn and overall, each with a bootstrap CI (``eval.stats``). With
  ``rating_logprobs`` (for judges too weak to write ``[[x]]``, on endpoints with vLLM's
  ``continue_final_message``: ``vllm serve``, ``alignforge serve``) the answer is pre-filled up to
  ``Rating: [[`` and the score is the expected rating under the next token's probabilities.
* ``alignbench``: AlignBench's multi-dimensional grading. A question's ``subcategory`` maps through
  ``config/subcategory_question_mapping.json`` to a question type and through
  ``config/dimension_set.json`` to its dimensions (defined in ``config/dimension_definition.json``);
  the subcategory comes from the row's ``subcategory`` field or, by ``question_id``, from the
  AlignBench data file in the folder. The judge sees the question, the reference answer and the
  answer, and ends with a dict of dimension scores and ``"综合得分"`` (overall, 1-10), parsed from the
  last ``{...}`` (:func:`~alignforge.eval.judge.parse_score_dict`). **The prompt text is our own**
  (:data:`ALIGNBENCH_SYSTEM`, :data:`ALIGNBENCH_USER`): the official one is hard-coded in AlignBench's
  ``judge.py``, which is not in ``../shared``, so scores are not comparable with the leaderboard.
  Overall = mean(reasoning average, language average), each the mean of its category means;
  reasoning = 逻辑推理 and 数学计算 (AlignBench's README), language = the other six categories.
* ``pairwise``: A (the graded file) against B (``against``), rows matched by id. Each pair is judged
  twice with ``pair-v2`` (``pair-v2-multi-turn`` for two-turn rows), once with A shown first and once
  with B shown first; :func:`~alignforge.eval.judge.combine_swapped` turns the two verdicts into
  win/tie/loss for A (disagreement is a tie). With ``logprob_verdict`` the requests ask for
  ``top_logprobs`` and, where the endpoint returns them, the verdict letter's probabilities give
  ``p_a_better`` (the mean over the two orders of P(A's answer is named)); items without them say so.

A judge call that failed, or an answer that cannot be parsed, is counted per category (``failed``,
``unparsable``) and never scored. Token usage is summed over the calls made (cached answers cost
nothing) and reported under ``calls``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from alignforge.errors import ConfigError, DataError

MODES = ("mtbench", "alignbench", "pairwise")
NEED_REF = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS for MT-Bench
REASONING = ("逻辑推理", "数学计算")  # AlignBench: 中文推理; every other category is 中文语言
OVERALL_KEY = "综合得分"

ALIGNBENCH_SYSTEM = (
    "你是一个擅长评价文本质量的助手。请你以公正的评判者的身份，评估一个AI助手对于用户提问的回答的质量。"
    "你需要从下面的几个维度对回答进行评估：\n{dimensions}\n"
    "我们会给你提供用户的提问、高质量的参考答案和需要你评估的AI助手的答案。评估时请对照参考答案，"
    "先逐一给出每个维度的简短理由，再给出1到10的分数，最后给出综合得分（1到10）。"
    "回答的最后必须是一个字典，键为各维度名和'综合得分'，值为分数，例如：{example}"
)
ALIGNBENCH_USER = (
    "用户的提问：{question}\n[参考答案开始]\n{reference}\n[参考答案结束]\n[助手的答案开始]\n{answer}\n[助手的答案结束]"
)


# ----------------------------------------------------------------------------- reading
@dataclass
class JudgeRow:
    """One row of a response file, as the judge needs it."""

    id: str
    category: str | None
    questions: list[str]  # the user turns, one per response
    responses: list[str]
    reference: Any = None
    subcategory: str | None = None
    line: int = 0
    file: str = ""


def _prompt_question(obj: dict, ctx: Any) -> str:
    p = obj.get("prompt")
    if isinstance(p, str) and p.strip():
        return p
    if isinstance(p, list):
        users = [m.get("content") for m in p if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise ctx.err("prompt", "missing field (need a string or a list of messages with a user turn)")


def read_judge_rows(path: str | Path) -> list[JudgeRow]:
    """The rows of a response file (``eval generate``'s output); a bad row or a duplicate id raises
    :class:`DataError` naming file, line and field."""
    from alignforge.data.readers import Ctx, iter_json_objects
    from alignforge.eval.responses import read_responses

    fname = str(path)
    if not Path(path).is_file():
        raise DataError("no such file", file=fname)
    base = {r.line: r for r in read_responses(path)}
    rows: list[JudgeRow] = []
    seen: dict[str, int] = {}
    for line, obj in iter_json_objects(path):
        ctx = Ctx(fname, line)
        r = base[line]
        if r.id in seen:
            raise ctx.err("id", f"duplicate id {r.id!r} (first on line {seen[r.id]})")
        seen[r.id] = line
        followups = obj.get("followups") or []
        if not isinstance(followups, list) or not all(isinstance(f, str) for f in followups):
            raise ctx.err("followups", "expected a list of strings")
        questions = [_prompt_question(obj, ctx), *followups]
        if len(questions) != len(r.responses):
            raise ctx.err("responses", f"{len(r.responses)} responses for {len(questions)} user turns")
        sub = obj.get("subcategory")
        if sub is not None and not isinstance(sub, str):
            raise ctx.err("subcategory", f"expected a string, got {type(sub).__name__}")
        rows.append(JudgeRow(r.id, r.category, questions, r.responses, obj.get("reference"), sub, line, fname))
    if not rows:
        raise DataError("no rows", file=fname)
    return rows


def load_judge_prompts(data: str | Path) -> dict[str, dict]:
    """FastChat's ``judge_prompts.jsonl`` (``data`` is the file or the MT-Bench folder holding it), by name."""
    from alignforge.data.readers import iter_json_objects

    p = Path(data)
    f = p / "judge_prompts.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"{f}: no judge_prompts.jsonl (pass the MT-Bench folder with --data)")
    out = {}
    for line, obj in iter_json_objects(f):
        for k in ("name", "system_prompt", "prompt_template"):
            if not isinstance(obj.get(k), str):
                raise DataError("missing field", file=str(f), line=line, field=k)
        out[obj["name"]] = obj
    return out


def load_mtbench_references(data: str | Path) -> dict[str, list[str]]:
    """GPT-4 reference answers by question id, from ``reference_answer/gpt-4.jsonl`` under ``data``
    (or its ``mt_bench/``); empty when there is none."""
    from alignforge.data.readers import iter_json_objects

    p = Path(data)
    if not p.is_dir():
        p = p.parent
    for cand in (p / "mt_bench" / "reference_answer" / "gpt-4.jsonl", p / "reference_answer" / "gpt-4.jsonl"):
        if cand.is_file():
            out = {}
            for line, obj in iter_json_objects(cand):
                try:
                    out[str(obj["question_id"])] = list(obj["choices"][0]["turns"])
                except (KeyError, IndexError, TypeError):
                    raise DataError("expected question_id and choices[0].turns", file=str(cand), line=line) from None
            return out
    return {}


# ----------------------------------------------------------------------------- summaries
def _score_summary(scores: Sequence[float], n_resamples: int, seed: int) -> dict[str, Any]:
    from alignforge.eval.stats import bootstrap_ci

    if not scores:
        return {"mean": None, "ci": None}
    lo, hi = bootstrap_ci(scores, n_resamples=n_resamples, seed=seed)
    return {"mean": float(sum(scores) / len(scores)), "ci": [lo, hi]}


def _group(items: list[dict], key: str, n_resamples: int, seed: int) -> dict[str, dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        groups[str(it[key])].append(it)
    out = {}
    for g, its in sorted(groups.items()):
        scores = [it["score"] for it in its if it["status"] == "ok"]
        out[g] = {
            "n": len(its),
            "scored": len(scores),
            "unparsable": sum(it["status"] == "unparsable" for it in its),
            "failed": sum(it["status"] == "failed" for it in its),
            **_score_summary(scores, n_resamples, seed),
        }
    return out


def _status(result: Any, parsed: Any) -> str:
    if not result.ok:
        return "failed"
    return "unparsable" if parsed is None else "ok"


def _messages(system: str, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


# ----------------------------------------------------------------------------- MT-Bench
def mtbench_requests(
    rows: Sequence[JudgeRow],
    prompts: dict[str, dict],
    refs: dict[str, list[str]],
    max_tokens: int,
    rating_logprobs: bool = False,
) -> list[tuple[JudgeRow, int, dict]]:
    """``(row, turn, request)`` for every turn of every row (FastChat's single-answer grading).

    ``rating_logprobs``: the judge's answer is pre-filled with ``"Rating: [["`` (vLLM's
    ``continue_final_message``) and two tokens are asked for with ``top_logprobs``, so that the
    rating is read from the next token's probabilities instead of from free text."""
    from alignforge.eval.judge import RATING_PREFILL

    out = []
    for row in rows:
        math_like = row.category in NEED_REF
        ref = refs.get(row.id)
        if math_like and ref is None:
            raise DataError(
                f"category {row.category!r} needs a reference answer, and question {row.id!r} has none in "
                "reference_answer/gpt-4.jsonl",
                file=row.file,
                line=row.line,
                field="id",
            )
        for t in range(len(row.responses)):
            if t > 1:
                raise DataError("MT-Bench grading has at most 2 turns", file=row.file, line=row.line, field="responses")
            name = ("single-math-v1" if math_like else "single-v1") + ("-multi-turn" if t == 1 else "")
            if name not in prompts:
                raise ConfigError(f"judge prompt {name!r} is not in judge_prompts.jsonl")
            jp = prompts[name]
            if t == 0:
                kw = {"question": row.questions[0], "answer": row.responses[0]}
            else:
                kw = {
                    "question_1": row.questions[0],
                    "question_2": row.questions[1],
                    "answer_1": row.responses[0],
                    "answer_2": row.responses[1],
                }
            if math_like:
                kw["ref_answer_1"] = ref[0]
                if t == 1:
                    kw["ref_answer_2"] = ref[1]
            req = {
                "messages": _messages(jp["system_prompt"], jp["prompt_template"].format(**kw)),
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            if rating_logprobs:
                req["messages"].append({"role": "assistant", "content": RATING_PREFILL})
                req.update(
                    max_tokens=2,
                    logprobs=True,
                    top_logprobs=20,
                    continue_final_message=True,
                    add_generation_prompt=False,
                )
            out.append((row, t, req))
    return out


def _graded(row: JudgeRow, res: Any, score: float | None, **extra: Any) -> dict[str, Any]:
    """One graded item: where it came from, its score (None unless parsed) and status, the judge's text."""
    return {
        "id": row.id,
        "category": row.category or "(none)",
        **extra,
        "score": score,
        "status": _status(res, score),
        "judgment": res.text,
        "error": res.error,
    }


def _counts(items: Sequence[dict], scores: Sequence[float]) -> dict[str, int]:
    return {
        "n": len(items),
        "scored": len(scores),
        "unparsable": sum(it["status"] == "unparsable" for it in items),
        "failed": sum(it["status"] == "failed" for it in items),
    }


def grade_mtbench(
    rows: Sequence[JudgeRow],
    judge: Any,
    data: str | Path,
    max_tokens: int = 2048,
    n_resamples: int = 9999,
    seed: int = 0,
    rating_logprobs: bool = False,
) -> dict[str, Any]:
    """MT-Bench single grading (module docstring). With ``rating_logprobs`` an item's score is the
    expected rating under the judge's next-token probabilities after ``"Rating: [["``
    (:func:`~alignforge.eval.judge.rating_probs`); an answer without logprobs or without a rating
    among its top tokens is unparsable. The report then gives ``rating_mass``: the mean probability
    the judge put on a rating token at all (a judge that puts little there is guessing)."""
    from alignforge.eval.judge import parse_rating, rating_probs, summarize

    todo = mtbench_requests(rows, load_judge_prompts(data), load_mtbench_references(data), max_tokens, rating_logprobs)
    results = judge.complete([r for _, _, r in todo])
    items = []
    for (row, t, _), res in zip(todo, results, strict=True):
        if not rating_logprobs:
            score = parse_rating(res.text, bounds=(1, 10)) if res.ok else None
            items.append(_graded(row, res, score, turn=t + 1))
            continue
        rp = rating_probs(res.response) if res.ok else None
        items.append(_graded(row, res, rp["expected"] if rp else None, turn=t + 1, rating_probs=rp))
    scores = [it["score"] for it in items if it["status"] == "ok"]
    extra: dict[str, Any] = {}
    if rating_logprobs:
        masses = [it["rating_probs"]["mass"] for it in items if it["rating_probs"]]
        extra["rating_logprobs"] = {
            "with_rating": len(masses),
            "rating_mass": sum(masses) / len(masses) if masses else None,
        }
    return {
        "mode": "mtbench",
        **extra,
        "overall": {**_counts(items, scores), **_score_summary(scores, n_resamples, seed)},
        "categories": _group(items, "category", n_resamples, seed),
        "turns": _group(items, "turn", n_resamples, seed),
        "calls": summarize(results),
        "items": items,
    }


# ----------------------------------------------------------------------------- AlignBench
def load_alignbench_config(data: str | Path) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """``(subcategory -> question type, question type -> dimensions, dimension -> definition)``."""
    cfg = Path(data) / "config"
    out = []
    for name in ("subcategory_question_mapping.json", "dimension_set.json", "dimension_definition.json"):
        f = cfg / name
        if not f.is_file():
            raise ConfigError(f"{f}: missing (pass the AlignBench folder, with its config/, as --data)")
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except ValueError as e:
            raise DataError(f"invalid JSON: {e}", file=str(f)) from None
    return out[0], out[1], out[2]


def _alignbench_subcategories(data: str | Path) -> dict[str, str]:
    from alignforge.data.readers import iter_json_objects

    for name in ("data_v1.1_release.jsonl", "data_release.jsonl"):
        f = Path(data) / name
        if f.is_file():
            return {
                str(o["question_id"]): o["subcategory"]
                for _, o in iter_json_objects(f)
                if "question_id" in o and isinstance(o.get("subcategory"), str)
            }
    return {}


def alignbench_requests(
    rows: Sequence[JudgeRow], data: str | Path, max_tokens: int
) -> list[tuple[JudgeRow, list, dict]]:
    """``(row, dimensions, request)`` per row (the last turn is graded)."""
    sub2type, type2dims, defs = load_alignbench_config(data)
    subs = None
    out = []
    for row in rows:
        sub = row.subcategory
        if sub is None:
            subs = _alignbench_subcategories(data) if subs is None else subs
            sub = subs.get(row.id)
        if sub is None:
            raise DataError(
                f"no subcategory for question {row.id!r} (neither in the row nor in {data}/data_v1.1_release.jsonl)",
                file=row.file,
                line=row.line,
                field="subcategory",
            )
        if sub not in sub2type:
            raise DataError(
                f"unknown AlignBench subcategory {sub!r}", file=row.file, line=row.line, field="subcategory"
            )
        dims = type2dims[sub2type[sub]]
        if row.reference is None or not isinstance(row.reference, str):
            raise DataError(
                "AlignBench grading needs the reference answer", file=row.file, line=row.line, field="reference"
            )
        dim_text = "\n".join(f"{i + 1}. {d}：{defs.get(d, '')}" for i, d in enumerate(dims))
        example = json.dumps({**{d: 5 for d in dims}, OVERALL_KEY: 5}, ensure_ascii=False)
        system = ALIGNBENCH_SYSTEM.format(dimensions=dim_text, example=example)
        user = ALIGNBENCH_USER.format(question=row.questions[-1], reference=row.reference, answer=row.responses[-1])
        out.append((row, dims, {"messages": _messages(system, user), "temperature": 0, "max_tokens": max_tokens}))
    return out


def alignbench_overall(category_means: dict[str, float | None]) -> dict[str, Any]:
    """AlignBench's overall score: mean(reasoning average, language average), each the mean of the
    category means in its group (categories without a score are left out); ``None`` if a group is empty."""
    reas = [m for c, m in category_means.items() if c in REASONING and m is not None]
    lang = [m for c, m in category_means.items() if c not in REASONING and m is not None]
    r = sum(reas) / len(reas) if reas else None
    g = sum(lang) / len(lang) if lang else None
    return {"reasoning": r, "language": g, "overall": (r + g) / 2 if r is not None and g is not None else None}


def grade_alignbench(
    rows: Sequence[JudgeRow],
    judge: Any,
    data: str | Path,
    max_tokens: int = 2048,
    n_resamples: int = 9999,
    seed: int = 0,
) -> dict[str, Any]:
    from alignforge.eval.judge import parse_score_dict, summarize

    todo = alignbench_requests(rows, data, max_tokens)
    results = judge.complete([r for _, _, r in todo])
    items = []
    for (row, dims, _), res in zip(todo, results, strict=True):
        d = parse_score_dict(res.text) if res.ok else None
        score = d.get(OVERALL_KEY) if d else None
        if score is not None and not 1 <= score <= 10:
            score = None
        dimensions = {k: v for k, v in (d or {}).items() if k in dims} if score is not None else None
        items.append(_graded(row, res, score, dimensions=dimensions))
    cats = _group(items, "category", n_resamples, seed)
    scores = [it["score"] for it in items if it["status"] == "ok"]
    dim_scores: dict[str, list[float]] = defaultdict(list)
    for it in items:
        for k, v in (it["dimensions"] or {}).items():
            dim_scores[k].append(v)
    return {
        "mode": "alignbench",
        "overall": {**_counts(items, scores), **alignbench_overall({c: v["mean"] for c, v in cats.items()})},
        "categories": cats,
        "dimensions": {k: sum(v) / len(v) for k, v in sorted(dim_scores.items())},
        "calls": summarize(results),
        "items": items,
    }


# ----------------------------------------------------------------------------- pairwise
def match_rows(a: Sequence[JudgeRow], b: Sequence[JudgeRow]) -> list[tuple[JudgeRow, JudgeRow]]:
    """Pairs of rows with the same id, in A's order; every id of A must be in B (else a DataError)."""
    by_id = {r.id: r for r in b}
    missing = [r for r in a if r.id not in by_id]
    if missing:
        ids = ", ".join(repr(r.id) for r in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} id(s) of {missing[0].file} are not in this file: {ids} "
            f"(first on line {missing[0].line} of A)",
            file=b[0].file if b else None,
            field="id",
        )
    pairs = []
    for r in a:
        o = by_id[r.id]
        if len(o.responses) != len(r.responses):
            raise DataError(
                f"id {r.id!r}: {len(o.responses)} turns here, {len(r.responses)} in {r.file}",
                file=o.file,
                line=o.line,
                field="responses",
            )
        pairs.append((r, o))
    return pairs


def _pair_request(jp: dict, a: JudgeRow, first: list[str], second: list[str], max_tokens: int, logprobs: bool) -> dict:
    if len(a.questions) == 1:
        kw = {"question": a.questions[0], "answer_a": first[0], "answer_b": second[0]}
    else:
        kw = {
            "question_1": a.questions[0],
            "question_2": a.questions[1],
            "answer_a_1": first[0],
            "answer_a_2": first[1],
            "answer_b_1": second[0],
            "answer_b_2": second[1],
        }
    req: dict[str, Any] = {
        "messages": _messages(jp["system_prompt"], jp["prompt_template"].format(**kw)),
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if logprobs:
        req.update(logprobs=True, top_logprobs=20)
    return req


def verdict_probs(response: dict | None) -> dict[str, float] | None:
    """P(A), P(B), P(C) of the verdict letter, renormalised over the three, from the ``top_logprobs``
    of the token right after the last ``[[`` in the answer; ``None`` when the response has no logprobs
    there or none of the three letters is among them."""
    from alignforge.eval.judge import logprob_content

    content = logprob_content(response)
    if content is None:
        return None
    text = ""
    pos = None
    for j, tok in enumerate(content):
        text += str(tok.get("token", ""))
        if text.endswith("[["):
            pos = j + 1
    if pos is None or pos >= len(content):
        return None
    probs: dict[str, float] = {}
    for cand in content[pos].get("top_logprobs") or []:
        letter = str(cand.get("token", "")).strip()
        if letter in ("A", "B", "C") and letter not in probs:
            probs[letter] = math.exp(float(cand["logprob"]))
    total = sum(probs.values())
    if total <= 0:
        return None
    return {k: probs.get(k, 0.0) / total for k in ("A", "B", "C")}


@dataclass
class PairOutcome:
    id: str
    category: str
    outcome: str | None  # win / tie / loss for A, None when not scored
    status: str  # ok / unparsable / failed
    verdicts: list[str | None] = field(default_factory=list)
    p_a_better: float | None = None
    judgments: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


def judge_pairs(
    pairs: Sequence[tuple[JudgeRow, JudgeRow]],
    judge: Any,
    data: str | Path,
    max_tokens: int = 2048,
    logprob_verdict: bool = False,
) -> tuple[list[PairOutcome], dict[str, Any]]:
    """Each pair judged twice, positions swapped; returns the outcomes and the call summary."""
    from alignforge.eval.judge import combine_swapped, parse_pairwise, summarize

    prompts = load_judge_prompts(data)
    reqs = []
    for a, b in pairs:
        name = "pair-v2" if len(a.responses) == 1 else "pair-v2-multi-turn"
        if len(a.responses) > 2:
            raise DataError("pairwise grading has at most 2 turns", file=a.file, line=a.line, field="responses")
        if name not in prompts:
            raise ConfigError(f"judge prompt {name!r} is not in judge_prompts.jsonl")
        jp = prompts[name]
        reqs.append(_pair_request(jp, a, a.responses, b.responses, max_tokens, logprob_verdict))
        reqs.append(_pair_request(jp, a, b.responses, a.responses, max_tokens, logprob_verdict))
    results = judge.complete(reqs)
    out = []
    for k, (a, _) in enumerate(pairs):
        r1, r2 = results[2 * k], results[2 * k + 1]
        v1 = parse_pairwise(r1.text) if r1.ok else None
        v2 = parse_pairwise(r2.text) if r2.ok else None
        if not (r1.ok and r2.ok):
            status, outcome = "failed", None
        else:
            outcome = combine_swapped(v1, v2)
            status = "ok" if outcome is not None else "unparsable"
        p = None
        if logprob_verdict and r1.ok and r2.ok:
            p1, p2 = verdict_probs(r1.response), verdict_probs(r2.response)
            if p1 is not None and p2 is not None:
                p = 0.5 * (p1["A"] + 0.5 * p1["C"]) + 0.5 * (p2["B"] + 0.5 * p2["C"])
        out.append(
            PairOutcome(
                a.id, a.category or "(none)", outcome, status, [v1, v2], p, [r1.text, r2.text], [r1.error, r2.error]
            )
        )
    return out, summarize(results)


def grade_pairwise(
    a_rows: Sequence[JudgeRow],
    b_rows: Sequence[JudgeRow],
    judge: Any,
    data: str | Path,
    max_tokens: int = 2048,
    logprob_verdict: bool = False,
    n_resamples: int = 9999,
    seed: int = 0,
) -> dict[str, Any]:
    from alignforge.eval.winrate import winrate_report

    pairs = match_rows(a_rows, b_rows)
    outcomes, calls = judge_pairs(pairs, judge, data, max_tokens, logprob_verdict)
    rep = winrate_report(outcomes, pairs, n_resamples=n_resamples, seed=seed)
    rep["mode"] = "pairwise"
    rep["calls"] = calls
    if logprob_verdict:
        ps = [o.p_a_better for o in outcomes if o.p_a_better is not None]
        rep["logprob_verdict"] = {
            "with_logprobs": len(ps),
            "without": len(outcomes) - len(ps),
            "mean_p_a_better": sum(ps) / len(ps) if ps else None,
        }
    return rep


# ----------------------------------------------------------------------------- the judge and the command
def make_judge(
    judge_url: str | None,
    judge_model: str | None,
    api_key_env: str | None = None,
    local_judge: str | None = None,
    concurrency: int = 4,
    cache: str | Path | None = None,
    device: str | None = None,
) -> Any:
    """A :class:`JudgeClient` on ``judge_url`` (``judge_model`` names the model), or a
    :class:`LocalJudge` on ``local_judge``. An unset ``api_key_env`` is a ConfigError here, before any request."""
    from alignforge.eval.judge import JudgeClient, LocalJudge

    if local_judge is not None:
        if judge_url is not None:
            raise ConfigError("give either --judge-url or --local-judge, not both")
        from alignforge.models.loading import load_model, load_tokenizer, resolve_device

        tok = load_tokenizer(local_judge, padding_side="left")
        lm = load_model(local_judge).to(resolve_device(device)).eval()
        return LocalJudge(lm, tok, judge_model or local_judge)
    if judge_url is None:
        raise ConfigError("a judge is needed: --judge-url URL --judge-model NAME, or --local-judge MODEL")
    if not judge_model:
        raise ConfigError("--judge-model is required with --judge-url")
    return JudgeClient(judge_url, judge_model, api_key_env, concurrency=concurrency, cache_dir=cache)


def run_judge(
    responses: str | Path,
    mode: str,
    judge: Any,
    data: str | Path,
    against: str | Path | None = None,
    max_tokens: int = 2048,
    logprob_verdict: bool = False,
    n_resamples: int = 9999,
    seed: int = 0,
    rating_logprobs: bool = False,
) -> dict[str, Any]:
    """Grade ``responses`` in ``mode`` (module docstring); returns the JSON report."""
    if rating_logprobs and mode != "mtbench":
        raise ConfigError("--rating-logprobs is only for --mode mtbench")
    if mode not in MODES:
        raise ConfigError(f"unknown judge mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "pairwise" and against is None:
        raise ConfigError("--mode pairwise needs --against B.jsonl")
    if mode != "pairwise" and against is not None:
        raise ConfigError("--against is only for --mode pairwise")
    rows = read_judge_rows(responses)
    if mode == "mtbench":
        rep = grade_mtbench(rows, judge, data, max_tokens, n_resamples, seed, rating_logprobs)
    elif mode == "alignbench":
        rep = grade_alignbench(rows, judge, data, max_tokens, n_resamples, seed)
    else:
        rep = grade_pairwise(
            rows, read_judge_rows(against), judge, data, max_tokens, logprob_verdict, n_resamples, seed
        )
    rep["responses"] = str(responses)
    if against is not None:
        rep["against"] = str(against)
    rep["judge"] = {"model": getattr(judge, "model", None), "url": getattr(judge, "base_url", None)}
    return rep


def format_judge(rep: dict[str, Any]) -> str:
    """A short text table of a judge report."""
    lines = []
    if rep["mode"] == "pairwise":
        from alignforge.eval.winrate import format_winrate

        lines.append(format_winrate(rep))
    else:
        lines.append(f"{'category':<24} {'n':>4} {'scored':>6} {'unpars':>6} {'failed':>6} {'mean':>6}  95% CI")
        for c, v in rep["categories"].items():
            mean = f"{v['mean']:.2f}" if v["mean"] is not None else "-"
            ci = f"[{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" if v["ci"] else ""
            lines.append(f"{c:<24} {v['n']:>4} {v['scored']:>6} {v['unparsable']:>6} {v['failed']:>6} {mean:>6}  {ci}")
        o = rep["overall"]
        if rep["mode"] == "alignbench":
            f = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
            lines.append(f"overall {f(o['overall'])} (reasoning {f(o['reasoning'])}, language {f(o['language'])})")
        else:
            lines.append(f"overall {o['mean']:.2f}" if o["mean"] is not None else "overall -")
        rl = rep.get("rating_logprobs")
        if rl is not None:
            mass = f"{rl['rating_mass']:.3f}" if rl["rating_mass"] is not None else "-"
            lines.append(f"ratings from logprobs: {rl['with_rating']} items; mean probability on a rating token {mass}")
    u = rep["calls"]["usage"]
    lines.append(
        f"judge calls: {rep['calls']['n']} ({rep['calls']['cached']} cached, {rep['calls']['failed']} failed); "
        f"tokens: {u['prompt_tokens']} prompt + {u['completion_tokens']} completion"
    )
    return "\n".join(lines)
