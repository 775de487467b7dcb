"""Real result (issue 11): does RAIN make the embedded model more harmless, and does it beat Best-of-N at equal time?

Data: the first ``--n`` (100; 5 with ``--quick``) distinct first human turns of HH harmless-base test, and
the first ``--n`` AdvBench behaviours (``goal`` column of ``harmful_behaviors.csv``), each as a one-turn
conversation, answered by the embedded SmolLM2-135M-Instruct (fp32, CPU), one prompt at a time, at most
``--max-new-tokens`` (64; 16 with ``--quick``) new tokens, stopping at EOS:

* ``vanilla``: greedy ``model.generate`` (KV cache on);
* ``rain-self``: RAIN with the paper's constants (``RainConfig`` defaults) and self-evaluation;
* ``rain-rm``: the same with the HH reward model ``--rm`` as the evaluator (``RainConfig(evaluator="rm")``);
* ``bon-self`` / ``bon-rm``: Best-of-N (``inference/bon.py``; T = 1 sampling, the N samples of a prompt in one
  batch) picked by the same self-judge / the same reward model, with N set so that its time matches RAIN's:
  RAIN's mean time per prompt on the first ``--calib`` prompts of each set, over the mean time of one sampled
  answer plus its scoring on the same prompts, ``N = max(1, round(rain_s / sample_s))`` (printed, and saved in
  ``bon_n.json``; ``--bon-n`` overrides). The N samples run as one batch, so Best-of-N's measured time per
  prompt is usually below RAIN's; the table shows both.

One scorer for every method: the llm-attacks refusal rule (``eval/refusal.is_refusal``) on both sets
(AdvBench: harmless = refused, attack success = not refused; HH: the refusal-rule harmless share), and on HH
the raw score of the reward model ``--rm``. That RM is also the evaluator of ``rain-rm`` and ``bon-rm``, so
their RM scores are not an independent measure (the refusal rule is).

Every method's answers are cached in ``--out`` (``<method>.<set>.jsonl``, one line per prompt, written as it
is done), so a rerun resumes; ``settings.json`` records what the answers depend on, and a rerun with other
settings stops rather than mixing them. The table also shows the methods left out of ``--methods`` whose
answers an earlier run completed. Prints a markdown table and writes ``<out>/summary.json``. Usage::

    setsid nohup .venv/bin/python benchmarks/rain_effect.py --rm outputs/ppo_ablation/rm/final \\
        > outputs/rain_effect.log 2>&1 &
    .venv/bin/python benchmarks/rain_effect.py --quick --rm outputs/ppo_ablation/rm/final
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DEFAULT_DATA  # noqa: E402
from _rain import ADVBENCH, advbench_goals, greedy, hh_first_turns, load_policy  # noqa: E402

METHODS = ("vanilla", "rain-self", "rain-rm", "bon-self", "bon-rm")
SETS = ("hh", "advbench")


def read_rows(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():  # a line cut by a kill is not valid JSON: that prompt is redone
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows[r["i"]] = r
    return rows


def check_settings(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{out} holds answers made with other settings {diff} (old, new): use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


class Runner:
    """The policy, the scorer and the methods' searchers / evaluators (each built on first use)."""

    def __init__(self, args):
        self.args = args
        self.model, self.tok = load_policy(args.model)
        self._built: dict = {}
        greedy(self.model, self.tok, [{"role": "user", "content": "Hi"}], 2)  # warm-up, not timed

    def _get(self, key, make):
        if key not in self._built:
            self._built[key] = make()
        return self._built[key]

    def scorer(self):
        from alignforge.inference.evaluators import RewardEvaluator

        return self._get("scorer", lambda: RewardEvaluator(self.args.rm))

    def evaluator(self, kind: str):
        from alignforge.inference.evaluators import RewardEvaluator, SelfJudge
        from alignforge.inference.rain import RainConfig

        if kind == "rm":
            return self._get("ev-rm", lambda: RewardEvaluator(self.args.rm))
        d = RainConfig()
        return self._get("ev-self", lambda: SelfJudge(self.model, self.tok, self.args.judge_vote, d.judge_min_mass))

    def rain(self, kind: str):
        from alignforge.inference.rain import RainConfig, RainSearch

        cfg = RainConfig(
            max_new_tokens=self.args.max_new_tokens,
            seed=self.args.seed,
            judge_vote=self.args.judge_vote,
            evaluator=kind,
            reward_model=self.args.rm if kind == "rm" else None,
        )
        return self._get(f"rain-{kind}", lambda: RainSearch(self.model, self.tok, cfg, self.evaluator(kind)))

    def bon(self, kind: str, conv: list, i: int, n: int) -> dict:
        from alignforge.inference.bon import best_of_n
        from alignforge.inference.generate import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=self.args.max_new_tokens, temperature=1.0)
        return best_of_n(self.model, self.tok, [conv], n, self.evaluator(kind), cfg, seed=self.args.seed + i)[0]

    def answer(self, method: str, conv: list, i: int, n: int | None) -> dict:
        """One prompt's answer, timed (scoring by the independent scorer is not)."""
        import torch

        if method == "vanilla":
            ids, finished, dt = greedy(self.model, self.tok, conv, self.args.max_new_tokens)
            return {
                "response": self.tok.decode(ids, skip_special_tokens=True),
                "tokens": len(ids),
                "finished": finished,
                "wall_s": dt,
            }
        kind = method.split("-")[1]
        if method.startswith("rain-"):
            with torch.inference_mode():
                r = self.rain(kind).generate(conv, index=i)
            return {
                "response": r.response,
                "tokens": len(r.response_ids),
                "finished": r.finished,
                "wall_s": r.wall_s,
                "iterations": r.iterations,
                "steps": len(r.steps),
                "judge_neither": r.judge_neither,
                "cache_hit_rate": round(r.cache_hits / max(1, r.cache_lookups), 4),
            }
        b = self.bon(kind, conv, i, n)
        return {
            "response": b["response"],
            "tokens": len(b["response_ids"]),
            "finished": b["finished"],
            "wall_s": b["wall_s"],
            "n": n,
            "best": b["best"],
            "scores": b["scores"],
        }

    def score(self, set_name: str, conv: list, row: dict) -> None:
        from alignforge.eval.refusal import is_refusal

        row["refused"] = is_refusal(row["response"])
        if set_name == "hh":
            sc = self.scorer()
            sc.start(conv, self.tok)
            row["rm"] = sc.raw_score(row["response"])


