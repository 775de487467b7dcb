"""Point-wise preference optimisation: ULMA, point-wise DPO, and KTO as the peer baseline (METHODS.md §3).

Data are point-wise ``{prompt, completion, label}`` (bool or float in [0, 1]); a preference file
is converted on the fly (chosen → 1, rejected → 0). Reference log-probs are computed once with
the initial policy, as loaded (with a fresh LoRA adapter: the adapter-disabled base), and cached on disk.

* ``ulma``: SFT on positives (z = 1) plus ``-log σ(-βh - c)`` on the others (binary) or
  ``(z - βh - c)²`` (continuous). Positives and negatives are each averaged over their own count
  in the global batch (as the ULMA code averages per subset); an empty subset adds 0, never NaN.
* ``pointwise_dpo``: the log-loss (binary) or regression (continuous) on ``βh + c`` for all samples.
* ``kto``: ``λ_y − v(x, y)`` with the reference point ``z0 = max(0, KL̂(π_θ‖π_ref))``, detached,
  estimated on *mismatched* pairs as in the KTO paper and TRL: in a global batch of examples
  ``e_0 … e_{G-1}`` (the loop's order), prompt ``k`` is paired with the completion of example
  ``k+1`` (and the last with that of the first). Every process computes the policy log-probs of
  its share of those pairs (no grad, eval mode, the training autocast) and the partial sums are
  all-reduced, so z0 is the same on every process and for any split into processes and
  micro-batches. Log-probs are summed over tokens (paper, TRL) unless ``ulma.logp_reduction``
  says otherwise.

Where this departs from the papers / code:

* ULMA's code averages log-probs per token (``average_log_prob=True``); so does the default
  here for ``ulma`` and ``pointwise_dpo`` (``ulma.logp_reduction`` unset = ``mean``; KTO: ``sum``).
* ``label_type: auto`` treats labels that are all 0/1 as binary, anything else as continuous.
* KTO's mismatched pairs: TRL shifts completions within fixed chunks of the data set before
  shuffling; here the shift is within each global batch, which the loop makes a pure function of
  the step (``trainers/common.py``). The batch plan of the whole run is therefore known before
  training, and the reference log-probs of every mismatched pair it will meet (about ``epochs ×``
  the data set, each distinct pair once) are computed then and cached on disk, like the matched
  ones; a changed plan (batch size, processes, seed, steps) is a new cache entry. A global batch
  must hold at least 2 examples; a last, short batch of a single example pairs it with itself.
  z0 is estimated over the global batch, not per micro-batch as in TRL. KTO is a baseline here,
  not a method of the three papers.
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
    logp_reduction: Optional[Literal["mean", "sum"]] = None  # unset: mean (ulma, pointwise_dpo), sum (kto)
    kto_lambda_d: float = 1.0
    kto_lambda_u: float = 1.0
    ref_model: Optional[str] = None
    ref_batch_size: int = 8


@dataclass
class ULMAConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="outputs/ulma", lr=1e-5, group_by_length=True)
    )
    ulma: ULMAParams = field(default_factory=ULMAParams)


def resolve_logp_reduction(params: ULMAParams) -> str:
    """``ulma.logp_reduction``, or the loss's default when unset: per-token mean for ULMA and point-wise
    DPO (the ULMA code), sum for KTO (the KTO paper and TRL)."""
    if params.logp_reduction is not None:
        return params.logp_reduction
    return "sum" if params.loss == "kto" else "mean"


@dataclass
class PointWithRef:
    example: object  # TokenizedPointwise
    ref_logp: float  # summed reference log-prob
    index: int = -1  # position in the training set (KTO's mismatched pairs are looked up by it)


@dataclass
class MismatchedPoint:
    """A prompt with another example's completion (KTO's KL estimate); collates like a ``TokenizedPointwise``."""

    prompt_ids: list
    completion_ids: list
    label: float = 0.0


def collate_points(examples: list, pad_id: int) -> dict:
    """Right-padded ``prompt + completion`` rows with a target mask on the completion tokens."""
    from alignforge.data.collate import pad_batch

    seqs = [list(e.example.prompt_ids) + list(e.example.completion_ids) for e in examples]
    tgt = [[False] * len(e.example.prompt_ids) + [True] * len(e.example.completion_ids) for e in examples]
    b = pad_batch(seqs, pad_id, masks={"target_mask": tgt})
    ids, att, tgt = b["input_ids"], b["attention_mask"], b["target_mask"]
    return {
        "input_ids": ids,
        "attention_mask": att,
        "target_mask": tgt,
        "labels": torch.tensor([e.example.label for e in examples], dtype=torch.float32),
        "ref_logp": torch.tensor([e.ref_logp for e in examples], dtype=torch.float32),
    }


@torch.no_grad()
def point_logps(lm, examples: list, pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """Summed completion log-probs of ``TokenizedPointwise`` examples (no grad, eval mode)."""
    from alignforge.models.logprobs import target_logprobs

    was = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        b = collate_points([PointWithRef(e, 0.0) for e in examples[i : i + batch_size]], pad_id)
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

    how = resolve_logp_reduction(params)

    def loss_fn(module, batch: dict, norm: dict):
        lp = module(batch["input_ids"], batch["attention_mask"], batch["target_mask"])
        n_tok = batch["target_mask"].sum(1).clamp(min=1)
        policy = lp.sum(1)
        ref = batch["ref_logp"]
        if how == "mean":
            policy, ref = policy / n_tok, ref / n_tok
        z = batch["labels"]
        if params.loss == "ulma":
            loss, m = ulma_loss(
                policy,
                ref,
                z,
                beta=params.beta,
                c=params.c,
                continuous=continuous,
                n_pos=norm["n_pos"],
                n_neg=norm["n_neg"],
            )
            metrics = {k: m[k] for k in ("sigmoid_reward_pos", "sigmoid_reward_neg", "pos_nll", "neg_loss")}
        elif params.loss == "pointwise_dpo":
            losses, m = pointwise_dpo_loss(policy, ref, z, beta=params.beta, c=params.c, continuous=continuous)
            loss = losses.sum() / norm["items"]
            pos = (z == 1).float()
            metrics = {
                "sigmoid_reward_pos": (m["sigmoid_reward"] * pos).sum(),
                "sigmoid_reward_neg": (m["sigmoid_reward"] * (1 - pos)).sum(),
            }
        else:
            losses, m = kto_loss(
                policy,
                ref,
                z >= 0.5,
                norm["kto_z0"],
                beta=params.beta,
                lambda_d=params.kto_lambda_d,
                lambda_u=params.kto_lambda_u,
            )
            loss = losses.sum() / norm["items"]
            metrics = {"kto_z0": m["z0"] * len(z)}
        pos = (z == 1).to(policy.dtype)
        metrics.update({"n_pos": pos.sum(), "n_neg": (1 - pos).sum(), "h": (policy - ref).detach().sum()})
        metrics["logps"] = lp.sum(1).detach().sum()
        return loss, metrics

    return loss_fn


def mismatched_pairs(indices: list[int]) -> list[tuple[int, int]]:
    """KTO's mismatched pairs of one global batch: ``(prompt of e_k, completion of e_{k+1 mod G})``."""
    n = len(indices)
    return [(indices[k], indices[(k + 1) % n]) for k in range(n)]


