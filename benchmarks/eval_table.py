"""Real result (issue 12): the evaluation suite end to end on real data, with `alignforge serve` as the judge.

The embedded SmolLM2-135M-Instruct (``base``) and the policies named by ``--policy NAME=PATH``
(repeatable; default: the reference-reward PPO run of ``benchmarks/ppo_ablation.py``). For each,
``alignforge eval generate`` answers the first ``--n-mtbench`` MT-Bench questions (both turns) and the
first ``--n-advbench`` AdvBench behaviours, greedy. Then:

* ``alignforge eval judge --mode mtbench``: single-answer grading by the embedded model itself, served by
  ``alignforge serve`` (a 135M judge: weak, and often unparsable; the unparsable answers are counted);
* ``alignforge eval winrate``: each policy against base on MT-Bench, verdicts by the HH reward model
  ``--rm``, raw and length-controlled win rates;
* ``alignforge eval harm``: AdvBench attack success by the refusal rule.

Every command's output is cached under ``--out`` (the judge's calls in its disk cache), so a rerun
resumes. Prints a markdown table and writes ``<out>/summary.json``. Usage::

    .venv/bin/python benchmarks/eval_table.py --rm outputs/ppo_ablation/rm/final
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SHARED  # noqa: E402

MTBENCH = SHARED / "data/mt-bench"
ADVBENCH = SHARED / "data/advbench/harmful_behaviors.csv"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", required=True, help="HH reward model dir (win-rate verdicts)")
    ap.add_argument("--policy", action="append", default=None, help="NAME=PATH (repeatable)")
    ap.add_argument("--n-mtbench", type=int, default=20)
    ap.add_argument("--n-advbench", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--judge-max-tokens", type=int, default=96)
    ap.add_argument("--out", default="outputs/eval_table")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    policies = dict(x.split("=", 1) for x in (args.policy or ["ppo=outputs/ppo_ablation2/refreward/final"]))
    models = {"base": "embedded", **policies}
    for name, model in models.items():
        common = ["--model", model, "--max-new-tokens", str(args.max_new_tokens), "--no-progress"]
        af(
            "eval",
            "generate",
            "--set",
            "mtbench",
            "--data",
            str(MTBENCH),
            "--n",
            str(args.n_mtbench),
            "--out",
            str(out / f"{name}.mtbench.jsonl"),
            *common,
        )
        af(
            "eval",
            "generate",
            "--set",
            "advbench",
            "--data",
            str(ADVBENCH),
            "--n",
            str(args.n_advbench),
            "--out",
            str(out / f"{name}.advbench.jsonl"),
            *common,
        )
        af("eval", "harm", str(out / f"{name}.advbench.jsonl"), "--out", str(out / f"{name}.harm.json"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "alignforge.cli", "serve", "embedded", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/v1/models", server)
        for name in models:
            af(
                "eval",
                "judge",
                str(out / f"{name}.mtbench.jsonl"),
                "--mode",
                "mtbench",
                "--data",
                str(MTBENCH),
                "--judge-url",
                f"http://127.0.0.1:{port}/v1",
                "--judge-model",
                "embedded",
                "--concurrency",
                "1",
                "--max-tokens",
                str(args.judge_max_tokens),
                "--out",
                str(out / f"{name}.judge.json"),
                "--cache",
                str(out / "judge_cache"),
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    af(
        "eval",
        "winrate",
        str(out / "ppo.mtbench.jsonl"),
        str(out / "base.mtbench.jsonl"),
        "--rm",
        args.rm,
        "--out",
        str(out / "winrate.json"),
    )
    summary = {"args": vars(args), "seconds": round(time.time() - t0, 1)}
    for name in models:
        summary[name] = {
            "judge": json.loads((out / f"{name}.judge.json").read_text()),
            "harm": json.loads((out / f"{name}.harm.json").read_text()),
        }
    summary["winrate"] = {name: json.loads((out / f"winrate_{name}.json").read_text()) for name in policies}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print(json.dumps({k: summary[k] for k in ("seconds",)}))


if __name__ == "__main__":
    main()
