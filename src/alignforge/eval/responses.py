"""``alignforge eval generate``: answer a prompt set with a model, and read such response files back.

Output: one JSON line per prompt (in prompt order, unless a resumed run filled gaps)::

    {"id", "set", "category", "prompt": [messages], "followups": [str], "responses": [str, one per turn],
     "response": str (the last turn's), "reference" (if the set has one),
     "metadata": {"model", "set", "decoding": {...}, "settings_digest"}}

Generation runs on :class:`~alignforge.inference.generate.HFBackend` in batches of
``batch_size`` prompts; batch ``k`` of the (filtered) prompt list is decoded with seed
``seed + k`` (every turn of it), so batches that a resumed run redoes whole sample as in an
uninterrupted run; the missing prompts of a partly written batch are redone as a smaller batch
with the same seed (greedy: the same answers up to padding numerics). A multi-turn prompt
(MT-Bench) asks turn ``t + 1`` after the model's own answer to turn ``t``: the conversation is
``prompt + [assistant: answer_1, user: followup_1, ...]``.

Resuming: each batch's lines are flushed and fsynced when the batch is done. A rerun keeps the
complete lines of an existing output (a torn last line from a kill is dropped), skips their ids
and answers the rest. An output written with other settings (model, set, decoding) is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from alignforge.errors import ConfigError, DataError


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_existing(out: Path, digest: str) -> dict[str, dict]:
    """Complete rows of an existing output (keyed by id); drop a torn last line; refuse other settings."""
    done: dict[str, dict] = {}
    if not out.is_file():
        return done
    good: list[str] = []
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, raw in enumerate(lines):
        torn = not raw.endswith("\n")
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a torn last line from a kill
            raise DataError(
                "invalid JSON (not a torn last line: refusing to resume)", file=str(out), line=i + 1
            ) from None
        if torn or not isinstance(row, dict):
            break
        got = (row.get("metadata") or {}).get("settings_digest")
        if got != digest:
            raise ConfigError(
                f"{out}:{i + 1}: written with other settings (model, set or decoding); use another --out or delete it"
            )
        if row.get("id") is None:
            raise DataError("missing field", file=str(out), line=i + 1, field="id")
        done[str(row["id"])] = row
        good.append(raw)
    if len(good) != len(lines):
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text("".join(good), encoding="utf-8")
        os.replace(tmp, out)
    return done


def generate_responses(
    kind: str,
    data: str | Path,
    model: str,
    out_path: str | Path,
    *,
    categories: list[str] | None = None,
    n: int | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
    backend: Any = None,
) -> dict:
    """Answer the prompts of ``kind``/``data`` with ``model``; write/extend ``out_path`` (see module docstring).

    ``backend``: an already-built :class:`HFBackend` (tests); else ``model`` is loaded.
    Returns ``{out, prompts, generated, resumed}``.
    """
    from alignforge.eval.prompts import load_prompt_set
    from alignforge.inference.generate import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size
    )
    decoding = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else 1.0,
        "seed": seed,
        "batch_size": batch_size,
        "greedy": cfg.greedy,
    }
    settings = {"model": str(model), "set": kind, "decoding": decoding}
    digest = settings_digest(settings)
    prompts = load_prompt_set(kind, data, categories=categories, n=n)
    out = Path(out_path)
    done = _read_existing(out, digest)
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate prompt ids in the prompt set", file=str(data))
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    todo = [(k, [p for p in b if p.id not in done]) for k, b in enumerate(batches)]
    todo = [(k, b) for k, b in todo if b]
    n_todo = sum(len(b) for _, b in todo)
    if n_todo:
        if backend is None:
            backend = _load_backend(model, device)
        out.parent.mkdir(parents=True, exist_ok=True)
        prog, task = _progress(progress, n_todo, f"eval generate ({kind})")
        try:
            with open(out, "a", encoding="utf-8") as f:
                for k, batch in todo:
                    bcfg = dataclasses.replace(cfg, seed=seed + k, batch_size=len(batch))
                    answers = _answer_batch(backend, batch, bcfg)
                    for p, resp in zip(batch, answers, strict=True):
                        row = {
                            "id": p.id,
                            "set": kind,
                            "category": p.category,
                            "prompt": p.prompt,
                            "followups": p.followups,
                            "responses": resp,
                            "response": resp[-1],
                        }
                        if p.reference is not None:
                            row["reference"] = p.reference
                        row["metadata"] = {**settings, "settings_digest": digest}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        done[p.id] = row
                    f.flush()
                    os.fsync(f.fileno())
                    if prog is not None:
                        prog.advance(task, len(batch))
        finally:
            if prog is not None:
                prog.stop()
    return {"out": str(out), "prompts": len(prompts), "generated": n_todo, "resumed": len(prompts) - n_todo}


def _answer_batch(backend: Any, batch: list, cfg: Any) -> list[list[str]]:
    """Answers per prompt, one per turn; turn t+1 of a prompt sees the model's own answer to turn t."""
    convs = [list(p.prompt) for p in batch]
    answers: list[list[str]] = [[] for _ in batch]
    active = list(range(len(batch)))
    turn = 0
    while active:
        texts = backend.generate([convs[i] for i in active], cfg)
        nxt = []
        for i, text in zip(active, texts, strict=True):
            answers[i].append(text)
            convs[i].append({"role": "assistant", "content": text})
            if turn < len(batch[i].followups):
                convs[i].append({"role": "user", "content": batch[i].followups[turn]})
                nxt.append(i)
        active, turn = nxt, turn + 1
    return answers


def _load_backend(model: str, device: str | None) -> Any:
    from alignforge.inference.generate import HFBackend
    from alignforge.models.loading import load_model, load_tokenizer, resolve_device

    tok = load_tokenizer(model, padding_side="left")
    lm = load_model(model).to(resolve_device(device))
    return HFBackend(lm, tok)


def _progress(enabled: bool, total: int, description: str):
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    prog.start()
    return prog, prog.add_task(description, total=total)


# --------------------------------------------------------------------------- reading response files


@dataclass
class ResponseRow:
    id: str
    category: str | None
    responses: list[str]
    line: int

    @property
    def response(self) -> str:
        return self.responses[-1]


def read_responses(path: str | Path) -> Iterator[ResponseRow]:
    """Rows of a response file (``eval generate``'s output, or any JSONL with ``response`` or
    ``responses``; ``id`` defaults to the line). A bad row raises ``DataError`` (FILE:LINE: field)."""
    from alignforge.data.readers import Ctx, iter_json_objects

    fname = str(path)
    for line, obj in iter_json_objects(path):
        ctx = Ctx(fname, line)
        if obj.get("responses") is not None:
            resp = obj["responses"]
            if not isinstance(resp, list) or not resp:
                raise ctx.err("responses", "expected a non-empty list of strings")
            for i, r in enumerate(resp):
                if not isinstance(r, str):
                    raise ctx.err(f"responses[{i}]", f"expected a string, got {type(r).__name__}")
        elif "response" in obj:
            if not isinstance(obj["response"], str):
                raise ctx.err("response", f"expected a string, got {type(obj['response']).__name__}")
            resp = [obj["response"]]
        else:
            raise ctx.err("response", "missing field (need 'response' or 'responses')")
        cat = obj.get("category")
        if cat is not None and not isinstance(cat, str):
            raise ctx.err("category", f"expected a string, got {type(cat).__name__}")
        yield ResponseRow(str(obj.get("id", line)), cat, list(resp), line)
