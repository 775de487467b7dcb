"""Supervised fine-tuning on demonstrations (the SFT stage every method starts from).

Reads ``{messages}`` / ``{prompt, completion}`` (TRL SFT formats, or the chosen side of a
preference file), renders them through the tokenizer's chat template, and trains with
next-token prediction on assistant tokens only (the end-of-turn token included).

Departures from the papers (ChatGLM-RLHF and ULMA describe SFT only as the starting point):

* The loss is the summed NLL of the global batch divided by its number of target tokens
  (every assistant token weighs the same, whatever micro-batch or rank it falls in), not the
  mean of per-micro-batch means. ULMA's recipe (SFT 4×4, lr 1e-5, cosine, 3 epochs, LoRA
  r=8/α=32 on q,v) is reachable through the config but is not the default.
* The LM head is applied only at target positions (``models/logprobs.py``), which gives the
  same loss with less compute on a 49k vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignforge.config import DataConfig, LoraConfig, ModelConfig, TrainConfig


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/sft"))


def collate_sft(examples: list, pad_id: int) -> dict:
    """Right-pad ``TokenizedSFT`` examples into ``input_ids``/``attention_mask``/``target_mask`` (B, T)."""
    from alignforge.data.collate import pad_batch

    b = pad_batch([e.input_ids for e in examples], pad_id, masks={"target_mask": [e.loss_mask for e in examples]})
    ids, att, tgt = b["input_ids"], b["attention_mask"], b["target_mask"]
    tgt[:, 0] = False  # the first token has no context to be predicted from
    return {"input_ids": ids, "attention_mask": att, "target_mask": tgt}


def count_targets(examples: list) -> float:
    """Number of trained tokens (the loss normaliser)."""
    return float(sum(sum(e.loss_mask[1:]) for e in examples))


def sft_step_loss(module, batch: dict, normalizer: float):
    from alignforge.losses.sft import nll_loss

    logps = module(batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    loss, _ = nll_loss(logps, batch["target_mask"], normalizer)
    return loss, {}


def sft_prompt_ids(example) -> list[int]:
    """The tokens before the first trained (assistant) token: the example's first prompt."""
    first = next((i for i, m in enumerate(example.loss_mask) if m), len(example.input_ids))
    return list(example.input_ids[:first])


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT as configured; returns the loop summary (``final_dir`` holds the model)."""
    from alignforge.data.tokenize import load_sft_dataset
    from alignforge.errors import ConfigError
    from alignforge.inference.probe import policy_probe
    from alignforge.models.loading import load_tokenizer
    from alignforge.models.logprobs import TokenLogProbs
    from alignforge.models.lora import save_trained
    from alignforge.models.policy import build_policy
    from alignforge.trainers.common import Task, make_accelerator, run_training, sub_state_dict, write_data_report

    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: name at least one SFT file")
    accelerator = make_accelerator(cfg.train, fsdp=True)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    examples, report = load_sft_dataset(
        cfg.data.train_files, tokenizer, cfg.data.max_length, overlong=cfg.data.overlong, on_error=cfg.data.on_error
    )
    write_data_report(accelerator, cfg.train.output_dir, report.summary())

    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)  # LoRA init is random: seed before building
    model = build_policy(cfg.model, cfg.lora, accelerator.device)
    pad_id = tokenizer.pad_token_id  # load_tokenizer sets one (eos) when the model has none

    def save(unwrapped, out_dir: Path, state_dict: dict | None = None) -> None:  # state_dict: under FSDP
        lm_state = None if state_dict is None else sub_state_dict(state_dict, "lm.")
        save_trained(unwrapped.lm, tokenizer, out_dir, state_dict=lm_state)

    task = Task(
        module=TokenLogProbs(model),
        examples=examples,
        collate=lambda ex: collate_sft(ex, pad_id),
        normalizer=count_targets,
        loss=sft_step_loss,
        save_model=save,
        fsdp=True,
        lengths=[len(e.input_ids) for e in examples],
        probe=policy_probe(cfg.train, tokenizer, [p for p in map(sft_prompt_ids, examples) if p]),
    )
    summary = run_training(task, cfg.train, accelerator, run_config=cfg, title="SFT")
    summary["data_report"] = report.summary()
    summary["config"] = asdict(cfg)
    return summary
