"""Benchmark: ``alignforge rm train`` against TRL's ``RewardTrainer`` (issue 3, item 5).

Both sides train the same reward model (the embedded SmolLM2-135M-Instruct with one scalar
head, *the same head init*), on the same first N pairs of HH harmless-base, max length 512,
batch 4, one epoch, plain Bradley-Terry (no regulariser, no length balancing), the same lr,
cosine schedule without warmup, grad clipping 1.0, fp32, no gradient checkpointing.

Each side runs in its own subprocess, so the peak RSS (``ru_maxrss`` at the end of the child)
is per side. Only the training loop is timed: from the start of the first step to the end of
the last optimiser step. Tokenisation, model loading and saving are excluded on both sides
(TRL tokenises in ``RewardTrainer.__init__``; ours before its loop).

What each side sees:

* **Same pairs.** The first N pairs of the file whose ``prompt + longer response`` fits in
  ``max_length`` (so neither side truncates or drops any).
* **Same batches.** Ours runs with its defaults (``reward.packed=true``,
  ``train.group_by_length=true``); its epoch order is ``trainers.common.epoch_order`` (seeded
  shuffle, then length-sorted windows). TRL gets its dataset in exactly that order with
  ``train_sampling_strategy="sequential"``, i.e. TRL also gets length grouping (its own
  ``group_by_length`` sampler would be its fastest setting anyway) and its first batch is ours.
* **Same tokens** (``--trl-input tokens``, the default): TRL gets pre-tokenised ``chosen_ids`` /
  ``rejected_ids`` = our ``prompt_ids + chosen_ids`` (ending at ``<|im_end|>``), and its pad
  token is set to ``<|endoftext|>`` so that HF's sequence-classification pooling (the
  *rightmost* token that is not the pad id, in transformers 5) lands on ``<|im_end|>``, where
  ours scores. With SmolLM2's own pad token (``<|im_end|>``) HF would score the token *before*
  the end-of-turn token on such ids. ``--trl-input conversational`` instead gives TRL the
  conversational dataset and lets it apply the chat template: its sequences then end with
  ``<|im_end|>\\n`` and HF scores the trailing newline (one token later than ours), so the
  first losses differ slightly; throughput is the same to within a token per sequence.

Also measured (printed, not in the final JSON): ours with ``reward.packed=false`` (chosen and
rejected as two padded sequences, as TRL does), to show where the speed-up comes from.

Usage::

    .venv/bin/python benchmarks/rm_vs_trl.py --quick          # N=16, a few minutes on 2 cores
    .venv/bin/python benchmarks/rm_vs_trl.py                  # N=64
    .venv/bin/python benchmarks/rm_vs_trl.py --n 128 --repeats 2

The last line of stdout is one JSON object (see ``main``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    common_parser,
    machine_line,
    parse,
    peak_rss_mb,
    run_child,
    select_pairs,  # noqa: E402
    time_our_loop,
    token_counts,
    trl_timer,
)

# --------------------------------------------------------------------------- preparation (parent)


def prepare(args) -> dict:
    """Select the pairs, write them, build the shared initial model, compute the batch order."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from alignforge.models.loading import ensure_embedded
    from alignforge.trainers.common import epoch_order
    from alignforge.trainers.rm import pair_length

    work = Path(args.workdir)
    base = ensure_embedded()
    tok, chosen, tokenized = select_pairs(args.data, args.n, args.max_length, work)

    lengths = [pair_length(p) for p in tokenized]
    order = epoch_order(0, len(tokenized), args.batch, args.seed, lengths)
    (work / "order.json").write_text(json.dumps(order))
    with open(work / "trl_tokens.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            p = tokenized[i]
            f.write(
                json.dumps(
                    {
                        "chosen_ids": list(p.prompt_ids) + list(p.chosen_ids),
                        "rejected_ids": list(p.prompt_ids) + list(p.rejected_ids),
                    }
                )
                + "\n"
            )

    # one seq-cls model with one fixed head, loaded as is by both sides
    init = work / "init"
    if not (init / "config.json").is_file():
        torch.manual_seed(args.seed)
        hf_logging.set_verbosity_error()
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(init))
        tok.save_pretrained(str(init))
        head = model.score.weight.detach().clone()
        torch.save(head, work / "head.pt")
        del model
    return {"n_pairs": len(chosen), **token_counts(tokenized), "first_batch": order[: args.batch]}


