"""PPO as ChatGLM-RLHF runs it, plus the critic-free GRPO / RLOO / ReMax (METHODS.md §1c, §5).

One **iteration** = a rollout, then ``ppo.ppo_epochs`` passes of ``ppo.minibatches`` updates:

1. ``ppo.prompts_per_iteration`` prompts (a seeded shuffle of the prompt set, a pure function of the
   iteration) are answered ``ppo.samples_per_prompt`` times each by the policy (KV-cached HF
   ``generate``, EOS stop, temperature / top-p / top-k);
2. the frozen reward model scores each answer (re-tokenised when its tokenizer differs), and the
   **reference reward** ``r(x, y_ref)`` is subtracted: ``y_ref`` is the reference model's greedy
   answer, made once before training and cached on disk (ChatGLM-RLHF's baseline);
3. per-token KL to the reference (k1/k2/k3) goes into the reward (``−β·kl_t``), or into the loss;
4. advantages: GAE with a critic (value head on the reward model by default), or from groups of
   samples (``grpo``, ``rloo``), or against the current policy's greedy answer (``remax``);
5. clipped policy loss + clipped value loss (+ ``α·NTP`` on an SFT batch), through the loop's
   guarded step.

**Passes that cannot change the result are skipped.** With ``ppo.kl_coef = 0`` there is no reference
pass (and with full fine-tuning and no ``ppo.reference_reward``, no reference model in memory; ``kl_ref``
is then not logged). With one update per rollout (``ppo_epochs = minibatches = 1``), no KL term and no
dropout, the rollout's log-prob pass is skipped: the update's own detached log-probs are ``logπ_old``
(the ratio is exactly 1; a second pass would give the same values up to rounding), as TRL does.
**A prompt's forward runs once per micro-batch.** The K samples of a prompt share its prefill in
generation (``ppo.share_prompt_prefill``) and its forward in every log-prob pass
(``ppo.share_prompt_forward``, :func:`shared_prompt_logps`: the prompt's KV cache is indexed to its rows,
and gradients flow back through it), so the update's decoder FLOPs on a prompt of length P with K
responses of length L fall from K·(P+L) to P+K·L tokens.

**Exact resume.** The rollout of iteration ``i`` is a pure function of (seed, ``i``, the weights at
its start): prompts come from the seeded order, each generation *block* (``ppo.gen_batch_prompts``
prompts × K samples) is sampled with its own seed ``f(seed, i, block)``, and minibatches are seeded
shuffles within blocks. Checkpoints fall at iteration boundaries; a run killed anywhere in an
iteration reruns it from its start and ends with the same weights. Since a rank holds whole blocks
and every global minibatch takes the same share of every block, 2 processes give the same
samples and minibatches as 1 process with the same global batch.

Where this departs from the paper (details the paper does not give are options, METHODS.md [unv]):

* ``y_ref`` is greedy by default (``ppo.ref_greedy``); the paper does not say.
* No advantage whitening by default (as the paper); ``ppo.whiten_advantages`` turns it on.
* The NTP term (``ppo.ntp_coef``) is the mean-token NLL of an SFT-format batch, added to every update.
* The critic is a separate model (initialised from the RM, or the policy with a zero head), or, with
  ``ppo.critic_shared=true`` and a LoRA policy, a second LoRA adapter on the actor's base with a
  zero-initialised value head (``models/value.SharedValueModel``: no second copy of the weights; the
  critic then starts from the policy, not the RM).
* Losses are token-level means over the global minibatch (the policy, value and KL terms share one
  normaliser, the number of response tokens in the minibatch).
* ``ppo.safety_reward_model`` adds Llama 2's second reward model (not in ChatGLM-RLHF, which uses one RM):
  safety prompts (``ppo.safety_prompt_files``) and responses the safety RM scores as unsafe get its score,
  the rest the helpfulness RM's, both z-normalised (``CombinedScorer``).
* Rollouts use the HF backend by default; ``ppo.backend=vllm`` (a colocated vLLM engine with a weight
  sync after each update) is written against vLLM's API but has not been run on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from alignforge.config import DataConfig, LoraConfig, ModelConfig, TrainConfig


@dataclass
class PPOParams:
    reward_model: str = ""  # a saved alignforge reward model (required)
    # Llama 2's two reward models: with a safety RM, a response is scored by it on the prompts of
    # safety_prompt_files and wherever sigmoid(its z-score) < safety_threshold, else by reward_model;
    # both scores z-normalised with their reward_stats.json
    safety_reward_model: str = ""
    safety_prompt_files: list[str] = field(default_factory=list)  # safety prompts (added to data.train_files)
    safety_threshold: float = 0.15
    advantage: Literal["gae", "grpo", "rloo", "remax"] = "gae"
    iterations: int = 10
    prompts_per_iteration: int = 8  # global, over all processes
    samples_per_prompt: int = 1  # K; grpo and rloo need K >= 2
    gen_batch_prompts: int = 4  # prompts per generation block; each process takes whole blocks
    max_new_tokens: int = 64
    temperature: float = 1.0  # also used to recompute the log-probs of the sampled tokens
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False
    share_prompt_prefill: bool = True  # HF backend: K samples of a prompt share one prompt forward (KV repeated)
    # log-prob passes (rollout and update) and reward scoring: the rows of a micro-batch that share a prompt
    # run its forward once (KV indexed per row, gradients flow back through it); the log-prob passes keep
    # the row-by-row forward under model.gradient_checkpointing
    share_prompt_forward: bool = True
    sampler: Literal["inverse_cdf", "multinomial"] = "inverse_cdf"  # HF backend's draw (inference.generate)
    ppo_epochs: int = 1
    minibatches: int = 1  # updates per epoch; each block's rows split evenly among them
    forward_batch_size: int = 8  # rows per forward pass (rollout scoring and training micro-batches)
    clip: float = 0.2
    vf_clip: float = 0.2  # <= 0: unclipped value loss
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = False
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["reward", "loss"] = "reward"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    reference_reward: bool = True  # r~ = r(x, y) - r(x, y_ref) (ChatGLM-RLHF); false for the ablation
    ref_greedy: bool = True  # y_ref decoded greedily (else sampled at ppo.temperature)
    grpo_norm_std: bool = True  # false: Dr. GRPO (no division by the group std)
    ntp_coef: float = 0.0
    ntp_file: Optional[str] = None  # SFT-format data for the NTP term
    ntp_batch_size: int = 4  # per process
    filter_samples: int = 0  # > 0: sample this many answers per prompt and drop low-variance prompts
    filter_eps: float = 1e-3
    critic_init: Literal["rm", "policy"] = "rm"
    critic_shared: bool = False  # the critic as a second LoRA adapter on the actor's base (+ a value head)
    backend: Literal["hf", "vllm"] = "hf"  # the policy's rollouts: HF generate, or a colocated vLLM engine (GPU)
    vllm_gpu_memory_utilization: float = 0.3
    ref_model: Optional[str] = None  # full fine-tuning: the frozen reference (default: the initial policy)
    score_batch_size: int = 8
    sample_every: int = 1  # iterations between rows of OUTPUT/samples.jsonl; 0 = never
    # every N iterations, the policy as `final` would hold it goes to OUTPUT/snapshots/iter-NNNNNNNN (for
    # choosing an iteration on a validation set afterwards); 0 = never
    snapshot_every: int = 0
    n_samples_logged: int = 4


@dataclass
class PPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512, max_prompt_length=256))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="outputs/ppo", lr=1e-6, scheduler="constant", save_every=1)
    )
    ppo: PPOParams = field(default_factory=PPOParams)


# --------------------------------------------------------------------------- data


@dataclass
class Prompt:
    messages: list
    ids: list[int]
    safety: bool = False  # from ppo.safety_prompt_files: always scored by the safety reward model


@dataclass
class PromptReport:
    read: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_filter: int = 0
    kept: int = 0

    def summary(self) -> str:
        s = (
            f"prompts: {self.read} read, {self.truncated} truncated from the left, "
            f"{self.dropped_long} dropped as over-long"
        )
        if self.dropped_filter:
            s += f", {self.dropped_filter} dropped by the reward-variance filter"
        return s + f"; {self.kept} used"


def load_prompts(
    files: list[str],
    tokenizer,
    max_prompt_length: int,
    overlong: str,
    on_error: str,
    safety_files: list[str] | tuple = (),
) -> tuple[list[Prompt], PromptReport]:
    """Read and tokenise prompt files (any format ``read_prompts`` takes); over-long prompts are cut from
    the left (``overlong=truncate``) or dropped, and counted. The prompts of ``safety_files`` follow those
    of ``files`` and are flagged ``safety``."""
    from alignforge.data.readers import read_prompts
    from alignforge.data.tokenize import tokenize_prompt
    from alignforge.errors import ConfigError

    if max_prompt_length < 1:
        raise ConfigError(f"data.max_prompt_length must be >= 1, got {max_prompt_length}")
    rep = PromptReport()
    out: list[Prompt] = []
    for f, safety in [(f, False) for f in files] + [(f, True) for f in safety_files]:
        for rec in read_prompts(f, on_error=on_error).records:
            rep.read += 1
            ids = tokenize_prompt(rec.prompt, tokenizer, rec.source)
            if len(ids) > max_prompt_length:
                if overlong == "drop":
                    rep.dropped_long += 1
                    continue
                ids = ids[-max_prompt_length:]
                rep.truncated += 1
            out.append(Prompt(rec.prompt, ids, safety))
    rep.kept = len(out)
    return out, rep


def iteration_prompts(i: int, n: int, per_iter: int, seed: int) -> list[int]:
    """Global prompt indices of iteration ``i``: consecutive slices of seeded per-epoch shuffles
    (wrapping into the next epoch), so always exactly ``per_iter`` of them."""
    start = i * per_iter
    out: list[int] = []
    while len(out) < per_iter:
        epoch, k = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        out += perm[k : k + per_iter - len(out)]
    return out


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- sequences


def right_pad(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``prompt + response`` rows, right-padded, with the response-aligned gather index.

    Returns ``input_ids``/``attention_mask`` ``(B, T)``; ``resp_pos`` ``(B, R)``: the sequence position of
    response token ``k`` (clamped inside the row where ``k`` is past the end); ``resp_mask`` ``(B, R)``.
    """
    from alignforge.data.collate import pad_batch

    b = pad_batch([list(p) + list(r) for p, r in zip(prompts, responses, strict=False)], pad_id)
    ids, att = b["input_ids"], b["attention_mask"]
    R = max(1, max(len(r) for r in responses))
    k = torch.arange(R)
    lens_p = torch.tensor([len(p) for p in prompts])
    lens_s = lens_p + torch.tensor([len(r) for r in responses])
    pos = torch.minimum(lens_p[:, None] + k, (lens_s - 1)[:, None])
    rmask = (k[None, :] < (lens_s - lens_p)[:, None]).long()
    return {"input_ids": ids, "attention_mask": att, "resp_pos": pos, "resp_mask": rmask}


