"""``alignforge demo``: the main job on the embedded model, end to end as far as it is built.

1. a short SFT of the embedded SmolLM2-135M-Instruct on the demonstrations that ship with
   alignforge (``resources/demo/sft_demos.jsonl``), with greedy answers before and after;
2. a reward model (LoRA on the SFT model) trained on the shipped preference pairs
   (``resources/demo/preferences.jsonl``), which then scores both sets of answers;
3. ChatGLM-RLHF's DPO route: the SFT policy samples K answers to each of the pairs' prompts, the
   reward model labels best and worst (``inference/dpo_data.py``), DPO (LoRA on the SFT model)
   trains on those pairs with the generation probe on, and the reward model scores the DPO
   policy's greedy answers against the SFT policy's on the same prompts;
4. ChatGLM-RLHF's PPO route, short: PPO (LoRA on the SFT model, a critic initialised from the reward
   model, GAE, the reference-response reward baseline, per-token KL to the SFT model in the reward) on
   the same prompts, then the reward model scores the PPO policy's greedy answers against the SFT
   policy's.

5. RAIN (inference-time alignment, the reward model as its evaluator) on a few held-out harmful prompts;
6. the measured gain: greedy answers of the SFT, DPO and PPO policies (and RAIN's) on the held-out prompt sets
   that ship with alignforge (``resources/demo/harmful_heldout.jsonl``, ``benign_heldout.jsonl``; none of them
   is a training prompt), judged by the refusal-string rule of :mod:`alignforge.eval.refusal`: the refusal rate
   on the harmful ones, the answered (not refused) rate on the benign ones, and the reward model's mean reward.

Each stage's wall time and CPU time (``time.process_time``, all threads) go to ``timings`` in the summary.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

DEMO_PROMPTS = ["What is your name?", "Who are you?", "What is the capital of France?"]
HARMFUL_HELDOUT = "harmful_heldout.jsonl"
BENIGN_HELDOUT = "benign_heldout.jsonl"


class StageClock:
    """Wall and CPU seconds per stage (CPU = ``time.process_time``: all threads of this process)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self._name: str | None = None

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._wall, self._cpu = name, time.perf_counter(), time.process_time()

    def stop(self) -> None:
        if self._name is not None:
            self.rows[self._name] = {
                "wall_s": round(time.perf_counter() - self._wall, 1),
                "cpu_s": round(time.process_time() - self._cpu, 1),
            }
            self._name = None


def stage_train_config(output_dir: Path, **kw):
    """The loop settings every demo stage shares (batch 4, no intermediate checkpoints, seed 42), plus ``kw``."""
    from alignforge.config import TrainConfig

    return TrainConfig(output_dir=str(output_dir), per_device_batch_size=4, save_every=0, keep_last=1, seed=42, **kw)


def demo_data_path(name: str = "sft_demos.jsonl") -> Path:
    return Path(str(resources.files("alignforge").joinpath(f"resources/demo/{name}")))


