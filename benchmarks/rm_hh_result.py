"""Real result (issues 3 and 13): a reward model on HH, with and without length balancing.

1. Seeded split of each HH file in ``--data`` (comma-separated; default harmless-base;
   ``--data hh`` = helpful-base and harmless-base, as ChatGLM-RLHF trains on both) with
   ``data/split.py``: ``--heldout`` held-out pairs per file (split seed 0), the rest is that file's
   training pool; ``--n-train`` pairs of each pool are sampled (seeded; 0 = the full pool). The
   training file is the pools concatenated (mixing ratio = the pools' natural sizes) and shuffled
   with ``--seed``. ``--extra FILE`` (repeatable) adds a file's pairs to the training file in full (no
   split, nothing held out; e.g. ``alignment_hh.py``'s explicit-refusal pairs, ``OUT/data/nN_sS_cC/extra.jsonl``).
2. ``train_rm`` twice on the same pairs, same seed, LoRA (r=16, all-linear; the score head is
   trained in full), the default Gaussian score prior: ``reward.length_balance=false`` and ``=true``.
3. Both RMs score the held-out pairs of each file (and all pooled): accuracy (bootstrap 95% CI),
   accuracy on pairs where the longer / the shorter response won, the share of pairs where the RM prefers the longer
   response, and the Pearson correlation of score with response length (tokens) over all
   600 held-out responses.

Prints a markdown table; writes ``<out>/summary.json``. Usage::

    nohup .venv/bin/python benchmarks/rm_hh_result.py > outputs/rm_hh_result.log 2>&1 &
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SHARED, experiment_parser, lora_overrides  # noqa: E402


def evaluate(c, r, pairs, seed: int) -> dict:
    try:
        from alignforge.eval.rm_eval import evaluate_pairs
    except ImportError:
        evaluate_pairs = None
    if evaluate_pairs is not None:
        return evaluate_pairs(c, r, pairs, n_boot=1000, seed=seed)
    # fallback (numpy only): the subset of the statistics quoted in the table
    c, r = np.asarray(c), np.asarray(r)
    out = (c > r) + 0.5 * (c == r)
    rng = np.random.default_rng(seed)
    boots = [out[rng.integers(0, len(out), len(out))].mean() for _ in range(1000)]
    lc = np.array([len(p.chosen_ids) for p in pairs])
    lr = np.array([len(p.rejected_ids) for p in pairs])
    d = lc - lr
    longer = np.where(d > 0, c, r)
    shorter = np.where(d > 0, r, c)
    return {
        "n_pairs": len(pairs),
        "accuracy": float(out.mean()),
        "accuracy_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "accuracy_longer_won": float(out[d > 0].mean()),
        "accuracy_shorter_won": float(out[d < 0].mean()),
        "rm_prefers_longer": float(((longer > shorter) + 0.5 * (longer == shorter))[d != 0].mean()),
        "length_correlation": {"pearson": float(np.corrcoef(np.r_[c, r], np.r_[lc, lr])[0, 1])},
        "longer_chosen_share": float((d > 0).mean()),
    }


HH = {
    "helpful": str(SHARED / "data/hh-rlhf/helpful-base/test.jsonl.gz"),
    "harmless": str(SHARED / "data/hh-rlhf/harmless-base/test.jsonl.gz"),
}


def data_files(spec: str) -> dict[str, str]:
    """``--data``: ``hh`` (both HH files), ``none`` (no HH file: train on the ``--extra`` files alone,
    nothing held out), or comma-separated paths; named by their parent folder."""
    if spec == "hh":
        return dict(HH)
    if spec == "none":
        return {}
    paths = [p for p in spec.split(",") if p]
    return {(Path(p).parent.name or Path(p).stem) + (f"-{i}" if len(paths) > 1 else ""): p for i, p in enumerate(paths)}


def main() -> None:
    ap = experiment_parser(__doc__, n_train=512, out="outputs/rm_hh_result")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint interval (steps); a rerun resumes")
    ap.add_argument("--only", choices=["both", "nobal", "bal"], default="both")
    ap.add_argument("--extra", action="append", default=[], help="a preference file trained on in full (repeatable)")
    args = ap.parse_args()
    if args.data == "none" and not args.extra:
        ap.error("--data none trains on the --extra files alone: give at least one --extra FILE")

    from alignforge.config import load_config
    from alignforge.data.readers import read_preference
    from alignforge.data.split import experiment_split
    from alignforge.data.tokenize import tokenize_preference
    from alignforge.models.reward import load_reward_model, score_pairs
    from alignforge.trainers.rm import RMConfig, train_rm

    t_all = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    files = data_files(args.data)
    reps, n_train, held = {}, 0, {}
    train_rows: list[str] = []
    for name, path in files.items():
        sub = data / name if len(files) > 1 else data
        rep, n = experiment_split(
            path,
            sub,
            heldout=args.heldout,
            split_seed=args.split_seed,
            n_train=args.n_train,
            seed=args.seed,
            echo=lambda s: print(s, flush=True),
        )
        reps[name], n_train = rep.__dict__, n_train + n
        held[name] = read_preference(sub / "heldout.jsonl").records
        train_rows += (sub / "train.jsonl").read_text().splitlines()
    for path in args.extra:  # validated (file:line errors), trained on in full
        n_extra = len(read_preference(path).records)
        train_rows += [x for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
        reps[f"extra:{path}"], n_train = {"pairs": n_extra}, n_train + n_extra
    if len(files) > 1 or args.extra:  # the pools (and extras) concatenated, shuffled once (seeded)
        if len(files) <= 1:
            data = data / "with_extra"
            data.mkdir(parents=True, exist_ok=True)
        random.Random(args.seed).shuffle(train_rows)
        (data / "train.jsonl").write_text("\n".join(train_rows) + "\n")
        print(f"training file: {len(train_rows)} pairs from {', '.join([*files, *args.extra])}", flush=True)
    rep = reps
    runs = {"nobal": False, "bal": True}
    if args.only != "both":
        runs = {args.only: runs[args.only]}
    summary: dict = {
        "command": "benchmarks/rm_hh_result.py",
        "args": vars(args),
        "split": rep,
        "n_train_sampled": n_train,
        "runs": {},
    }
    for name, balance in runs.items():
        t0 = time.perf_counter()
        cfg = load_config(
            RMConfig,
            None,
            lora_overrides(args, data / "train.jsonl", out / name)
            + [
                f"reward.length_balance={str(balance).lower()}",
                f"train.save_every={args.save_every}",
                "train.log_every=10",
                "reward.stats_pairs=64",
            ],
        )
        s = train_rm(cfg)
        train_s = time.perf_counter() - t0
        hist = s["history"]
        n_pairs_trained = (
            json.loads((out / name / "length_balance.json").read_text())["n_after"] if balance else n_train
        )
        print(
            f"[{name}] trained {s['step']} steps in {train_s:.0f}s; last logged loss {hist[-1]['loss']:.4f}", flush=True
        )
        if not held:  # --data none: nothing held out, nothing to score
            summary["runs"][name] = {
                "train_seconds": round(train_s, 1),
                "steps": s["step"],
                "n_train_pairs": n_pairs_trained,
                "final_dir": s["final_dir"],
                "loss_first": hist[0]["loss"],
                "loss_last": hist[-1]["loss"],
            }
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            continue
        t1 = time.perf_counter()
        rm, tok, _ = load_reward_model(s["final_dir"])
        pad_id = tok.pad_token_id
        per_file, all_c, all_r, all_pairs = {}, [], [], []
        for fname, recs in held.items():
            pairs = [tokenize_preference(rec, tok, args.max_length, full_render=True)[0] for rec in recs]
            c, r = score_pairs(rm, pairs, pad_id, batch_size=8, progress=False)
            per_file[fname] = evaluate(c, r, pairs, seed=args.seed)
            all_c, all_r, all_pairs = all_c + list(c), all_r + list(r), all_pairs + pairs
        res = evaluate(all_c, all_r, all_pairs, seed=args.seed)
        if len(held) > 1:
            res["per_file"] = per_file
        res.update(
            {
                "train_seconds": round(train_s, 1),
                "eval_seconds": round(time.perf_counter() - t1, 1),
                "steps": s["step"],
                "n_train_pairs": n_pairs_trained,
                "final_dir": s["final_dir"],
                "loss_first": hist[0]["loss"],
                "loss_last": hist[-1]["loss"],
                "data_report": s["data_report"],
            }
        )
        summary["runs"][name] = res
        print(
            f"[{name}] held-out accuracy {res['accuracy']:.3f} CI {res['accuracy_ci95']}, "
            f"pearson(score, len) {res['length_correlation']['pearson']:.3f}",
            flush=True,
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        del rm

    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    if not held:
        print(json.dumps({"bench": "rm_hh_result", "heldout": 0, "runs": summary["runs"]}))
        return

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        "| length balancing | train pairs | steps | held-out acc (95% CI) | acc longer-won | acc shorter-won "
        "| RM prefers longer | pearson(score, len) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in summary["runs"].items():
        ci = res["accuracy_ci95"]
        ci_s = f"[{f(ci[0])}, {f(ci[1])}]" if ci else ""
        lines.append(
            f"| {'on' if name == 'bal' else 'off'} | {res['n_train_pairs']} | {res['steps']} | "
            f"{f(res['accuracy'])} {ci_s} | {f(res['accuracy_longer_won'])} | "
            f"{f(res['accuracy_shorter_won'])} | {f(res['rm_prefers_longer'])} | "
            f"{f(res['length_correlation']['pearson'])} |"
        )
    for name, res in summary["runs"].items():
        for fname, sub in res.get("per_file", {}).items():
            ci = sub["accuracy_ci95"]
            lines.append(
                f"| {'on' if name == 'bal' else 'off'}: {fname} held-out | | | {f(sub['accuracy'])} "
                f"[{f(ci[0])}, {f(ci[1])}] | {f(sub['accuracy_longer_won'])} | {f(sub['accuracy_shorter_won'])} | "
                f"{f(sub['rm_prefers_longer'])} | {f(sub['length_correlation']['pearson'])} |"
            )
    print("\n".join(lines))
    print(
        f"held-out: {args.heldout} pairs per file, longer response chosen in "
        f"{f(next(iter(summary['runs'].values())).get('longer_chosen_share'))} of them; "
        f"total {summary['total_seconds']:.0f}s"
    )
    print(
        json.dumps(
            {
                "bench": "rm_hh_result",
                **{f"{k}_accuracy": v["accuracy"] for k, v in summary["runs"].items()},
                **{f"{k}_pearson_len": v["length_correlation"]["pearson"] for k, v in summary["runs"].items()},
            }
        )
    )


if __name__ == "__main__":
    main()
