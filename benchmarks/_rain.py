"""What the RAIN benchmarks (``rain_overhead.py``, ``rain_effect.py``) share: prompts, the policy, greedy decoding."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from _harness import SHARED

ADVBENCH = str(SHARED / "data/advbench/harmful_behaviors.csv")


def hh_first_turns(data: str | Path, n: int, tokenizer: Any = None, max_prompt_tokens: int = 256) -> list[list[dict]]:
    """The first ``n`` distinct first human turns of an HH file (``read_prompts``), as one-turn conversations;
    with ``tokenizer``, only those whose rendered prompt has at most ``max_prompt_tokens`` tokens."""
    from alignforge.data.readers import read_prompts
    from alignforge.inference.generate import render_prompt

    seen, out = set(), []
    for rec in read_prompts(data, on_error="skip").records:
        first = next((m for m in rec.prompt if m["role"] == "user"), None)
        if first is None or not first["content"].strip() or first["content"] in seen:
            continue
        conv = [{"role": "user", "content": first["content"]}]
        if tokenizer is not None and len(render_prompt(tokenizer, conv)) > max_prompt_tokens:
            continue
        seen.add(first["content"])
        out.append(conv)
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} first-turn prompts in {data}")
    return out


def advbench_goals(path: str | Path, n: int) -> list[list[dict]]:
    from alignforge.eval.refusal import load_advbench

    goals = load_advbench(path, n=n)
    if len(goals) < n:
        raise SystemExit(f"only {len(goals)} AdvBench behaviours in {path}")
    return [[{"role": "user", "content": g}] for g in goals]


def load_policy(name: str) -> tuple[Any, Any]:
    """The policy in eval mode (fp32) and its tokenizer; ``embedded`` is the packaged SmolLM2-135M-Instruct."""
    from alignforge.models.loading import ensure_embedded, load_model, load_tokenizer

    path = str(ensure_embedded()) if name == "embedded" else name
    return load_model(path).eval(), load_tokenizer(path)


def greedy(model: Any, tokenizer: Any, conv: list[dict], max_new_tokens: int, use_cache: bool = True) -> tuple:
    """Greedy ``model.generate`` of one prompt (batch 1, no padding), stopping at EOS:
    ``(new token ids up to and including EOS, finished, seconds)``. ``use_cache=False`` is the RAIN
    paper's vanilla baseline (``genc``: every step re-runs the whole sequence)."""
    import torch

    from alignforge.inference.generate import bos_to_add, eos_token_ids, render_prompt

    ids = torch.tensor([render_prompt(tokenizer, conv, bos_to_add(tokenizer))])
    eos = eos_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=use_cache,
        )
    dt = time.perf_counter() - t
    new = out[0, ids.shape[1] :].tolist()
    cut = next((j + 1 for j, x in enumerate(new) if x in eos), None)
    return (new[:cut] if cut else new), cut is not None, dt