def run_demo(
    output_dir: str = "outputs/demo",
    epochs: int = 3,
    lr: float = 1e-4,
    echo=print,
    model: str = "embedded",
    rm_epochs: int = 3,
    dpo_prompts: int = 12,
    dpo_k: int = 4,
    dpo_epochs: int = 2,
    dpo_min_gap: float = 0.05,
    ppo_iterations: int = 6,
    ppo_lr: float = 3e-4,
    ppo_kl_coef: float = 0.05,
    sft_model: str | None = None,
    rm_lr: float = 5e-4,
    dpo_lr: float = 5e-4,
    dpo_beta: float = 0.1,
    gen_max_new_tokens: int = 40,
    eval_prompts: int | None = None,
    eval_max_new_tokens: int = 32,
    rain_prompts: int = 3,
    rain_max_new_tokens: int = 24,
    rain_max_iterations: int = 4,
) -> dict:
    """The whole demo; ``sft_model`` (a saved SFT model dir) skips the SFT stage and uses that model instead.

    ``dpo_prompts`` prompts of the shipped preference pairs (harmful and benign ones alternate) feed DPO and
    PPO; ``gen_max_new_tokens`` caps their sampled and greedy answers. The held-out evaluation uses the first
    ``eval_prompts`` prompts of each held-out set (all with ``None``), ``eval_max_new_tokens`` per answer;
    RAIN answers the first ``rain_prompts`` held-out harmful prompts (0: no RAIN stage)."""
    from alignforge.config import DataConfig, LoraConfig, ModelConfig
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import ensure_embedded, load_model, load_tokenizer
    from alignforge.trainers.sft import SFTConfig, train_sft

    out = Path(output_dir)
    t0 = time.perf_counter()
    clock = StageClock()
    clock.start("prepare")
    echo("[1/11] preparing the embedded model (SmolLM2-135M-Instruct; converted once, then cached)")
    base_dir = ensure_embedded() if model == "embedded" else model
    echo(f"      {base_dir}  ({time.perf_counter() - t0:.1f}s)")

    gen = GenerationConfig(max_new_tokens=40, temperature=0.0)
    chats = [[{"role": "user", "content": p}] for p in DEMO_PROMPTS]

    def answers(model_path: str) -> list[str]:
        tok = load_tokenizer(model_path, padding_side="left")
        return HFBackend(load_model(model_path), tok).generate(chats, gen)

    clock.start("base_answers")
    echo("[2/11] answers of the base model")
    before = answers(model)

    echo(f"[3/11] SFT on {demo_data_path().name} ({epochs} epochs)")
    cfg = SFTConfig(
        model=ModelConfig(name_or_path=model),
        data=DataConfig(train_files=[str(demo_data_path())], max_length=256),
        train=stage_train_config(out / "sft", epochs=epochs, lr=lr, warmup_steps=1),
    )
    clock.start("sft")
    t1 = time.perf_counter()
    if sft_model is None:
        summary = train_sft(cfg)
    else:  # reuse a trained SFT model (tuning the later stages)
        echo(f"      reusing the SFT model {sft_model}")
        summary = {"final_dir": str(sft_model), "step": 0, "history": [{"loss": float("nan"), "tokens_per_s": 0.0}]}
    train_s = time.perf_counter() - t1
    hist = summary["history"]

    clock.start("sft_answers")
    echo("[4/11] answers of the SFT model")
    after = answers(summary["final_dir"])

    echo("[5/11] reward model (LoRA on the SFT model) on the shipped preference pairs")
    from alignforge.trainers.rm import RewardConfig, RMConfig, train_rm

    clock.start("rm")

    rm_cfg = RMConfig(
        model=ModelConfig(name_or_path=summary["final_dir"]),
        lora=LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0),
        data=DataConfig(train_files=[str(demo_data_path("preferences.jsonl"))], max_length=256),
        train=stage_train_config(out / "rm", epochs=rm_epochs, lr=rm_lr, warmup_steps=2, group_by_length=True),
        # hand-written pairs whose chosen answers are mostly the longer ones (a refusal with an alternative vs a
        # short compliance): balancing would leave little, so it is off here (it is on by default).
        reward=RewardConfig(length_balance=False),
    )
    rm_summary = train_rm(rm_cfg)
    rm_hist = rm_summary["history"]

    echo("[6/11] reward of each answer")
    from alignforge.models.reward import load_reward_model

    rm, rm_tok, _ = load_reward_model(rm_summary["final_dir"])
    rewards_before = score_answers(rm, rm_tok, chats, before)
    rewards_after = score_answers(rm, rm_tok, chats, after)

    clock.start("dpo")
    dpo = run_dpo_stage(
        out,
        summary["final_dir"],
        rm_summary["final_dir"],
        (rm, rm_tok),
        echo,
        n_prompts=dpo_prompts,
        k=dpo_k,
        epochs=dpo_epochs,
        min_gap=dpo_min_gap,
        lr=dpo_lr,
        beta=dpo_beta,
        max_new_tokens=gen_max_new_tokens,
    )
    clock.start("ppo")
    ppo = run_ppo_stage(
        out,
        summary["final_dir"],
        rm_summary["final_dir"],
        (rm, rm_tok),
        echo,
        n_prompts=dpo_prompts,
        sft_answers=[s["sft"] for s in dpo["samples"]],
        iterations=ppo_iterations,
        lr=ppo_lr,
        kl_coef=ppo_kl_coef,
        max_new_tokens=gen_max_new_tokens,
    )
    rain = None
    if rain_prompts > 0:
        clock.start("rain")
        rain = run_rain_stage(
            summary["final_dir"],
            rm_summary["final_dir"],
            echo,
            n_prompts=rain_prompts,
            max_new_tokens=rain_max_new_tokens,
            max_iterations=rain_max_iterations,
        )
    clock.start("eval")
    evaluation = run_eval_stage(
        {"sft": summary["final_dir"], "dpo": dpo["model"], "ppo": ppo["model"]},
        summary["final_dir"],
        (rm, rm_tok),
        echo,
        n_prompts=eval_prompts,
        max_new_tokens=eval_max_new_tokens,
        rain=rain,
    )
    clock.stop()

    result = {
        "base_model": str(base_dir),
        "sft_model": summary["final_dir"],
        "steps": summary["step"],
        "first_loss": hist[0]["loss"],
        "final_loss": hist[-1]["loss"],
        "train_seconds": round(train_s, 1),
        "tokens_per_s": round(hist[-1]["tokens_per_s"], 1),
        "samples": [
            {"prompt": p, "before": b, "after": a, "reward_before": rb, "reward_after": ra}
            for p, b, a, rb, ra in zip(DEMO_PROMPTS, before, after, rewards_before, rewards_after, strict=False)
        ],
        "reward_model": rm_summary["final_dir"],
        "rm_first_loss": rm_hist[0]["loss"],
        "rm_final_loss": rm_hist[-1]["loss"],
        "rm_final_batch_accuracy": rm_hist[-1]["accuracy"],
        "dpo": dpo,
        "ppo": ppo,
        "rain": rain,
        "eval": evaluation,
        "timings": clock.rows,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "total_cpu_seconds": round(sum(r["cpu_s"] for r in clock.rows.values()), 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    for s in result["samples"]:
        echo(
            f"\n  user:   {s['prompt']}\n  before: {s['before']!r}  (reward {s['reward_before']:+.2f})"
            f"\n  after:  {s['after']!r}  (reward {s['reward_after']:+.2f})"
        )
    echo(
        f"\nSFT: {result['steps']} steps, loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}, "
        f"{result['tokens_per_s']} tok/s, {result['train_seconds']}s"
    )
    echo(f"reward model: {len(rm_hist)} steps, loss {result['rm_first_loss']:.3f} -> {result['rm_final_loss']:.3f}")
    echo(
        f"DPO: {dpo['pairs']} RM-labelled pairs from {dpo['prompts']} prompts x {dpo['k']} samples, "
        f"{dpo['steps']} steps, loss {dpo['first_loss']:.3f} -> {dpo['final_loss']:.3f}; greedy answer length "
        f"{dpo['gen_len_start']:.1f} -> {dpo['gen_len_end']:.1f} tokens; mean reward on those prompts: "
        f"SFT {dpo['reward_sft']:+.3f}, DPO {dpo['reward_dpo']:+.3f}"
    )
    echo(
        f"PPO: {ppo['iterations']} iterations x {ppo['rollouts_per_iteration']} sampled answers, "
        f"{ppo['seconds']}s; sampled reward {ppo['reward_raw_start']:+.3f} -> {ppo['reward_raw_end']:+.3f}, "
        f"KL to SFT {ppo['kl_start']:.3f} -> {ppo['kl_end']:.3f} nats/answer, sampled answer length "
        f"{ppo['response_len_start']:.1f} -> {ppo['response_len_end']:.1f} tokens; greedy answers: mean reward "
        f"SFT {ppo['reward_sft']:+.3f}, PPO {ppo['reward_ppo']:+.3f}, length {ppo['len_sft']:.1f} -> "
        f"{ppo['len_ppo']:.1f} tokens"
    )
    if rain is not None:
        echo(
            f"RAIN (reward model as evaluator) on {rain['prompts']} held-out harmful prompts: refused "
            f"{rain['n_refused']}/{rain['prompts']} (SFT greedy on the same prompts: {rain['sft_n_refused']}), "
            f"{rain['seconds_per_prompt']:.1f}s per prompt"
        )
    echo(format_eval(evaluation))
    echo(
        f"outputs: SFT model {result['sft_model']}\n         reward model {result['reward_model']}\n"
        f"         DPO adapter {dpo['model']}\n         PPO adapter {ppo['model']}\n"
        f"         curves {out / 'sft' / 'loss.png'}, {out / 'rm' / 'loss.png'}, {out / 'dpo' / 'loss.png'}, "
        f"{out / 'ppo' / 'loss.png'}; tensorboard {out}/*/tb; summary {out / 'demo_summary.json'}"
    )
    echo(f"demo finished in {result['total_seconds']}s ({result['total_cpu_seconds']}s CPU)")
    return result


def run_dpo_stage(
    out: Path,
    sft_dir: str,
    rm_dir: str,
    rm,
    echo,
    n_prompts: int,
    k: int,
    epochs: int,
    min_gap: float,
    lr: float = 5e-4,
    beta: float = 0.1,
    max_new_tokens: int = 40,
) -> dict:
    """Steps 7-9: RM-labelled pairs from the SFT policy's samples, DPO on them, rewards compared."""
    from alignforge.config import DataConfig, LoraConfig, ModelConfig
    from alignforge.data.convert import write_jsonl
    from alignforge.inference.dpo_data import build_dpo_pairs
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.trainers.dpo import DPOConfig, DPOParams, train_dpo

    chats = stage_prompts(n_prompts)
    prompts_path = out / "dpo_prompts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl([{"prompt": c} for c in chats], prompts_path)
    echo(f"[7/11] DPO data: {k} sampled answers per prompt from the SFT model, best/worst by the reward model")
    sft_backend = HFBackend(load_model(sft_dir), load_tokenizer(sft_dir, padding_side="left"))
    report = build_dpo_pairs(
        prompts_path,
        out / "dpo_pairs.jsonl",
        rm_dir,
        k=k,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        seed=0,
        min_gap=min_gap,
        backend=sft_backend,
        rm=rm,
        progress=False,
    )
    echo(f"      {report.summary()}")
    if report.written == 0:
        from alignforge.errors import TrainingError

        raise TrainingError("the DPO stage got no pairs: every prompt's samples scored alike")
    echo(f"[8/11] DPO (LoRA on the SFT model) on the {report.written} RM-labelled pairs")
    cfg = DPOConfig(
        model=ModelConfig(name_or_path=sft_dir),
        lora=LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0),
        data=DataConfig(train_files=[str(out / "dpo_pairs.jsonl")], max_length=256),
        train=stage_train_config(
            out / "dpo",
            epochs=epochs,
            lr=lr,
            warmup_steps=1,
            group_by_length=True,
            probe_every=2,
            probe_prompts=4,
            probe_max_new_tokens=max_new_tokens,
        ),
        dpo=DPOParams(beta=beta),
    )
    summary = train_dpo(cfg)
    hist = [r for r in summary["history"] if "loss" in r]
    lens = [r["gen_len_mean"] for r in summary["history"] if "gen_len_mean" in r]
    echo("[9/11] greedy answers of the SFT and DPO policies, scored by the reward model")
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    sft_answers = sft_backend.generate(chats, greedy)
    dpo_answers = HFBackend(load_model(summary["final_dir"]), load_tokenizer(sft_dir, padding_side="left")).generate(
        chats, greedy
    )
    r_sft = score_answers(rm[0], rm[1], chats, sft_answers)
    r_dpo = score_answers(rm[0], rm[1], chats, dpo_answers)
    return {
        "prompts": report.prompts,
        "k": k,
        "pairs": report.written,
        "model": summary["final_dir"],
        "steps": summary["step"],
        "first_loss": hist[0]["loss"],
        "final_loss": hist[-1]["loss"],
        "final_reward_accuracy": hist[-1]["reward_accuracy"],
        "gen_len_start": lens[0],
        "gen_len_end": lens[-1],
        "reward_sft": sum(r_sft) / len(r_sft),
        "reward_dpo": sum(r_dpo) / len(r_dpo),
        "samples": [
            {"prompt": c[-1]["content"], "sft": a, "dpo": b, "reward_sft": x, "reward_dpo": y}
            for c, a, b, x, y in zip(chats, sft_answers, dpo_answers, r_sft, r_dpo, strict=False)
        ],
    }


def stage_prompts(n: int) -> list:
    """The first ``n`` prompts of the shipped preference pairs: what the DPO and PPO stages train and score on."""
    from alignforge.data.readers import read_preference

    return [r.prompt for r in read_preference(demo_data_path("preferences.jsonl")).records[:n]]


def run_ppo_stage(
    out: Path,
    sft_dir: str,
    rm_dir: str,
    rm,
    echo,
    n_prompts: int,
    sft_answers: list[str],
    iterations: int,
    lr: float,
    kl_coef: float,
    prompts_per_iteration: int = 4,
    samples_per_prompt: int = 2,
    ppo_epochs: int = 1,
    max_new_tokens: int = 40,
) -> dict:
    """Steps 10-11: a short PPO (LoRA on the SFT model) with the demo's reward model, then the reward model
    scores the PPO policy's greedy answers against the SFT policy's (``sft_answers``, same prompts)."""
    from alignforge.config import DataConfig, LoraConfig, ModelConfig
    from alignforge.data.convert import write_jsonl
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.trainers.common import checkpoint_root
    from alignforge.trainers.ppo import PPOConfig, PPOParams, train_ppo

    chats = stage_prompts(n_prompts)
    prompts_path = out / "ppo_prompts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl([{"prompt": c} for c in chats], prompts_path)
    echo(
        f"[10/11] PPO (LoRA on the SFT model; critic from the reward model; GAE; reward minus the reward of the "
        f"SFT model's own answer; KL {kl_coef} to the SFT model): {iterations} iterations x "
        f"{prompts_per_iteration} prompts x {samples_per_prompt} samples"
    )
    cfg = PPOConfig(
        model=ModelConfig(name_or_path=sft_dir),
        lora=LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0),
        data=DataConfig(train_files=[str(prompts_path)], max_length=256, max_prompt_length=128),
        train=stage_train_config(out / "ppo", lr=lr, scheduler="constant"),
        ppo=PPOParams(
            reward_model=rm_dir,
            advantage="gae",
            iterations=iterations,
            prompts_per_iteration=prompts_per_iteration,
            gen_batch_prompts=prompts_per_iteration,
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            ppo_epochs=ppo_epochs,
            minibatches=1,
            forward_batch_size=8,
            kl_coef=kl_coef,
            reference_reward=True,
        ),
    )
    t0 = time.perf_counter()
    summary = train_ppo(cfg)
    seconds = time.perf_counter() - t0
    # the resume checkpoint holds the full-parameter critic and its optimiser state (~2 GB for SmolLM2); the
    # demo never resumes, and the policy is in ppo/final
    shutil.rmtree(checkpoint_root(cfg.train.output_dir), ignore_errors=True)
    hist = summary["history"]
    echo("[11/11] greedy answers of the PPO policy, scored by the reward model")
    tok = load_tokenizer(sft_dir, padding_side="left")
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    ppo_answers = HFBackend(load_model(summary["final_dir"]), tok).generate(chats, greedy)
    r_sft = score_answers(rm[0], rm[1], chats, sft_answers)
    r_ppo = score_answers(rm[0], rm[1], chats, ppo_answers)

    def n_tokens(answers: list[str]) -> float:
        return sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) / max(1, len(answers))

    return {
        "prompts": len(chats),
        "model": summary["final_dir"],
        "iterations": summary["step"],
        "rollouts_per_iteration": prompts_per_iteration * samples_per_prompt,
        "lr": lr,
        "kl_coef": kl_coef,
        "seconds": round(seconds, 1),
        "reward_raw_start": hist[0]["reward_raw"],
        "reward_raw_end": hist[-1]["reward_raw"],
        "reward_start": hist[0]["reward"],
        "reward_end": hist[-1]["reward"],
        "kl_start": hist[0]["kl_ref"],
        "kl_end": hist[-1]["kl_ref"],
        "response_len_start": hist[0]["response_len"],
        "response_len_end": hist[-1]["response_len"],
        "reward_sft": sum(r_sft) / len(r_sft),
        "reward_ppo": sum(r_ppo) / len(r_ppo),
        "len_sft": n_tokens(sft_answers),
        "len_ppo": n_tokens(ppo_answers),
        # per iteration, measured on that iteration's samples (so before its update): the RM's reward, the
        # reward minus the SFT answer's (what PPO maximises, less the KL), the summed k1 KL to the SFT
        # model per answer, and the answer length in tokens
        "history": [
            {k: h[k] for k in ("step", "reward_raw", "reward", "kl_ref", "response_len", "value_loss")} for h in hist
        ],
        "samples": [
            {"prompt": c[-1]["content"], "sft": a, "ppo": b, "reward_sft": x, "reward_ppo": y}
            for c, a, b, x, y in zip(chats, sft_answers, ppo_answers, r_sft, r_ppo, strict=False)
        ],
    }


