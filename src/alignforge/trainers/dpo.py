"""Pairwise offline preference optimisation: DPO (+NTP), cDPO and IPO (METHODS.md §1d, §4).

Each pair is packed into one sequence ``[prompt | chosen | rejected]`` with a block attention mask,
so the prompt is computed once, and the 49k-vocabulary LM head is applied only at response
tokens (``models/packing.py``). Reference log-probs are computed once before training with the
initial policy, the model as loaded (with a fresh LoRA adapter: the adapter-disabled base), on the
accelerator's device, each process its share, and cached on disk (``models/refcache.py``); no
reference model is held during training.

Where this departs from the papers:

* ChatGLM-RLHF trains DPO on pairs that its reward model labels (best/worst of K samples); that
  data step is ``alignforge dpo-data``. This trainer takes any preference file.
* Whether ChatGLM-RLHF adds an SFT/NTP term to DPO is not determinable [unv]. ``dpo.ntp_coef``
  (default 0) adds ``α·(−mean-token log π(y_w|x))`` per pair (the "DPO+NTP" variant).
* Log-probs are summed over response tokens by default for the sigmoid loss and cDPO (DPO paper,
  TRL) and averaged per token for IPO (IPO paper, TRL); an explicit ``dpo.logp_reduction`` wins.
* IPO uses β as τ (``(Δ − 1/(2β))²``), as TRL does.
* Length levers (not in the DPO paper): ``dpo.logp_reduction=mean`` is *length-normalised DPO*: the
  policy and reference log-probs of each response are divided by its token count before the margin,
  so ``h`` is a per-token mean log-ratio (the reduction ULMA uses). ``dpo.simpo_gamma`` γ (default
  0) is a SimPO-style target margin, ``-log σ(βΔ − γ)`` (sigmoid loss and cDPO only). SimPO itself is
  reference-free and always length-normalised; here the reference stays in ``h`` and the reduction is
  the separate ``logp_reduction`` option, so ``logp_reduction=mean simpo_gamma=γ`` is SimPO's margin
  loss on reference-corrected per-token log-ratios.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from alignforge.config import DataConfig, LoraConfig, ModelConfig, TrainConfig


@dataclass
class DPOParams:
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # > 0: conservative DPO (cDPO)
    ntp_coef: float = 0.0  # DPO+NTP: weight of the NLL on chosen responses
    logp_reduction: Optional[Literal["sum", "mean"]] = None  # unset: sum (sigmoid, cDPO), mean (ipo)
    simpo_gamma: float = 0.0  # SimPO-style target margin: -log sigma(beta*delta - gamma) (sigmoid loss only)
    ref_model: Optional[str] = None  # default: the initial policy, as loaded (a fresh LoRA adapter disabled)
    ref_batch_size: int = 8


@dataclass
class DPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="outputs/dpo", lr=1e-6, group_by_length=True)
    )
    dpo: DPOParams = field(default_factory=DPOParams)


@dataclass
class PairWithRef:
    pair: object  # TokenizedPair
    ref_chosen: float  # summed reference log-probs
    ref_rejected: float


def resolve_logp_reduction(params: DPOParams) -> str:
    """``dpo.logp_reduction``, or the loss's default when unset: per-token mean for IPO, sum otherwise."""
    if params.logp_reduction is not None:
        return params.logp_reduction
    return "mean" if params.loss_type == "ipo" else "sum"


def reduce_logps(sums: torch.Tensor, counts: torch.Tensor, how: str) -> torch.Tensor:
    return sums / counts.clamp(min=1) if how == "mean" else sums


