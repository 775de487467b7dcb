"""Point-wise preference optimisation: ULMA, point-wise DPO, and KTO as the peer baseline (METHODS.md §3).

Data are point-wise ``{prompt, completion, label}`` (bool or float in [0, 1]); a preference file
is converted on the fly (chosen → 1, rejected → 0). Reference log-probs are computed once with
the initial policy, as loaded (with a fresh LoRA adapter: the adapter-disabled base), and cached on disk.

* ``ulma``: SFT on positives (z = 1) plus ``-log σ(-βh - c)`` on the others (binary) or
  ``(z - βh - c)²`` (continuous). Positives and negatives are each averaged over their own count
  in the global batch (as the ULMA code averages per subset); an empty subset adds 0, never NaN.
* ``pointwise_dpo``: the log-loss (binary) or regression (continuous) on ``βh + c`` for all samples.
* ``kto``: ``λ_y − v(x, y)``.

Where this departs from the papers / code:

* ULMA's code averages log-probs per token (``average_log_prob=True``); so does
  ``ulma.logp_reduction: mean`` (the default here); ``sum`` is available.
* ``label_type: auto`` treats labels that are all 0/1 as binary, anything else as continuous.
* KTO's reference point z0 is estimated from *mismatched* pairs in the paper and TRL; here it is
  the detached mean of ``h`` over the micro-batch, clamped at 0 (no extra forward passes).
  KTO is a baseline here, not a method of the three papers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from alignforge.config import DataConfig, LoraConfig, ModelConfig, TrainConfig


@dataclass
class ULMAParams:
    loss: Literal["ulma", "pointwise_dpo", "kto"] = "ulma"
    beta: float = 0.1
    c: float = 0.0  # stands in for beta*log Z(x); the ULMA code's ulma_constant_zx (default 0)
    label_type: Literal["auto", "binary", "continuous"] = "auto"
    logp_reduction: Literal["mean", "sum"] = "mean"
    kto_lambda_d: float = 1.0
    kto_lambda_u: float = 1.0
    ref_model: Optional[str] = None
    ref_batch_size: int = 8


@dataclass
class ULMAConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/ulma", lr=1e-5,
                                                                   group_by_length=True))
    ulma: ULMAParams = field(default_factory=ULMAParams)


@dataclass
class PointWithRef:
    example: object  # TokenizedPointwise
    ref_logp: float  # summed reference log-prob


def collate_points(examples: list, pad_id: int) -> dict:
    """Right-padded ``prompt + completion`` rows with a target mask on the completion tokens."""
    seqs = [list(e.example.prompt_ids) + list(e.example.completion_ids) for e in examples]
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    tgt = torch.zeros((B, T), dtype=torch.bool)
    for i, (s, e) in enumerate(zip(seqs, examples)):
        P = len(e.example.prompt_ids)
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        tgt[i, P:len(s)] = True
    return {"input_ids": ids, "attention_mask": att, "target_mask": tgt,
            "labels": torch.tensor([e.example.label for e in examples], dtype=torch.float32),
            "ref_logp": torch.tensor([e.ref_logp for e in examples], dtype=torch.float32)}


@torch.no_grad()
def point_logps(lm, examples: list, pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """Summed completion log-probs of ``TokenizedPointwise`` examples (no grad, eval mode)."""
    from alignforge.models.logprobs import target_logprobs

    was = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        b = collate_points([PointWithRef(e, 0.0) for e in examples[i:i + batch_size]], pad_id)
        lp = target_logprobs(lm, b["input_ids"].to(device), b["attention_mask"].to(device), b["target_mask"].to(device))
        out.append(lp.sum(1).cpu())
    lm.train(was)
    return torch.cat(out)


def resolve_label_type(examples: list, label_type: str) -> str:
    if label_type != "auto":
        return label_type
    return "binary" if all(e.label in (0.0, 1.0) for e in examples) else "continuous"


def make_loss(params: ULMAParams, continuous: bool):
    from alignforge.losses.preference import kto_loss, pointwise_dpo_loss, ulma_loss

    def loss_fn(module, batch: dict, norm: dict):
        lp = module(batch["input_ids"], batch["attention_mask"], batch["target_mask"])
        n_tok = batch["target_mask"].sum(1).clamp(min=1)
        policy = lp.sum(1)
        ref = batch["ref_logp"]
        if params.logp_reduction == "mean":
            policy, ref = policy / n_tok, ref / n_tok
        z = batch["labels"]
        if params.loss == "ulma":
            loss, m = ulma_loss(policy, ref, z, beta=params.beta, c=params.c, continuous=continuous,
                                n_pos=norm["n_pos"], n_neg=norm["n_neg"])
            metrics = {k: m[k] for k in ("sigmoid_reward_pos", "sigmoid_reward_neg", "pos_nll", "neg_loss")}
        elif params.loss == "pointwise_dpo":
            losses, m = pointwise_dpo_loss(policy, ref, z, beta=params.beta, c=params.c, continuous=continuous)
            loss = losses.sum() / norm["items"]
            pos = (z == 1).float()
            metrics = {"sigmoid_reward_pos": (m["sigmoid_reward"] * pos).sum(),
                       "sigmoid_reward_neg": (m["sigmoid_reward"] * (1 - pos)).sum()}
        else:
            h = (policy - ref).detach()
            losses, m = kto_loss(policy, ref, z >= 0.5, h.mean(), beta=params.beta, lambda_d=params.kto_lambda_d,
                                 lambda_u=params.kto_lambda_u)
            loss = losses.sum() / norm["items"]
            metrics = {"kto_z0": m["z0"] * len(z)}
        pos = (z == 1).to(policy.dtype)
        metrics.update({"n_pos": pos.sum(), "n_neg": (1 - pos).sum(), "h": (policy - ref).detach().sum()})
        metrics["logps"] = lp.sum(1).detach().sum()
        return loss, metrics

    return loss_fn


def summarize(sums: dict[str, float], items: float) -> dict[str, float]:
    """Log per-subset means: σ(βh) over positives and over negatives (ULMA's logged "rewards")."""
    out = {}
    n_pos, n_neg = sums.pop("n_pos", 0.0), sums.pop("n_neg", 0.0)
    for k, v in sums.items():
        if k.endswith("_pos") or k == "pos_nll":
            if n_pos:  # a step without positives logs no positive-side means
                out[k] = v / n_pos
        elif k.endswith("_neg") or k == "neg_loss":
            if n_neg:
                out[k] = v / n_neg
        else:
            out[k] = v / items
    return out


def train_ulma(cfg: ULMAConfig) -> dict:
    """Run ULMA / point-wise DPO / KTO as configured; returns the loop summary."""
    from accelerate.utils import set_seed

    from alignforge.data.tokenize import load_pointwise_dataset
    from alignforge.errors import ConfigError
    from alignforge.inference.probe import policy_probe
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.logprobs import TokenLogProbs
    from alignforge.models.lora import save_trained
    from alignforge.models.policy import build_policy
    from alignforge.models.refcache import (
        cache_key,
        examples_digest,
        load_or_compute,
        reference_fingerprint,
        reference_policy,
    )
    from alignforge.trainers.common import Task, make_accelerator, run_training, write_data_report

    p = cfg.ulma
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: name at least one point-wise or preference file")
    if p.beta <= 0:
        raise ConfigError(f"ulma.beta must be > 0, got {p.beta}")
    accelerator = make_accelerator(cfg.train)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    points, report = load_pointwise_dataset(cfg.data.train_files, tokenizer, cfg.data.max_length,
                                            max_prompt_length=cfg.data.max_prompt_length,
                                            overlong=cfg.data.overlong, on_error=cfg.data.on_error)
    label_type = resolve_label_type(points, p.label_type)
    if label_type == "binary" and any(e.label not in (0.0, 1.0) for e in points):
        raise ConfigError("ulma.label_type=binary but some labels are not 0/1; use continuous or auto")
    n_pos = sum(e.label == 1.0 for e in points)
    summary_line = f"{report.summary()}; {label_type} labels, {n_pos} positive, {len(points) - n_pos} other"
    write_data_report(accelerator, cfg.train.output_dir, summary_line)

    set_seed(cfg.train.seed)
    model = build_policy(cfg.model, cfg.lora, accelerator.device)
    pad_id = tokenizer.pad_token_id  # load_tokenizer sets one (eos) when the model has none

    # on the accelerator's device, each process its share (models/refcache.py)
    with reference_policy(model, p.ref_model, accelerator.device) as ref_lm:
        def compute(idx: list[int]):
            with accelerator.autocast():  # in the training precision
                return {"logps": point_logps(ref_lm, [points[i] for i in idx], pad_id, p.ref_batch_size)}

        key = cache_key(reference_fingerprint(ref_lm), examples_digest(points, ("prompt_ids", "completion_ids")),
                        {"kind": "pointwise", "precision": str(accelerator.mixed_precision)})
        ref, _ = load_or_compute(key, compute, accelerator, echo=accelerator.print, n=len(points))
    examples = [PointWithRef(e, float(r)) for e, r in zip(points, ref["logps"])]

    def normalizer(exs: list) -> dict:
        pos = sum(e.example.label == 1.0 for e in exs)
        return {"items": len(exs), "n_pos": pos, "n_neg": len(exs) - pos}

    def save(unwrapped, out: Path) -> None:
        save_trained(unwrapped.lm, tokenizer, out)

    task = Task(module=TokenLogProbs(model), examples=examples, collate=lambda ex: collate_points(ex, pad_id),
                normalizer=normalizer, loss=make_loss(p, label_type == "continuous"), save_model=save,
                lengths=[len(e.prompt_ids) + len(e.completion_ids) for e in points], summarize=summarize,
                probe=policy_probe(cfg.train, tokenizer, [e.prompt_ids for e in points]))
    summary = run_training(task, cfg.train, accelerator, run_config=cfg, title=f"ULMA ({p.loss})")
    summary["data_report"] = summary_line
    summary["config"] = asdict(cfg)
    return summary