# --------------------------------------------------------------------------- children


def child_ours(args, packed: bool) -> dict:
    from alignforge.config import load_config
    from alignforge.trainers.rm import RMConfig, train_rm

    work = Path(args.workdir)
    marks: dict[str, float] = {}
    time_our_loop(marks)
    out = tempfile.mkdtemp(prefix="rm-ours-", dir=args.workdir)
    cfg = load_config(
        RMConfig,
        None,
        [
            f"model.name_or_path={work / 'init'}",
            f"data.train_files=[{work / 'pairs.jsonl'}]",
            f"data.max_length={args.max_length}",
            "reward.regularizer=none",
            "reward.length_balance=false",
            f"reward.packed={str(packed).lower()}",
            f"train.per_device_batch_size={args.batch}",
            "train.epochs=1",
            f"train.lr={args.lr}",
            "train.scheduler=cosine",
            "train.warmup_steps=0",
            "train.warmup_ratio=0",
            "train.max_grad_norm=1.0",
            "train.weight_decay=0",
            f"train.seed={args.seed}",
            "train.group_by_length=true",
            "train.progress=false",
            "train.save_every=0",
            "train.tensorboard=false",
            "train.log_every=1",
            f"train.precision={args.precision}",
            f"train.output_dir={out}",
        ],
    )
    summary = train_rm(cfg)
    secs = marks["end"] - marks["start"]
    hist = summary["history"]
    return {
        "side": "ours" if packed else "ours_unpacked",
        "seconds": secs,
        "steps": summary["step"],
        "pairs_per_s": args.n / secs,
        "cpu_seconds": marks["cpu_end"] - marks["cpu_start"],
        "first_loss": hist[0]["loss"],
        "last_loss": hist[-1]["loss"],
        "peak_rss_mb": peak_rss_mb(),
    }


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from alignforge.data.readers import read_preference

    work = Path(args.workdir)
    order = json.loads((work / "order.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(work / "init"))
    if args.trl_input == "tokens":
        rows = [json.loads(line) for line in open(work / "trl_tokens.jsonl", encoding="utf-8")]
        tok.pad_token = "<|endoftext|>"  # so HF pools at <|im_end|>, the last real token (see docstring)
    else:
        recs = read_preference(work / "pairs.jsonl").records
        rows = [{"prompt": recs[i].prompt, "chosen": recs[i].chosen, "rejected": recs[i].rejected} for i in order]
    ds = Dataset.from_list(rows)
    model = AutoModelForSequenceClassification.from_pretrained(str(work / "init"), dtype=torch.float32)
    assert torch.equal(model.score.weight.detach(), torch.load(work / "head.pt")), "head init differs"

    marks: dict[str, float] = {}

    losses: list[float] = []

    class Trainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    cfg = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="rm-trl-", dir=args.workdir),
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        seed=args.seed,
        max_length=args.max_length,
        gradient_checkpointing=False,
        bf16=args.precision == "bf16",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        center_rewards_coefficient=None,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[trl_timer(marks)])
    assert len(trainer.train_dataset) == args.n, f"TRL kept {len(trainer.train_dataset)} of {args.n} pairs"
    trainer.train()
    secs = marks["end"] - marks["start"]
    return {
        "side": "trl",
        "trl_input": args.trl_input,
        "seconds": secs,
        "steps": trainer.state.global_step,
        "pairs_per_s": args.n / secs,
        "cpu_seconds": marks["cpu_end"] - marks["cpu_start"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_rss_mb": peak_rss_mb(),
        "optim": str(cfg.optim),
    }


# --------------------------------------------------------------------------- parent


def child(side: str, args) -> dict:
    return run_child(
        __file__,
        side,
        [
            "--workdir",
            args.workdir,
            "--n",
            str(args.n),
            "--seed",
            str(args.seed),
            "--lr",
            str(args.lr),
            "--batch",
            str(args.batch),
            "--max-length",
            str(args.max_length),
            "--precision",
            args.precision,
            "--trl-input",
            args.trl_input,
        ],
    )


def main() -> None:
    ap = common_parser(__doc__, lr=1e-5)
    ap.add_argument("--no-unpacked", action="store_true", help="skip ours with reward.packed=false")
    ap.add_argument("--child", choices=["ours", "ours_unpacked", "trl"], default=None)
    args = parse(ap)

    if args.child:
        res = (
            child_ours(args, True)
            if args.child == "ours"
            else child_ours(args, False)
            if args.child == "ours_unpacked"
            else child_trl(args)
        )
        print(json.dumps(res), flush=True)
        return

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="rm_vs_trl-")
        args.workdir = tmp.name
    t0 = time.perf_counter()
    info = prepare(args)
    machine_line(info)
    runs: dict[str, list[dict]] = {"ours": [], "trl": [], "ours_unpacked": []}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both sides alike
        runs["ours"].append(child("ours", args))
        runs["trl"].append(child("trl", args))
        if not args.no_unpacked:
            runs["ours_unpacked"].append(child("ours_unpacked", args))
    best = {k: max(v, key=lambda r: r["pairs_per_s"]) for k, v in runs.items() if v}
    first = {k: v[0] for k, v in runs.items() if v}
    if "ours_unpacked" in best:
        print(
            json.dumps(
                {
                    "ours_unpacked_pairs_per_s": round(best["ours_unpacked"]["pairs_per_s"], 4),
                    "packing_speedup": round(best["ours"]["pairs_per_s"] / best["ours_unpacked"]["pairs_per_s"], 3),
                    "unpacked_vs_trl": round(best["ours_unpacked"]["pairs_per_s"] / best["trl"]["pairs_per_s"], 3),
                    "first_loss_ours_unpacked": first["ours_unpacked"]["first_loss"],
                    "real_tokens_packed": info["real_tokens_packed"],
                    "real_tokens_unpacked": info["real_tokens_unpacked"],
                }
            ),
            flush=True,
        )
    cpu = {k: min(r["cpu_seconds"] for r in v) for k, v in runs.items() if v}
    print(
        json.dumps(
            {
                "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
                "ratio_by_cpu_time": round(cpu["trl"] / cpu["ours"], 3),
                "per_run_ratio_wall": [
                    round(o["pairs_per_s"] / t["pairs_per_s"], 3)
                    for o, t in zip(runs["ours"], runs["trl"], strict=False)
                ],
            }
        ),
        flush=True,
    )
    diff = abs(first["ours"]["first_loss"] - first["trl"]["first_loss"])
    print(
        json.dumps(
            {
                "first_loss_abs_diff": diff,
                "agree_1e-3": diff < 1e-3,
                "precision": args.precision,
                "trl_input": args.trl_input,
                "total_wall_s": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )
    print(
        json.dumps(
            {
                "bench": "rm_vs_trl",
                "n_pairs": args.n,
                "ours_pairs_per_s": round(best["ours"]["pairs_per_s"], 4),
                "trl_pairs_per_s": round(best["trl"]["pairs_per_s"], 4),
                "ratio": round(best["ours"]["pairs_per_s"] / best["trl"]["pairs_per_s"], 3),
                "ours_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["ours"]), 1),
                "trl_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["trl"]), 1),
                "first_loss_ours": first["ours"]["first_loss"],
                "first_loss_trl": first["trl"]["first_loss"],
            }
        ),
        flush=True,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