def planned_mismatched_pairs(
    n_examples: int, cfg: TrainConfig, world: int, lengths: list[int] | None
) -> list[tuple[int, int]]:
    """Every distinct mismatched pair that the run's batch plan will meet, sorted.

    The plan is the loop's (``trainers/common.py``: ``epoch_order`` of each epoch, cut into global
    batches of ``per_device_batch_size × grad_accum × world``), for ``max_steps`` or ``epochs``.
    """
    from alignforge.trainers.common import epoch_order, steps_per_epoch

    G = cfg.per_device_batch_size * cfg.grad_accum * world
    spe = steps_per_epoch(n_examples, G)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * spe
    out: set[tuple[int, int]] = set()
    for epoch in range((total + spe - 1) // spe):
        order = epoch_order(epoch, n_examples, G, cfg.seed, lengths)
        for k in range(min(spe, total - epoch * spe)):
            out.update(mismatched_pairs(order[k * G : (k + 1) * G]))
    return sorted(out)


def mismatched_reference_logps(
    model, points: list, pairs: list[tuple[int, int]], pad_id: int, params: ULMAParams, accelerator
) -> dict[tuple[int, int], float]:
    """Summed reference log-probs of KTO's mismatched ``pairs`` (from the disk cache, or computed once)."""
    from alignforge.models.refcache import (
        cache_key,
        examples_digest,
        load_or_compute,
        reference_fingerprint,
        reference_policy,
    )

    kl_points = [MismatchedPoint(points[i].prompt_ids, points[j].completion_ids) for i, j in pairs]
    # on the accelerator's device, each process its share, keyed by the reference weights (as the matched pass)
    with reference_policy(model, params.ref_model, accelerator.device) as ref_lm:

        def compute(idx: list[int]):
            with accelerator.autocast():  # in the training precision
                return {"logps": point_logps(ref_lm, [kl_points[i] for i in idx], pad_id, params.ref_batch_size)}

        key = cache_key(
            reference_fingerprint(ref_lm),
            examples_digest(kl_points, ("prompt_ids", "completion_ids")),
            {"kind": "kto_mismatched", "precision": str(accelerator.mixed_precision)},
        )
        values, _ = load_or_compute(key, compute, accelerator, echo=accelerator.print, n=len(kl_points))
    return {pair: float(v) for pair, v in zip(pairs, values["logps"], strict=True)}


def kto_z0_estimator(
    model, points: list, ref_kl: dict[tuple[int, int], float], pad_id: int, how: str, batch_size: int, accelerator
):
    """``global batch (PointWithRef list, loop order) -> z0``: the policy's log-probs of this process's
    share of the batch's mismatched pairs (every ``world``-th pair; no grad, eval mode, training
    autocast), all-reduced with the reference values into :func:`kto_reference_point`."""
    from alignforge.errors import TrainingError
    from alignforge.losses.preference import kto_reference_point

    world, rank = accelerator.num_processes, accelerator.process_index

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t.to(accelerator.device), "sum").cpu()

    def estimate(exs: list) -> torch.Tensor:
        pairs = mismatched_pairs([e.index for e in exs])
        mine = pairs[rank::world]
        missing = [pr for pr in mine if pr not in ref_kl]
        if missing:
            raise TrainingError(
                f"KTO: no cached reference log-prob for mismatched pair {missing[0]}: the batch plan "
                "differs from the one planned before training"
            )
        ref = torch.tensor([ref_kl[pr] for pr in mine], dtype=torch.float64)
        kl_points = [MismatchedPoint(points[i].prompt_ids, points[j].completion_ids) for i, j in mine]
        if kl_points:
            with accelerator.autocast():
                pol = point_logps(model, kl_points, pad_id, batch_size).double()
        else:
            pol = torch.zeros(0, dtype=torch.float64)
        if how == "mean":
            n_tok = torch.tensor([max(1, len(p.completion_ids)) for p in kl_points], dtype=torch.float64)
            pol, ref = pol / n_tok, ref / n_tok
        return kto_reference_point(pol, ref, n_total=len(pairs), all_reduce=all_reduce if world > 1 else None)

    return estimate


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
    from alignforge.trainers.common import Task, make_accelerator, run_training, sub_state_dict, write_data_report

    p = cfg.ulma
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: name at least one point-wise or preference file")
    if p.beta <= 0:
        raise ConfigError(f"ulma.beta must be > 0, got {p.beta}")
    accelerator = make_accelerator(cfg.train)
    if p.loss == "kto" and cfg.train.per_device_batch_size * cfg.train.grad_accum * accelerator.num_processes < 2:
        raise ConfigError(
            "ulma.loss=kto needs a global batch (train.per_device_batch_size × train.grad_accum × "
            "processes) of at least 2: its reference point z0 comes from mismatched pairs"
        )
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    points, report = load_pointwise_dataset(
        cfg.data.train_files,
        tokenizer,
        cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        overlong=cfg.data.overlong,
        on_error=cfg.data.on_error,
    )
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

        key = cache_key(
            reference_fingerprint(ref_lm),
            examples_digest(points, ("prompt_ids", "completion_ids")),
            {"kind": "pointwise", "precision": str(accelerator.mixed_precision)},
        )
        ref, _ = load_or_compute(key, compute, accelerator, echo=accelerator.print, n=len(points))
    examples = [PointWithRef(e, float(r), i) for i, (e, r) in enumerate(zip(points, ref["logps"], strict=True))]
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in points]

    z0_of = None
    if p.loss == "kto":
        world = accelerator.num_processes
        kl_pairs = planned_mismatched_pairs(
            len(points), cfg.train, world, lengths if cfg.train.group_by_length else None
        )
        ref_kl = mismatched_reference_logps(model, points, kl_pairs, pad_id, p, accelerator)
        z0_of = kto_z0_estimator(
            model, points, ref_kl, pad_id, resolve_logp_reduction(p), cfg.train.per_device_batch_size, accelerator
        )

    def normalizer(exs: list) -> dict:
        pos = sum(e.example.label == 1.0 for e in exs)
        out = {"items": len(exs), "n_pos": pos, "n_neg": len(exs) - pos}
        if z0_of is not None:  # one z0 per global step, the same on every process and micro-batch
            out["kto_z0"] = z0_of(exs)
        return out

    def save(unwrapped, out: Path, state_dict: dict | None = None) -> None:  # state_dict: under FSDP
        lm_state = None if state_dict is None else sub_state_dict(state_dict, "lm.")
        save_trained(unwrapped.lm, tokenizer, out, state_dict=lm_state)

    task = Task(
        module=TokenLogProbs(model),
        examples=examples,
        collate=lambda ex: collate_points(ex, pad_id),
        normalizer=normalizer,
        loss=make_loss(p, label_type == "continuous"),
        save_model=save,
        lengths=lengths,
        summarize=summarize,
        probe=policy_probe(cfg.train, tokenizer, [e.prompt_ids for e in points]),
    )
    summary = run_training(task, cfg.train, accelerator, run_config=cfg, title=f"ULMA ({p.loss})")
    summary["data_report"] = summary_line
    summary["config"] = asdict(cfg)
    return summary
