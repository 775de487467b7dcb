"""Benchmark: ``train_dpo`` against TRL's ``DPOTrainer`` (issue 4, item 7).

Both sides run full fine-tuning (no LoRA) of the embedded SmolLM2-135M-Instruct on the same first
N pairs of HH harmless-base, max length 512, batch 4, sigmoid DPO with beta 0.1, one epoch, lr
1e-6, cosine without warmup, grad clipping 1.0, fp32, no gradient checkpointing, no reference
model held during training (ours never holds one; TRL with ``precompute_ref_log_probs=True``).

Each side runs in its own subprocess, so the peak RSS (``ru_maxrss`` at the end of the child)
is per side. **Timed = reference pass + training loop** on both sides: ours times
``trainers.dpo.reference_logps`` (with an empty ``$ALIGNFORGE_CACHE``, so it is really computed)
plus the loop from the first step to the end of the last optimiser step; TRL times its
``_precompute_ref_logps`` (run in ``DPOTrainer.__init__``) plus the loop (``on_step_begin`` of the
first step to ``on_step_end`` of the last). Tokenisation, model loading and saving are excluded on
both sides. The ``*_train_pairs_per_s`` fields give the loop alone; ``cpu_time_ratio`` compares
process CPU time (user + system) over the same regions, which is less sensitive to other
jobs on the machine than wall time (but not immune: with 2 OpenMP threads on 2 busy cores, every
parallel op waits for a descheduled thread; ``OMP_NUM_THREADS=1`` in the environment of this
script applies to both children and gives steadier numbers on a shared machine).

TRL settings tried (``--trl-variants``): ``precompute`` (precompute_ref_log_probs=True, the
default and its fastest CPU setting here) and ``live`` (a second reference model, forwarded every
step). ``padding_free`` is not a variant: TRL 1.16 disables it ("temporarily unavailable after a
refactor", it warns and falls back to padding); it is passed as False. Gradient checkpointing is
off on both sides (it only trades speed for memory).

What each side sees:

* **Same pairs**: the first N pairs of the file whose ``prompt + longer response`` fits in 512
  tokens (so neither side truncates or drops any).
* **Same batches**: ours runs with its defaults (packing, ``train.group_by_length=true``); its
  epoch order is ``trainers.common.epoch_order``. TRL gets its dataset in exactly that order with
  ``train_sampling_strategy="sequential"``, so both see the same batches.
* **Same token ids** (``--trl-input tokens``, the default): TRL gets our ``prompt_ids`` /
  ``chosen_ids`` / ``rejected_ids`` (``DPOTrainer._prepare_dataset`` is overridden to keep them).
  TRL's own conversational tokenisation (``--trl-input conversational``) differs from ours by
  one token per response: its responses end with ``<|im_end|>\\n`` (the chat template's trailing
  newline), ours with ``<|im_end|>``; everything before is identical (checked in ``prepare`` and
  printed as ``tokenisation_check``).

Correctness checks (printed and in the final JSON): the step-0 losses (policy == reference, so
both are ln 2 for sigmoid DPO) and ``max_abs_logp_diff``: the largest difference between the
per-sequence chosen/rejected log-probs of the initial model computed by ours (the packed
forward, ``packed_response_logps``, as cached by our reference pass) and by TRL (its
concatenated padded forward in ``compute_ref_log_probs``, stored by its precompute), over all N
pairs, on identical token ids.

Usage::

    .venv/bin/python benchmarks/dpo_vs_trl.py --quick     # N=16, a few minutes on 2 cores
    .venv/bin/python benchmarks/dpo_vs_trl.py             # N=64
    .venv/bin/python benchmarks/dpo_vs_trl.py --n 128 --repeats 2

The last line of stdout is one JSON object (see ``main``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    common_parser,
    cpu_s,
    machine_line,
    parse,
    peak_rss_mb,
    run_child,  # noqa: E402
    select_pairs,
    time_our_loop,
    token_counts,
    trl_timer,
)

# --------------------------------------------------------------------------- preparation (parent)


def prepare(args) -> dict:
    """Select the pairs, write them, compute the batch order and TRL's token rows."""
    from alignforge.models.loading import ensure_embedded
    from alignforge.trainers.common import epoch_order

    work = Path(args.workdir)
    base = ensure_embedded()
    tok, chosen, tokenized = select_pairs(args.data, args.n, args.max_length, work)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized]
    order = epoch_order(0, len(tokenized), args.batch, args.seed, lengths)
    (work / "order.json").write_text(json.dumps(order))
    with open(work / "trl_tokens.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            p = tokenized[i]
            f.write(
                json.dumps(
                    {
                        "prompt_ids": list(p.prompt_ids),
                        "chosen_ids": list(p.chosen_ids),
                        "rejected_ids": list(p.rejected_ids),
                    }
                )
                + "\n"
            )

    # how TRL would tokenise the same conversational records (its tokenize_fn, without the trainer)
    check = {"n_checked": 0, "prompt_equal": 0, "response_equal_but_trailing": 0, "other": 0, "trailing_tokens": []}
    for rec, p in list(zip(chosen, tokenized, strict=False))[:8]:
        msgs = lambda m: [dict(x) for x in m]  # noqa: E731
        tp = tok.apply_chat_template(msgs(rec.prompt), add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        tc = tok.apply_chat_template(msgs(rec.prompt) + msgs(rec.chosen), tokenize=True, return_dict=True)["input_ids"]
        check["n_checked"] += 1
        check["prompt_equal"] += int(tp == list(p.prompt_ids))
        resp = tc[len(tp) :]
        if resp[: len(p.chosen_ids)] == list(p.chosen_ids):
            check["response_equal_but_trailing"] += 1
            tail = tok.decode(resp[len(p.chosen_ids) :])
            if tail not in check["trailing_tokens"]:
                check["trailing_tokens"].append(tail)
        else:
            check["other"] += 1
    return {
        "n_pairs": len(chosen),
        **token_counts(tokenized),
        "first_batch": order[: args.batch],
        "base": str(base),
        "tokenisation_check": check,
    }


# --------------------------------------------------------------------------- children


def child_ours(args) -> dict:
    import torch

    import alignforge.trainers.dpo as dpo
    from alignforge.config import load_config

    work = Path(args.workdir)
    marks: dict[str, float] = {}
    real_reference = dpo.reference_logps

    def timed_reference(*a, **kw):
        t, c = time.perf_counter(), cpu_s()
        out = real_reference(*a, **kw)
        marks["ref"], marks["ref_cpu"] = time.perf_counter() - t, cpu_s() - c
        marks["ref_values"] = out
        return out

    dpo.reference_logps = timed_reference
    time_our_loop(marks)
    out = tempfile.mkdtemp(prefix="dpo-ours-", dir=args.workdir)
    cfg = load_config(
        dpo.DPOConfig,
        None,
        [
            f"model.name_or_path={args.base}",
            f"data.train_files=[{work / 'pairs.jsonl'}]",
            f"data.max_length={args.max_length}",
            "dpo.loss_type=sigmoid",
            f"dpo.beta={args.beta}",
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
            "lora.enabled=false",
            "model.gradient_checkpointing=false",
            f"train.output_dir={out}",
        ],
    )
    summary = dpo.train_dpo(cfg)
    train_s = marks["end"] - marks["start"]
    ref = marks["ref_values"]
    (work / "ours_ref.json").write_text(json.dumps({k: ref[k].tolist() for k in ("chosen_logps", "rejected_logps")}))
    hist = summary["history"]
    total = marks["ref"] + train_s
    cpu = marks["ref_cpu"] + marks["cpu_end"] - marks["cpu_start"]
    return {
        "side": "ours",
        "seconds": total,
        "cpu_seconds": cpu,
        "pairs_per_cpu_s": args.n / cpu,
        "ref_seconds": marks["ref"],
        "train_seconds": train_s,
        "steps": summary["step"],
        "pairs_per_s": args.n / total,
        "train_pairs_per_s": args.n / train_s,
        "first_loss": hist[0]["loss"],
        "last_loss": hist[-1]["loss"],
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def child_trl(args, variant: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignforge.data.readers import read_preference

    work = Path(args.workdir)
    order = json.loads((work / "order.json").read_text())
    tok = AutoTokenizer.from_pretrained(args.base)
    if args.trl_input == "tokens":
        rows = [json.loads(line) for line in open(work / "trl_tokens.jsonl", encoding="utf-8")]
    else:
        recs = read_preference(work / "pairs.jsonl").records
        rows = [
            {
                "prompt": [dict(m) for m in recs[i].prompt],
                "chosen": [dict(m) for m in recs[i].chosen],
                "rejected": [dict(m) for m in recs[i].rejected],
            }
            for i in order
        ]
    ds = Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    marks: dict[str, float] = {}
    losses: list[float] = []

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, a, name):
            if args.trl_input == "tokens":
                return dataset  # already our token ids (prompt_ids / chosen_ids / rejected_ids)
            return super()._prepare_dataset(dataset, processing_class, a, name)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t, c = time.perf_counter(), cpu_s()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            marks["ref"] = marks.get("ref", 0.0) + time.perf_counter() - t
            marks["ref_cpu"] = marks.get("ref_cpu", 0.0) + cpu_s() - c
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    precompute = variant == "precompute"
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dpo-trl-", dir=args.workdir),
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        seed=args.seed,
        max_length=args.max_length,
        beta=args.beta,
        loss_type=["sigmoid"],
        gradient_checkpointing=False,
        padding_free=False,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=8 if precompute else None,
        bf16=args.precision == "bf16",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[trl_timer(marks)])
    assert len(trainer.train_dataset) == args.n, f"TRL kept {len(trainer.train_dataset)} of {args.n} pairs"
    if precompute:  # TRL's per-sequence log-probs of the initial model, in its dataset order
        tds = trainer.train_dataset
        (work / f"trl_ref_{args.trl_input}.json").write_text(
            json.dumps(
                {
                    "order": order,
                    "chosen_logps": [float(x) for x in tds["ref_chosen_logps"]],
                    "rejected_logps": [float(x) for x in tds["ref_rejected_logps"]],
                }
            )
        )
    trainer.train()
    train_s = marks["end"] - marks["start"]
    ref_s = marks.get("ref", 0.0)
    total = ref_s + train_s
    cpu = marks.get("ref_cpu", 0.0) + marks["cpu_end"] - marks["cpu_start"]
    return {
        "side": f"trl_{variant}",
        "trl_input": args.trl_input,
        "seconds": total,
        "cpu_seconds": cpu,
        "pairs_per_cpu_s": args.n / cpu,
        "ref_seconds": ref_s,
        "train_seconds": train_s,
        "steps": trainer.state.global_step,
        "pairs_per_s": args.n / total,
        "train_pairs_per_s": args.n / train_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_rss_mb": peak_rss_mb(),
        "optim": str(cfg.optim),
        "holds_ref_model": trainer.ref_model is not None,
        "torch_threads": torch.get_num_threads(),
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
            "--beta",
            str(args.beta),
            "--max-length",
            str(args.max_length),
            "--trl-input",
            args.trl_input,
            "--base",
            args.base,
            "--precision",
            args.precision,
        ],
        env={
            "ALIGNFORGE_CACHE": tempfile.mkdtemp(prefix="afcache-", dir=args.workdir),  # ours: no cached reference
            "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="hfds-", dir=args.workdir),
        },
    )  # TRL: no cached precompute


def logp_diff(args) -> dict:
    """Max |ours - TRL| over the per-sequence chosen/rejected log-probs of the initial model (all N pairs)."""
    work = Path(args.workdir)
    path = work / f"trl_ref_{args.trl_input}.json"
    if not path.is_file() or not (work / "ours_ref.json").is_file():
        return {"max_abs_logp_diff": None}
    ours = json.loads((work / "ours_ref.json").read_text())
    trl = json.loads(path.read_text())
    diffs = []
    for k in ("chosen_logps", "rejected_logps"):
        for j, i in enumerate(trl["order"]):  # TRL row j is our pair i
            diffs.append((abs(ours[k][i] - trl[k][j]), k, i, ours[k][i], trl[k][j]))
    worst = max(diffs)
    i0 = trl["order"][0]
    return {
        "max_abs_logp_diff": worst[0],
        "mean_abs_logp_diff": sum(d[0] for d in diffs) / len(diffs),
        "n_compared": len(diffs),
        "max_rel_logp_diff": max(d[0] / max(1e-9, abs(d[4])) for d in diffs),
        "worst": {"which": worst[1], "pair": worst[2], "ours": worst[3], "trl": worst[4]},
        "example": {
            "pair": i0,
            "ours_chosen": ours["chosen_logps"][i0],
            "trl_chosen": trl["chosen_logps"][0],
            "ours_rejected": ours["rejected_logps"][i0],
            "trl_rejected": trl["rejected_logps"][0],
        },
    }


def main() -> None:
    ap = common_parser(__doc__, lr=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument(
        "--trl-variants",
        default="precompute",
        help="comma list of TRL settings: precompute (precompute_ref_log_probs=True), live (ref model)",
    )
    ap.add_argument("--base", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parse(ap)

    if args.child:
        res = child_ours(args) if args.child == "ours" else child_trl(args, args.child.removeprefix("trl_"))
        print(json.dumps(res), flush=True)
        return

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="dpo_vs_trl-")
        args.workdir = tmp.name
    t0 = time.perf_counter()
    info = prepare(args)
    args.base = info.pop("base")
    machine_line(info)
    variants = [v.strip() for v in args.trl_variants.split(",") if v.strip()]
    runs: dict[str, list[dict]] = {"ours": [], **{f"trl_{v}": [] for v in variants}}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both sides alike
        runs["ours"].append(child("ours", args))
        for v in variants:
            runs[f"trl_{v}"].append(child(f"trl_{v}", args))

    best_of = {k: max(v, key=lambda r: r["pairs_per_s"]) for k, v in runs.items()}
    trl_key = max((k for k in runs if k.startswith("trl_")), key=lambda k: best_of[k]["pairs_per_s"])
    ours, trl = best_of["ours"], best_of[trl_key]
    first = {k: v[0] for k, v in runs.items()}
    lp = logp_diff(args)
    loss_diff = abs(first["ours"]["first_loss"] - first[trl_key]["first_loss"])
    print(
        json.dumps(
            {
                "trl_best_variant": trl_key,
                **{f"{k}_pairs_per_s": round(b["pairs_per_s"], 4) for k, b in best_of.items()},
                "ours_ref_s": round(ours["ref_seconds"], 2),
                "trl_ref_s": round(trl["ref_seconds"], 2),
                "ours_train_pairs_per_s": round(ours["train_pairs_per_s"], 4),
                "trl_train_pairs_per_s": round(trl["train_pairs_per_s"], 4),
                "train_only_ratio": round(ours["train_pairs_per_s"] / trl["train_pairs_per_s"], 3),
                "cpu_time_ratio": round(ours["pairs_per_cpu_s"] / trl["pairs_per_cpu_s"], 3),
                "ratio_per_repeat": [
                    round(o["pairs_per_s"] / t["pairs_per_s"], 3)
                    for o, t in zip(runs["ours"], runs[trl_key], strict=False)
                ],
                "real_tokens_packed": info["real_tokens_packed"],
                "real_tokens_unpacked": info["real_tokens_unpacked"],
                "first_loss_abs_diff": loss_diff,
                "first_loss_agree_1e-4": loss_diff < 1e-4,
                **lp,
                "logp_agree_1e-3": lp["max_abs_logp_diff"] is not None and lp["max_abs_logp_diff"] < 1e-3,
                "trl_input": args.trl_input,
                "precision": args.precision,
                "total_wall_s": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )
    print(
        json.dumps(
            {
                "bench": "dpo_vs_trl",
                "n_pairs": args.n,
                "ours_pairs_per_s": round(ours["pairs_per_s"], 4),
                "trl_pairs_per_s": round(trl["pairs_per_s"], 4),
                "ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
                "ours_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["ours"]), 1),
                "trl_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[trl_key]), 1),
                "first_loss_ours": first["ours"]["first_loss"],
                "first_loss_trl": first[trl_key]["first_loss"],
                "max_abs_logp_diff": lp["max_abs_logp_diff"],
            }
        ),
        flush=True,
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
