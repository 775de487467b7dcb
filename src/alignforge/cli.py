"""The ``alignforge`` command line.

Every command imports what it needs inside its body, so ``alignforge --help`` is fast.
Errors that a user can cause (:class:`~alignforge.errors.AlignforgeError`) are printed as
one clear line on stderr with exit code 2; no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from alignforge.errors import AlignforgeError

app = typer.Typer(
    name="alignforge",
    help=(
        "Align LLMs with human preferences: data, annotation, SFT, reward models, DPO/IPO, ULMA/KTO, "
        "PPO/GRPO, generation."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Read, validate, convert and describe datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
rm_app = typer.Typer(help="Reward models: train, evaluate, score.", no_args_is_help=True)
app.add_typer(rm_app, name="rm")
eval_app = typer.Typer(
    help=(
        "Evaluation: answer prompt sets, LLM judges, win rates, attack success / over-refusal, response lengths, "
        "RM accuracy."
    ),
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")


@eval_app.command("generate")
def eval_generate(
    set_: str = typer.Option(..., "--set", help="alignbench | mtbench | advbench | hh | redinstruct | jsonl"),
    data: Path = typer.Option(..., "--data", help="The set's file (mtbench: question.jsonl or its folder)."),
    model: str = typer.Option(..., "--model", help="Model: 'embedded', an HF dir, adapter dir, .gguf or hub id."),
    out: Path = typer.Option(..., "--out", help="Output JSONL (a rerun resumes; other settings are refused)."),
    category: Optional[List[str]] = typer.Option(None, "--category", help="Only this category (repeatable)."),
    n: Optional[int] = typer.Option(None, "--n", help="Only the first N prompts (after --category)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (the default)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generate call."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if available)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Answer a prompt set (MT-Bench: turn 2 after the model's own first answer) into a response JSONL."""
    from alignforge.eval.responses import generate_responses

    r = generate_responses(
        set_,
        data,
        model,
        out,
        categories=list(category) if category else None,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    typer.echo(f"done: {r['prompts']} prompts ({r['generated']} generated, {r['resumed']} already there)")
    typer.echo(f"responses: {r['out']}")


@eval_app.command("harm")
def eval_harm(
    responses: Path = typer.Argument(..., help="Responses to AdvBench (or other harmful) prompts (JSONL)."),
    benign: Optional[Path] = typer.Option(None, "--benign", help="Responses to benign prompts: over-refusal."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON report (default: RESPONSES with .harm.json)."),
    n_resamples: int = typer.Option(9999, "--n-resamples", help="Bootstrap resamples for the CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
) -> None:
    """Attack success rate (llm-attacks refusal rule) and over-refusal, with bootstrap CIs."""
    from alignforge.eval.harm import format_harm, harm_report

    rep = harm_report(responses, benign, n_resamples=n_resamples, seed=seed)
    dst = out or responses.with_name(responses.name.removesuffix(".jsonl") + ".harm.json")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    typer.echo(format_harm(rep))
    typer.echo(f"report: {dst}")


@eval_app.command("lengths")
def eval_lengths(
    files: List[Path] = typer.Argument(..., help="Response JSONL files (e.g. from `eval generate`)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Count tokens (else whitespace words)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the report as JSON."),
) -> None:
    """Response length per file and per category: mean and median (ChatGLM-RLHF Table 6)."""
    from alignforge.eval.lengths import format_lengths, length_report

    tok = None
    if tokenizer is not None:
        from alignforge.models.loading import load_tokenizer

        tok = load_tokenizer(tokenizer)
    rep = length_report(files, tok)
    typer.echo(format_lengths(rep))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        typer.echo(f"report: {out}")


@eval_app.command("rm-accuracy")
def eval_rm_accuracy(
    rm_dir: Path = typer.Argument(..., help="A saved reward model (e.g. outputs/rm/final)."),
    labels: List[Path] = typer.Argument(..., help="Human preference labels: annotation export, TRL format or raw HH."),
    out: Path = typer.Option(..., "--out", help="JSON result (written atomically)."),
    by: str = typer.Option("category", "--by", help="Group by this record field (or metadata field)."),
    max_length: int = typer.Option(512, help="Fit prompt + response in this many tokens (as in training)."),
    batch_size: int = typer.Option(8, help="Pairs per forward pass."),
    limit: Optional[int] = typer.Option(None, help="Only the first N valid pairs."),
    on_error: str = typer.Option("skip", help="skip: drop invalid records and report them; raise: stop at the first."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the CIs."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA if available)."),
) -> None:
    """Reward-model accuracy against human preference labels, overall and per category (ChatGLM-RLHF Table 5)."""
    from alignforge.eval.rm_accuracy import format_rm_accuracy, rm_accuracy

    if on_error not in ("raise", "skip"):
        _err(f"--on-error must be raise or skip, not {on_error!r}")
    res = rm_accuracy(
        rm_dir,
        labels,
        by=by,
        max_length=max_length,
        batch_size=batch_size,
        limit=limit,
        on_error=on_error,
        n_boot=n_boot,
        seed=seed,
        device=device,
        out_path=out,
    )
    typer.echo(res["data_report"]["summary"])
    typer.echo(format_rm_accuracy(res))
    typer.echo(f"result: {out}")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run dirs (each with metrics.jsonl; samples.jsonl if any)."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML page (self-contained; written atomically)."),
    eval_files: Optional[List[Path]] = typer.Option(
        None, "--eval", help="Eval JSON (harm, lengths, rm-accuracy, rm eval summary, or any JSON with rows)."
    ),
    responses: Optional[List[Path]] = typer.Option(
        None, "--responses", help="Response JSONL files: histograms and examples side by side (repeatable)."
    ),
    examples: int = typer.Option(8, "--examples", help="Example prompts shown side by side."),
    title: str = typer.Option("alignforge report", "--title"),
) -> None:
    """One self-contained HTML page: training curves, score/length histograms, eval tables, example responses."""
    from alignforge.eval.report import write_report

    path = write_report(
        run_dirs, out, eval_files=eval_files or [], responses=responses or [], n_examples=examples, title=title
    )
    typer.echo(f"report: {path}")


def _write_report(rep: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@eval_app.command("judge")
def eval_judge(
    responses: Path = typer.Argument(..., help="Responses to grade (JSONL from `eval generate`)."),
    mode: str = typer.Option(..., "--mode", help="mtbench | alignbench | pairwise"),
    data: Path = typer.Option(..., "--data", help="MT-Bench folder (judge_prompts.jsonl) or AlignBench folder."),
    out: Path = typer.Option(..., "--out", help="JSON report."),
    against: Optional[Path] = typer.Option(None, "--against", help="pairwise: the B responses (ids matched)."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible API root."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The judge model's name."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Env var holding the API key."),
    local_judge: Optional[str] = typer.Option(None, "--local-judge", help="Judge with this local model instead."),
    concurrency: int = typer.Option(4, "--concurrency", help="Judge requests in flight."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Judge cache folder (default: alignforge cache)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Judge answer length."),
    logprob_verdict: bool = typer.Option(False, "--logprob-verdict", help="pairwise: also P(verdict) from logprobs."),
    rating_logprobs: bool = typer.Option(
        False,
        "--rating-logprobs",
        help="mtbench: pre-fill 'Rating: [[' and score the expected rating from the next token's "
        "logprobs (needs vLLM's continue_final_message: vllm serve, alignforge serve, --local-judge).",
    ),
    n_resamples: int = typer.Option(9999, "--n-resamples", help="Bootstrap resamples for the CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    device: Optional[str] = typer.Option(None, "--device", help="--local-judge device."),
) -> None:
    """Grade responses with an LLM judge: MT-Bench scores, AlignBench scores, or pairwise A vs B."""
    from alignforge.eval.grading import MODES, format_judge, make_judge, run_judge

    if mode not in MODES:
        _err(f"unknown --mode {mode!r}; known: {', '.join(MODES)}")
    judge = make_judge(judge_url, judge_model, api_key_env, local_judge, concurrency, cache, device)
    rep = run_judge(
        responses, mode, judge, data, against, max_tokens, logprob_verdict, n_resamples, seed, rating_logprobs
    )
    _write_report(rep, out)
    typer.echo(format_judge(rep))
    typer.echo(f"report: {out}")


@eval_app.command("winrate")
def eval_winrate(
    a: Path = typer.Argument(..., help="Responses of model A (JSONL)."),
    b: Path = typer.Argument(..., help="Responses of model B (JSONL, ids matched)."),
    out: Path = typer.Option(..., "--out", help="JSON report."),
    rm: Optional[Path] = typer.Option(None, "--rm", help="Verdicts from this alignforge reward model."),
    tie_eps: float = typer.Option(1e-6, "--tie-eps", help="--rm: a tie when |r(A) - r(B)| < eps."),
    data: Optional[Path] = typer.Option(None, "--data", help="Judge: the MT-Bench folder (pair-v2 prompts)."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible API root."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The judge model's name."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Env var holding the API key."),
    local_judge: Optional[str] = typer.Option(None, "--local-judge", help="Judge with this local model instead."),
    concurrency: int = typer.Option(4, "--concurrency", help="Judge requests in flight."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Judge cache folder (default: alignforge cache)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Judge answer length."),
    n_resamples: int = typer.Option(9999, "--n-resamples", help="Bootstrap resamples for the CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    device: Optional[str] = typer.Option(None, "--device", help="Device for --rm / --local-judge."),
) -> None:
    """Win/tie/loss of A against B (pairwise judge or reward model), raw and length-controlled."""
    from alignforge.eval.grading import make_judge
    from alignforge.eval.winrate import format_winrate, run_winrate

    judge = None
    if rm is None or judge_url is not None or local_judge is not None:
        judge = make_judge(judge_url, judge_model, api_key_env, local_judge, concurrency, cache, device)
    rep = run_winrate(a, b, judge, data, rm, tie_eps, max_tokens, n_resamples, seed, device)
    _write_report(rep, out)
    typer.echo(format_winrate(rep))
    typer.echo(f"report: {out}")


def _register_annotation() -> None:
    from alignforge.annotate.cli import annotate_app, pairs_app  # imports typer only

    app.add_typer(annotate_app, name="annotate", help="Annotation web app: serve, import, export, agreement, users.")
    app.add_typer(pairs_app, name="pairs", help="Sample response pairs for annotation.")


_register_annotation()


def _err(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- training


def _load_cfg(cls, config: Optional[Path], overrides: Optional[List[str]], resume: bool):
    """Config from an optional YAML file plus overrides; a first argument ``k=v`` is an override."""
    from alignforge.config import load_config

    ov = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        ov.insert(0, str(config))
        config = None
    if resume:
        ov.append("train.resume=true")
    return load_config(cls, config, ov)


def _run_trainer(
    cls, train_fn, config, overrides, resume, extra_keys: tuple[str, ...] = (), unit: str = "steps"
) -> None:
    cfg = _load_cfg(cls, config, overrides, resume)
    summary = train_fn(cfg)
    out = Path(cfg.train.output_dir)
    last = summary["history"][-1] if summary["history"] else {}
    extras = "".join(f", {k} {last[k]:.4f}" for k in extra_keys if k in last)
    typer.echo(f"done: {summary['step']} {unit}, final loss {last.get('loss', float('nan')):.4f}{extras}")
    typer.echo(f"model: {summary['final_dir']}")
    typer.echo(f"curves: {out / 'loss.png'}  metrics: {out / 'metrics.jsonl'}  tensorboard: {out / 'tb'}")


_CONFIG_ARG = typer.Argument(None, help="YAML config (see configs/); a first key=value is taken as an override.")
_OVERRIDES_ARG = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-5 lora.enabled=true")
_RESUME_OPT = typer.Option(False, "--resume", help="Continue from the newest checkpoint in train.output_dir.")
_DEVICE_OPT = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available, else the CPU).")


@app.command()
def sft(
    config: Optional[Path] = _CONFIG_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG, resume: bool = _RESUME_OPT
) -> None:
    """Supervised fine-tuning on demonstrations ({messages} or {prompt, completion} JSONL)."""
    from alignforge.trainers.sft import SFTConfig, train_sft

    _run_trainer(SFTConfig, train_sft, config, overrides, resume)


@app.command()
def dpo(
    config: Optional[Path] = _CONFIG_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG, resume: bool = _RESUME_OPT
) -> None:
    """Pairwise DPO (+NTP), cDPO or IPO on preference pairs; reference log-probs cached on disk."""
    from alignforge.trainers.dpo import DPOConfig, train_dpo

    _run_trainer(DPOConfig, train_dpo, config, overrides, resume, ("reward_accuracy", "reward_margin"))


@app.command()
def ulma(
    config: Optional[Path] = _CONFIG_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG, resume: bool = _RESUME_OPT
) -> None:
    """Point-wise alignment: ULMA, point-wise DPO or KTO (ulma.loss); preference files are converted."""
    from alignforge.trainers.ulma import ULMAConfig, train_ulma

    _run_trainer(ULMAConfig, train_ulma, config, overrides, resume, ("sigmoid_reward_pos", "sigmoid_reward_neg"))


@app.command()
def ppo(
    config: Optional[Path] = _CONFIG_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG, resume: bool = _RESUME_OPT
) -> None:
    """PPO with ChatGLM-RLHF's reference-response reward and NTP loss, or GRPO/RLOO/ReMax (ppo.advantage)."""
    from alignforge.trainers.ppo import PPOConfig, train_ppo

    _run_trainer(PPOConfig, train_ppo, config, overrides, resume, ("reward", "kl_ref"), unit="iterations")


@app.command("dpo-data")
def dpo_data(
    prompts: Path = typer.Argument(..., help="Prompts JSONL ({prompt} or {messages} ending on a user turn)."),
    out: Path = typer.Argument(..., help="Preference JSONL to write (atomically)."),
    reward_model: str = typer.Option(..., "--reward-model", help="A reward model dir from `alignforge rm train`."),
    policy: str = typer.Option("embedded", help="The policy that samples responses (usually the SFT model)."),
    k: int = typer.Option(4, help="Responses sampled per prompt."),
    min_gap: float = typer.Option(0.0, help="Skip prompts whose best and worst rewards differ by less."),
    temperature: float = typer.Option(0.9),
    top_p: float = typer.Option(0.95),
    max_new_tokens: int = typer.Option(128),
    seed: int = typer.Option(0),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts."),
    device: Optional[str] = _DEVICE_OPT,
) -> None:
    """ChatGLM-RLHF's DPO data: sample K responses per prompt, label best/worst with the reward model."""
    from alignforge.inference.dpo_data import build_dpo_pairs

    report = build_dpo_pairs(
        str(prompts),
        str(out),
        reward_model,
        policy=policy,
        k=k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        min_gap=min_gap,
        limit=limit,
        device=device,
    )
    typer.echo(report.summary())


@rm_app.command("train")
def rm_train(
    config: Optional[Path] = _CONFIG_ARG, overrides: Optional[List[str]] = _OVERRIDES_ARG, resume: bool = _RESUME_OPT
) -> None:
    """Train a Bradley-Terry reward model (length balancing and Gaussian score prior by default)."""
    from alignforge.trainers.rm import RMConfig, train_rm

    _run_trainer(RMConfig, train_rm, config, overrides, resume, ("accuracy",))


@rm_app.command("eval")
def rm_eval(
    rm_dir: Path = typer.Argument(..., help="A saved reward model (e.g. outputs/rm/final)."),
    data: List[Path] = typer.Argument(..., help="Held-out preference file(s): TRL formats or raw HH-RLHF."),
    out: Path = typer.Option(Path("outputs/rm_eval"), "--out", help="Where summary.json, scores.jsonl and plots go."),
    max_length: int = typer.Option(512, help="Fit prompt + response in this many tokens (as in training)."),
    batch_size: int = typer.Option(8, help="Pairs per forward pass."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N valid pairs."),
    on_error: str = typer.Option("skip", help="skip: drop invalid records and report them; raise: stop at the first."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the accuracy CI."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots."),
    device: Optional[str] = _DEVICE_OPT,
    overlong: str = typer.Option(
        "truncate_prompt",
        help="Pairs longer than --max-length: truncate_prompt (cut the "
        "prompt; drop the pair if a response must be cut) | truncate | drop.",
    ),
) -> None:
    """Evaluate a reward model: accuracy (bootstrap CI), by length-difference bucket, length bias."""
    from alignforge.eval.rm_eval import format_eval, run_rm_eval

    if on_error not in ("raise", "skip"):
        _err(f"--on-error must be raise or skip, not {on_error!r}")
    s = run_rm_eval(
        rm_dir,
        data,
        out,
        max_length=max_length,
        batch_size=batch_size,
        limit=limit,
        on_error=on_error,
        n_boot=n_boot,
        seed=seed,
        plots=plots,
        device=device,
        overlong=overlong,
    )
    typer.echo(s["data_report"]["summary"])
    typer.echo(format_eval(s))
    typer.echo(f"\nsummary: {s['files']['summary']}  scores: {s['files']['scores']}")
    for p in s["files"]["plots"]:
        typer.echo(f"plot: {p}")


@rm_app.command("score")
def rm_score(
    rm_dir: Path = typer.Argument(..., help="A saved reward model (e.g. outputs/rm/final)."),
    src: Path = typer.Argument(..., help="{prompt, completion} or {prompt, response} records (JSONL/JSON(.gz))."),
    dst: Path = typer.Argument(..., help="Output .jsonl or .jsonl.gz: the same records plus 'score' (atomic)."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    max_length: int = typer.Option(1024, help="Truncate prompt + completion to this many tokens."),
    normalize: bool = typer.Option(
        False, "--normalize", help="Also write score_normalized = (score - mean) / std (RM reference stats)."
    ),
    device: Optional[str] = _DEVICE_OPT,
) -> None:
    """Score (prompt, completion) records with a reward model."""
    from alignforge.eval.rm_eval import score_file

    r = score_file(rm_dir, src, dst, batch_size=batch_size, max_length=max_length, normalize=normalize, device=device)
    std = r["score_std"]
    typer.echo(
        f"scored {r['n']} records ({r['n_truncated']} truncated to {max_length} tokens); "
        f"score mean {r['score_mean']:.4f}" + (f", std {std:.4f}" if std is not None else "")
    )
    typer.echo(f"written to {r['out']}")


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="A LoRA adapter dir (e.g. outputs/sft/final)."),
    out: Path = typer.Argument(..., help="Where to write the merged full model."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
) -> None:
    """Merge a LoRA adapter into its base model and save a full HF model."""
    from alignforge.models.lora import merge_adapter

    path = merge_adapter(str(adapter), str(out), dtype=dtype)
    typer.echo(f"merged model written to {path}")


@app.command()
def generate(
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="A user message (repeat for a batch)."),
    model: str = typer.Option("embedded", help="Model: 'embedded', an HF dir, adapter dir, .gguf or hub id."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    seed: int = typer.Option(0),
    device: Optional[str] = _DEVICE_OPT,
) -> None:
    """Generate responses to one or more single-turn prompts."""
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer, resolve_device

    tok = load_tokenizer(model, padding_side="left")
    lm = load_model(model).to(resolve_device(device))
    backend = HFBackend(lm, tok)
    outs = backend.generate(
        [[{"role": "user", "content": p}] for p in prompt],
        GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
    )
    for p, o in zip(prompt, outs, strict=False):
        typer.echo(f"### user: {p}\n### assistant: {o}\n")


@app.command()
def serve(
    model: str = typer.Argument(..., help="Model: 'embedded', an HF dir, adapter dir, .gguf or hub id."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000),
    api_key_env: Optional[str] = typer.Option(
        None, "--api-key-env", help="Environment variable holding the bearer key clients must send."
    ),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", help="The model id clients ask for (default: MODEL as given)."
    ),
    device: Optional[str] = _DEVICE_OPT,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/models), e.g. as a local judge."""
    from alignforge.inference.serve import serve as run_server

    run_server(
        model,
        host=host,
        port=port,
        api_key_env=api_key_env,
        device=device,
        served_model_name=served_model_name,
        echo=typer.echo,
    )


rain_app = typer.Typer(
    help="RAIN: rewindable inference that aligns a frozen model with self-evaluation.", no_args_is_help=True
)
app.add_typer(rain_app, name="rain")


@rain_app.command("generate")
def rain_generate_cmd(
    prompts: Path = typer.Argument(..., help="Prompt file (JSONL/JSON: 'prompt' as text or messages)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL (one line per prompt; a rerun resumes)."),
    model: str = typer.Option("embedded", help="Model: 'embedded', an HF dir, adapter dir, .gguf or hub id."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with RainConfig fields."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value RainConfig overrides, e.g. c_puct=2"),
    device: Optional[str] = _DEVICE_OPT,
) -> None:
    """Answer every prompt with RAIN (tree search + self-evaluation, no training)."""
    from alignforge.config import load_config
    from alignforge.inference.rain import RainConfig, rain_file

    cfg = load_config(RainConfig, config, list(overrides or []))
    res = rain_file(str(prompts), str(out), model=model, cfg=cfg, device=device)
    typer.echo(f"done: {res['prompts']} prompts ({res['resumed']} resumed), mean {res['mean_wall_s']:.2f}s per prompt")
    typer.echo(f"responses: {res['out']}")


@app.command()
def demo(
    overrides: Optional[List[str]] = _OVERRIDES_ARG,
    output_dir: str = typer.Option("outputs/demo", help="The run dir (a rerun skips the finished stages)."),
    model: str = typer.Option("embedded", help="Base model (default: the embedded SmolLM2-135M-Instruct)."),
) -> None:
    """The whole loop on the embedded model and shipped data: the pipeline config demo:pipeline.yaml.

    SFT -> labels -> reward model -> DPO + NTP -> RAIN -> held-out eval -> HTML report; key=value
    overrides change the pipeline config (e.g. align.method=ppo)."""
    from alignforge.demo import run_demo

    run_demo(output_dir=output_dir, model=model, overrides=list(overrides or []), echo=typer.echo)


@app.command()
def pipeline(
    config: Optional[Path] = typer.Argument(None, help="Pipeline YAML (the demo's: demo:pipeline.yaml)."),
    overrides: Optional[List[str]] = _OVERRIDES_ARG,
    from_stage: Optional[str] = typer.Option(None, "--from", help="First stage to run (earlier ones must be done)."),
    until_stage: Optional[str] = typer.Option(None, "--until", help="Last stage to run."),
) -> None:
    """The whole loop in one run dir: sft -> pairs -> label -> rm -> align -> rain -> eval -> report.

    Each stage writes RUN_DIR/STAGE/stage.json; a rerun skips unchanged stages, reruns changed ones (and
    those after them) and resumes an interrupted one."""
    from alignforge.pipeline import load_pipeline_config, run_pipeline

    ov = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        ov.insert(0, str(config))
        config = None
    cfg = load_pipeline_config(config, ov)
    run_pipeline(cfg, from_stage, until_stage, echo=typer.echo)


@app.command("prepare-embedded")
def prepare_embedded() -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a cached safetensors HF dir (once)."""
    from alignforge.models.loading import ensure_embedded

    typer.echo(str(ensure_embedded()))


# --------------------------------------------------------------------------- data


@data_app.command("convert")
def data_convert(
    src: Path = typer.Argument(..., help="Input file: JSONL/JSON(.gz), HF datasets dir, or raw HH-RLHF."),
    dst: Path = typer.Argument(..., help="Output .jsonl or .jsonl.gz (written atomically)."),
    to: str = typer.Option(..., "--to", help="preference | pointwise | sft"),
    on_error: str = typer.Option("raise", help="raise: stop at the first bad record; skip: drop it and report."),
) -> None:
    """Convert between TRL formats (and from raw HH-RLHF)."""
    from alignforge.data.convert import convert_file

    if to not in ("preference", "pointwise", "sft"):
        _err(f"--to must be preference, pointwise or sft, not {to!r}")
    if on_error not in ("raise", "skip"):
        _err(f"--on-error must be raise or skip, not {on_error!r}")
    report = convert_file(str(src), str(dst), to=to, on_error=on_error)
    typer.echo(report.summary())


@data_app.command("validate")
def data_validate(
    path: Path = typer.Argument(..., help="File to check."),
    kind: Optional[str] = typer.Option(None, help="preference | pointwise | sft | prompt (default: detect)."),
) -> None:
    """Check every record; print each problem as FILE:LINE: field 'F': reason. Exit 1 if any."""
    from alignforge.data.readers import detect_kind, read_any

    k = kind or detect_kind(str(path))
    res = read_any(str(path), k, on_error="skip")
    for e in res.dropped:
        typer.echo(str(e), err=True)
    typer.echo(res.summary())
    if res.dropped:
        raise typer.Exit(1)


@data_app.command("mix")
def data_mix(
    spec: Path = typer.Argument(..., help="Mix spec (YAML/JSON): sources [{file, weight | n, heldout, split_seed}]."),
    out: Path = typer.Option(..., "--out", help="Output folder: train.jsonl, heldout/NAME.jsonl, mix_report.json."),
    n_train: Optional[int] = typer.Option(None, help="Override the spec's n_train (with weights)."),
    seed: Optional[int] = typer.Option(None, help="Override the spec's sampling seed."),
) -> None:
    """Mix data files by a documented ratio, holding out a seeded split of each (data/mix.py)."""
    from alignforge.data.mix import check_ratio, load_spec, mix_files

    s = load_spec(spec)
    if n_train is not None:
        s.n_train = n_train
    if seed is not None:
        s.seed = seed
    check_ratio(s)
    mix_files(s, out, echo=typer.echo)


@data_app.command("stats")
def data_stats(
    path: Path = typer.Argument(..., help="Dataset file."),
    tokenizer: str = typer.Option("embedded", help="Tokenizer used to count tokens."),
    kind: Optional[str] = typer.Option(None, help="preference | pointwise | sft | prompt (default: detect)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """ChatGLM-RLHF Table 2 statistics (+ length-difference histogram for pairs)."""
    from alignforge.data.stats import compute_stats, format_stats
    from alignforge.models.loading import load_tokenizer

    tok = load_tokenizer(tokenizer)
    stats = compute_stats(str(path), tok, kind=kind)
    typer.echo(json.dumps(stats, indent=2) if as_json else format_stats(stats))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning alignforge errors into one-line messages."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    # peft calls a transformers property that transformers 5 deprecates; nothing for users to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        rc = app(args=argv, standalone_mode=False)
    except AlignforgeError as e:
        from alignforge.errors import TrainingInterrupted

        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 130 if isinstance(e, TrainingInterrupted) else 2
    except typer.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return rc if isinstance(rc, int) else 0


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
