"""Benchmark: RAIN's time overhead over vanilla greedy decoding (issue 11; the paper reports ~4x vs its baseline).

The first ``--n`` distinct first human turns of HH harmless-base test (20; 5 with ``--quick``), on the
embedded SmolLM2-135M-Instruct in fp32, one prompt at a time, the same ``--max-new-tokens`` (64) limit for
every method, each stopping at EOS:

* ``vanilla_cached``: greedy ``model.generate`` with the KV cache (batch 1);
* ``vanilla_uncached``: the same with ``use_cache=False``, the paper's baseline (its ``genc``);
* ``rain``: ``rain_generate`` with the paper's constants (``RainConfig`` defaults: self-evaluation with
  the hard A/B vote, set lengths 1, 2, 4, 10, T_m = 50, T = 6, V = 0.8, c = 2, γ = 0.2), KV reuse on.
  ``--rm DIR`` makes an alignforge reward model the evaluator instead (``tanh`` of its z-score), every
  other constant unchanged: it shows how much of the overhead is the judge's lack of signal, since the
  inner loop stops early only once the most-visited child's value passes V.

Methods run one after another in this process, after one untimed warm-up ``generate``; RAIN's time includes
its one-time cost of caching the judge's constant prefix (the first prompt pays it). Methods may produce
different numbers of tokens (each stops at EOS), so per-token ratios are reported next to the time ratios.
Tree statistics: ``iters_per_step`` = sum of inner iterations / committed steps, ``cache_hit_rate`` = KV cache
hits / lookups, summed over prompts.

Usage::

    .venv/bin/python benchmarks/rain_overhead.py --quick
    .venv/bin/python benchmarks/rain_overhead.py --threads 2      # on an idle machine

The last line of stdout is one JSON object (``bench``, ``n_prompts``, ``vanilla_cached_s``,
``vanilla_uncached_s``, ``rain_s``, ``ratio_vs_cached``, ``ratio_vs_uncached``, ``iters_per_step``,
``cache_hit_rate``, then extra keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DEFAULT_DATA, matmul_gflops, peak_rss_mb  # noqa: E402
from _rain import greedy, hh_first_turns, load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 prompts")
    ap.add_argument("--n", type=int, default=None, help="prompts (default 20; 5 with --quick)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0, help="RAIN's sampling seed (prompt i uses seed + i)")
    ap.add_argument("--save", default=None, help="write every prompt's three answers and RAIN's tree stats (JSONL)")
    ap.add_argument(
        "--rm", default=None, help="an alignforge reward model as RAIN's evaluator (default: self-evaluation)"
    )
    ap.add_argument("--model", default="embedded", help=argparse.SUPPRESS)  # a tiny model, to smoke-test
    args = ap.parse_args()
    args.n = args.n or (5 if args.quick else 20)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from alignforge.inference.rain import RainConfig, make_evaluator, rain_generate

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    model, tok = load_policy(args.model)
    convs = hh_first_turns(args.data, args.n, tok)
    print(
        json.dumps(
            {
                "prompts": args.n,
                "max_new_tokens": args.max_new_tokens,
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
            }
        ),
        flush=True,
    )
    greedy(model, tok, convs[0], 2)  # warm-up, not timed

    runs: dict[str, list[tuple]] = {}
    for name, cached in (("vanilla_cached", True), ("vanilla_uncached", False)):
        runs[name] = [greedy(model, tok, c, args.max_new_tokens, use_cache=cached) for c in convs]
        tot = sum(r[2] for r in runs[name])
        print(f"[{name}] {tot:.2f}s, {sum(len(r[0]) for r in runs[name])} tokens", flush=True)
    cfg = RainConfig(
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        **({"evaluator": "rm", "reward_model": args.rm} if args.rm else {}),
    )
    from alignforge.inference.kvcache import FORWARD_STATS, reset_forward_stats

    evaluator = make_evaluator(model, tok, cfg)  # loaded before the clock starts, like the policy
    reset_forward_stats()
    t = time.perf_counter()
    rain = rain_generate(model, tok, convs, cfg, evaluator=evaluator, progress=True)
    rain_total_wall = time.perf_counter() - t
    fwd = dict(FORWARD_STATS)
    # compute bound: ~2 FLOPs per non-embedding parameter per position run (+ the LM head at the read
    # positions, left out), against this CPU's fp32 matmul throughput measured here
    emb = model.get_input_embeddings().weight
    body = sum(q.numel() for q in model.parameters() if q is not emb)
    gflop = 2 * body * fwd["positions"] / 1e9
    peak = matmul_gflops()

    cached_s = sum(r[2] for r in runs["vanilla_cached"])
    uncached_s = sum(r[2] for r in runs["vanilla_uncached"])
    rain_s = sum(r.wall_s for r in rain)
    tok_cached = sum(len(r[0]) for r in runs["vanilla_cached"])
    tok_uncached = sum(len(r[0]) for r in runs["vanilla_uncached"])
    tok_rain = sum(len(r.response_ids) for r in rain)
    steps = sum(len(r.steps) for r in rain)
    iters = sum(r.iterations for r in rain)
    lookups = sum(r.cache_lookups for r in rain)

    def per_tok(s: float, n: int) -> float:
        return s / max(1, n)

    if args.save:
        with open(args.save, "w", encoding="utf-8") as f:
            for c, a, b, r in zip(convs, runs["vanilla_cached"], runs["vanilla_uncached"], rain, strict=True):
                row = {
                    "prompt": c[-1]["content"],
                    "vanilla_cached": tok.decode(a[0], skip_special_tokens=True),
                    "vanilla_cached_s": round(a[2], 4),
                    "vanilla_uncached_s": round(b[2], 4),
                    "rain": r.to_json(),
                }
                f.write(json.dumps(row) + "\n")
    res = {
        "bench": "rain_overhead",
        "n_prompts": args.n,
        "vanilla_cached_s": round(cached_s, 3),
        "vanilla_uncached_s": round(uncached_s, 3),
        "rain_s": round(rain_s, 3),
        "ratio_vs_cached": round(rain_s / cached_s, 2),
        "ratio_vs_uncached": round(rain_s / uncached_s, 2),
        "iters_per_step": round(iters / max(1, steps), 2),
        "cache_hit_rate": round(sum(r.cache_hits for r in rain) / max(1, lookups), 4),
        "tokens_vanilla_cached": tok_cached,
        "tokens_vanilla_uncached": tok_uncached,
        "tokens_rain": tok_rain,
        "per_token_ratio_vs_cached": round(per_tok(rain_s, tok_rain) / per_tok(cached_s, tok_cached), 2),
        "per_token_ratio_vs_uncached": round(per_tok(rain_s, tok_rain) / per_tok(uncached_s, tok_uncached), 2),
        "uncached_equals_cached": sum(
            a[0] == b[0] for a, b in zip(runs["vanilla_cached"], runs["vanilla_uncached"], strict=True)
        ),
        "rain_equals_greedy": sum(r.response_ids == a[0] for r, a in zip(rain, runs["vanilla_cached"], strict=True)),
        "rain_finished": sum(r.finished for r in rain),
        "committed_steps": steps,
        "iterations": iters,
        "evaluations": sum(r.evaluations for r in rain),
        "judge_neither": sum(r.judge_neither for r in rain),
        "added_nodes": sum(r.added_nodes for r in rain),
        "cache_lookups": lookups,
        "rain_max_prompt_s": round(max(r.wall_s for r in rain), 3),
        "rain_total_wall_s": round(rain_total_wall, 3),
        "rain_forwards": fwd["calls"],
        "rain_positions": fwd["positions"],
        "rain_positions_per_token": round(fwd["positions"] / max(1, tok_rain), 1),
        "rain_gflop_per_s": round(gflop / rain_total_wall, 1),
        "matmul_gflop_per_s": round(peak, 1),
        "rain_share_of_matmul": round(gflop / rain_total_wall / peak, 3),
        "max_new_tokens": args.max_new_tokens,
        "evaluator": args.rm or "self",
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "loadavg": os.getloadavg(),
        "total_wall_s": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