@torch.no_grad()
def pair_logps(lm, pairs: list, pad_id: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Summed response log-probs and token counts of ``pairs`` under ``lm`` (no grad, eval mode)."""
    from alignforge.models.packing import pack_pairs, packed_response_logps

    was = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    outs: dict[str, list] = {}
    for i in range(0, len(pairs), batch_size):
        b = {k: v.to(device) for k, v in pack_pairs(pairs[i : i + batch_size], pad_id).items()}
        for k, v in packed_response_logps(lm, b).items():
            outs.setdefault(k, []).append(v.cpu())
    lm.train(was)
    return {k: torch.cat(v) for k, v in outs.items()}


def reference_logps(lm, pairs: list, pad_id: int, params: DPOParams, accelerator) -> dict[str, torch.Tensor]:
    """Reference log-probs for every pair: from the disk cache, or computed once and cached.

    Computed on ``accelerator.device`` (where ``lm`` must already be) under the training autocast,
    each process its share of the pairs (``models/refcache.py``)."""
    from alignforge.models.refcache import (
        cache_key,
        examples_digest,
        load_or_compute,
        reference_fingerprint,
        reference_policy,
    )

    with reference_policy(lm, params.ref_model, accelerator.device) as ref:

        def compute(idx: list[int]):
            # in the training precision (half the time of fp32 under bf16). Step-0 log-ratios are then exactly
            # 0 when the reference and training batches have the same shapes; otherwise bf16 rounding differs
            # with the padded shape, about as much as against an fp32 reference (16 HH pairs: step-0 loss
            # 0.698834 vs 0.698836 with an fp32 reference; mean |Δ logp| 0.16 vs 0.18)
            with accelerator.autocast():
                return pair_logps(ref, [pairs[i] for i in idx], pad_id, params.ref_batch_size)

        digest = examples_digest(pairs, ("prompt_ids", "chosen_ids", "rejected_ids"))
        key = cache_key(
            reference_fingerprint(ref), digest, {"kind": "pairs", "precision": str(accelerator.mixed_precision)}
        )
        values, _ = load_or_compute(key, compute, accelerator, echo=accelerator.print, n=len(pairs))
    return values


def collate_pairs(examples: list, pad_id: int) -> dict:
    from alignforge.models.packing import pack_pairs

    batch = pack_pairs([e.pair for e in examples], pad_id)
    batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in examples], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in examples], dtype=torch.float32)
    return batch


def make_loss(params: DPOParams):
    from alignforge.losses.preference import dpo_loss

    how = resolve_logp_reduction(params)

    def loss_fn(module, batch: dict, normalizer: float):
        out = module(batch)
        nc, nr = out["chosen_tokens"], out["rejected_tokens"]
        pc = reduce_logps(out["chosen_logps"], nc, how)
        pr = reduce_logps(out["rejected_logps"], nr, how)
        rc = reduce_logps(batch["ref_chosen"], nc, how)
        rr = reduce_logps(batch["ref_rejected"], nr, how)
        losses, m = dpo_loss(
            pc,
            pr,
            rc,
            rr,
            beta=params.beta,
            label_smoothing=params.label_smoothing,
            loss_type=params.loss_type,
            margin=params.simpo_gamma,
        )
        loss = losses.sum()
        nll = -(out["chosen_logps"] / nc.clamp(min=1))
        if params.ntp_coef:
            loss = loss + params.ntp_coef * nll.sum()
        metrics = {k: v.sum() for k, v in m.items()}
        metrics.update(
            {
                "logps_chosen": out["chosen_logps"].detach().sum(),
                "logps_rejected": out["rejected_logps"].detach().sum(),
                "nll_chosen": nll.detach().sum(),
                # sequence-level KL estimate on the data responses: mean of log pi/pi_ref
                "kl_data": (
                    (out["chosen_logps"] - batch["ref_chosen"] + out["rejected_logps"] - batch["ref_rejected"]).detach()
                    / 2
                ).sum(),
            }
        )
        return loss / normalizer, metrics

    return loss_fn


def train_dpo(cfg: DPOConfig) -> dict:
    """Run DPO as configured; returns the loop summary (``final_dir`` holds the model or adapter)."""
    from accelerate.utils import set_seed

    from alignforge.data.tokenize import load_preference_dataset
    from alignforge.errors import ConfigError
    from alignforge.inference.probe import policy_probe
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.lora import save_trained
    from alignforge.models.packing import PackedPairLogProbs
    from alignforge.models.policy import build_policy
    from alignforge.trainers.common import Task, make_accelerator, run_training, sub_state_dict, write_data_report

    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: name at least one preference file")
    if cfg.dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0, got {cfg.dpo.beta}")
    if cfg.dpo.simpo_gamma and cfg.dpo.loss_type != "sigmoid":
        raise ConfigError("dpo.simpo_gamma is a margin of the sigmoid loss; IPO (dpo.loss_type=ipo) has its own target")
    accelerator = make_accelerator(cfg.train)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    pairs, report = load_preference_dataset(
        cfg.data.train_files,
        tokenizer,
        cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        overlong=cfg.data.overlong,
        on_error=cfg.data.on_error,
    )
    write_data_report(accelerator, cfg.train.output_dir, report.summary())

    set_seed(cfg.train.seed)
    model = build_policy(cfg.model, cfg.lora, accelerator.device)
    pad_id = tokenizer.pad_token_id  # load_tokenizer sets one (eos) when the model has none
    ref = reference_logps(model, pairs, pad_id, cfg.dpo, accelerator)
    examples = [
        PairWithRef(p, float(c), float(r))
        for p, c, r in zip(pairs, ref["chosen_logps"], ref["rejected_logps"], strict=False)
    ]

    def save(unwrapped, out: Path, state_dict: dict | None = None) -> None:  # state_dict: under FSDP
        lm_state = None if state_dict is None else sub_state_dict(state_dict, "lm.")
        save_trained(unwrapped.lm, tokenizer, out, state_dict=lm_state)

    task = Task(
        module=PackedPairLogProbs(model),
        examples=examples,
        collate=lambda ex: collate_pairs(ex, pad_id),
        normalizer=len,
        loss=make_loss(cfg.dpo),
        save_model=save,
        lengths=[len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs],
        probe=policy_probe(cfg.train, tokenizer, [p.prompt_ids for p in pairs]),
    )
    summary = run_training(task, cfg.train, accelerator, run_config=cfg, title="DPO")
    summary["data_report"] = report.summary()
    summary["config"] = asdict(cfg)
    return summary