def share_prompts(batch: dict[str, torch.Tensor], prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`right_pad`'s ``batch`` plus the shared-prompt layout, when some prompt repeats in it.

    Adds ``prompt_ids`` / ``prompt_mask`` ``(U, P)``: each distinct prompt once, left-padded (so that
    every prompt ends in column ``P − 1``); ``prompt_index`` ``(B,)``: row -> its prompt; ``resp_ids``
    ``(B, R)``: the responses, right-padded (``resp_mask`` is ``batch``'s). Returns ``batch`` unchanged
    when every row's prompt differs (nothing to share).
    """
    from alignforge.data.collate import pad_batch

    uniq: dict[tuple[int, ...], int] = {}
    index = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
    if len(uniq) == len(prompts):
        return batch
    up = pad_batch([list(u) for u in uniq], pad_id, side="left")
    ids, pos, rmask = batch["input_ids"], batch["resp_pos"], batch["resp_mask"]
    resp = torch.where(rmask.bool(), ids.gather(1, pos), torch.full_like(pos, pad_id))
    return {
        **batch,
        "prompt_ids": up["input_ids"],
        "prompt_mask": up["attention_mask"],
        "prompt_index": torch.tensor(index),
        "resp_ids": resp,
    }


def shared_prompt_logps(
    lm, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False, entropy_grad: bool = True
):
    """:func:`response_logps` on :func:`share_prompts`' layout: the decoder runs once over the ``U``
    distinct prompts (``use_cache``), the cache is indexed to the ``B`` rows (``Cache.reorder_cache``),
    and a second pass runs only the response tokens against it. The same values as the row-by-row pass
    (up to rounding); gradients reach the prompt positions through the cache."""
    from alignforge.models.logprobs import head_logprobs
    from alignforge.models.lora import unwrap_base
    from alignforge.models.packing import prefix_cached_hidden

    base = unwrap_base(lm)
    rmask = batch["resp_mask"]
    last, second = prefix_cached_hidden(
        base.get_decoder(), batch["prompt_ids"], batch["prompt_mask"], batch["prompt_index"], batch["resp_ids"], rmask
    )
    # the state that predicts response token k: the prompt's last one for k = 0, else response token k - 1's
    h = torch.cat([last[:, None], second[:, :-1]], dim=1)
    valid = rmask.bool()
    res = head_logprobs(
        base,
        h[valid],
        batch["resp_ids"][valid],
        valid,
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
    )
    return res if with_entropy else (res, None)


def response_logps(
    lm, batch: dict[str, torch.Tensor], temperature: float, with_entropy: bool = False, entropy_grad: bool = True
):
    """``(B, R)`` log-probs (and entropies) of the response tokens at the sampling temperature
    (through :func:`shared_prompt_logps` when ``batch`` has :func:`share_prompts`' layout)."""
    from alignforge.models.logprobs import target_logprobs

    if "prompt_index" in batch:
        return shared_prompt_logps(lm, batch, temperature, with_entropy, entropy_grad)
    ids, att = batch["input_ids"], batch["attention_mask"]
    target = torch.zeros_like(att, dtype=torch.bool)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(batch["resp_pos"])
    valid = batch["resp_mask"].bool()
    target[rows[valid], batch["resp_pos"][valid]] = True
    out = target_logprobs(
        lm, ids, att, target, temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad
    )
    lp, ent = out if with_entropy else (out, None)
    lp = lp.gather(1, batch["resp_pos"]) * batch["resp_mask"]
    if ent is not None:
        ent = ent.gather(1, batch["resp_pos"]) * batch["resp_mask"]
    return lp, ent


def response_values(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, R)``: ``V`` at the state before each response token (position ``pos − 1``)."""
    v = critic(batch["input_ids"], batch["attention_mask"])
    return v.gather(1, (batch["resp_pos"] - 1).clamp(min=0)) * batch["resp_mask"]


class ActorCritic(nn.Module):
    """The trained modules in one ``nn.Module``, so one optimiser and one DDP wrapper cover both.

    ``forward(batch, temperature, with_entropy, ntp=None, entropy_grad=True)`` -> ``(logps, entropies,
    values, ntp_logps)``; the NTP batch (SFT format) goes through the same call so that a distributed
    wrapper syncs once; ``entropy_grad=False`` gives entropies for the log only (no autograd graph).
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        temperature: float,
        with_entropy: bool,
        ntp: dict[str, torch.Tensor] | None = None,
        entropy_grad: bool = True,
    ):
        from alignforge.models.logprobs import target_logprobs

        lp, ent = response_logps(self.policy, batch, temperature, with_entropy, entropy_grad)
        values = response_values(self.critic, batch) if self.critic is not None else None
        ntp_lp = None
        if ntp is not None:
            ntp_lp = target_logprobs(self.policy, ntp["input_ids"], ntp["attention_mask"], ntp["target_mask"])
        return lp, ent, values, ntp_lp


# --------------------------------------------------------------------------- the reward


class RewardScorer:
    """The frozen reward model on (prompt, response) pairs.

    Each response is decoded to text and the conversation re-rendered with the reward model's own
    chat template to the end of the rendering (``full_render``), which is what the reward model scores
    everywhere else (``rm score``, ``dpo-data``, plain transformers); so a reward model whose tokenizer
    differs from the policy's scores the same text. A response cut at ``max_new_tokens`` is scored as if
    it ended there.
    """

    def __init__(self, path: str, policy_tokenizer, device, batch_size: int, share_prompts: bool = True):
        from alignforge.models.reward import load_reward_model

        self.path = path
        self.share_prompts = share_prompts  # K answers of a prompt: its common token prefix runs once
        self.rm, self.tok, self.stats = load_reward_model(path)
        self.rm.to(device)
        self.policy_tok = policy_tokenizer
        self.batch_size = batch_size
        self.same = self.tok.get_vocab() == policy_tokenizer.get_vocab() and getattr(
            self.tok, "chat_template", None
        ) == getattr(policy_tokenizer, "chat_template", None)

    def sequences(self, prompts: list[Prompt], responses: list[list[int]]) -> list[list[int]]:
        from alignforge.models.reward import reward_input_ids

        return [
            reward_input_ids(p.messages, self.policy_tok.decode(r, skip_special_tokens=True), self.tok)
            for p, r in zip(prompts, responses, strict=True)
        ]

    def __call__(self, prompts: list[Prompt], responses: list[list[int]]) -> torch.Tensor:
        from alignforge.models.reward import score_sequences

        seqs = self.sequences(prompts, responses)
        keys = [tuple(p.ids) for p in prompts]
        groups = keys if self.share_prompts and len(set(keys)) < len(keys) else None
        scores = score_sequences(
            self.rm, seqs, self.tok.pad_token_id, batch_size=self.batch_size, progress=False, groups=groups
        )
        return torch.as_tensor(scores, dtype=torch.float32)

    def fingerprint(self) -> str:
        from alignforge.models.loading import model_fingerprint

        return model_fingerprint(self.rm)

    def z(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores z-normalised with the model's saved statistics (``reward_stats.json``)."""
        from alignforge.errors import ConfigError

        mean, std = self.stats.get("mean"), self.stats.get("std")
        if mean is None or not std:
            raise ConfigError(
                f"reward model {self.path}: reward_stats.json has no mean/std to normalise with "
                "(needed to combine two reward models); retrain or rescore it with `alignforge rm train`"
            )
        return (scores - float(mean)) / float(std)


class CombinedScorer:
    """Two reward models combined as Llama 2 does (Touvron et al. 2023, §3.2.2): a response is scored by
    the safety RM when its prompt is a safety prompt or the safety RM finds it unsafe
    (``sigmoid(z_safety) < threshold``), else by the helpfulness RM; both scores are z-normalised with their
    saved statistics, so the two scales meet. ``last_safety`` holds which rows the safety RM scored.

    Where it departs from Llama 2: the threshold applies to the sigmoid of the z-score (Llama 2 thresholds
    its safety RM's raw output, trained with a margin loss on its own scale), and the combined score is not
    passed through ``whiten(logit(·))``: the z-scores are already on one scale.
    """

    def __init__(self, helpful: RewardScorer, safety: RewardScorer, threshold: float):
        self.helpful, self.safety, self.threshold = helpful, safety, threshold
        self.rm = helpful.rm
        self.last_safety = torch.zeros(0, dtype=torch.bool)

    def __call__(self, prompts: list[Prompt], responses: list[list[int]]) -> torch.Tensor:
        zh = self.helpful.z(self.helpful(prompts, responses))
        zs = self.safety.z(self.safety(prompts, responses))
        flagged = torch.tensor([p.safety for p in prompts], dtype=torch.bool)
        use = flagged | (torch.sigmoid(zs) < self.threshold)
        self.last_safety = use
        return torch.where(use, zs, zh)

    def fingerprint(self) -> str:
        blob = f"{self.helpful.fingerprint()}|{self.safety.fingerprint()}|{self.threshold!r}"
        return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- the trainer


def _gen_cfg(p: PPOParams, seed: int, rows: int, greedy: bool = False):
    from alignforge.inference.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=p.max_new_tokens,
        temperature=0.0 if greedy else p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=seed,
        batch_size=max(1, rows),
        stop_on_eos=not p.ignore_eos,
        share_prompt_prefill=p.share_prompt_prefill,
        sampler=p.sampler,
    )


def _check(cfg: PPOConfig, world: int) -> None:
    from alignforge.errors import ConfigError

    p = cfg.ppo
    if not cfg.data.train_files and not p.safety_prompt_files:
        raise ConfigError("data.train_files is empty: name at least one prompt file")
    if not p.reward_model:
        raise ConfigError("ppo.reward_model is required: a reward model trained with `alignforge rm train`")
    if p.safety_prompt_files and not p.safety_reward_model:
        raise ConfigError("ppo.safety_prompt_files needs ppo.safety_reward_model (the RM that scores those prompts)")
    if p.safety_reward_model and not 0.0 <= p.safety_threshold <= 1.0:
        raise ConfigError(f"ppo.safety_threshold is a probability in [0, 1], got {p.safety_threshold}")
    if p.critic_shared:
        if p.advantage != "gae":
            raise ConfigError(f"ppo.critic_shared=true is for ppo.advantage=gae ({p.advantage} has no critic)")
        if not cfg.lora.enabled:
            raise ConfigError("ppo.critic_shared=true needs a LoRA policy (lora.enabled=true)")
        if cfg.model.gradient_checkpointing:
            raise ConfigError("ppo.critic_shared=true does not work with model.gradient_checkpointing=true")
    if p.advantage in ("grpo", "rloo") and p.samples_per_prompt < 2:
        raise ConfigError(f"ppo.advantage={p.advantage} needs ppo.samples_per_prompt >= 2, got {p.samples_per_prompt}")
    for name in (
        "iterations",
        "prompts_per_iteration",
        "samples_per_prompt",
        "gen_batch_prompts",
        "ppo_epochs",
        "minibatches",
        "forward_batch_size",
        "max_new_tokens",
        "score_batch_size",
    ):
        if getattr(p, name) < 1:
            raise ConfigError(f"ppo.{name} must be >= 1, got {getattr(p, name)}")
    if p.prompts_per_iteration % (p.gen_batch_prompts * world):
        raise ConfigError(
            f"ppo.prompts_per_iteration ({p.prompts_per_iteration}) must be a multiple of "
            f"ppo.gen_batch_prompts × processes ({p.gen_batch_prompts} × {world})"
        )
    if (p.gen_batch_prompts * p.samples_per_prompt) % p.minibatches:
        raise ConfigError(
            f"ppo.minibatches ({p.minibatches}) must divide the rows of a generation block "
            f"(gen_batch_prompts × samples_per_prompt = {p.gen_batch_prompts * p.samples_per_prompt})"
        )
    if p.temperature < 0:
        raise ConfigError(f"ppo.temperature must be >= 0, got {p.temperature}")
    for name in ("sample_every", "snapshot_every"):
        if getattr(p, name) < 0:
            raise ConfigError(f"ppo.{name} must be >= 0 (0 = never), got {getattr(p, name)}")
    if p.ntp_coef > 0 and not p.ntp_file:
        raise ConfigError("ppo.ntp_coef > 0 needs ppo.ntp_file (SFT-format data)")
    if p.adaptive_kl and (p.kl_target <= 0 or p.kl_horizon < 1):
        raise ConfigError("ppo.adaptive_kl needs ppo.kl_target > 0 and ppo.kl_horizon >= 1")


def _fault(kind: str, n: int) -> None:
    """Test hook: ``ALIGNFORGE_FAULT_AFTER_ROLLOUT=N`` kills the process after the rollout of iteration N
    (1-based); the update-phase kill is the shared ``ALIGNFORGE_FAULT_AFTER_STEP``."""
    import os
    import signal

    if kind == "rollout" and os.environ.get("ALIGNFORGE_FAULT_AFTER_ROLLOUT") == str(n):
        os.kill(os.getpid(), signal.SIGKILL)


class _Trainer:
    def __init__(self, cfg: PPOConfig):
        from alignforge.trainers.common import make_accelerator

        self.cfg, self.p = cfg, cfg.ppo
        self.acc = make_accelerator(cfg.train)
        _check(cfg, self.acc.num_processes)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.out = Path(cfg.train.output_dir)
        self.vllm = None  # the vLLM engine when ppo.backend=vllm
        self.guard_lr = cfg.train.lr  # the learning rate of the last update, for the log
        # log-probs of the samples at the sampling temperature (greedy decoding: the model's own distribution)
        self.lp_temperature = cfg.ppo.temperature if cfg.ppo.temperature > 0 else 1.0
        # kl_coef = 0 (the adaptive controller keeps 0 at 0): no reference pass (nor model, unless y_ref needs it)
        self.use_kl = cfg.ppo.kl_coef > 0
        # activation checkpointing recomputes each layer without a cache: no shared prompt forward then
        self.share_forward = cfg.ppo.share_prompt_forward and not cfg.model.gradient_checkpointing

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from alignforge.models.loading import load_model, load_tokenizer
        from alignforge.models.policy import build_policy
        from alignforge.trainers.common import write_data_report

        cfg, p, acc = self.cfg, self.p, self.acc
        self.tok = load_tokenizer(cfg.model.name_or_path)
        self.pad_id = self.tok.pad_token_id
        mpl = cfg.data.max_prompt_length or cfg.data.max_length // 2
        self.prompts, self.prompt_report = load_prompts(
            cfg.data.train_files, self.tok, mpl, cfg.data.overlong, cfg.data.on_error, p.safety_prompt_files
        )
        set_seed(cfg.train.seed)
        self.policy = build_policy(cfg.model, cfg.lora, acc.device)
        if p.backend == "vllm":
            from alignforge.errors import ConfigError
            from alignforge.inference.vllm_backend import VLLMBackend
            from alignforge.models.loading import is_adapter_dir, resolve_model_path

            path = resolve_model_path(cfg.model.name_or_path)
            if is_adapter_dir(path):
                raise ConfigError(
                    "ppo.backend=vllm needs a full model as model.name_or_path, not a LoRA adapter dir: "
                    "merge it first (alignforge merge)"
                )
            self.vllm = VLLMBackend(
                path,
                self.tok,
                gpu_memory_utilization=p.vllm_gpu_memory_utilization,
                seed=cfg.train.seed,
                rank=self.rank,
                world_size=self.world,
            )
        from alignforge.models.lora import adapter_is_identity

        # the reference: a fresh LoRA adapter switched off (no second copy), else a frozen copy of the
        # model as loaded (or of ppo.ref_model)
        self.lora = not p.ref_model and adapter_is_identity(self.policy)
        self.ref = None
        if not self.lora and self.needs_reference():
            self.ref = load_model(p.ref_model or cfg.model.name_or_path).to(acc.device).eval()
            for q in self.ref.parameters():
                q.requires_grad_(False)
        share = p.share_prompt_forward
        self.scorer = RewardScorer(p.reward_model, self.tok, acc.device, p.score_batch_size, share)
        if p.safety_reward_model:
            safety = RewardScorer(p.safety_reward_model, self.tok, acc.device, p.score_batch_size, share)
            self.scorer = CombinedScorer(self.scorer, safety, p.safety_threshold)
        self.critic = None
        if p.advantage == "gae":
            from alignforge.models.value import load_value_model

            if p.critic_shared:
                from alignforge.models.value import SharedValueModel

                self.critic = SharedValueModel(self.policy)
            else:
                self.critic = load_value_model(p.reward_model if p.critic_init == "rm" else cfg.model.name_or_path)
            self.critic.to(acc.device)
        if p.filter_samples > 0:
            self.filter_prompts()
        if not self.prompts:
            from alignforge.errors import ConfigError

            raise ConfigError(f"no prompts left ({self.prompt_report.summary()})")
        write_data_report(acc, self.out, self.prompt_report.summary())
        self.ref_rewards = self.reference_rewards() if p.reference_reward else None
        self.ntp = None
        if p.ntp_coef > 0:
            from alignforge.data.tokenize import load_sft_dataset

            self.ntp, rep = load_sft_dataset(
                p.ntp_file, self.tok, cfg.data.max_length, overlong=cfg.data.overlong, on_error=cfg.data.on_error
            )
            if not self.ntp:
                from alignforge.errors import ConfigError

                raise ConfigError(f"ppo.ntp_file {p.ntp_file}: no usable examples ({rep.summary()})")

    def needs_reference(self) -> bool:
        """Whether the reference policy is used at all: for the KL term (``kl_coef > 0``) or for ``y_ref``."""
        return self.use_kl or self.p.reference_reward

    def reuses_update_logps(self, model) -> bool:
        """True when the rollout's own log-prob pass can be skipped: one update per rollout (``ppo_epochs = 1``,
        ``minibatches = 1``), so the update runs on the rollout's weights and ``π_old = π_θ``; no KL term (which
        needs ``logπ_old`` before the update); and no dropout in the policy (which would make the train-mode
        log-probs differ from the eval-mode ones). The update then uses its own detached log-probs as
        ``logπ_old`` (the ratio is exactly 1, as TRL does it), instead of a second pass that gives the same
        values up to rounding."""
        p = self.p
        if self.use_kl or p.ppo_epochs != 1 or p.minibatches != 1:
            return False
        from alignforge.models.lora import unwrap_base

        cfg = getattr(unwrap_base(model), "config", None)
        if any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout")):
            return False
        return not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())

    def reference_policy(self):
        from contextlib import nullcontext

        from alignforge.models.lora import reference_mode

        return reference_mode(self.policy) if self.lora else nullcontext(self.ref)

    # ----------------------------------------------------------------- generation
    def generate(self, model, rows: list[list[int]], seed: int, greedy: bool = False):
        from alignforge.inference.generate import HFBackend

        if self.vllm is not None and model is self.policy:  # the engine holds the policy's current weights
            return self.vllm.generate_from_ids(rows, _gen_cfg(self.p, seed, len(rows), greedy))
        with self.acc.autocast():
            return HFBackend(model, self.tok).generate_from_ids(rows, _gen_cfg(self.p, seed, len(rows), greedy))

    def my_blocks(self, n_prompts: int) -> list[int]:
        """Global block indices this rank handles (contiguous, whole blocks)."""
        nb = n_prompts // self.p.gen_batch_prompts
        per = nb // self.world
        return list(range(self.rank * per, (self.rank + 1) * per))

    def reference_rewards(self) -> torch.Tensor:
        """``r(x, y_ref)`` for every prompt: y_ref is the reference model's answer, cached on disk."""
        from accelerate.utils import gather_object

        from alignforge.models.loading import cache_dir, model_fingerprint
        from alignforge.trainers.common import examples_digest

        p = self.p
        with self.reference_policy() as ref:
            fp = model_fingerprint(ref)
        blob = json.dumps(
            {
                "ref": fp,
                "rm": self.scorer.fingerprint(),
                "prompts": examples_digest(self.prompts),
                **({"safety": [q.safety for q in self.prompts]} if self.p.safety_reward_model else {}),
                "greedy": p.ref_greedy,
                "temperature": p.temperature,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "max_new_tokens": p.max_new_tokens,
                "ignore_eos": p.ignore_eos,
                "gen_batch_prompts": p.gen_batch_prompts,
                "seed": self.cfg.train.seed,
                "precision": str(self.acc.mixed_precision),
            },
            sort_keys=True,
        )
        key = hashlib.sha256(blob.encode()).hexdigest()[:24]
        path = cache_dir() / "ppo_ref" / f"{key}.pt"
        if path.is_file():
            self.acc.print(f"reference responses from cache {path}")
            data = torch.load(path)
        else:
            self.acc.print(f"generating reference responses for {len(self.prompts)} prompts (cached at {path})")
            G = p.gen_batch_prompts
            blocks = list(range(self.rank, -(-len(self.prompts) // G), self.world))
            mine = []
            with self.reference_policy() as ref:
                for b in blocks:
                    idx = list(range(b * G, min(len(self.prompts), (b + 1) * G)))
                    gens = self.generate(
                        ref,
                        [self.prompts[j].ids for j in idx],
                        mix_seed(self.cfg.train.seed, -1, b),
                        greedy=p.ref_greedy,
                    )
                    resp = [g.response_ids for g in gens]
                    with self.acc.autocast():
                        r = self.scorer([self.prompts[j] for j in idx], resp)
                    mine += [(j, rr, float(s)) for j, rr, s in zip(idx, resp, r, strict=False)]
            allr = sorted(gather_object(mine) if self.world > 1 else mine)
            data = {"responses": [x[1] for x in allr], "rewards": torch.tensor([x[2] for x in allr])}
            if self.acc.is_main_process:
                import os

                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(data, tmp)
                os.replace(tmp, path)
        self.ref_responses = data["responses"]
        return data["rewards"].float()

    def filter_prompts(self) -> None:
        """Drop prompts whose ``filter_samples`` sampled answers get reward variance < ``filter_eps``."""
        from accelerate.utils import gather_object

        p, K, G = self.p, self.p.filter_samples, self.p.gen_batch_prompts
        if K < 2:
            from alignforge.errors import ConfigError

            raise ConfigError(f"ppo.filter_samples must be >= 2 to measure a variance, got {K}")
        mine = []
        for b in range(self.rank, -(-len(self.prompts) // G), self.world):
            idx = list(range(b * G, min(len(self.prompts), (b + 1) * G)))
            rows = [self.prompts[j].ids for j in idx for _ in range(K)]
            gens = self.generate(self.policy, rows, mix_seed(self.cfg.train.seed, -2, b))
            with self.acc.autocast():
                r = self.scorer([self.prompts[j] for j in idx for _ in range(K)], [g.response_ids for g in gens])
            var = r.view(-1, K).var(dim=1, unbiased=False)
            mine += [(j, float(v)) for j, v in zip(idx, var, strict=False)]
        allv = sorted(gather_object(mine) if self.world > 1 else mine)
        keep = [j for j, v in allv if v >= p.filter_eps]
        self.prompt_report.dropped_filter = len(self.prompts) - len(keep)
        self.prompts = [self.prompts[j] for j in keep]
        self.prompt_report.kept = len(self.prompts)
        if self.acc.is_main_process:
            from alignforge.data.convert import write_jsonl

            self.out.mkdir(parents=True, exist_ok=True)
            write_jsonl(({"prompt": q.messages} for q in self.prompts), self.out / "kept_prompts.jsonl")

    # ----------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(self, it: int, module: ActorCritic) -> dict:
        from alignforge.losses.ppo import gae, group_advantages, kl_estimate, token_rewards, whiten

        p, acc = self.p, self.acc
        K, G = p.samples_per_prompt, p.gen_batch_prompts
        glob = iteration_prompts(it, len(self.prompts), p.prompts_per_iteration, self.cfg.train.seed)
        t0 = time.perf_counter()
        blocks, prompts, responses, finished, greedy_resp = [], [], [], [], []
        policy = module.policy
        for b in self.my_blocks(len(glob)):
            idx = glob[b * G : (b + 1) * G]
            rows = [self.prompts[j] for j in idx for _ in range(K)]
            gens = self.generate(policy, [r.ids for r in rows], mix_seed(self.cfg.train.seed, it, b))
            blocks.append((b, len(prompts), len(rows)))
            prompts += [(j, r) for j, r in zip([j for j in idx for _ in range(K)], rows, strict=False)]
            responses += [g.response_ids for g in gens]
            finished += [g.finished for g in gens]
            if p.advantage == "remax":
                greedy_resp += [
                    g.response_ids for g in self.generate(policy, [self.prompts[j].ids for j in idx], 0, greedy=True)
                ]
        gen_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        recs = [r for _, r in prompts]
        with acc.autocast():
            raw = self.scorer(recs, responses)
            safety_used = getattr(self.scorer, "last_safety", None)
            if p.advantage == "remax":
                base_g = self.scorer(
                    [self.prompts[j] for b in self.my_blocks(len(glob)) for j in glob[b * G : (b + 1) * G]], greedy_resp
                )
        if not bool(torch.isfinite(raw).all()):
            from alignforge.errors import TrainingError

            raise TrainingError(
                f"non-finite reward at iteration {it + 1}; stopped before the update, {self.ck.last_good()}"
            )
        score = raw.clone()
        if self.ref_rewards is not None:
            score = score - self.ref_rewards[[j for j, _ in prompts]]
        ids_p = [r.ids for r in recs]
        old_lp, ref_lp, values, masks = [], [], [], []
        B = p.forward_batch_size
        need_old = not self.reuses_update_logps(policy)
        module.eval()
        with acc.autocast():
            for s in range(0, len(recs), B):
                batch = self.make_batch(ids_p[s : s + B], responses[s : s + B])
                if need_old:
                    lp, _ = response_logps(policy, batch, self.lp_temperature)
                    old_lp.append(lp.float().cpu())
                if self.use_kl:
                    with self.reference_policy() as ref:
                        rl, _ = response_logps(ref, batch, self.lp_temperature)
                    ref_lp.append(rl.float().cpu())
                masks.append(batch["resp_mask"].cpu())
                if module.critic is not None:
                    values.append(response_values(module.critic, batch).float().cpu())
        module.train()
        R = max(m.shape[1] for m in masks)

        def cat(xs):
            return torch.cat([torch.nn.functional.pad(x, (0, R - x.shape[1])) for x in xs]) if xs else None

        old_lp, ref_lp, mask = cat(old_lp), cat(ref_lp), cat(masks)
        m = mask.float()
        kl = kl_estimate(old_lp, ref_lp, p.kl_estimator) * m if self.use_kl else torch.zeros_like(m)
        beta = self.kl_coef if p.kl_in == "reward" else 0.0
        if p.advantage == "gae":
            vals = cat(values)
            rewards = token_rewards(score, kl, mask, beta)
            adv, ret = gae(rewards, vals, mask, p.gamma, p.lam)
        else:
            if p.advantage == "remax":  # r(x, y) - r(x, greedy answer of the current policy)
                seq_adv = raw - base_g.repeat_interleave(K)
            else:
                seq_adv = group_advantages(score, K, p.advantage, norm_std=p.grpo_norm_std)
            rewards = token_rewards(seq_adv, kl, mask, beta)
            adv, _ = gae(rewards, torch.zeros_like(rewards), mask, p.gamma, 1.0)
            vals = ret = torch.zeros_like(adv)
        if p.whiten_advantages:
            adv = whiten(adv, mask)
        score_s = time.perf_counter() - t1
        _fault("rollout", it + 1)
        lens = m.sum(1)
        return {
            "blocks": blocks,
            "prompt_idx": [j for j, _ in prompts],
            "prompt_ids": ids_p,
            "responses": responses,
            "old_lp": old_lp,
            "ref_lp": ref_lp,
            "mask": mask,
            "adv": adv,
            "ret": ret,
            "values": vals,
            "raw": raw,
            "score": score,
            "safety_used": safety_used,
            "finished": finished,
            "kl": kl,
            "lens": lens,
            "gen_s": gen_s,
            "score_s": score_s,
        }

    # ----------------------------------------------------------------- update
    def make_batch(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        """:func:`right_pad` (+ :func:`share_prompts` with ``ppo.share_prompt_forward``), on the device."""
        batch = right_pad(prompts, responses, self.pad_id)
        if self.share_forward:
            batch = share_prompts(batch, prompts, self.pad_id)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def minibatch_rows(self, ro: dict, it: int, epoch: int, mb: int) -> list[int]:
        """Local row indices of global minibatch ``mb``: chunk ``mb`` of a seeded shuffle of every block."""
        out = []
        for b, start, n in ro["blocks"]:
            g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, it, epoch, b))
            perm = torch.randperm(n, generator=g).tolist()
            c = n // self.p.minibatches
            out += [start + k for k in perm[mb * c : (mb + 1) * c]]
        return out

    def ntp_rows(self, update: int) -> list[int]:
        from alignforge.trainers.common import micro_slice, step_indices

        Bn = self.p.ntp_batch_size
        idx = step_indices(update, len(self.ntp), Bn * self.world, self.cfg.train.seed)
        return micro_slice(idx, 0, self.rank, self.world, Bn)

    def update(self, it: int, ro: dict, module, optimizer, scheduler, guard) -> dict:
        import contextlib

        from alignforge.losses.ppo import kl_estimate, policy_loss, value_loss

        p, acc = self.p, self.acc
        sums: dict[str, float] = {}

        def add(k, v):
            sums[k] = sums.get(k, 0.0) + float(v)

        for epoch in range(p.ppo_epochs):
            for mb in range(p.minibatches):
                rows = self.minibatch_rows(ro, it, epoch, mb)
                if self.share_forward and p.samples_per_prompt > 1:  # a prompt's K rows side by side: shared forwards
                    rows = sorted(rows, key=lambda r: ro["prompt_idx"][r])
                n_tok = torch.tensor(float(ro["mask"][rows].sum()), device=acc.device)
                n_tok = max(float(acc.reduce(n_tok, "sum")), 1.0)
                chunks = [rows[s : s + p.forward_batch_size] for s in range(0, len(rows), p.forward_batch_size)]
                ntp_batch = ntp_norm = None
                if self.ntp is not None:
                    from alignforge.data.collate import collate_sft

                    ntp_ex = [self.ntp[k] for k in self.ntp_rows(self.update_step)]
                    ntp_batch = {k: v.to(acc.device) for k, v in collate_sft(ntp_ex, self.pad_id).items()}
                    nt = torch.tensor(float(ntp_batch["target_mask"].sum()), device=acc.device)
                    ntp_norm = max(float(acc.reduce(nt, "sum")), 1.0)
                loss_total = 0.0
                # one autocast region per optimiser step: each weight is cast to bf16 once, not once per micro-batch
                with acc.autocast():
                    for ci, ch in enumerate(chunks):
                        last = ci == len(chunks) - 1
                        batch = self.make_batch([ro["prompt_ids"][r] for r in ch], [ro["responses"][r] for r in ch])
                        Rb = batch["resp_mask"].shape[1]
                        sl = {
                            k: ro[k][ch][:, :Rb].to(acc.device)
                            for k in ("old_lp", "ref_lp", "adv", "ret", "values")
                            if ro[k] is not None
                        }
                        mask = batch["resp_mask"]
                        sync = contextlib.nullcontext() if last else acc.no_sync(module)
                        with sync:
                            lp, ent, vals, ntp_lp = module(  # the entropy needs a graph only for an entropy bonus
                                batch,
                                self.lp_temperature,
                                True,
                                ntp_batch if last else None,
                                entropy_grad=bool(p.ent_coef),
                            )
                            lp = lp.float()
                            old = sl["old_lp"] if "old_lp" in sl else lp.detach()  # see reuses_update_logps
                            pl, pm = policy_loss(lp, old, sl["adv"], mask, p.clip)
                            loss = pl.sum()
                            add("policy_loss", pl.sum().detach())
                            add("clipped", pm["clipped"])
                            add("approx_kl", pm["approx_kl"])
                            add("entropy", ent.detach().float().sum())
                            if vals is not None:
                                vl, vm = value_loss(vals.float(), sl["values"], sl["ret"], mask, p.vf_clip)
                                loss = loss + p.vf_coef * vl.sum()
                                add("value_loss", vl.sum().detach())
                                add("vf_clipped", vm["vf_clipped"])
                            if p.kl_in == "loss" and self.kl_coef > 0:
                                kk = kl_estimate(lp, sl["ref_lp"], p.kl_estimator) * mask
                                loss = loss + self.kl_coef * kk.sum()
                            if p.ent_coef:
                                loss = loss - p.ent_coef * ent.float().sum()
                            loss = loss / n_tok
                            if ntp_lp is not None:
                                from alignforge.losses.sft import nll_loss

                                nl, nm = nll_loss(ntp_lp.float(), ntp_batch["target_mask"], ntp_norm)
                                loss = loss + p.ntp_coef * nl
                                add("ntp_nll", nm["nll_sum"])
                                add("ntp_tokens", nm["n_tokens"])
                            acc.backward(loss * self.world)
                        loss_total += float(loss.detach())
                step_loss = float(acc.reduce(torch.tensor(loss_total, device=acc.device), "sum"))
                gnorm = guard(step_loss, f"iteration {it + 1} (update {self.update_step + 1})")
                self.guard_lr = guard.last_lr
                add("grad_norm", gnorm)
                add("updates", 1)
                add("tokens", n_tok)
                self.update_step += 1
                from alignforge.trainers.common import fault_hook

                fault_hook(self.update_step)
        return sums

    # ----------------------------------------------------------------- main
    def run(self) -> dict:
        from alignforge.errors import TrainingInterrupted
        from alignforge.losses.ppo import adaptive_kl_coef
        from alignforge.trainers.common import (
            Checkpointer,
            GuardedStep,
            Logger,
            build_optimizer,
            examples_digest,
            sigint_flag,
            write_metrics,
        )

        cfg, p, acc = self.cfg, self.p, self.acc
        self.setup()
        total_updates = p.iterations * p.ppo_epochs * p.minibatches
        module = ActorCritic(self.policy, self.critic)
        optimizer, scheduler = build_optimizer(module, cfg.train, total_updates)
        module, optimizer = acc.prepare(module, optimizer)
        acc.register_for_checkpointing(scheduler)
        unwrapped = acc.unwrap_model(module)
        shape = {
            "prompts_per_iteration": p.prompts_per_iteration,
            "samples_per_prompt": p.samples_per_prompt,
            "gen_batch_prompts": p.gen_batch_prompts,
            "minibatches": p.minibatches,
            "ppo_epochs": p.ppo_epochs,
            "world_size": self.world,
            "seed": cfg.train.seed,
            "n_examples": len(self.prompts),
            "examples_digest": examples_digest(self.prompts),
            "total_steps": p.iterations,
        }
        self.ck = ck = Checkpointer(acc, cfg.train, shape, p.iterations)
        self.kl_coef = p.kl_coef
        self.update_step, it, history = 0, 0, []
        state = ck.resume() if cfg.train.resume else None
        if state is not None:
            it, history = state["step"], state["history"]
            self.update_step, self.kl_coef = state["update_step"], state["kl_coef"]
        if self.vllm is not None:
            self.vllm.sync_weights(unwrapped.policy)  # the weights at the start of iteration `it`
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            from alignforge.config import dump_config

            dump_config(cfg, self.out / "config.yaml")
            drop_later_samples(self.out / "samples.jsonl", it)
        guard = GuardedStep(acc, module, optimizer, scheduler, cfg.train, ck.last_good)
        logger = Logger(
            acc,
            cfg.train,
            p.iterations,
            it,
            history,
            label="ppo",
            rate_key="reward",
            rate_label="reward",
            rate_format="+.3f",
        )
        try:
            with sigint_flag() as sigint:
                while it < p.iterations:
                    torch.manual_seed(mix_seed(cfg.train.seed, it, self.rank, 7))  # dropout etc.: pure per iteration
                    ro = self.rollout(it, unwrapped)
                    t2 = time.perf_counter()
                    sums = self.update(it, ro, module, optimizer, scheduler, guard)
                    if self.vllm is not None:
                        self.vllm.sync_weights(unwrapped.policy)
                    train_s = time.perf_counter() - t2
                    row = self.metrics(it, ro, sums, train_s)
                    if p.adaptive_kl and self.use_kl:
                        self.kl_coef = adaptive_kl_coef(
                            self.kl_coef,
                            row["kl_ref"],
                            p.kl_target,
                            p.kl_horizon,
                            p.prompts_per_iteration * p.samples_per_prompt,
                        )
                    it += 1
                    logger.log(row)
                    if p.sample_every and (it % p.sample_every == 0 or it == 1):
                        self.write_samples(it, ro)
                    extra = {"update_step": self.update_step, "kl_coef": self.kl_coef}
                    saved = (cfg.train.save_every > 0 and it % cfg.train.save_every == 0) or it == p.iterations
                    if saved:
                        ck.save(it, history, extra)
                    if p.snapshot_every and it % p.snapshot_every == 0:
                        ck.save_model(f"snapshots/iter-{it:08d}", lambda tmp: self._save_policy(unwrapped, tmp))
                    stop = sigint["set"]
                    if self.world > 1:
                        flag = torch.tensor(1.0 if stop else 0.0, device=acc.device)
                        stop = float(acc.reduce(flag, "sum")) > 0
                    if stop:
                        if not saved:
                            ck.save(it, history, extra)
                        raise TrainingInterrupted(
                            f"interrupted: checkpoint saved at {ck.last_saved}; continue with train.resume=true"
                        )
        finally:
            logger.close()
            if acc.is_main_process and history:
                write_metrics(history, self.out)
        final = ck.save_final(lambda tmp: self._save_policy(unwrapped, tmp), history, title="PPO")
        return {
            "step": it,
            "final_dir": str(final),
            "history": history,
            "resumed_from": ck.resumed_from,
            "data_report": self.prompt_report.summary(),
            "config": asdict(cfg),
        }

    def _save_policy(self, unwrapped: ActorCritic, out: Path) -> None:
        from alignforge.models.lora import save_trained

        save_trained(unwrapped.policy, self.tok, out)

    def metrics(self, it: int, ro: dict, sums: dict, train_s: float) -> dict:
        acc, p = self.acc, self.p
        m = ro["mask"].float()
        n_seq = float(m.shape[0])
        local = {
            "n_seq": n_seq,
            "reward_raw": float(ro["raw"].sum()),
            "reward": float(ro["score"].sum()),
            "kl_ref": float(ro["kl"].sum()),
            "response_len": float(ro["lens"].sum()),
            "cut": float(sum(1 for f in ro["finished"] if not f)),
        }
        if ro["safety_used"] is not None:
            local["safety_rm"] = float(ro["safety_used"].sum())
        if ro["ref_lp"] is not None:
            local["kl_k1"] = float(((ro["old_lp"] - ro["ref_lp"]) * m).sum())
        keys = sorted(local)
        t = acc.reduce(torch.tensor([local[k] for k in keys], dtype=torch.float64, device=acc.device), "sum")
        g = dict(zip(keys, t.tolist(), strict=False))
        keys2 = sorted(sums)
        t2 = acc.reduce(torch.tensor([sums[k] for k in keys2], dtype=torch.float64, device=acc.device), "sum")
        s = dict(zip(keys2, t2.tolist(), strict=False))
        N = g["n_seq"]
        tok = max(s.get("tokens", 1.0) / self.world, 1.0)  # every rank added the same global count
        ups = max(s.get("updates", 1.0) / self.world, 1.0)
        row = {
            "step": it + 1,
            "reward_raw": g["reward_raw"] / N,
            "reward": g["reward"] / N,
            "response_len": g["response_len"] / N,
            "cut_share": g["cut"] / N,
            "policy_loss": s.get("policy_loss", 0.0) / tok,
            "clip_frac": s.get("clipped", 0.0) / tok,
            "approx_kl": s.get("approx_kl", 0.0) / tok,
            "entropy": s.get("entropy", 0.0) / tok,
            "grad_norm": s.get("grad_norm", 0.0) / self.world / ups,
            "kl_coef": self.kl_coef,
            "gen_s": ro["gen_s"],
            "score_s": ro["score_s"],
            "train_s": train_s,
            "lr": self._lr(),
        }
        if "safety_rm" in g:  # the share of responses the safety reward model scored
            row["safety_share"] = g["safety_rm"] / N
        if "kl_k1" in g:  # no reference pass when kl_coef = 0
            row["kl_ref"] = g["kl_k1"] / N
        row["loss"] = row["policy_loss"]
        if "value_loss" in s:
            row["value_loss"] = s["value_loss"] / tok
            row["vf_clip_frac"] = s.get("vf_clipped", 0.0) / tok
            row["loss"] = row["policy_loss"] + p.vf_coef * row["value_loss"]
        if "ntp_nll" in s:
            row["ntp_loss"] = s["ntp_nll"] / max(s.get("ntp_tokens", 1.0), 1.0)
        return row

    def _lr(self) -> float:
        return float(self.guard_lr)

    def write_samples(self, it: int, ro: dict) -> None:
        if not self.acc.is_main_process:
            return
        n = min(self.p.n_samples_logged, len(ro["responses"]))
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
            for k in range(n):
                f.write(
                    json.dumps(
                        {
                            "step": it,
                            "prompt": self.tok.decode(ro["prompt_ids"][k], skip_special_tokens=False),
                            "response": self.tok.decode(ro["responses"][k], skip_special_tokens=True),
                            "reward_raw": float(ro["raw"][k]),
                            "reward": float(ro["score"][k]),
                            "n_tokens": len(ro["responses"][k]),
                            "finished": bool(ro["finished"][k]),
                            **({"safety_rm": bool(ro["safety_used"][k])} if ro["safety_used"] is not None else {}),
                        }
                    )
                    + "\n"
                )


def drop_later_samples(path: Path, iteration: int) -> None:
    """On resume, drop the sample rows that iterations after ``iteration`` wrote (they are rerun)."""
    if not path.is_file():
        return
    rows = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    keep = [x for x in rows if json.loads(x)["step"] <= iteration]
    if len(keep) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        tmp.replace(path)


def train_ppo(cfg: PPOConfig) -> dict:
    """Run PPO (or GRPO / RLOO / ReMax) as configured; returns the loop summary."""
    return _Trainer(cfg).run()
