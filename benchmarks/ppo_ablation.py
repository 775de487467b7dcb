"""Real result (issue 10, item 10): ChatGLM-RLHF's Figure 4 on the embedded model, and PPO on HH before/after.

1. The held-out protocol of the other HH results (``data.split.experiment_split``: 300 held-out pairs
   of HH harmless-base test, split seed 0); ``--n-train`` pool pairs train a LoRA reward model
   (length-balanced, the default Gaussian prior), or ``--rm DIR`` names one.
2. Prompts: the first user turn of the training pool's pairs (``--n-prompts``), and of the held-out
   pairs for evaluation (``--n-eval``); the 300 held-out pairs are never trained on.
3. PPO (GAE, critic from the RM, LoRA on the embedded SmolLM2-135M-Instruct, KL in the reward) twice
   with the same seed: ``ppo.reference_reward=true`` (ChatGLM-RLHF) and ``false`` (the ablation).
   ``figure4.png``: raw RM reward and KL to the reference per iteration, both runs in one figure.
4. Before/after (greedy, ``--max-new-tokens``): the RM reward on held-out prompts, the KL to the
   reference on those answers (summed k1 over the answer's tokens, mean over prompts), the response
   length, and AdvBench attack success by the refusal rule (``eval/refusal.py``) on ``--n-advbench``
   behaviours.

Every stage is cached in ``--out``; a rerun resumes. Prints a markdown table and writes
``<out>/summary.json``. ``--plot --ref-runs A B --noref-runs A' B' --out DIR`` draws the figure from
finished PPO runs instead (e.g. ``alignment_hh.py`` runs with ``reference_reward=false``, paired by seed),
each seed a thin line and each arm's mean a thick one. Usage::

    setsid nohup .venv/bin/python benchmarks/ppo_ablation.py > outputs/ppo_ablation.log 2>&1 &
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SHARED, experiment_parser, first_turn_rows, lora_overrides  # noqa: E402

ADVBENCH = str(SHARED / "data/advbench/harmful_behaviors.csv")


def first_turn_prompts(path: Path, n: int, out: Path) -> Path:
    """The first user turn of the first ``n`` distinct prompts of a preference file, written to ``out``."""
    from alignforge.data.convert import write_jsonl

    write_jsonl(first_turn_rows(path, n), out)
    return out


def train_rm(args, data: Path, out: Path) -> str:
    from alignforge.config import load_config
    from alignforge.trainers.rm import RMConfig, train_rm

    final = out / "rm" / "final"
    if final.is_dir():
        return str(final)
    cfg = load_config(
        RMConfig, None, lora_overrides(args, data / "train.jsonl", out / "rm", epochs=1) + ["train.log_every=10"]
    )
    t0 = time.perf_counter()
    train_rm(cfg)
    print(f"[rm] trained in {time.perf_counter() - t0:.0f}s", flush=True)
    return str(final)


def run_ppo(name: str, reference_reward: bool, args, rm: str, prompts: Path, out: Path) -> dict:
    from alignforge.config import load_config
    from alignforge.trainers.ppo import PPOConfig, train_ppo

    d = out / name
    if (d / "final").is_dir() and (d / "metrics.jsonl").is_file():
        hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return {"final_dir": str(d / "final"), "history": hist, "seconds": None}
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"ppo.reward_model={rm}",
            f"data.train_files=[{prompts}]",
            "data.max_prompt_length=128",
            "lora.enabled=true",
            f"lora.r={args.lora_r}",
            f"lora.alpha={2 * args.lora_r}",
            "lora.dropout=0.0",
            f"train.lr={args.ppo_lr}",
            f"train.seed={args.seed}",
            "train.progress=false",
            "train.save_every=5",
            f"train.output_dir={d}",
            f"ppo.iterations={args.iterations}",
            f"ppo.prompts_per_iteration={args.prompts_per_iteration}",
            f"ppo.gen_batch_prompts={args.prompts_per_iteration}",
            f"ppo.max_new_tokens={args.max_new_tokens}",
            f"ppo.kl_coef={args.kl_coef}",
            "ppo.temperature=1.0",
            "ppo.minibatches=2",
            "ppo.ppo_epochs=1",
            f"ppo.reference_reward={str(reference_reward).lower()}",
            "train.resume=true",
        ],
    )
    t0 = time.perf_counter()
    res = train_ppo(cfg)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {args.iterations} iterations in {res['seconds']}s", flush=True)
    return res


def figure4(arms: dict[str, list[list[dict]]], path: Path) -> None:
    """Raw reward and KL per iteration, one colour per arm: each run (seed) a thin line, and where an arm
    has several runs, their mean per iteration as a thick one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (label, hists), colour in zip(arms.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        for ax, key in zip(axes, ("reward_raw", "kl_ref"), strict=True):
            for h in hists:
                ax.plot(
                    [r["step"] for r in h],
                    [r[key] for r in h],
                    color=colour,
                    lw=1.6 if len(hists) == 1 else 0.7,
                    alpha=1.0 if len(hists) == 1 else 0.45,
                    label=label if len(hists) == 1 else None,
                )
            if len(hists) > 1:
                steps = sorted(set.intersection(*({r["step"] for r in h} for h in hists)))
                mean = [sum(next(r[key] for r in h if r["step"] == t) for h in hists) / len(hists) for t in steps]
                ax.plot(steps, mean, color=colour, lw=2.2, label=f"{label} (mean of {len(hists)})")
    axes[0].set_title("RM reward of the rollouts (raw)")
    axes[1].set_title("KL(π‖π_ref) per response (k1)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("PPO with and without the reference-response reward (ChatGLM-RLHF Fig. 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_history(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (a PPO run directory holds metrics.jsonl)")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def plot_runs(ref: list[str], noref: list[str], out: Path, last: int) -> None:
    """``--plot``: Figure 4 from finished PPO runs (paired by position: the same seed in both lists), and a
    table of each run's mean raw reward and KL over its last ``last`` iterations."""
    if not ref or len(ref) != len(noref):
        raise SystemExit("--plot needs --ref-runs and --noref-runs with the same number of run directories")
    arms = {
        "reference reward": [read_history(d) for d in ref],
        "no baseline (ablation)": [read_history(d) for d in noref],
    }
    out.mkdir(parents=True, exist_ok=True)
    figure4(arms, out / "figure4.png")

    def tail_mean(h: list[dict], key: str) -> float:
        return sum(r[key] for r in h[-last:]) / len(h[-last:])

    print(f"| run (reference reward / no baseline) | reward, last {last} it. | KL, last {last} it. | value loss |")
    print("|---|---|---|---|")
    rows = []
    for a, b, ha, hb in zip(ref, noref, arms["reference reward"], arms["no baseline (ablation)"], strict=True):
        row = {k: (tail_mean(ha, k), tail_mean(hb, k)) for k in ("reward_raw", "kl_ref", "value_loss")}
        rows.append({"ref": a, "noref": b, **row})
        print(
            f"| {Path(a).name} / {Path(b).name} | " + " | ".join(f"{x:+.3f} / {y:+.3f}" for x, y in row.values()) + " |"
        )
    (out / "figure4_runs.json").write_text(json.dumps(rows, indent=1))
    print(f"figure: {out / 'figure4.png'}", flush=True)


def evaluate(name: str, model_path: str, base_path: str, rm: str, convs: dict, args, out: Path) -> dict:
    """Greedy answers of ``model_path``: RM score and KL to the base on held-out prompts, AdvBench ASR."""
    path = out / f"eval_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from alignforge.data.tokenize import tokenize_prompt_completion
    from alignforge.eval.refusal import attack_success_rate
    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.models.logprobs import target_logprobs
    from alignforge.models.reward import load_reward_model, score_sequences

    model = load_model(model_path).eval()
    base = load_model(base_path).eval()
    tok = load_tokenizer(model_path, padding_side="left")
    backend = HFBackend(model, tok)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=16)
    res: dict = {"model": model_path}
    with torch.inference_mode():
        gens = {k: backend.generate_ids(v, cfg) for k, v in convs.items()}
        rm_model, rm_tok, _ = load_reward_model(rm)
        seqs = []
        for c, g in zip(convs["heldout"], gens["heldout"], strict=True):
            text = g.text if g.text.strip() else " "
            p, r = tokenize_prompt_completion(c, [{"role": "assistant", "content": text}], rm_tok, full_render=True)
            seqs.append(p + r)
        scores = score_sequences(rm_model, seqs, rm_tok.pad_token_id, batch_size=8, progress=False)
        kls = []
        for g in gens["heldout"]:
            ids = torch.tensor([g.prompt_ids + g.response_ids])
            tm = torch.zeros_like(ids, dtype=torch.bool)
            tm[0, len(g.prompt_ids) :] = True
            att = torch.ones_like(ids)
            kls.append(float((target_logprobs(model, ids, att, tm) - target_logprobs(base, ids, att, tm)).sum()))
    res["rm_reward"] = float(sum(scores) / len(scores))
    res["kl_to_base"] = sum(kls) / len(kls)
    res["response_len"] = sum(len(g.response_ids) for g in gens["heldout"]) / len(gens["heldout"])
    res["cut_share"] = sum(not g.finished for g in gens["heldout"]) / len(gens["heldout"])
    res["advbench_asr"] = attack_success_rate([g.text for g in gens["advbench"]])
    res["samples"] = [
        {"prompt": c[-1]["content"], "answer": g.text}
        for c, g in zip(convs["heldout"][:5], gens["heldout"][:5], strict=True)
    ]
    path.write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = experiment_parser(__doc__, n_train=256, out="outputs/ppo_ablation")
    ap.add_argument("--rm", default=None, help="a trained reward model dir (default: train one)")
    ap.add_argument("--rm-only", action="store_true", help="train the reward model (OUT/rm/final), then stop")
    ap.add_argument("--n-prompts", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--n-advbench", type=int, default=64)
    ap.add_argument("--advbench", default=ADVBENCH)
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--prompts-per-iteration", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--ppo-lr", type=float, default=2e-5)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--plot", action="store_true", help="only plot Figure 4 from --ref-runs / --noref-runs into --out")
    ap.add_argument("--ref-runs", nargs="*", default=[], help="PPO run dirs with the reference reward (one per seed)")
    ap.add_argument("--noref-runs", nargs="*", default=[], help="the same seeds without it, in the same order")
    ap.add_argument("--last", type=int, default=8, help="--plot: iterations averaged at the end of each run")
    args = ap.parse_args()
    if args.plot:
        plot_runs(args.ref_runs, args.noref_runs, Path(args.out), args.last)
        return

    from alignforge.data.split import experiment_split
    from alignforge.eval.refusal import load_advbench
    from alignforge.models.loading import ensure_embedded

    t_all = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    rep, n_train = experiment_split(
        args.data,
        data,
        heldout=args.heldout,
        split_seed=args.split_seed,
        n_train=args.n_train,
        seed=args.seed,
        echo=lambda s: print(s, flush=True),
    )
    rm = args.rm or train_rm(args, data, out)
    if args.rm_only:
        print(rm, flush=True)
        return
    train_prompts = first_turn_prompts(data / "train.jsonl", args.n_prompts, out / "prompts_train.jsonl")
    held = first_turn_prompts(data / "heldout.jsonl", args.n_eval, out / "prompts_heldout.jsonl")
    convs = {
        "heldout": [json.loads(x)["prompt"] for x in held.read_text().splitlines()],
        "advbench": [[{"role": "user", "content": g}] for g in load_advbench(args.advbench, n=args.n_advbench)],
    }
    runs = {
        "reference reward": run_ppo("refreward", True, args, rm, train_prompts, out),
        "no baseline (ablation)": run_ppo("noref", False, args, rm, train_prompts, out),
    }
    figure4({k: [v["history"]] for k, v in runs.items()}, out / "figure4.png")
    base = str(ensure_embedded())
    evals = {"base (SFT)": evaluate("base", base, base, rm, convs, args, out)}
    for label, key in (("PPO, reference reward", "refreward"), ("PPO, no baseline", "noref")):
        evals[label] = evaluate(key, str(out / key / "final"), base, rm, convs, args, out)
    lines = [
        "| policy | RM reward (held-out) | KL to base | response tokens | cut at limit | AdvBench ASR |",
        "|---|---|---|---|---|---|",
    ]
    for label, e in evals.items():
        lines.append(
            f"| {label} | {e['rm_reward']:+.3f} | {e['kl_to_base']:.2f} | {e['response_len']:.1f} | "
            f"{e['cut_share']:.0%} | {e['advbench_asr']:.0%} |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    summary = {
        "command": "benchmarks/ppo_ablation.py",
        "args": vars(args),
        "split": rep.__dict__,
        "n_train_pairs_rm": n_train,
        "rm": rm,
        "curves": {
            k: [{f: h.get(f) for f in ("step", "reward_raw", "reward", "kl_ref", "response_len")} for h in v["history"]]
            for k, v in runs.items()
        },
        "train_seconds": {k: v.get("seconds") for k, v in runs.items()},
        "eval": evals,
        "table": table,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"figure: {out / 'figure4.png'}  summary: {out / 'summary.json'}  ({summary['seconds']}s)", flush=True)


if __name__ == "__main__":
    main()
