"""``alignforge demo``: the main job on the embedded model, end to end as far as it is built.

1. a short SFT of the embedded SmolLM2-135M-Instruct on the demonstrations that ship with
   alignforge (``resources/demo/sft_demos.jsonl``), with greedy answers before and after;
2. a reward model (LoRA on the SFT model) trained on the shipped preference pairs
   (``resources/demo/preferences.jsonl``), which then scores both sets of answers.

Later stages add DPO/PPO, RAIN and evaluation to this same command.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

DEMO_PROMPTS = ["What is your name?", "Who are you?", "What is the capital of France?"]


def demo_data_path(name: str = "sft_demos.jsonl") -> Path:
    return Path(str(resources.files("alignforge").joinpath(f"resources/demo/{name}")))


def run_demo(output_dir: str = "outputs/demo", epochs: int = 3, lr: float = 1e-4, echo=print,
             model: str = "embedded", rm_epochs: int = 3) -> dict:
    from alignforge.config import DataConfig, LoraConfig, ModelConfig, TrainConfig
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import ensure_embedded, load_model, load_tokenizer
    from alignforge.trainers.sft import SFTConfig, train_sft

    out = Path(output_dir)
    t0 = time.perf_counter()
    echo("[1/6] preparing the embedded model (SmolLM2-135M-Instruct; converted once, then cached)")
    base_dir = ensure_embedded() if model == "embedded" else model
    echo(f"      {base_dir}  ({time.perf_counter() - t0:.1f}s)")

    gen = GenerationConfig(max_new_tokens=40, temperature=0.0)
    chats = [[{"role": "user", "content": p}] for p in DEMO_PROMPTS]

    def answers(model_path: str) -> list[str]:
        tok = load_tokenizer(model_path, padding_side="left")
        return HFBackend(load_model(model_path), tok).generate(chats, gen)

    echo("[2/6] answers of the base model")
    before = answers(model)

    echo(f"[3/6] SFT on {demo_data_path().name} ({epochs} epochs)")
    cfg = SFTConfig(
        model=ModelConfig(name_or_path=model),
        data=DataConfig(train_files=[str(demo_data_path())], max_length=256),
        train=TrainConfig(output_dir=str(out / "sft"), epochs=epochs, per_device_batch_size=4, lr=lr,
                          warmup_steps=1, save_every=0, keep_last=1, seed=42),
    )
    t1 = time.perf_counter()
    summary = train_sft(cfg)
    train_s = time.perf_counter() - t1
    hist = summary["history"]

    echo("[4/6] answers of the SFT model")
    after = answers(summary["final_dir"])

    echo("[5/6] reward model (LoRA on the SFT model) on the shipped preference pairs")
    from alignforge.trainers.rm import RewardConfig, RMConfig, train_rm

    rm_cfg = RMConfig(
        model=ModelConfig(name_or_path=summary["final_dir"]),
        lora=LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0),
        data=DataConfig(train_files=[str(demo_data_path("preferences.jsonl"))], max_length=256),
        train=TrainConfig(output_dir=str(out / "rm"), epochs=rm_epochs, per_device_batch_size=4, lr=5e-4, warmup_steps=2,
                          save_every=0, keep_last=1, seed=42, group_by_length=True),
        # 24 hand-written pairs whose chosen answers are mostly the longer ones: balancing would
        # leave almost nothing, so it is off here (it is on by default).
        reward=RewardConfig(length_balance=False),
    )
    rm_summary = train_rm(rm_cfg)
    rm_hist = rm_summary["history"]

    echo("[6/6] reward of each answer")
    from alignforge.models.reward import load_reward_model

    rm, rm_tok, _ = load_reward_model(rm_summary["final_dir"])
    rewards_before = score_answers(rm, rm_tok, chats, before)
    rewards_after = score_answers(rm, rm_tok, chats, after)

    result = {
        "base_model": str(base_dir),
        "sft_model": summary["final_dir"],
        "steps": summary["step"],
        "first_loss": hist[0]["loss"],
        "final_loss": hist[-1]["loss"],
        "train_seconds": round(train_s, 1),
        "tokens_per_s": round(hist[-1]["tokens_per_s"], 1),
        "samples": [{"prompt": p, "before": b, "after": a, "reward_before": rb, "reward_after": ra}
                    for p, b, a, rb, ra in zip(DEMO_PROMPTS, before, after, rewards_before, rewards_after)],
        "reward_model": rm_summary["final_dir"],
        "rm_first_loss": rm_hist[0]["loss"],
        "rm_final_loss": rm_hist[-1]["loss"],
        "rm_final_batch_accuracy": rm_hist[-1]["accuracy"],
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    for s in result["samples"]:
        echo(f"\n  user:   {s['prompt']}\n  before: {s['before']!r}  (reward {s['reward_before']:+.2f})"
             f"\n  after:  {s['after']!r}  (reward {s['reward_after']:+.2f})")
    echo(f"\nSFT: {result['steps']} steps, loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}, "
         f"{result['tokens_per_s']} tok/s, {result['train_seconds']}s")
    echo(f"reward model: {len(rm_hist)} steps, loss {result['rm_first_loss']:.3f} -> {result['rm_final_loss']:.3f}")
    echo(f"outputs: SFT model {result['sft_model']}\n         reward model {result['reward_model']}\n"
         f"         curves {out / 'sft' / 'loss.png'}, {out / 'rm' / 'loss.png'}; tensorboard {out}/*/tb; "
         f"summary {out / 'demo_summary.json'}")
    echo(f"demo finished in {result['total_seconds']}s")
    return result


def score_answers(rm, tokenizer, chats: list, answers: list[str]) -> list[float]:
    """Reward of each (chat, answer), read at the answer's end-of-turn token."""
    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.models.reward import score_sequences

    seqs = []
    for chat, ans in zip(chats, answers):
        p, c = tokenize_prompt_completion(chat, [{"role": "assistant", "content": ans or " "}], tokenizer)
        seqs.append(p + c)
    return [float(x) for x in score_sequences(rm, seqs, tokenizer.pad_token_id, progress=False)]