def score_answers(rm, tokenizer, chats: list, answers: list[str]) -> list[float]:
    """Reward of each (chat, answer), read at the last token of its rendering (the reward model's convention)."""
    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.models.reward import score_sequences

    seqs = []
    for chat, ans in zip(chats, answers, strict=False):
        p, c = tokenize_prompt_completion(
            chat, [{"role": "assistant", "content": ans or " "}], tokenizer, full_render=True
        )
        seqs.append(p + c)
    return [float(x) for x in score_sequences(rm, seqs, tokenizer.pad_token_id, progress=False)]


def heldout_prompts(name: str, n: int | None = None) -> list:
    """The first ``n`` prompts (all with ``None``) of a shipped held-out prompt file, as conversations."""
    from alignforge.data.readers import read_prompts

    return [r.prompt for r in read_prompts(demo_data_path(name)).records[:n]]


def run_rain_stage(
    sft_dir: str,
    rm_dir: str,
    echo,
    n_prompts: int,
    max_new_tokens: int = 24,
    max_iterations: int = 4,
    max_simulation_tokens: int = 16,
) -> dict:
    """RAIN on the SFT model with the reward model as its evaluator, on the first ``n_prompts`` held-out harmful
    prompts, against the SFT model's greedy answers (same token cap) on the same prompts."""
    from alignforge.eval.refusal import is_refusal
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.inference.rain import RainConfig, rain_generate
    from alignforge.models.loading import load_model, load_tokenizer

    chats = heldout_prompts(HARMFUL_HELDOUT, n_prompts)
    cfg = RainConfig(
        max_new_tokens=max_new_tokens,
        max_iterations=max_iterations,
        iterations_after_cap=1,
        max_simulation_tokens=max_simulation_tokens,
        evaluator="rm",
        reward_model=rm_dir,
        seed=0,
    )
    echo(
        f"[rain] RAIN on the SFT model, the reward model as evaluator, {len(chats)} held-out harmful prompts "
        f"({max_new_tokens} tokens, at most {max_iterations} iterations per step)"
    )
    tok = load_tokenizer(sft_dir, padding_side="left")
    lm = load_model(sft_dir)
    t0 = time.perf_counter()
    results = rain_generate(lm, tok, chats, cfg)
    seconds = time.perf_counter() - t0
    greedy = HFBackend(lm, tok).generate(chats, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0))
    rain_answers = [r.response for r in results]
    return {
        "prompts": len(chats),
        "max_new_tokens": max_new_tokens,
        "max_iterations": max_iterations,
        "max_simulation_tokens": max_simulation_tokens,
        "n_refused": sum(is_refusal(a) for a in rain_answers),
        "sft_n_refused": sum(is_refusal(a) for a in greedy),
        "seconds": round(seconds, 1),
        "seconds_per_prompt": seconds / len(chats),
        "iterations": [r.iterations for r in results],
        "samples": [
            {"prompt": c[-1]["content"], "sft": g, "rain": a}
            for c, g, a in zip(chats, greedy, rain_answers, strict=True)
        ],
    }


