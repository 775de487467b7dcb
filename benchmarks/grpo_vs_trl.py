"""Benchmark: ``train_ppo`` with ``ppo.advantage=grpo`` against TRL's ``GRPOTrainer`` (issue 10, item 9).

Equal work on both sides:

* **Model**: the embedded SmolLM2-135M-Instruct, **full fine-tuning** (no LoRA), no gradient checkpointing.
* **Prompts**: the first distinct first user turns of HH harmless-base, 8 per step, the same 8 on both
  sides at every step (TRL gets its dataset in our iteration order, ``shuffle_dataset=False``).
* **Samples**: 4 per prompt (32 rows a step), sampled at T=1, top_p=1, top_k=0, 64 new tokens with EOS
  ignored on both sides (ours ``ppo.ignore_eos=true``; TRL ``generation_kwargs={"min_new_tokens": 64}``,
  so no row ends early), generated in one batch of 32 on both sides (ours ``ppo.gen_batch_prompts=8``).
* **Reward**: the same alignforge reward model (an *untrained* seeded head on the embedded backbone,
  saved once under the work dir: this measures speed, not quality). TRL gets the RM *directory* as its
  reward function, i.e. it loads it as an HF sequence-classification model and scores
  ``apply_chat_template(prompt + completion)``, the token alignforge scores too.
* **Algorithm**: GRPO advantages (group mean and std), clip 0.2, one policy update per rollout
  (``ppo_epochs=1``, ``minibatches=1``; TRL ``num_iterations=1``), no KL term (ours ``ppo.kl_coef=0``; TRL
  ``beta=0``, its default, no reference model), no reference reward (TRL has none), token-mean loss over
  the global batch (TRL ``loss_type="dapo"``), lr 1e-6 constant, grad clipping 1.0, AdamW, fp32 unless a
  variant says bf16. Micro-batches of 8 rows on our side (``forward_batch_size=8``).

Each side runs in its own subprocess (peak RSS per side). ``steps + 1`` steps are run; the first is a
warm-up and **timed = the mean over the other steps of one whole step**: ours from the start of
``rollout`` (generation, scoring, the rollout's forward passes, advantages) to the end of ``update``
(all micro-batches and the optimiser step); TRL from ``on_step_begin`` to ``on_step_end`` (its
generation and scoring happen inside the step, in ``_prepare_inputs``). Model loading is excluded.

TRL variants (``--trl-variants``): ``fp32_b8`` (``per_device_train_batch_size=8``,
``gradient_accumulation_steps=4``), ``fp32_b32`` (32 × 1), ``bf16_b8`` (bf16 autocast); a ``_keep``
suffix (e.g. ``bf16_b8_keep``) gives the TRL process the same glibc ``malloc`` setting that our trainers
apply on CPU by default (``alignforge.trainers.common.keep_freed_memory``: no heap trimming, no ``mmap``
for large blocks), so that the comparison is not one of allocators. Our variants (``--ours-variants``):
``fp32``, ``bf16``, with ``_nokeep`` for ``train.keep_freed_memory=false`` and ``_noshare`` for
``ppo.share_prompt_prefill=false`` (each of the K samples runs its own prompt prefill, as before) and
``_nosharefwd`` for ``ppo.share_prompt_forward=false`` (the update's log-prob pass runs each row's prompt
again, as TRL does, instead of once per prompt and micro-batch) and ``_multinomial`` for
``ppo.sampler=multinomial`` (transformers' ``torch.multinomial`` draw, as TRL samples, instead of
``InverseCDFSampler``). The fastest of each side is reported.

Usage::

    .venv/bin/python benchmarks/grpo_vs_trl.py --quick        # 2 prompts x 4, 16 tokens, 1 timed step
    .venv/bin/python benchmarks/grpo_vs_trl.py                # 8 prompts x 4, 64 tokens, 3 timed steps

The last line of stdout is one JSON object (``bench``, ``ours_s_per_step``, ``trl_s_per_step``, ``ratio``
= trl / ours, ``ours_peak_rss_mb``, ``trl_peak_rss_mb``, then extra keys).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    DEFAULT_DATA,
    cpu_s,
    first_turn_prompts,
    machine_line,
    peak_rss_mb,
    run_child,
    untrained_reward_model,
)

K = 4  # samples per prompt


def prepare(args) -> dict:
    """Prompts (in our iteration order, for TRL too) and the reward model."""
    from alignforge.models.loading import ensure_embedded
    from alignforge.trainers.ppo import iteration_prompts

    work = Path(args.workdir)
    steps = args.steps + 1
    path = first_turn_prompts(args.data, args.prompts * steps, work / f"grpo-{args.prompts}x{steps}")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    order = [j for i in range(steps) for j in iteration_prompts(i, len(rows), args.prompts, args.seed)]
    (work / "trl_prompts.jsonl").write_text("".join(json.dumps(rows[j]) + "\n" for j in order), encoding="utf-8")
    return {"prompts_file": str(path), "rm": str(untrained_reward_model(work)), "base": str(ensure_embedded())}


def child_ours(args, variant: str) -> dict:
    import torch

    import alignforge.trainers.common as common
    import alignforge.trainers.ppo as ppo
    from alignforge.config import load_config

    spans: list[list[float]] = []
    real_rollout, real_update = ppo._Trainer.rollout, ppo._Trainer.update

    def rollout(self, it, module):
        spans.append([time.perf_counter(), cpu_s()])
        return real_rollout(self, it, module)

    def update(self, *a, **kw):
        out = real_update(self, *a, **kw)
        spans[-1] += [time.perf_counter(), cpu_s()]
        return out

    precision, *flags = variant.split("_")
    if precision not in ("fp32", "bf16") or not set(flags) <= {"nokeep", "noshare", "nosharefwd", "multinomial"}:
        raise SystemExit(
            f"unknown ours variant {variant!r}: fp32 or bf16, "
            "optionally with _nokeep / _noshare / _nosharefwd / _multinomial"
        )
    ppo._Trainer.rollout, ppo._Trainer.update = rollout, update
    ppo._Trainer._save_policy = lambda self, unwrapped, tmp: Path(tmp).mkdir(parents=True)
    common.save_checkpoint = lambda acc, output_dir, step, state, keep_last: Path(output_dir) / f"step-{step}"
    cfg = load_config(
        ppo.PPOConfig,
        None,
        [
            f"model.name_or_path={args.base}",
            f"ppo.reward_model={args.rm}",
            f"data.train_files=[{args.prompts_file}]",
            f"train.output_dir={tempfile.mkdtemp(prefix='grpo-ours-', dir=args.workdir)}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.save_every=0",
            f"train.seed={args.seed}",
            f"train.precision={precision}",
            "train.lr=1e-6",
            "train.scheduler=constant",
            "train.max_grad_norm=1.0",
            "train.weight_decay=0",
            "lora.enabled=false",
            "model.gradient_checkpointing=false",
            "ppo.advantage=grpo",
            f"ppo.iterations={args.steps + 1}",
            f"ppo.prompts_per_iteration={args.prompts}",
            f"ppo.gen_batch_prompts={args.prompts}",
            f"ppo.samples_per_prompt={K}",
            f"ppo.max_new_tokens={args.tokens}",
            "ppo.ignore_eos=true",
            "ppo.temperature=1.0",
            "ppo.top_p=1.0",
            "ppo.top_k=0",
            "ppo.ppo_epochs=1",
            "ppo.minibatches=1",
            "ppo.forward_batch_size=8",
            f"ppo.score_batch_size={args.prompts * K}",
            "ppo.kl_coef=0",
            "ppo.reference_reward=false",
            "ppo.clip=0.2",
            "ppo.sample_every=0",
            f"train.keep_freed_memory={'nokeep' not in flags}",
            f"ppo.share_prompt_prefill={'noshare' not in flags}",
            f"ppo.share_prompt_forward={'nosharefwd' not in flags}",
            f"ppo.sampler={'multinomial' if 'multinomial' in flags else 'inverse_cdf'}",
        ],
    )
    summary = ppo.train_ppo(cfg)
    timed = spans[1:]
    hist = summary["history"]
    return {
        "side": f"ours_{variant}",
        "s_per_step": sum(s[2] - s[0] for s in timed) / len(timed),
        "cpu_s_per_step": sum(s[3] - s[1] for s in timed) / len(timed),
        "step_s": [round(s[2] - s[0], 3) for s in spans],
        "gen_s": [round(h["gen_s"], 3) for h in hist],
        "score_s": [round(h["score_s"], 3) for h in hist],
        "train_s": [round(h["train_s"], 3) for h in hist],
        "reward_raw": [h["reward_raw"] for h in hist],
        "response_len": [h["response_len"] for h in hist],
        "steps": summary["step"],
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def child_trl(args, variant: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if variant.endswith("_keep"):
        from alignforge.trainers.common import keep_freed_memory

        keep_freed_memory()
    precision, micro = variant.removesuffix("_keep").split("_b")
    micro = int(micro)
    rows = args.prompts * K
    rows_ds = [json.loads(x) for x in open(Path(args.workdir) / "trl_prompts.jsonl", encoding="utf-8")]
    ds = Dataset.from_list(rows_ds)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    spans: list[list[float]] = []
    lens: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            spans.append([time.perf_counter(), cpu_s()])

        def on_step_end(self, a, state, control, **kw):
            spans[-1] += [time.perf_counter(), cpu_s()]

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lens.append(logs["completions/mean_length"])

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo-trl-", dir=args.workdir),
        per_device_train_batch_size=min(micro, rows),
        gradient_accumulation_steps=max(1, rows // micro),
        num_generations=K,
        max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        max_steps=args.steps + 1,
        shuffle_dataset=False,
        seed=args.seed,
        bf16=precision == "bf16",
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        log_completions=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    parts: dict[str, list[float]] = {"generate": [], "rewards": [], "generate_and_score": []}

    class Trainer(GRPOTrainer):  # the same methods, timed (per call; one of each per step here)
        def _generate_single_turn(self, *a, **kw):
            t = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            parts["generate"].append(round(time.perf_counter() - t, 3))
            return out

        def _calculate_rewards(self, *a, **kw):
            t = time.perf_counter()
            out = super()._calculate_rewards(*a, **kw)
            parts["rewards"].append(round(time.perf_counter() - t, 3))
            return out

        def _generate_and_score_completions(self, *a, **kw):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            parts["generate_and_score"].append(round(time.perf_counter() - t, 3))
            return out

    trainer = Trainer(
        model=model, reward_funcs=[args.rm], args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()]
    )
    assert trainer.ref_model is None
    trainer.train()
    timed = spans[1:]
    return {
        "side": f"trl_{variant}",
        "s_per_step": sum(s[2] - s[0] for s in timed) / len(timed),
        "cpu_s_per_step": sum(s[3] - s[1] for s in timed) / len(timed),
        "step_s": [round(s[2] - s[0], 3) for s in spans],
        "mean_completion_length": lens,
        **parts,
        "steps": trainer.state.global_step,
        "optim": str(cfg.optim),
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def child(side: str, args) -> dict:
    keys = ("workdir", "prompts", "tokens", "steps", "seed", "base", "rm", "prompts_file")
    flags = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    env = {"HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="hfds-", dir=args.workdir)}
    return run_child(__file__, side, flags, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 prompts x 4 samples, 16 tokens, 1 timed step")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default 8; 2 with --quick)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (default 64; 16 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 3; 1 with --quick)")
    ap.add_argument(
        "--trl-variants", default="fp32_b8,fp32_b32,bf16_b8,bf16_b8_keep", help="comma list: fp32_bN / bf16_bN [_keep]"
    )
    ap.add_argument(
        "--ours-variants",
        default="fp32",
        help="comma list: fp32, bf16 [_nokeep] [_noshare] [_nosharefwd] [_multinomial]",
    )
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default=None, help="default: $ALIGNFORGE_CACHE/bench (the RM is kept there)")
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.prompts = args.prompts or (2 if args.quick else 8)
    args.tokens = args.tokens or (16 if args.quick else 64)
    args.steps = args.steps or (1 if args.quick else 3)

    if args.child:
        if args.child.startswith("ours_"):
            res = child_ours(args, args.child.removeprefix("ours_"))
        else:
            res = child_trl(args, args.child.removeprefix("trl_"))
        print(json.dumps(res), flush=True)
        return

    from alignforge.models.loading import cache_dir

    args.workdir = str(Path(args.workdir) if args.workdir else cache_dir() / "bench")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = prepare(args)
    args.base, args.rm, args.prompts_file = info["base"], info["rm"], info["prompts_file"]
    machine_line({"prompts": args.prompts, "samples": K, "tokens": args.tokens, "timed_steps": args.steps, **info})
    runs = {}
    for v in [x.strip() for x in args.ours_variants.split(",") if x.strip()]:
        runs[f"ours_{v}"] = child(f"ours_{v}", args)
    for v in [x.strip() for x in args.trl_variants.split(",") if x.strip()]:
        runs[f"trl_{v}"] = child(f"trl_{v}", args)
    ours_key = min((k for k in runs if k.startswith("ours_")), key=lambda k: runs[k]["s_per_step"])
    trl_key = min((k for k in runs if k.startswith("trl_")), key=lambda k: runs[k]["s_per_step"])
    ours, trl = runs[ours_key], runs[trl_key]
    print(
        json.dumps(
            {
                "bench": "grpo_vs_trl",
                "ours_s_per_step": round(ours["s_per_step"], 3),
                "trl_s_per_step": round(trl["s_per_step"], 3),
                "ratio": round(trl["s_per_step"] / ours["s_per_step"], 3),
                "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1),
                "trl_peak_rss_mb": round(trl["peak_rss_mb"], 1),
                "ours_variant": ours_key,
                "trl_variant": trl_key,
                "cpu_ratio": round(trl["cpu_s_per_step"] / ours["cpu_s_per_step"], 3),
                "all_s_per_step": {k: round(r["s_per_step"], 3) for k, r in runs.items()},
                "all_peak_rss_mb": {k: round(r["peak_rss_mb"], 1) for k, r in runs.items()},
                "rows_per_step": args.prompts * K,
                "new_tokens": args.tokens,
                "timed_steps": args.steps,
                "total_wall_s": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
