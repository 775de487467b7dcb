"""Generation probe: what the policy itself answers while it trains.

Data metrics (rewards, log-probs, KL on the data responses) do not show what RLHF papers watch
most closely, the policy's *own* outputs: ChatGLM-RLHF tracks response length because reward
hacking and DPO both tend to grow it. Every ``train.probe_every`` steps (and once before the
first step) the training loop calls a :class:`GenerationProbe`: greedy answers to a fixed set of
prompts, logged as

* ``gen_len_mean`` — mean response length in tokens (end-of-turn token included),
* ``gen_finished`` — share of answers that ended with an end-of-turn token within
  ``train.probe_max_new_tokens`` (the others were cut),

and the answers themselves appended to ``OUTPUT/samples.jsonl`` (``{"step", "prompt", "response",
"n_tokens", "finished"}``). Greedy decoding in a forked RNG: the probe changes neither the
training RNG nor the weights, so a run with the probe ends with the same weights as one without.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from alignforge.inference.generate import GenerationConfig, HFBackend


def probe_prompt_ids(
    train_prompt_ids: Sequence[Sequence[int]], n: int, *, tokenizer: Any = None, probe_file: str | None = None
) -> list[list[int]]:
    """The prompts the probe answers: the first ``n`` of ``probe_file`` (a prompts file, any format
    ``data.readers.read_prompts`` takes), or else the first ``n`` distinct training prompts."""
    if probe_file:
        from alignforge.data.readers import read_prompts
        from alignforge.data.tokenize import tokenize_prompt

        return [tokenize_prompt(r.prompt, tokenizer, r.source) for r in read_prompts(probe_file).records[:n]]
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for ids in train_prompt_ids:
        key = tuple(ids)
        if key not in seen:
            seen.add(key)
            out.append(list(ids))
            if len(out) == n:
                break
    return out


class GenerationProbe:
    """Greedy answers to fixed prompts; ``probe(model, step)`` returns the metrics to log."""

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        samples_path: str | Path | None = None,
        batch_size: int = 8,
    ):
        if not prompts:
            from alignforge.errors import ConfigError

            raise ConfigError("the generation probe has no prompts")
        self.tokenizer = tokenizer
        self.prompts = [list(p) for p in prompts]
        self.cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
        self.samples_path = Path(samples_path) if samples_path else None

    @classmethod
    def from_config(
        cls, train_cfg: Any, tokenizer: Any, train_prompt_ids: Sequence[Sequence[int]]
    ) -> "GenerationProbe | None":
        """The probe a ``TrainConfig`` asks for, or ``None`` when ``probe_every == 0``."""
        if train_cfg.probe_every <= 0:
            return None
        from alignforge.errors import ConfigError

        for key in ("probe_prompts", "probe_max_new_tokens"):
            if getattr(train_cfg, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1 when train.probe_every > 0, got {getattr(train_cfg, key)}")
        prompts = probe_prompt_ids(
            train_prompt_ids, train_cfg.probe_prompts, tokenizer=tokenizer, probe_file=train_cfg.probe_file
        )
        if not prompts:
            where = f"train.probe_file {train_cfg.probe_file}" if train_cfg.probe_file else "the training data"
            raise ConfigError(f"the generation probe found no prompts in {where}")
        return cls(tokenizer, prompts, train_cfg.probe_max_new_tokens, Path(train_cfg.output_dir) / "samples.jsonl")

    def _drop_from(self, step: int) -> None:
        """Forget samples of ``step`` and later: left by a killed run that is now resumed (or by an
        earlier run in the same output dir), they would otherwise appear twice."""
        path = self.samples_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] < step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
        if len(keep) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            tmp.replace(path)

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        import torch

        backend = HFBackend(model, self.tokenizer)
        with torch.no_grad():
            gens = backend.generate_from_ids(self.prompts, self.cfg)
        if self.samples_path is not None:
            self._drop_from(step)
            with open(self.samples_path, "a", encoding="utf-8") as f:
                for g in gens:
                    f.write(
                        json.dumps(
                            {
                                "step": step,
                                "prompt": self.tokenizer.decode(g.prompt_ids, skip_special_tokens=False),
                                "response": g.text,
                                "n_tokens": len(g.response_ids),
                                "finished": g.finished,
                            }
                        )
                        + "\n"
                    )
        n = len(gens)
        return {
            "gen_len_mean": sum(len(g.response_ids) for g in gens) / n,
            "gen_finished": sum(g.finished for g in gens) / n,
        }


def policy_probe(train_cfg: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]]):
    """The ``Task.probe`` of a policy trainer (SFT, DPO, ULMA): greedy answers of ``module.lm``, or
    ``None`` when ``train.probe_every`` is 0. The training loop calls it on the unwrapped module (on
    the accelerator's device) under the training autocast."""
    probe = GenerationProbe.from_config(train_cfg, tokenizer, prompt_ids)
    if probe is None:
        return None
    return lambda module, step: probe(module.lm, step)
