"""Evaluation prompt sets, loaded by kind into one shape (:class:`EvalPrompt`).

=============  =====================================================================================
kind           file and what becomes a prompt
=============  =====================================================================================
``alignbench`` AlignBench ``data_v1.1_release.jsonl``: ``question`` (one user turn), ``category``,
               ``reference`` (the reference answer, for the judge); id = ``question_id``
``mtbench``    MT-Bench ``question.jsonl`` (or the ``mt-bench`` / ``mt_bench`` folder holding it):
               the first of ``turns`` is the prompt, the others are follow-ups that are asked after
               the model's own previous answer; id = ``question_id``
``advbench``   AdvBench ``harmful_behaviors.csv``: every ``goal`` (:func:`eval.refusal.load_advbench`);
               id = the 1-based row
``hh``         an Anthropic HH-RLHF split file (``test.jsonl.gz``): the first human turn of ``chosen``;
               id = the line
``redinstruct`` a red-instruct question bank (HarmfulQA ``harmfulqa.json``, CatQA ``catqa_english.json``:
               ``{topic: {subtopic: [question, ...]}}``; DangerousQA ``dangerousqa.json``: ``[question, ...]``),
               harmful prompts only; category = the topic (``harmful`` for a flat list); repeated question
               strings are kept once; id = the 1-based position
``jsonl``      a plain prompt file as read by :func:`data.readers.parse_prompt` (``{prompt}`` or
               ``{messages}`` ending on a user turn); id = the record's ``id`` if present, else the
               line; ``category`` kept if present
=============  =====================================================================================

Every record error is a :class:`~alignforge.errors.DataError` naming file, line and field. An
unknown ``categories`` entry is a :class:`~alignforge.errors.ConfigError` listing the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from alignforge.data.readers import Ctx, is_hh_string, iter_json_objects, parse_hh, parse_prompt
from alignforge.errors import ConfigError, DataError

Message = dict[str, str]

KINDS = ("alignbench", "mtbench", "advbench", "hh", "redinstruct", "jsonl")


@dataclass
class EvalPrompt:
    """One evaluation item: ``prompt`` (messages ending on a user turn) and optional ``followups``
    (later user turns, each asked after the model's previous answer)."""

    id: str
    prompt: list[Message]
    category: str | None = None
    followups: list[str] = field(default_factory=list)
    reference: Any = None
    file: str | None = None
    line: int | None = None

    @property
    def n_turns(self) -> int:
        return 1 + len(self.followups)


def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def _text(obj: dict, key: str, ctx: Ctx) -> str:
    if key not in obj or obj[key] is None:
        raise ctx.err(key, "missing field")
    v = obj[key]
    if not isinstance(v, str):
        raise ctx.err(key, f"expected a string, got {type(v).__name__}")
    if not v.strip():
        raise ctx.err(key, "empty string")
    return v


def _qid(obj: dict, ctx: Ctx) -> str:
    if obj.get("question_id") is None:
        raise ctx.err("question_id", "missing field")
    v = obj["question_id"]
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ctx.err("question_id", f"expected an integer or string, got {type(v).__name__}")
    return str(v)


def _optional_category(obj: dict, ctx: Ctx) -> str | None:
    v = obj.get("category")
    if v is None:
        return None
    if not isinstance(v, str):
        raise ctx.err("category", f"expected a string, got {type(v).__name__}")
    return v


def load_alignbench(path: str | Path) -> list[EvalPrompt]:
    """AlignBench questions (v1.0 or v1.1 JSONL; unknown keys ignored)."""
    fname = str(path)
    out = []
    for line, obj in iter_json_objects(path):
        ctx = Ctx(fname, line)
        out.append(
            EvalPrompt(
                id=_qid(obj, ctx),
                prompt=_user(_text(obj, "question", ctx)),
                category=_text(obj, "category", ctx),
                reference=obj.get("reference"),
                file=fname,
                line=line,
            )
        )
    return out


def mtbench_questions_file(path: str | Path) -> Path:
    """``question.jsonl`` itself, or found under an ``mt-bench`` / ``mt_bench`` folder."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "question.jsonl", p / "mt_bench" / "question.jsonl"):
            if cand.is_file():
                return cand
        raise DataError("no question.jsonl in this folder (nor in its mt_bench/)", file=str(p))
    return p


def load_mtbench(path: str | Path) -> list[EvalPrompt]:
    """MT-Bench questions: ``turns[0]`` is the prompt, ``turns[1:]`` the follow-ups."""
    qfile = mtbench_questions_file(path)
    fname = str(qfile)
    out = []
    for line, obj in iter_json_objects(qfile):
        ctx = Ctx(fname, line)
        turns = obj.get("turns")
        if turns is None:
            raise ctx.err("turns", "missing field")
        if not isinstance(turns, list) or not turns:
            raise ctx.err("turns", "expected a non-empty list of strings")
        for i, t in enumerate(turns):
            if not isinstance(t, str) or not t.strip():
                raise ctx.err(f"turns[{i}]", "expected a non-empty string")
        out.append(
            EvalPrompt(
                id=_qid(obj, ctx),
                prompt=_user(turns[0]),
                category=_text(obj, "category", ctx),
                followups=list(turns[1:]),
                reference=obj.get("reference"),
                file=fname,
                line=line,
            )
        )
    return out


def load_advbench_prompts(path: str | Path) -> list[EvalPrompt]:
    """Every AdvBench ``goal`` as a one-turn prompt (through :func:`eval.refusal.load_advbench`)."""
    from alignforge.eval.refusal import load_advbench

    try:
        goals = load_advbench(path, n=None)
    except ValueError as e:  # no 'goal' column
        raise DataError(str(e).split(": ", 1)[-1], file=str(path), field="goal") from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=str(path)) from None
    return [
        EvalPrompt(id=str(i + 1), prompt=_user(g), category="harmful", file=str(path), line=None)
        for i, g in enumerate(goals)
    ]


def load_hh_prompts(path: str | Path) -> list[EvalPrompt]:
    """The first human turn of every record of an HH-RLHF split file."""
    fname = str(path)
    out = []
    for line, obj in iter_json_objects(path):
        ctx = Ctx(fname, line)
        chosen = obj.get("chosen")
        if chosen is None:
            raise ctx.err("chosen", "missing field")
        if not is_hh_string(chosen):
            raise ctx.err("chosen", "not an HH transcript (must start with '\\n\\nHuman:')")
        first = parse_hh(chosen)[0]["content"].strip()
        if not first:
            raise ctx.err("chosen", "empty first human turn")
        out.append(EvalPrompt(id=str(line), prompt=_user(first), file=fname, line=line))
    return out


def load_redinstruct(path: str | Path) -> list[EvalPrompt]:
    """Every distinct question of a red-instruct bank (nested ``{topic: {subtopic: [q]}}`` or a flat list)."""
    import json

    fname = str(path)
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=fname) from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})", file=fname) from None
    items: list[tuple[str, str, str]] = []  # (category, field path, question)
    if isinstance(obj, list):
        items = [("harmful", f"[{i}]", q) for i, q in enumerate(obj)]
    elif isinstance(obj, dict):
        for topic, subs in obj.items():
            if not isinstance(subs, dict):
                raise DataError("expected {subtopic: [question, ...]}", file=fname, field=topic)
            for sub, qs in subs.items():
                if not isinstance(qs, list):
                    raise DataError("expected a list of questions", file=fname, field=f"{topic}.{sub}")
                items += [(topic, f"{topic}.{sub}[{i}]", q) for i, q in enumerate(qs)]
    else:
        raise DataError("expected a list of questions or {topic: {subtopic: [question, ...]}}", file=fname)
    out, seen = [], set()
    for category, where, q in items:
        q = q.strip() if isinstance(q, str) else ""
        if not q:
            raise DataError("expected a non-empty question string", file=fname, field=where)
        if q not in seen:
            seen.add(q)
            out.append(EvalPrompt(id=str(len(out) + 1), prompt=_user(q), category=category, file=fname))
    if not out:
        raise DataError("no questions", file=fname)
    return out


def load_jsonl_prompts(path: str | Path) -> list[EvalPrompt]:
    """A plain prompt file (``data.readers`` validation; ``id`` and ``category`` kept if present)."""
    fname = str(path)
    out, seen = [], {}
    for line, obj in iter_json_objects(path):
        ctx = Ctx(fname, line)
        rec = parse_prompt(obj, ctx)
        pid = obj.get("id", line)
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise ctx.err("id", f"expected an integer or string, got {type(pid).__name__}")
        pid = str(pid)
        if pid in seen:
            raise ctx.err("id", f"duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = line
        out.append(EvalPrompt(id=pid, prompt=rec.prompt, category=_optional_category(obj, ctx), file=fname, line=line))
    return out


_LOADERS = {
    "alignbench": load_alignbench,
    "mtbench": load_mtbench,
    "advbench": load_advbench_prompts,
    "hh": load_hh_prompts,
    "redinstruct": load_redinstruct,
    "jsonl": load_jsonl_prompts,
}


def load_prompt_set(
    kind: str, path: str | Path, categories: Sequence[str] | None = None, n: int | None = None
) -> list[EvalPrompt]:
    """The prompts of a set (``kind`` in :data:`KINDS`), optionally only ``categories``, then the first ``n``."""
    if kind not in _LOADERS:
        raise ConfigError(f"unknown prompt set {kind!r}; known: {', '.join(KINDS)}")
    if n is not None and n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    prompts = _LOADERS[kind](path)
    if not prompts:
        raise DataError("no prompts", file=str(path))
    if categories:
        known = sorted({p.category for p in prompts if p.category is not None})
        unknown = [c for c in categories if c not in known]
        if unknown:
            listed = ", ".join(known) if known else "(this file has no categories)"
            raise ConfigError(f"{path}: unknown category {', '.join(map(repr, unknown))}; known: {listed}")
        wanted = set(categories)
        prompts = [p for p in prompts if p.category in wanted]
    return prompts if n is None else prompts[:n]
