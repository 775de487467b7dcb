"""Best-of-N: sample N answers per prompt, keep the one an evaluator scores highest.

The baseline RAIN is compared with at equal wall time (benchmarks/rain_effect.py picks N). The
evaluator is any :class:`~alignforge.inference.evaluators.Evaluator` (the self-judge, a reward
model, or a test's fake): ``start(conversation, tokenizer)`` once per prompt, then
``score(response_ids)`` per sample, a value in ``[-1, 1]``; nothing is committed.

Conventions:

* the N samples of a prompt are one batch of :class:`~alignforge.inference.generate.HFBackend`
  (the prompt repeated N times), sampled with the temperature / top-p / top-k of ``gen_cfg`` and
  seed ``seed + i`` for prompt ``i``; so ``n=1`` is plain sampling of the prompts one at a time
  (batch size 1) with ``GenerationConfig(seed=seed)``;
* the ids given to ``score`` are the response without its trailing EOS token (the judge sees the
  text, not the end-of-turn marker); an empty response is scored as ``score([])``;
* the best sample is the first argmax of the scores (ties go to the earlier sample).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from alignforge.errors import ConfigError, DataError
from alignforge.inference.generate import GenerationConfig, HFBackend

Conversation = list[dict[str, str]]


def as_conversation(prompt: Sequence[dict] | str, index: int = 0) -> Conversation:
    """A conversation from a conversation or a plain user text (``DataError`` if it is empty)."""
    conv = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if not conv or not any(str(m.get("content", "")).strip() for m in conv):
        raise DataError("empty prompt", line=index + 1, field="prompt")
    return conv


def best_of_n(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict] | str],
    n: int,
    evaluator: Any,
    gen_cfg: GenerationConfig | None = None,
    seed: int = 0,
) -> list[dict]:
    """Best-of-``n`` answers for ``prompts`` (conversations or plain user texts), in order.

    Each result is a dict: ``response`` (text of the best sample), ``response_ids`` (its ids, EOS
    included if it ended with one), ``finished``, ``best`` (its index among the samples),
    ``score`` (its score), ``scores`` (all ``n``), ``samples`` (all ``n`` texts), ``n``, and the
    prompt's ``wall_s`` (sampling + scoring), ``gen_s`` and ``score_s``.

    ``n < 1`` is a :class:`ConfigError`, and so is ``n > 1`` with greedy decoding
    (``gen_cfg.temperature == 0``: the samples would all be the same); an empty prompt list gives ``[]``.
    """
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"best_of_n: n must be an integer >= 1, got {n!r}")
    gen_cfg = gen_cfg or GenerationConfig(temperature=1.0)
    if n > 1 and gen_cfg.greedy:
        raise ConfigError(f"best_of_n: n={n} needs sampling (temperature > 0); greedy samples are all the same")
    convs = [as_conversation(p, i) for i, p in enumerate(prompts)]
    backend = HFBackend(model, tokenizer)
    eos = set(backend.eos_ids)
    out: list[dict] = []
    for i, conv in enumerate(convs):
        t0 = time.perf_counter()
        cfg = dataclasses.replace(gen_cfg, batch_size=n, seed=seed + i)
        row = backend.render(conv)
        gens = backend.generate_from_ids([row] * n, cfg)
        t1 = time.perf_counter()
        scores = []
        with torch.inference_mode():
            evaluator.start(conv, tokenizer)
            for g in gens:
                ids = list(g.response_ids)
                if ids and ids[-1] in eos:
                    ids = ids[:-1]
                scores.append(float(evaluator.score(ids)))
        t2 = time.perf_counter()
        best = max(range(n), key=lambda j: (scores[j], -j))  # first argmax
        g = gens[best]
        out.append(
            {
                "response": g.text,
                "response_ids": list(g.response_ids),
                "finished": g.finished,
                "best": best,
                "score": scores[best],
                "scores": scores,
                "samples": [x.text for x in gens],
                "n": n,
                "wall_s": t2 - t0,
                "gen_s": t1 - t0,
                "score_s": t2 - t1,
            }
        )
    return out