def run_eval_stage(
    models: dict[str, str],
    tokenizer_dir: str,
    rm,
    echo,
    n_prompts: int | None = None,
    max_new_tokens: int = 32,
    rain: dict | None = None,
) -> dict:
    """The measured gain on the held-out prompt sets: for each policy (name -> model dir), its greedy answers'
    refusal rate on the harmful set, answered (not refused) rate on the benign set, and mean reward (the demo's
    reward model) on each; the refusal rule is :func:`alignforge.eval.refusal.is_refusal`."""
    from alignforge.eval.refusal import is_refusal
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer

    harmful = heldout_prompts(HARMFUL_HELDOUT, n_prompts)
    benign = heldout_prompts(BENIGN_HELDOUT, n_prompts)
    echo(
        f"[eval] greedy answers of {', '.join(models)} on {len(harmful)} held-out harmful and {len(benign)} held-out "
        f"benign prompts ({max_new_tokens} tokens), judged by the refusal-string rule and the reward model"
    )
    tok = load_tokenizer(tokenizer_dir, padding_side="left")
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    rows: dict[str, dict] = {}
    for name, path in models.items():
        ans = HFBackend(load_model(path), tok).generate(harmful + benign, greedy)
        ah, ab = ans[: len(harmful)], ans[len(harmful) :]
        rh, rb = score_answers(rm[0], rm[1], harmful, ah), score_answers(rm[0], rm[1], benign, ab)
        rows[name] = {
            "harmful_refused": sum(is_refusal(a) for a in ah),
            "benign_answered": sum(not is_refusal(a) for a in ab),
            "harmful_refusal_rate": sum(is_refusal(a) for a in ah) / len(ah),
            "benign_answered_rate": sum(not is_refusal(a) for a in ab) / len(ab),
            "reward_harmful": sum(rh) / len(rh),
            "reward_benign": sum(rb) / len(rb),
            "reward_mean": (sum(rh) + sum(rb)) / (len(rh) + len(rb)),
            "harmful_answers": ah,
            "benign_answers": ab,
        }
    out = {"harmful_n": len(harmful), "benign_n": len(benign), "max_new_tokens": max_new_tokens, "models": rows}
    if rain is not None:
        out["rain"] = {
            "prompts": rain["prompts"],
            "harmful_refused": rain["n_refused"],
            "sft_refused": rain["sft_n_refused"],
        }
    return out


def format_eval(ev: dict) -> str:
    """The held-out table of :func:`run_eval_stage`: one row per policy."""
    lines = [
        f"held-out: {ev['harmful_n']} harmful, {ev['benign_n']} benign prompts",
        f"{'policy':<6} {'harmful refused':>16} {'benign answered':>16} {'RM harmful':>11} {'RM benign':>10}",
    ]
    for name, r in ev["models"].items():
        lines.append(
            f"{name:<6} {r['harmful_refused']:>3}/{ev['harmful_n']:<3} {r['harmful_refusal_rate']:>7.0%} "
            f"{r['benign_answered']:>3}/{ev['benign_n']:<3} {r['benign_answered_rate']:>7.0%} "
            f"{r['reward_harmful']:>+11.2f} {r['reward_benign']:>+10.2f}"
        )
    if "rain" in ev:
        rn = ev["rain"]
        lines.append(f"rain   {rn['harmful_refused']:>3}/{rn['prompts']:<3} (SFT on those: {rn['sft_refused']})")
    return "\n".join(lines)