def run_method(runner: Runner, method: str, data: dict, out: Path, n: int | None) -> dict[str, list[dict]]:
    res = {}
    for set_name in SETS:
        path = out / f"{method}.{set_name}.jsonl"
        done = read_rows(path)
        convs = data[set_name]
        todo = [i for i in range(len(convs)) if i not in done]
        if todo:
            t0 = time.perf_counter()
            with open(path, "a", encoding="utf-8") as f:
                for i in todo:
                    row = {"i": i, "prompt": convs[i][-1]["content"], **runner.answer(method, convs[i], i, n)}
                    runner.score(set_name, convs[i], row)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    done[i] = row
                    print(
                        f"[{method}/{set_name}] {i + 1}/{len(convs)}: {row['wall_s']:.1f}s, "
                        f"{row['tokens']} tokens, refused={row['refused']}",
                        flush=True,
                    )
            print(f"[{method}/{set_name}] {len(todo)} prompts in {time.perf_counter() - t0:.0f}s", flush=True)
        res[set_name] = [done[i] for i in range(len(convs))]
    return res


def choose_n(runner: Runner, kind: str, data: dict, out: Path) -> int:
    """N for ``bon-KIND``: RAIN's mean time per prompt over one sample's (plus scoring), on the calib prompts."""
    args = runner.args
    if args.bon_n:
        return args.bon_n
    path = out / "bon_n.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if kind in saved:
        print(f"[bon-{kind}] N = {saved[kind]['n']} (saved in {path})", flush=True)
        return saved[kind]["n"]
    k = min(args.calib, args.n)
    rain_t, sample_t = [], []
    for set_name in SETS:
        rows = read_rows(out / f"rain-{kind}.{set_name}.jsonl")
        if any(i not in rows for i in range(k)):
            raise SystemExit(
                f"bon-{kind} needs rain-{kind}'s times on the first {k} prompts: run it first or give --bon-n"
            )
        rain_t += [rows[i]["wall_s"] for i in range(k)]
        runner.bon(kind, data[set_name][0], 0, 1)  # warm-up (e.g. the judge's prefix KV), not timed
        sample_t += [runner.bon(kind, data[set_name][i], i, 1)["wall_s"] for i in range(k)]
    rain_s, sample_s = sum(rain_t) / len(rain_t), sum(sample_t) / len(sample_t)
    n = max(1, round(rain_s / sample_s))
    saved[kind] = {"n": n, "rain_s_per_prompt": round(rain_s, 3), "sample_s": round(sample_s, 4), "calib_prompts": k}
    path.write_text(json.dumps(saved, indent=1))
    print(f"[bon-{kind}] RAIN {rain_s:.2f}s/prompt, one sample + scoring {sample_s:.3f}s: N = {n}", flush=True)
    return n


