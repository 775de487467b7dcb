"""Real result (issue 12): the evaluation suite end to end on real data, with `alignforge serve` as the judge.

The embedded SmolLM2-135M-Instruct (``base``) and the policies named by ``--policy NAME=PATH``
(repeatable; default: the DPO+NTP and ULMA models of ``benchmarks/alignment_hh.py``'s first run).
For each, ``alignforge eval generate`` answers the first ``--n-mtbench`` MT-Bench questions (both
turns; 80 = all eight categories) and the first ``--n-advbench`` AdvBench behaviours, greedy. Then:

* ``alignforge eval judge --mode mtbench``: single-answer grading by the embedded model itself, served by
  ``alignforge serve``. ``--judge-rating logprobs`` (the default) pre-fills ``Rating: [[`` and scores
  the expected rating under the judge's next-token probabilities (``--rating-logprobs``);
  ``text`` parses ``[[x]]`` from the judge's free answer (a 135M judge almost never writes one);
* **a control for the judge**: base's answers given to other questions (rotated by one within each
  category) are graded too. A judge with signal scores them lower than the matched answers; the
  paired difference and its bootstrap CI say how much signal there is;
* ``alignforge eval winrate``: each policy against base on MT-Bench, verdicts by the HH reward model
  ``--rm``, raw and length-controlled win rates;
* ``alignforge eval harm``: AdvBench attack success by the refusal rule, and over-refusal on MT-Bench
  (the last turn's answer).

Every command's output is cached under ``--out`` (the judge's calls in its disk cache), so a rerun
resumes. Prints markdown tables and writes ``<out>/summary.json``. Usage::

    .venv/bin/python benchmarks/eval_table.py --rm outputs/ppo_ablation/rm/final
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SHARED  # noqa: E402

MTBENCH = SHARED / "data/mt-bench"
ADVBENCH = SHARED / "data/advbench/harmful_behaviors.csv"
DEFAULT_POLICIES = [
    "dpo_ntp=outputs/alignment_hh_small/runs/dpo_ntp1/final",
    "ulma=outputs/alignment_hh_small/runs/ulma/final",
]


def af(*args: str) -> None:
    cmd = [sys.executable, "-m", "alignforge.cli", *args]
    print("$ alignforge " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"alignforge serve exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def shuffled_control(src: Path, dst: Path) -> None:
    """``src``'s rows with each row's responses taken from the next row of the same category
    (rotated by one), so every answer is a real answer, to the wrong question."""
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_cat[r.get("category") or ""].append(i)
    out = [dict(r) for r in rows]
    for idx in by_cat.values():
        for k, i in enumerate(idx):
            j = idx[(k + 1) % len(idx)]
            out[i]["responses"] = rows[j]["responses"]
            out[i]["response"] = rows[j]["response"]
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")


def paired_difference(matched: dict, control: dict) -> dict:
    """Mean of (matched score − control score) over the items scored in both, with a bootstrap CI."""
    from alignforge.eval.stats import bootstrap_ci

    key = lambda it: (it["id"], it["turn"])  # noqa: E731
    ctl = {key(it): it["score"] for it in control["items"] if it["score"] is not None}
    diffs = [it["score"] - ctl[key(it)] for it in matched["items"] if it["score"] is not None and key(it) in ctl]
    if not diffs:
        return {"n": 0, "mean": None, "ci": None, "share_higher": None}
    ci = bootstrap_ci(diffs, n_resamples=9999) if len(diffs) > 1 else None
    return {
        "n": len(diffs),
        "mean": sum(diffs) / len(diffs),
        "ci": list(ci) if ci is not None else None,
        "share_higher": sum(d > 0 for d in diffs) / len(diffs),
    }


def fmt_ci(x: dict | None, pct: bool = False) -> str:
    if not x or x.get("value", x.get("mean")) is None:
        return "-"
    v = x.get("value", x.get("mean"))
    ci = x.get("ci")
    if pct:
        return f"{100 * v:.1f}% ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})" if ci else f"{100 * v:.1f}%"
    return f"{v:.2f} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", required=True, help="HH reward model dir (win-rate verdicts)")
    ap.add_argument("--policy", action="append", default=None, help="NAME=PATH (repeatable)")
    ap.add_argument("--n-mtbench", type=int, default=80)
    ap.add_argument("--n-advbench", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--judge-rating", choices=("logprobs", "text"), default="logprobs")
    ap.add_argument("--judge-max-tokens", type=int, default=96, help="--judge-rating text: the judge's answer length")
    ap.add_argument("--out", default="outputs/eval_table")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    policies = dict(x.split("=", 1) for x in (args.policy or DEFAULT_POLICIES))
    models = {"base": "embedded", **policies}
    for name, model in models.items():
        common = ["--model", model, "--max-new-tokens", str(args.max_new_tokens), "--no-progress"]
        for set_, data, n in (("mtbench", MTBENCH, args.n_mtbench), ("advbench", ADVBENCH, args.n_advbench)):
            af("eval", "generate", "--set", set_, "--data", str(data), "--n", str(n),
               "--out", str(out / f"{name}.{set_}.jsonl"), *common)  # fmt: skip
        af("eval", "harm", str(out / f"{name}.advbench.jsonl"), "--benign", str(out / f"{name}.mtbench.jsonl"),
           "--out", str(out / f"{name}.harm.json"))  # fmt: skip
    shuffled_control(out / "base.mtbench.jsonl", out / "control.mtbench.jsonl")
    judged = [*models, "control"]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "alignforge.cli", "serve", "embedded", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rating = ["--rating-logprobs"] if args.judge_rating == "logprobs" else ["--max-tokens", str(args.judge_max_tokens)]
    try:
        wait_for(f"http://127.0.0.1:{port}/v1/models", server)
        for name in judged:
            af("eval", "judge", str(out / f"{name}.mtbench.jsonl"), "--mode", "mtbench", "--data", str(MTBENCH),
               "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "embedded", "--concurrency", "1",
               *rating, "--out", str(out / f"{name}.judge.json"), "--cache", str(out / "judge_cache"))  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name in policies:
        af("eval", "winrate", str(out / f"{name}.mtbench.jsonl"), str(out / "base.mtbench.jsonl"),
           "--rm", args.rm, "--out", str(out / f"winrate_{name}.json"))  # fmt: skip
    judge = {name: json.loads((out / f"{name}.judge.json").read_text()) for name in judged}
    summary = {
        "args": vars(args),
        "seconds": round(time.time() - t0, 1),
        "judge": {k: {kk: vv for kk, vv in v.items() if kk != "items"} for k, v in judge.items()},
        "judge_control": paired_difference(judge["base"], judge["control"]),
        "harm": {name: json.loads((out / f"{name}.harm.json").read_text()) for name in models},
        "winrate": {
            name: {k: v for k, v in json.loads((out / f"winrate_{name}.json").read_text()).items() if k != "items"}
            for name in policies
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))

    print("\n| model | MT-Bench score, 135M judge (95% CI) | scored / graded | AdvBench ASR (95% CI) "
          "| MT-Bench over-refusal (95% CI) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in judged:
        o = judge[name]["overall"]
        h = summary["harm"].get(name, {})
        asr = fmt_ci(h.get("harmful", {}).get("attack_success_rate"), pct=True) if h else "-"
        orf = fmt_ci(h.get("benign", {}).get("over_refusal"), pct=True) if h else "-"
        print(f"| {name} | {fmt_ci(o)} | {o['scored']} / {o['n']} | {asr} | {orf} |")
    c = summary["judge_control"]
    print(f"\njudge control: matched − rotated answers = {fmt_ci(c)} over {c['n']} items; "
          f"matched scored higher in {c['share_higher']}")  # fmt: skip
    print("\n| policy vs base (MT-Bench, HH-RM verdicts) | category | n | win | tie | loss | win rate (95% CI) "
          "| length-controlled |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in policies:
        w = summary["winrate"][name]
        for cat, v in [*w["categories"].items(), ("overall", w["overall"])]:
            lc = f"{w['length_controlled']['lc_win_rate']:.3f}" if cat == "overall" else ""
            print(f"| {name} | {cat} | {v['n']} | {v['win']} | {v['tie']} | {v['loss']} "
                  f"| {fmt_ci(v['win_rate_adjusted'])} | {lc} |")  # fmt: skip
    print(json.dumps({"bench": "eval_table", "seconds": summary["seconds"]}))


if __name__ == "__main__":
    main()
