"""What the ``*_vs_trl`` benchmarks share: pair selection, per-side subprocesses, and timers.

Each side runs in its own child process (``--child SIDE``), so peak RSS (``ru_maxrss`` of the
child) is per side, and only the training loop (plus, where the benchmark says so, the reference
pass) is timed: tokenisation, model loading and saving are left out on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout
DEFAULT_DATA = str(SHARED / "data/hh-rlhf/harmless-base/test.jsonl.gz")


def cpu_s() -> float:
    """CPU seconds (user + system) of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def select_pairs(data: str, n: int, max_length: int, work: Path) -> tuple[Any, list, list]:
    """The first ``n`` pairs of ``data`` whose prompt + longer response fits in ``max_length - 1``
    tokens (TRL's conversational ids hold one more token per response: neither side truncates).
    Writes them to ``work/pairs.jsonl`` (TRL format); returns ``(tokenizer, records, tokenized)``."""
    from alignforge.data.convert import record_to_trl, write_jsonl
    from alignforge.data.readers import read_preference
    from alignforge.data.tokenize import tokenize_preference
    from alignforge.models.loading import ensure_embedded, load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(ensure_embedded())
    chosen, tokenized = [], []
    for rec in read_preference(data, on_error="skip").records:
        p, over = tokenize_preference(rec, tok, max_length - 1)
        if over:
            continue
        chosen.append(rec)
        tokenized.append(p)
        if len(chosen) == n:
            break
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} pairs fit in max_length {max_length}")
    write_jsonl([record_to_trl(r) for r in chosen], work / "pairs.jsonl")
    return tok, chosen, tokenized


def token_counts(tokenized: list) -> dict[str, int]:
    """Real tokens per epoch packed ``[prompt|chosen|rejected]`` vs two sequences per pair."""
    return {
        "real_tokens_packed": sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized),
        "real_tokens_unpacked": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized),
    }


def time_our_loop(marks: dict[str, float]) -> None:
    """Patch ``trainers.common`` so that ``marks`` gets ``start``/``cpu_start`` at the first loss
    call and ``end``/``cpu_end`` at the end-of-run checkpoint (which is then not written), and the
    final model is not saved (neither is timed)."""
    import alignforge.trainers.common as common

    real_run_training = common.run_training

    def timed_run_training(task, cfg, accelerator=None, **kw):
        real_loss = task.loss

        def loss(module, batch, norm):
            if "start" not in marks:
                marks["start"], marks["cpu_start"] = time.perf_counter(), cpu_s()
            return real_loss(module, batch, norm)

        task.loss = loss
        task.save_model = lambda unwrapped, out_dir: Path(out_dir).mkdir(parents=True)
        return real_run_training(task, cfg, accelerator, **kw)

    def no_checkpoint(accelerator, output_dir, step, state, keep_last):
        marks["end"], marks["cpu_end"] = time.perf_counter(), cpu_s()  # once, after the last step (save_every=0)
        return Path(output_dir) / f"step-{step}"

    common.run_training = timed_run_training
    common.save_checkpoint = no_checkpoint


def trl_timer(marks: dict[str, float]):
    """A ``TrainerCallback`` that fills ``marks`` like :func:`time_our_loop` does for ours."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if "start" not in marks:
                marks["start"], marks["cpu_start"] = time.perf_counter(), cpu_s()

        def on_step_end(self, a, state, control, **kw):
            marks["end"], marks["cpu_end"] = time.perf_counter(), cpu_s()

    return Timer()


def run_json_script(cmd: list[str], label: str, env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """Run ``cmd`` (a benchmark script) in a fresh interpreter; ``(its other stdout lines, its last line as
    JSON)``. A failure prints the tails of its output and exits naming ``label``."""
    full_env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{label} failed (rc {proc.returncode})")
    lines = proc.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def run_child(script: str, side: str, child_args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script --child SIDE …`` in a fresh interpreter; its last stdout line is its JSON result."""
    t = time.perf_counter()
    _, res = run_json_script([sys.executable, script, "--child", side, *child_args], f"{side} child", env)
    res["child_wall_s"] = round(time.perf_counter() - t, 1)
    res["loadavg_after"] = os.getloadavg()
    print(json.dumps(res), flush=True)
    return res


def machine_line(prepared: dict) -> None:
    import torch

    print(
        json.dumps(
            {
                "prepared": prepared,
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
            }
        ),
        flush=True,
    )


