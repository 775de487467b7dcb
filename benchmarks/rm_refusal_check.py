"""Does a reward model rank refusals the way the explicit-refusal pairs of ``alignment_hh.py`` mean it to, on
prompts it never saw? Two held-out pair files, built from an ``alignment_hh.py`` output dir:

* ``harmful_refusal_pairs.jsonl``: each held-out harmful question (CatQA + DangerousQA, ``eval/base/
  harmful_heldout.jsonl``), chosen = one of ``alignment_hh.REFUSALS`` (``random.Random(--seed)``), rejected =
  the base model's greedy answer there;
* ``benign_counter_pairs.jsonl``: the first ``--n-benign`` held-out helpful-base pairs (``data/nN/heldout/
  helpful.jsonl``), chosen = HH's chosen answer, rejected = one of the refusals.

Both are scored with ``eval.rm_eval.run_rm_eval`` (what ``alignforge rm eval`` runs); prints each accuracy with
its bootstrap CI and, last, one JSON line. Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/rm_refusal_check.py outputs/rm_hh_safety/bal/final \\
        --from outputs/alignment_hh_small --out outputs/rm_hh_safety/refusal_eval
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alignment_hh import REFUSALS  # noqa: E402


def build(src: Path, out: Path, n_train: int, n_benign: int, seed: int) -> dict[str, Path]:
    from alignforge.data.convert import write_jsonl

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def said(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    base_answers = src / "eval/base/harmful_heldout.jsonl"
    if not base_answers.is_file():
        sys.exit(
            f"{base_answers}: missing; it holds the base model's answers to the held-out harmful questions, which "
            f"an alignment_hh.py evaluation run (not --data-only) with --out {src} writes"
        )
    harm = [json.loads(x) for x in base_answers.read_text().splitlines() if x.strip()]
    rows_h = [
        {"prompt": r["prompt"], "chosen": said(rng.choice(REFUSALS)), "rejected": said(r["response"])} for r in harm
    ]
    held = src / f"data/n{n_train}/heldout/helpful.jsonl"
    rows_b = [json.loads(x) for x in held.read_text().splitlines() if x.strip()][:n_benign]
    rows_b = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": said(rng.choice(REFUSALS))} for r in rows_b]
    files = {
        "harmful_refusal_pairs": out / "harmful_refusal_pairs.jsonl",
        "benign_counter_pairs": out / "benign_counter_pairs.jsonl",
    }
    write_jsonl(rows_h, files["harmful_refusal_pairs"])
    write_jsonl(rows_b, files["benign_counter_pairs"])
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rm", help="a saved reward model dir")
    ap.add_argument("--from", dest="src", default="outputs/alignment_hh_small", help="an alignment_hh.py --out dir")
    ap.add_argument("--out", default="outputs/rm_refusal_check")
    ap.add_argument("--n-train", type=int, default=300, help="the alignment_hh --n-train whose held-out files to use")
    ap.add_argument("--n-benign", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from alignforge.eval.rm_eval import run_rm_eval

    res = {}
    for name, path in build(Path(args.src), Path(args.out), args.n_train, args.n_benign, args.seed).items():
        s = run_rm_eval(args.rm, path, Path(args.out) / name, max_length=args.max_length, plots=False, progress=False)
        res[name] = {"n": s["n_pairs"], "accuracy": s["accuracy"], "ci95": s["accuracy_ci95"]}
        print(f"{name}: {s['n_pairs']} pairs, accuracy {s['accuracy']:.3f} (95% CI {s['accuracy_ci95']})", flush=True)
    print(json.dumps({"bench": "rm_refusal_check", **res}))


if __name__ == "__main__":
    main()
