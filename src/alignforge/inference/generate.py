"""Text generation behind a small backend interface.

Everything that samples from a policy (evaluation, PPO rollouts, RAIN) talks to a
:class:`GenerationBackend`: a list of chat conversations in, one response string
per conversation out. :class:`HFBackend` implements it with a transformers model:
chat template, left-padded batches, ``model.generate``, and decoding of only the
new tokens. :meth:`HFBackend.generate_ids` also returns the token ids (for PPO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

Message = dict[str, str]
Conversation = list[Message]
Prompt = Union[Conversation, str]  # a str is used as already-rendered text


SAMPLERS = ("inverse_cdf", "multinomial")


@dataclass
class GenerationConfig:
    """Decoding settings; ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8
    stop_on_eos: bool = True
    return_logits: bool = False  # keep the model's raw logits at each new token (GeneratedSequence.logits)
    # A batch made of runs of k identical prompts (PPO / GRPO samples, Best-of-N) runs the prompt's forward
    # once per distinct prompt and repeats its KV cache k times, instead of k times over the same tokens.
    share_prompt_prefill: bool = True
    # How a sampled token is drawn from the (temperature / top-k / top-p filtered) distribution:
    # "inverse_cdf" (a uniform per row through the float64 CDF, InverseCDFSampler) or "multinomial"
    # (transformers' own torch.multinomial, whose CPU kernel draws an exponential per vocabulary entry:
    # ~30 ms a step for 32 rows x 49k tokens on 2 cores). The same distribution, different draws.
    sampler: str = "inverse_cdf"

    def __post_init__(self) -> None:
        from alignforge.errors import ConfigError

        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GeneratedSequence:
    """One generation: prompt ids (no padding), response ids (up to and including EOS)."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool  # ended with an EOS token (False: cut at max_new_tokens)
    logits: Any = None  # with GenerationConfig.return_logits: the raw logits, [len(response_ids), vocab]


@runtime_checkable
class GenerationBackend(Protocol):
    """Anything that turns conversations into responses."""

    def generate(self, prompts: list[Conversation], cfg: GenerationConfig) -> list[str]: ...


class InverseCDFSampler:
    """A transformers logits processor that draws the next token itself, for ``do_sample=False``.

    It filters the scores with transformers' own warpers (temperature, top-k, top-p, in that order, as
    ``generate`` applies them when sampling), takes the softmax, and draws one token per row by inverse
    transform sampling: a uniform ``u`` from the global torch RNG, the first token whose float64
    cumulative probability exceeds ``u``. It returns scores that are 0 at that token and ``-inf``
    elsewhere, so greedy selection picks it. Exact categorical sampling like ``torch.multinomial``, at a
    fraction of its CPU cost (one uniform per row instead of one exponential per vocabulary entry).
    """

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for w in self.warpers:
            scores = w(input_ids, scores)
        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tok, 0.0)


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in [tokenizer.eos_token_id] + (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
        if x is not None and x not in ids:
            ids.append(int(x))
    return ids


def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer adds one on its own (the chat template may not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if len(with_sp) > len(without) and with_sp[0] == bos else None


def render_prompt(
    tokenizer: Any, prompt: Prompt, bos: int | None = None, continue_final_message: bool = False
) -> list[int]:
    """Token ids of a conversation rendered with ``add_generation_prompt=True`` (a str is taken as
    already-rendered text); ``bos`` (see :func:`bos_to_add`) is put in front when missing.

    ``continue_final_message``: the last message (an assistant one) is left open, to be continued
    (the chat template's own ``continue_final_message``; no generation prompt is added)."""
    if isinstance(prompt, str):
        text = prompt
    elif continue_final_message:
        text = tokenizer.apply_chat_template(
            list(prompt), tokenize=False, add_generation_prompt=False, continue_final_message=True
        )
    else:
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def prompt_run_length(rows: Sequence[list[int]]) -> int:
    """``k`` when ``rows`` are runs of ``k`` consecutive identical prompts (``k`` = the first run's
    length; every run that long), else 1."""
    n = len(rows)
    k = 1
    while k < n and rows[k] == rows[0]:
        k += 1
    if k == 1 or n % k:
        return 1
    for s in range(0, n, k):
        if any(rows[s + j] != rows[s] for j in range(1, k)):
            return 1
    return k


class HFBackend:
    """A :class:`GenerationBackend` over a transformers causal LM (or PeftModel)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            from alignforge.errors import ModelError

            raise ModelError("tokenizer has neither a pad nor an eos token")
        self.eos_ids = eos_token_ids(tokenizer, model)
        self._bos_to_add = bos_to_add(tokenizer)

    # ------------------------------------------------------------------ prompts
    def render(self, prompt: Prompt, continue_final_message: bool = False) -> list[int]:
        """Token ids of a conversation rendered with ``add_generation_prompt=True``, or with its last
        message left open (``continue_final_message``, see :func:`render_prompt`)."""
        return render_prompt(self.tokenizer, prompt, self._bos_to_add, continue_final_message)

    # --------------------------------------------------------------- generating
    def _hf_generation_config(self, cfg: GenerationConfig) -> Any:
        from transformers import GenerationConfig as HFGenerationConfig

        kw: dict[str, Any] = dict(
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=0,
            num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=self.pad_id,
            # An empty list disables EOS stopping (None would fall back to the model's).
            eos_token_id=list(self.eos_ids) if cfg.stop_on_eos else [],
            # InverseCDFSampler draws the token; generate then selects it greedily
            do_sample=not cfg.greedy and cfg.sampler == "multinomial",
        )
        if kw["do_sample"]:
            kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        return HFGenerationConfig(**kw)

    def _left_pad(self, rows: Sequence[list[int]]) -> tuple[Any, Any]:
        from alignforge.data.collate import pad_batch

        b = pad_batch(rows, self.pad_id, side="left")
        return b["input_ids"], b["attention_mask"]

    def _trim(self, new_tokens: list[int], cfg: GenerationConfig) -> tuple[list[int], bool]:
        if cfg.stop_on_eos:
            for j, t in enumerate(new_tokens):
                if t in self.eos_ids:
                    return new_tokens[: j + 1], True
        return new_tokens, False

    def _device(self) -> Any:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - parameterless model
            import torch

            return torch.device("cpu")

    def _prefilled_cache(self, rows: list[list[int]], k: int, device: Any) -> tuple[Any, Any, Any]:
        """The left-padded batch of ``rows`` (runs of ``k`` identical prompts) and a KV cache of all but
        its last column, computed once per distinct prompt and repeated ``k`` times along the batch.
        ``generate`` then runs only the last prompt token and the new ones. Positions are those
        ``generate`` gives a left-padded batch (``cumsum(mask) − 1``, 0 on the padding)."""
        ids, mask = self._left_pad(rows[::k])
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(k)
        return ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0), cache

    def _generate_batch(
        self, rows: list[list[int]], cfg: GenerationConfig, seed: int, hf_cfg: Any
    ) -> list[GeneratedSequence]:
        import torch

        device = self._device()
        k = prompt_run_length(rows) if cfg.share_prompt_prefill else 1
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(seed)
            kw = {"output_logits": True, "return_dict_in_generate": True} if cfg.return_logits else {}
            if k > 1 and max(len(r) for r in rows) > 1:
                ids, mask, cache = self._prefilled_cache(rows, k, device)
                kw["cache"] = cache
            else:
                ids, mask = self._left_pad(rows)
                ids, mask = ids.to(device), mask.to(device)
            if not cfg.greedy and cfg.sampler == "inverse_cdf":
                from transformers import LogitsProcessorList

                kw["logits_processor"] = LogitsProcessorList([InverseCDFSampler(cfg.temperature, cfg.top_k, cfg.top_p)])
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_cfg, **kw)
        logits = torch.stack(out.logits, dim=1) if cfg.return_logits else None  # [B, new, V], unprocessed
        seqs = out.sequences if cfg.return_logits else out
        new = seqs[:, ids.shape[1] :].tolist()
        result = []
        for i, (prompt, toks) in enumerate(zip(rows, new, strict=False)):
            resp, finished = self._trim(toks, cfg)
            text = self.tokenizer.decode(resp, skip_special_tokens=True)
            lg = logits[i, : len(resp)] if logits is not None else None
            result.append(GeneratedSequence(list(prompt), resp, text, finished, lg))
        return result

    def generate_ids(self, prompts: Sequence[Prompt], cfg: GenerationConfig | None = None) -> list[GeneratedSequence]:
        """Generate for every prompt; returns ids and text, in prompt order.

        Batch ``b`` (0-based) is sampled with seed ``cfg.seed + b`` in a forked RNG, so
        results are reproducible for a given seed and batch size and the global RNG is
        left alone. The model runs in eval mode; its previous mode is restored.
        """
        return self.generate_from_ids([self.render(p) for p in prompts], cfg)

    def generate_from_ids(
        self, rows: Sequence[list[int]], cfg: GenerationConfig | None = None
    ) -> list[GeneratedSequence]:
        """:meth:`generate_ids` for prompts that are already token ids (rendered, with the
        generation prompt), e.g. the ``prompt_ids`` of tokenized training data."""
        cfg = cfg or GenerationConfig()
        rows = [list(r) for r in rows]
        if any(not r for r in rows):
            from alignforge.errors import ModelError

            raise ModelError("cannot generate from an empty prompt")
        hf_cfg = self._hf_generation_config(cfg)
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            out: list[GeneratedSequence] = []
            for b, start in enumerate(range(0, len(rows), cfg.batch_size)):
                out += self._generate_batch(rows[start : start + cfg.batch_size], cfg, cfg.seed + b, hf_cfg)
        finally:
            self.model.train(was_training)
        return out

    def generate(self, prompts: list[Conversation], cfg: GenerationConfig | None = None) -> list[str]:
        """One decoded response (new tokens only, special tokens skipped) per prompt."""
        return [g.text for g in self.generate_ids(prompts, cfg)]