def common_parser(doc: str, lr: float) -> argparse.ArgumentParser:
    """The options both benchmarks take (each adds its own)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=16 (a few minutes on 2 CPU cores)")
    ap.add_argument("--n", type=int, default=None, help="number of pairs (default 64; 16 with --quick)")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="both sides (bf16: autocast; the loss/log-prob agreement checks are meant for fp32)",
    )
    ap.add_argument("--trl-input", choices=["tokens", "conversational"], default="tokens")
    ap.add_argument("--repeats", type=int, default=1, help="alternate ours/TRL this many times; report the best")
    ap.add_argument("--workdir", default=None)
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    args = ap.parse_args()
    if args.n is None:
        args.n = 16 if args.quick else 64
    return args


def experiment_parser(doc: str, n_train: int, out: str) -> argparse.ArgumentParser:
    """The options of the real-result scripts (``rm_hh_result.py``, ``dpo_ulma_hh_result.py``): the
    shared held-out protocol (``data.split.experiment_split``) and the LoRA training settings."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=n_train, help="training pairs sampled from the pool (0 = all)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default=out)
    return ap


def lora_base(args, train_file, output_dir, lr: float) -> list[str]:
    """The data file, LoRA (r, alpha = 2r, no dropout), lr, seed, output dir; no progress bar or TensorBoard."""
    return [
        f"data.train_files=[{train_file}]",
        f"data.max_length={args.max_length}",
        "lora.enabled=true",
        f"lora.r={args.lora_r}",
        f"lora.alpha={2 * args.lora_r}",
        "lora.dropout=0.0",
        f"train.lr={lr}",
        f"train.seed={args.seed}",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.output_dir={output_dir}",
    ]


def lora_overrides(args, train_file, output_dir, epochs: int | None = None) -> list[str]:
    """The ``key=value`` overrides the real-result scripts share: :func:`lora_base` with ``args.lr``, plus
    batch, epochs and 5% warmup."""
    return lora_base(args, train_file, output_dir, args.lr) + [
        f"train.per_device_batch_size={args.batch}",
        f"train.epochs={args.epochs if epochs is None else epochs}",
        "train.warmup_ratio=0.05",
    ]


def first_turn_rows(path, n: int, id_prefix: str | None = None) -> list[dict]:
    """The first user turn of the first ``n`` distinct prompts of a preference file, as prompt rows
    (with ids ``{id_prefix}1``, ``{id_prefix}2``, ... when ``id_prefix`` is given)."""
    from alignforge.data.readers import read_prompts

    seen, rows = set(), []
    for rec in read_prompts(path, on_error="skip").records:
        first = next((m for m in rec.prompt if m["role"] == "user"), None)
        if first is None or first["content"] in seen:
            continue
        seen.add(first["content"])
        row = {"prompt": [{"role": "user", "content": first["content"]}]}
        rows.append(row if id_prefix is None else {"id": f"{id_prefix}{len(rows) + 1}", **row})
        if len(rows) == n:
            break
    return rows


# --------------------------------------------------------------------------- RL benchmarks (ppo_profile, grpo_vs_trl)


def first_turn_prompts(data: str, n: int, work: Path, max_prompt_tokens: int = 256) -> Path:
    """The first ``n`` distinct first user turns of ``data`` (HH harmless-base) whose rendered prompt fits in
    ``max_prompt_tokens``, written to ``work/prompts.jsonl`` as ``{"prompt": [{"role": "user", ...}]}`` rows."""
    from alignforge.data.readers import read_preference
    from alignforge.data.tokenize import tokenize_prompt
    from alignforge.models.loading import ensure_embedded, load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(ensure_embedded())
    seen, rows = set(), []
    for rec in read_preference(data, on_error="skip").records:
        text = rec.prompt[0]["content"]
        msgs = [{"role": "user", "content": text}]
        if text in seen or len(tokenize_prompt(msgs, tok, rec.source)) > max_prompt_tokens:
            continue
        seen.add(text)
        rows.append({"prompt": msgs})
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} first-turn prompts in {data}")
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def untrained_reward_model(work: Path, seed: int = 0) -> Path:
    """An alignforge reward model with an *untrained* (seeded random) head on the embedded backbone, saved once
    under ``work/rm-untrained-SEED`` (a speed benchmark needs the RM's cost, not its quality)."""
    import torch

    from alignforge.models.loading import ensure_embedded, load_tokenizer
    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    out = work / f"rm-untrained-{seed}"
    if (out / "reward_stats.json").is_file():
        return out
    torch.manual_seed(seed)
    rm = RewardModel(load_reward_backbone("embedded"))
    save_reward_model(rm, load_tokenizer(ensure_embedded()), out, {"mean": 0.0, "std": 1.0})
    return out


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This CPU's fp32 throughput: the best of ``repeats`` ``(n, n) @ (n, n)`` matmuls, in GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9
