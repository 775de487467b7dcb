"""Sample two different responses per prompt from an SFT model, for annotation.

``generate_pairs`` writes the import format of ``alignforge annotate import``:
``{"id", "prompt": [messages], "response_a", "response_b"}``. Each round samples every
still-unpaired prompt with a fresh seed; a prompt gets its pair once two of its samples
differ (after stripping whitespace) and are non-empty. Prompts still without two different
responses after ``max_tries`` rounds are left out and counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from alignforge.errors import ConfigError


@dataclass
class PairsReport:
    prompts: int
    written: int
    out_path: str
    failed: list[str] = field(default_factory=list)  # sources of prompts left out
    rounds: int = 0

    def summary(self) -> str:
        s = f"wrote {self.written} pairs for {self.prompts} prompts to {self.out_path} ({self.rounds} sampling rounds)"
        if self.failed:
            s += f"; {len(self.failed)} prompts left out (no two different responses)"
        return s


def generate_pairs(
    prompts_path: str | Path,
    out_path: str | Path,
    model: str = "embedded",
    temperature: float = 0.9,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    seed: int = 0,
    max_tries: int = 4,
    limit: int | None = None,
    batch_size: int = 8,
    backend=None,
    device: str | None = None,
) -> PairsReport:
    """See the module docstring. ``backend`` (a ``GenerationBackend``) overrides ``model``, which is
    otherwise loaded onto ``device`` (default: CUDA when available, else the CPU)."""
    from alignforge.data.convert import write_jsonl
    from alignforge.data.readers import read_prompts
    from alignforge.inference.generate import GenerationConfig, HFBackend

    if temperature <= 0:
        raise ConfigError("temperature must be > 0: greedy decoding gives the same response twice")
    if max_tries < 1:
        raise ConfigError(f"max_tries must be >= 1, got {max_tries}")
    recs = read_prompts(prompts_path).records
    if limit is not None:
        recs = recs[:limit]
    if backend is None:
        from alignforge.models.loading import load_model, load_tokenizer, resolve_device

        backend = HFBackend(load_model(model).to(resolve_device(device)), load_tokenizer(model, padding_side="left"))
    samples: list[list[str]] = [[] for _ in recs]
    todo = list(range(len(recs)))
    rounds = 0
    # round r samples with seed `seed + r * 100003`; two rounds are needed for a first pair
    while todo and rounds < max_tries + 1:
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + rounds * 100003,
            batch_size=batch_size,
        )
        texts = backend.generate([recs[i].prompt for i in todo], cfg)
        rounds += 1
        for i, t in zip(todo, texts, strict=False):
            if t.strip() and all(t.strip() != s.strip() for s in samples[i]):
                samples[i].append(t)
        todo = [i for i in todo if len(samples[i]) < 2]
    rows = []
    seen: dict[str, int] = {}
    for r, s in zip(recs, samples, strict=False):
        key = json.dumps(r.prompt, ensure_ascii=False, sort_keys=True)
        uid = "gen-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        seen[uid] = seen.get(uid, 0) + 1
        if seen[uid] > 1:  # the same prompt twice in the file: two items
            uid += f"-{seen[uid]}"
        if len(s) < 2:
            continue
        rows.append({"id": uid, "prompt": r.prompt, "response_a": s[0], "response_b": s[1]})
    n = write_jsonl(rows, out_path)
    failed = [f"{r.source.file}:{r.source.line}" for r, s in zip(recs, samples, strict=False) if len(s) < 2]
    return PairsReport(len(recs), n, str(out_path), failed, rounds)
