"""RM-labelled DPO data, as ChatGLM-RLHF builds it (METHODS.md §1d).

For each prompt, sample K responses from the policy, score each with the reward model, and
write the best as ``chosen`` and the worst as ``rejected`` (TRL conversational preference JSONL,
with the two scores kept as ``score_chosen`` / ``score_rejected``). Prompts whose K rewards differ
by less than ``min_gap`` (near-identical responses carry no signal; the same idea as ChatGLM-RLHF's
variance filter for PPO prompts) are skipped and counted, as are prompts whose best and worst
responses are the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignforge.errors import ConfigError


@dataclass
class DPODataReport:
    prompts: int
    written: int
    skipped_small_gap: int
    skipped_identical: int
    out_path: str

    def summary(self) -> str:
        return (
            f"wrote {self.written} pairs for {self.prompts} prompts to {self.out_path}; skipped "
            f"{self.skipped_small_gap} with a reward gap below min_gap and {self.skipped_identical} "
            f"whose best and worst responses were identical"
        )


def build_dpo_pairs(
    prompts_path: str | Path,
    out_path: str | Path,
    reward_model: str,
    policy: str = "embedded",
    k: int = 4,
    temperature: float = 0.9,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    seed: int = 0,
    min_gap: float = 0.0,
    batch_size: int = 8,
    max_length: int = 1024,
    limit: int | None = None,
    backend=None,
    rm=None,
    progress: bool = True,
    device: str | None = None,
) -> DPODataReport:
    """See the module docstring. ``backend`` / ``rm`` (a loaded RewardModel with its tokenizer as
    ``(rm, tokenizer)``) override loading ``policy`` / ``reward_model``, which are otherwise loaded
    onto ``device`` (default: CUDA when available, else the CPU)."""
    from alignforge.data.convert import write_jsonl
    from alignforge.data.readers import read_prompts
    from alignforge.data.tokenize import tokenize_prompt_completion, truncate_prompt_responses
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import resolve_device
    from alignforge.models.reward import load_reward_model, score_sequences

    if k < 2:
        raise ConfigError(f"k must be >= 2 to pick a best and a worst response, got {k}")
    if temperature <= 0:
        raise ConfigError("temperature must be > 0: greedy decoding gives the same response K times")
    recs = read_prompts(prompts_path).records[:limit]
    dev = resolve_device(device)
    if backend is None:
        from alignforge.models.loading import load_model, load_tokenizer

        backend = HFBackend(load_model(policy).to(dev), load_tokenizer(policy, padding_side="left"))
    samples = [[] for _ in recs]
    for j in range(k):
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + j * 100003,
            batch_size=batch_size,
        )
        for i, text in enumerate(backend.generate([r.prompt for r in recs], cfg)):
            samples[i].append(text)
    if rm is None:
        model, tok = load_reward_model(reward_model)[:2]
        model.to(dev)
    else:
        model, tok = rm
    seqs, owner = [], []
    for i, (r, texts) in enumerate(zip(recs, samples, strict=False)):
        for t in texts:
            p, c = tokenize_prompt_completion(
                r.prompt, [{"role": "assistant", "content": t if t.strip() else " "}], tok, full_render=True
            )
            p, (c,), _ = truncate_prompt_responses(p, [c], max_length)
            seqs.append(p + c)
            owner.append(i)
    scores = score_sequences(model, seqs, tok.pad_token_id, batch_size, progress=progress)
    per = [[] for _ in recs]
    for i, s in zip(owner, scores, strict=False):
        per[i].append(float(s))
    rows, small, same = [], 0, 0
    for r, texts, sc in zip(recs, samples, per, strict=False):
        best = max(range(k), key=lambda j: sc[j])
        worst = min(range(k), key=lambda j: sc[j])
        if sc[best] - sc[worst] < min_gap:
            small += 1
            continue
        if texts[best].strip() == texts[worst].strip() or not texts[best].strip() or not texts[worst].strip():
            same += 1
            continue
        rows.append(
            {
                "prompt": r.prompt,
                "chosen": [{"role": "assistant", "content": texts[best]}],
                "rejected": [{"role": "assistant", "content": texts[worst]}],
                "score_chosen": sc[best],
                "score_rejected": sc[worst],
            }
        )
    write_jsonl(rows, out_path)
    return DPODataReport(len(recs), len(rows), small, same, str(out_path))
