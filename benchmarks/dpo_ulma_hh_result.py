"""Real result (issue 4, item 8): DPO and ULMA on HH harmless-base; AdvBench ASR and a helpfulness check.

1. The same seeded split as the RM result (``data/split.py``: 300 held-out pairs of HH
   harmless-base test, split seed 0); ``--n-train`` pairs of the remaining pool are sampled
   (seed ``--seed``) to fit the CPU budget. The held-out pairs are never trained on.
2. From the embedded SmolLM2-135M-Instruct, same seed, same pairs, LoRA (r=16, alpha=32,
   all-linear, no dropout), max length 384, batch 4, one epoch, cosine lr with 5% warmup:
   * **DPO**: sigmoid loss, beta 0.1, summed log-probs (``train_dpo``);
   * **ULMA**: the pairs converted point-wise (chosen -> 1, rejected -> 0), beta 0.1, c 0,
     per-token mean log-probs (ULMA's default; ``train_ulma``).
3. Greedy generation (``--max-new-tokens`` 64, batched) for base / DPO / ULMA on
   * the first 100 AdvBench harmful behaviours (one user turn each): **attack-success rate**
     = share of responses with no llm-attacks refusal string anywhere (``eval/refusal.py``);
   * the first 100 prompts of HH helpful-base test (multi-turn contexts as given): the
     helpfulness *sanity* check: mean response length (tokens), share of responses cut at
     the token limit, share of **degenerate** responses (empty after stripping, or a
     repetition loop: >= 12 words with fewer than half of the word 3-grams distinct) and the
     share that contain a refusal string (over-refusal on benign prompts). With ``--rm DIR``
     (a trained reward model) the mean RM score of the responses is added.
   Why this check: a DPO/ULMA policy that "wins" AdvBench by collapsing (empty or looping
   output, or refusing everything) would show up here as short/degenerate/refusing answers to
   benign requests; an RM score needs a trained RM, which is optional.

Every stage is cached in ``--out`` (trained adapters, generations), so a rerun resumes.
Prints a markdown table; writes ``<out>/summary.json`` and ``<out>/table.md``. Usage::

    nohup .venv/bin/python benchmarks/dpo_ulma_hh_result.py > outputs/dpo_ulma_hh_result.log 2>&1 &
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SHARED, experiment_parser, lora_overrides  # noqa: E402
from alignforge.eval.lengths import is_degenerate  # noqa: E402

HELPFUL = str(SHARED / "data/hh-rlhf/helpful-base/test.jsonl.gz")
ADVBENCH = str(SHARED / "data/advbench/harmful_behaviors.csv")


def train(method: str, args, data: Path, out: Path) -> dict:
    from alignforge.config import load_config

    final = out / method / "final"
    info_path = out / method / "run_info.json"
    if final.is_dir() and info_path.is_file():
        print(f"[{method}] already trained: {final}", flush=True)
        return json.loads(info_path.read_text())
    common = lora_overrides(args, data / "train.jsonl", out / method) + [
        f"train.save_every={args.save_every}",
        "train.log_every=5",
        f"train.precision={args.precision}",
        f"train.probe_every={args.probe_every}",
        "train.probe_prompts=8",
        f"train.probe_max_new_tokens={args.max_new_tokens}",
        "train.resume=true",
    ]
    t0 = time.perf_counter()
    if method == "dpo":
        from alignforge.trainers.dpo import DPOConfig, train_dpo

        s = train_dpo(load_config(DPOConfig, None, common + [f"dpo.beta={args.beta}"]))
    else:
        from alignforge.trainers.ulma import ULMAConfig, train_ulma

        s = train_ulma(load_config(ULMAConfig, None, common + ["ulma.loss=ulma", f"ulma.beta={args.beta}"]))
    secs = time.perf_counter() - t0
    hist = s["history"]
    keep = [k for k in hist[-1] if k not in ("step", "lr", "epoch")]
    first = next(r for r in hist if "loss" in r)  # hist[0] is the probe's step-0 row when it is on
    info = {
        "train_seconds": round(secs, 1),
        "steps": s["step"],
        "final_dir": s["final_dir"],
        "data_report": s["data_report"],
        "first": {k: first.get(k) for k in keep},
        "last": {k: hist[-1].get(k) for k in keep},
        "gen_len": [[r["step"], round(r["gen_len_mean"], 1)] for r in hist if "gen_len_mean" in r],
    }
    info_path.write_text(json.dumps(info, indent=2))
    print(f"[{method}] trained {s['step']} steps in {secs:.0f}s; first {info['first']} last {info['last']}", flush=True)
    return info


def generate(name: str, model_path: str, prompts: dict[str, list], args, out: Path) -> dict:
    path = out / f"gen_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from alignforge.inference.generate import GenerationConfig, HFBackend
    from alignforge.models.loading import load_model, load_tokenizer
    from alignforge.models.lora import is_peft

    t0 = time.perf_counter()
    model = load_model(model_path)
    if is_peft(model):
        model = model.merge_and_unload()
    model.eval()
    tok = load_tokenizer(model_path, padding_side="left")
    backend = HFBackend(model, tok)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=args.gen_batch)
    res = {"model": model_path}
    for key, convs in prompts.items():
        # longest first: less padding per batch; results are put back in the original order
        order = sorted(range(len(convs)), key=lambda i: -len(backend.render(convs[i])))
        with torch.inference_mode():
            gens = backend.generate_ids([convs[i] for i in order], cfg)
        rows = [None] * len(convs)
        for i, g in zip(order, gens, strict=False):
            rows[i] = {"text": g.text, "n_tokens": len(g.response_ids), "finished": g.finished}
        res[key] = rows
    res["seconds"] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(res, indent=1))
    print(f"[gen {name}] {res['seconds']}s", flush=True)
    return res


def rm_scores(rm_dir: str, convs: list, texts: list[str], tmp: Path) -> float | None:
    from alignforge.data.convert import write_jsonl
    from alignforge.eval.rm_eval import score_file

    rows = [
        {"prompt": c, "completion": [{"role": "assistant", "content": t}]}
        for c, t in zip(convs, texts, strict=False)
        if t.strip()
    ]
    if not rows:
        return None
    write_jsonl(rows, tmp / "to_score.jsonl")
    r = score_file(rm_dir, tmp / "to_score.jsonl", tmp / "scored.jsonl", progress=False)
    return r["score_mean"]


def metrics(gen: dict, args, helpful_convs: list, out: Path, name: str) -> dict:
    from alignforge.eval.refusal import attack_success_rate, is_refusal

    adv = [r["text"] for r in gen["advbench"]]
    hel = gen["helpful"]
    htexts = [r["text"] for r in hel]
    m = {
        "asr": attack_success_rate(adv),
        "adv_empty": sum(not t.strip() for t in adv) / len(adv),
        "adv_degenerate": sum(is_degenerate(t) for t in adv) / len(adv),
        "help_mean_tokens": sum(r["n_tokens"] for r in hel) / len(hel),
        "help_cut_at_limit": sum(not r["finished"] for r in hel) / len(hel),
        "help_degenerate": sum(is_degenerate(t) for t in htexts) / len(htexts),
        "help_refusal": sum(is_refusal(t) for t in htexts) / len(htexts),
        "gen_seconds": gen.get("seconds"),
    }
    if args.rm:
        m["help_rm_score"] = rm_scores(args.rm, helpful_convs, htexts, out / f"rm_{name}")
    return m


def main() -> None:
    ap = experiment_parser(__doc__, n_train=384, out="outputs/dpo_ulma_hh_result")
    ap.add_argument("--helpful", default=HELPFUL)
    ap.add_argument("--advbench", default=ADVBENCH)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="bf16",
        help="training precision (bf16 autocast: ~1.4x faster on CPUs with AMX); generation is fp32",
    )
    ap.add_argument(
        "--probe-every",
        type=int,
        default=50,
        help="greedy answers to 8 training prompts every N steps: logs the policy's response length",
    )
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint interval; a rerun resumes")
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--rm", default=None, help="trained reward-model dir: adds the mean RM score on helpful prompts")
    ap.add_argument("--methods", default="dpo,ulma")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from alignforge.data.readers import read_preference
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

    goals = load_advbench(args.advbench, n=args.n_eval)
    helpful_convs = [r.prompt for r in read_preference(args.helpful, on_error="skip").records[: args.n_eval]]
    prompts = {"advbench": [[{"role": "user", "content": g}] for g in goals], "helpful": helpful_convs}

    summary: dict = {
        "command": "benchmarks/dpo_ulma_hh_result.py",
        "args": vars(args),
        "split": rep.__dict__,
        "n_train_pairs": n_train,
        "train": {},
        "eval": {},
    }

    def dump():
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    base = str(ensure_embedded())
    models = {"base": base}
    # base first: cheap, and gives a result even if training cannot finish
    summary["eval"]["base"] = metrics(generate("base", base, prompts, args, out), args, helpful_convs, out, "base")
    print(f"[base] {summary['eval']['base']}", flush=True)
    dump()
    for method in args.methods.split(","):
        info = train(method, args, data, out)
        summary["train"][method] = info
        models[method] = info["final_dir"]
        dump()
        summary["eval"][method] = metrics(
            generate(method, info["final_dir"], prompts, args, out), args, helpful_convs, out, method
        )
        print(f"[{method}] {summary['eval'][method]}", flush=True)
        dump()

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    cols = (
        "| model | train pairs | train min | AdvBench ASR (n={n}) ↓ | helpful: mean tokens | cut at {t} | degenerate "
        "| refusal-string | probe answer length, first → last |"
    ).format(n=args.n_eval, t=args.max_new_tokens)
    if args.rm:
        cols += " RM score |"
    lines = [cols, "|" + "---|" * (cols.count("|") - 1)]
    for name, m in summary["eval"].items():
        tr = summary["train"].get(name)
        row = (
            f"| {name} | {n_train if tr else '-'} | {tr['train_seconds'] / 60:.1f} | " if tr else f"| {name} | - | - | "
        )
        row += (
            f"{pct(m['asr'])} | {m['help_mean_tokens']:.1f} | {pct(m['help_cut_at_limit'])} | "
            f"{pct(m['help_degenerate'])} | {pct(m['help_refusal'])} | "
        )
        gl = (tr or {}).get("gen_len") or []
        row += f"{gl[0][1]} → {gl[-1][1]} |" if gl else "- |"
        if args.rm:
            row += f" {m['help_rm_score']:.3f} |" if m.get("help_rm_score") is not None else " - |"
        lines.append(row)
    table = "\n".join(lines)
    summary["table"] = table
    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    dump()
    (out / "table.md").write_text(table + "\n")
    print(table, flush=True)
    print(
        json.dumps(
            {"result": "dpo_ulma_hh", **{k: v["asr"] for k, v in summary["eval"].items()}, "n_train_pairs": n_train}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
