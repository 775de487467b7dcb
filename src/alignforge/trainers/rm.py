"""Reward-model training: ChatGLM-RLHF §1b (Bradley-Terry + length balancing + Gaussian score prior).

Pipeline: read preference pairs (TRL formats or raw HH) → tokenise through the chat template →
bucket-based length balancing (``data/balance.py``) → train a scalar head on the hidden state of
the last token of each response, with ``-log σ(r_w − r_l − m) + λ·reg`` (``losses/reward.py``).
Chosen and rejected share their prompt, so each pair is packed into one sequence
``[prompt | chosen | rejected]`` with a block attention mask (``models/packing.py``): the prompt is
computed once. Batches are grouped by length (``train.group_by_length``) so little is padding.

Where this departs from the paper (its details are not recoverable, see METHODS.md [unv]):

* λ of the Gaussian prior is not published: default ``reward.reg_coef = 0.01``; the prior is
  ``λ·(r_w² + r_l²)`` per pair. TRL's centring ``λ·(r_w + r_l)²`` is the alternative.
* Bucket edges and the balancing direction are not published: we down-sample the majority side
  within each |Δlen| bucket, edges ``0, 8, 16, 32, 64, 128, 256`` tokens (configurable).
* The paper scores the EOS of the final assistant turn; we score the last token of the rendered
  conversation (``apply_chat_template(prompt + response)``): the end-of-turn token, or what the
  template puts after it (ChatML: the newline after ``<|im_end|>``), so that plain transformers'
  ``AutoModelForSequenceClassification`` gives the same score (``models/reward.py``).
* Too long for ``data.max_length``: the prompt is cut from the left; a pair whose response would
  still have to be cut is dropped (``data.overlong=truncate_prompt``, the default here), since a
  cut response would be scored in mid-text. ``data.overlong=truncate`` cuts it instead. Both
  counts are in ``data_report.txt``.
* The paper drops cyclic preferences and ties during annotation; here that is the annotation
  export's job (pairs reaching this trainer are already strict preferences).
* The RM is initialised from any causal LM (typically the SFT model) with a fresh linear head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from alignforge.config import DataConfig, LoraConfig, ModelConfig, TrainConfig


@dataclass
class RewardConfig:
    regularizer: Literal["gaussian", "center", "none"] = "gaussian"
    reg_coef: float = 0.01
    margin: float = 0.0
    length_balance: bool = True
    bucket_edges: list[int] = field(default_factory=lambda: [0, 8, 16, 32, 64, 128, 256])
    packed: bool = True  # False: chosen and rejected as two padded sequences (as TRL does)
    stats_pairs: int = 256  # pairs whose scores give the stored mean/std


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512, overlong="truncate_prompt"))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="outputs/rm", lr=1e-5, group_by_length=True)
    )
    reward: RewardConfig = field(default_factory=RewardConfig)


def pair_length(p) -> int:
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def collate_unpacked(pairs: list, pad_id: int) -> dict:
    """``2B`` right-padded sequences: rows ``[:B]`` prompt+chosen, rows ``[B:]`` prompt+rejected."""
    seqs = [list(p.prompt_ids) + list(p.chosen_ids) for p in pairs] + [
        list(p.prompt_ids) + list(p.rejected_ids) for p in pairs
    ]
    from alignforge.data.collate import pad_batch

    return pad_batch(seqs, pad_id)


def pair_scores(module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen, r_rejected)`` from a packed or an unpacked batch."""
    if "segment_ids" in batch:
        return module(batch)
    scores = module(batch)
    B = scores.shape[0] // 2
    return scores[:B], scores[B:]


def make_loss(rcfg: RewardConfig):
    from alignforge.losses.reward import bradley_terry_loss

    def loss_fn(module, batch: dict, normalizer: float):
        rc, rr = pair_scores(module, batch)
        losses, m = bradley_terry_loss(
            rc, rr, margin=rcfg.margin or None, regularizer=rcfg.regularizer, reg_coef=rcfg.reg_coef
        )
        metrics = {
            "accuracy": m["accuracy"].sum(),
            "margin": m["margin"].sum(),
            "bt_loss": m["bt"].sum(),
            "reward_chosen": rc.detach().sum(),
            "reward_rejected": rr.detach().sum(),
        }
        return losses.sum() / normalizer, metrics

    return loss_fn


def score_stats(rm, pairs: list, pad_id: int, batch_size: int = 8) -> dict:
    """Mean and std of the scores of both responses of ``pairs`` (the RM's reference statistics)."""
    from alignforge.models.reward import score_pairs

    chosen, rejected = score_pairs(rm, pairs, pad_id, batch_size, progress=False)
    t = torch.tensor(list(chosen) + list(rejected), dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std().item() if len(t) > 1 else 0.0, "n_scores": len(t)}


def train_rm(cfg: RMConfig) -> dict:
    """Train a reward model as configured; returns the loop summary (``final_dir`` holds the RM)."""
    import json

    from accelerate.utils import set_seed

    from alignforge.data.balance import balance_by_length
    from alignforge.data.tokenize import load_preference_dataset
    from alignforge.errors import ConfigError
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.lora import LoraSettings, apply_lora
    from alignforge.models.packing import pack_pairs
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model
    from alignforge.trainers.common import Task, make_accelerator, run_training, write_data_report

    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: name at least one preference file")
    accelerator = make_accelerator(cfg.train)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    pairs, report = load_preference_dataset(
        cfg.data.train_files,
        tokenizer,
        cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        overlong=cfg.data.overlong,
        on_error=cfg.data.on_error,
        full_render=True,
    )
    lines = [report.summary()]
    balance = None
    if cfg.reward.length_balance:
        keep, balance = balance_by_length(
            [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], cfg.reward.bucket_edges, seed=cfg.train.seed
        )
        pairs = [pairs[i] for i in keep]
        lines.append(balance.summary())
    write_data_report(accelerator, cfg.train.output_dir, "\n".join(lines))
    if accelerator.is_main_process and balance is not None:
        (Path(cfg.train.output_dir) / "length_balance.json").write_text(json.dumps(balance.as_dict(), indent=2))

    set_seed(cfg.train.seed)  # the score head (and LoRA) init is random
    model = load_reward_backbone(cfg.model.name_or_path, cfg.model.dtype)
    pad_id = tokenizer.pad_token_id  # load_tokenizer sets one (eos) when the model has none
    model.config.pad_token_id = pad_id
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, LoraSettings.from_config(cfg.lora, task_type="SEQ_CLS"))

    def save(unwrapped: RewardModel, out_dir: Path) -> None:
        stats = score_stats(unwrapped, pairs[: cfg.reward.stats_pairs], pad_id)
        stats.update(
            {
                "reference": f"first {min(len(pairs), cfg.reward.stats_pairs)} training pairs",
                "regularizer": cfg.reward.regularizer,
                "reg_coef": cfg.reward.reg_coef,
                "length_balance": cfg.reward.length_balance,
            }
        )
        save_reward_model(unwrapped, tokenizer, out_dir, stats)

    collate = (lambda ex: pack_pairs(ex, pad_id)) if cfg.reward.packed else (lambda ex: collate_unpacked(ex, pad_id))
    task = Task(
        module=RewardModel(model),
        examples=pairs,
        collate=collate,
        normalizer=len,
        loss=make_loss(cfg.reward),
        save_model=save,
        lengths=[pair_length(p) for p in pairs],
    )
    summary = run_training(task, cfg.train, accelerator, run_config=cfg, title="reward model")
    summary["data_report"] = "\n".join(lines)
    summary["config"] = asdict(cfg)
    return summary
