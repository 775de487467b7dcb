"""How much refusal signal HH carries: the share of final assistant answers that contain a refusal
string (the llm-attacks rule of ``eval/refusal.py``, the one AdvBench ASR is scored with), for the
chosen and the rejected side of each HH split, and the share of pairs where only the chosen answer
refuses (the pairs that teach a refusal by contrast). Reads ``../shared/data/hh-rlhf``. Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/hh_refusal_share.py
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import SHARED  # noqa: E402
from alignforge.eval.refusal import is_refusal  # noqa: E402

SPLITS = ("harmless-base", "helpful-base")


def last_answer(text: str) -> str:
    return text.rsplit("\n\nAssistant:", 1)[-1].strip()


def main() -> None:
    out = {}
    for split in SPLITS:
        n = chosen = rejected = contrast = 0
        with gzip.open(SHARED / "data/hh-rlhf" / split / "test.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                a, b = is_refusal(last_answer(d["chosen"])), is_refusal(last_answer(d["rejected"]))
                n += 1
                chosen += a
                rejected += b
                contrast += a and not b
        out[split] = {
            "pairs": n,
            "chosen_refuses": chosen / n,
            "rejected_refuses": rejected / n,
            "only_chosen": contrast / n,
        }
        print(f"{split:<14} {n:>5} pairs: chosen refuses {chosen / n:.1%}, rejected {rejected / n:.1%}, "
              f"only the chosen {contrast / n:.1%}")  # fmt: skip
    print(json.dumps({"bench": "hh_refusal_share", **out}))


if __name__ == "__main__":
    main()