def metrics(res: dict[str, list[dict]]) -> dict:
    hh, adv = res["hh"], res["advbench"]
    rows = hh + adv

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "advbench_refused": mean(r["refused"] for r in adv),
        "advbench_asr": 1 - mean(r["refused"] for r in adv),
        "hh_refused": mean(r["refused"] for r in hh),
        "hh_rm": mean(r["rm"] for r in hh),
        "hh_tokens": mean(r["tokens"] for r in hh),
        "advbench_tokens": mean(r["tokens"] for r in adv),
        "s_per_prompt": mean(r["wall_s"] for r in rows),
        "empty": sum(not r["response"].strip() for r in rows),
        "cut_share": mean(not r["finished"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rm", required=True, help="a trained alignforge reward model dir (HH), e.g. outputs/ppo_ablation/rm/final"
    )
    ap.add_argument("--quick", action="store_true", help="5 prompts per set, 16 new tokens")
    ap.add_argument("--n", type=int, default=None, help="prompts per set (default 100; 5 with --quick)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (16 with --quick)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--bon-n", type=int, default=None, help="Best-of-N's N (default: matched to RAIN's time)")
    ap.add_argument("--calib", type=int, default=3, help="prompts per set that set N (RAIN's and one sample's time)")
    ap.add_argument("--judge-vote", choices=["hard", "soft"], default="hard", help="self-judge vote (RAIN and BoN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--advbench", default=ADVBENCH)
    ap.add_argument("--out", default="outputs/rain_effect")
    ap.add_argument("--model", default="embedded", help=argparse.SUPPRESS)  # a tiny model, to smoke-test
    args = ap.parse_args()
    args.n = args.n or (5 if args.quick else 100)
    args.max_new_tokens = args.max_new_tokens or (16 if args.quick else 64)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if args.bon_n is not None and args.bon_n < 1:
        raise SystemExit("--bon-n must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    out = Path(args.out)
    check_settings(
        out,
        {
            "model": args.model,
            "rm": str(Path(args.rm).resolve()),
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "judge_vote": args.judge_vote,
            "data": args.data,
            "advbench": args.advbench,
        },
    )
    runner = Runner(args)
    data = {"hh": hh_first_turns(args.data, args.n, runner.tok), "advbench": advbench_goals(args.advbench, args.n)}
    results, ns = {}, {}
    saved_n = json.loads((out / "bon_n.json").read_text()) if (out / "bon_n.json").is_file() else {}
    for m in METHODS:
        if m in methods:
            n = None
            if m.startswith("bon-"):
                n = ns[m] = choose_n(runner, m.split("-")[1], data, out)
            results[m] = run_method(runner, m, data, out, n)
            continue
        # Not asked for this time: in the table if an earlier run left all its answers.
        done = {s: read_rows(out / f"{m}.{s}.jsonl") for s in SETS}
        if all(i in done[s] for s in SETS for i in range(args.n)):
            results[m] = {s: [done[s][i] for i in range(args.n)] for s in SETS}
            if m.startswith("bon-"):
                kind = m.split("-")[1]
                ns[m] = done["hh"][0].get("n") or saved_n.get(kind, {}).get("n")

    summary_rows = {m: {**metrics(r), "n": ns.get(m)} for m, r in results.items()}
    lines = [
        "| method | N | AdvBench refused (ASR) | HH refused | HH RM score | tokens HH / AdvBench | s / prompt | cut |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, e in summary_rows.items():
        lines.append(
            f"| {m} | {e['n'] or ''} | {e['advbench_refused']:.0%} ({e['advbench_asr']:.0%}) | {e['hh_refused']:.0%} | "
            f"{e['hh_rm']:+.3f} | {e['hh_tokens']:.1f} / {e['advbench_tokens']:.1f} | {e['s_per_prompt']:.2f} | "
            f"{e['cut_share']:.0%} |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    summary = {
        "command": "benchmarks/rain_effect.py",
        "args": vars(args),
        "n_per_set": args.n,
        "methods": summary_rows,
        "bon_n": ns,
        "table": table,
        "samples": {
            m: [{"prompt": r["prompt"], "answer": r["response"]} for r in res["advbench"][:3] + res["hh"][:3]]
            for m, res in results.items()
        },
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'summary.json'} ({summary['seconds']}s)", flush=True)


if __name__ == "__main__":
    main()
