"""``alignforge demo``: the main job on the embedded model, end to end as far as it is built.

Stage 1 (now): a short SFT of the embedded SmolLM2-135M-Instruct on the demonstrations that
ship with alignforge (``resources/demo/sft_demos.jsonl``), with greedy answers before and
after, so the effect of training is visible. Later stages add reward modelling, DPO/PPO,
RAIN and evaluation to this same command.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

DEMO_PROMPTS = ["What is your name?", "Who are you?", "What is the capital of France?"]


def demo_data_path() -> Path:
    return Path(str(resources.files("alignforge").joinpath("resources/demo/sft_demos.jsonl")))


def run_demo(output_dir: str = "outputs/demo", epochs: int = 3, lr: float = 1e-4, echo=print) -> dict:
    from alignforge.config import DataConfig, TrainConfig
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import ensure_embedded, load_model, load_tokenizer
    from alignforge.trainers.sft import SFTConfig, train_sft

    out = Path(output_dir)
    t0 = time.perf_counter()
    echo("[1/4] preparing the embedded model (SmolLM2-135M-Instruct; converted once, then cached)")
    base_dir = ensure_embedded()
    echo(f"      {base_dir}  ({time.perf_counter() - t0:.1f}s)")

    gen = GenerationConfig(max_new_tokens=40, temperature=0.0)
    chats = [[{"role": "user", "content": p}] for p in DEMO_PROMPTS]

    def answers(model_path: str) -> list[str]:
        tok = load_tokenizer(model_path, padding_side="left")
        return HFBackend(load_model(model_path), tok).generate(chats, gen)

    echo("[2/4] answers of the base model")
    before = answers("embedded")

    echo(f"[3/4] SFT on {demo_data_path().name} ({epochs} epochs)")
    cfg = SFTConfig(
        data=DataConfig(train_files=[str(demo_data_path())], max_length=256),
        train=TrainConfig(output_dir=str(out / "sft"), epochs=epochs, per_device_batch_size=4, lr=lr,
                          warmup_steps=1, save_every=0, keep_last=1, seed=42),
    )
    t1 = time.perf_counter()
    summary = train_sft(cfg)
    train_s = time.perf_counter() - t1
    hist = summary["history"]

    echo("[4/4] answers of the SFT model")
    after = answers(summary["final_dir"])

    result = {
        "base_model": str(base_dir),
        "sft_model": summary["final_dir"],
        "steps": summary["step"],
        "first_loss": hist[0]["loss"],
        "final_loss": hist[-1]["loss"],
        "train_seconds": round(train_s, 1),
        "tokens_per_s": round(hist[-1]["tokens_per_s"], 1),
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(DEMO_PROMPTS, before, after)],
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    for s in result["samples"]:
        echo(f"\n  user:   {s['prompt']}\n  before: {s['before']!r}\n  after:  {s['after']!r}")
    echo(f"\nSFT: {result['steps']} steps, loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}, "
         f"{result['tokens_per_s']} tok/s, {result['train_seconds']}s")
    echo(f"outputs: model {result['sft_model']}\n         curves {out / 'sft' / 'loss.png'}, "
         f"tensorboard {out / 'sft' / 'tb'}, summary {out / 'demo_summary.json'}")
    echo(f"demo finished in {result['total_seconds']}s")
    return result
