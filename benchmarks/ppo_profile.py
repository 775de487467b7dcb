"""Benchmark: where the time of one PPO iteration goes (issue 10, item 9 "Speed").

``--warmup`` + 1 iterations of ``train_ppo`` on the embedded SmolLM2-135M-Instruct, **full fine-tuning** (no LoRA),
fp32, in the paper's setting: ``ppo.advantage=gae`` with a critic (initialised from the reward
model), KL in the reward, reference reward on. 8 prompts (the first distinct first user turns of HH
harmless-base), one sample each, in one generation block of 8, 64 new tokens with EOS ignored (so
every run does the same work), ``ppo_epochs=1``, ``minibatches=1``, ``forward_batch_size=8``: one
update over the whole rollout. The first ``--warmup`` iterations (default 2) are a warm-up: the first
update allocates the optimiser state and the gradients, first-touching ~3 GB, and until the second
update the process's heap is still growing to its working size (``train.keep_freed_memory``, on by
default, keeps it from then on: no page faults in later updates, where the default glibc ``malloc``
page-faults ~0.6–1.5 M pages in again each update); everything below is of the iteration after them.
``--quick``: 4 prompts, 16 tokens. ``--keep-freed-memory false`` turns ``train.keep_freed_memory`` off
(a process-wide setting, so the two are compared in two runs, one after the other).

The reward model is an **untrained** head on the embedded backbone (seeded, saved once under the
work dir): the benchmark measures speed, not quality, and an untrained head costs the same.

Measured, all in one process, one after another:

* ``gen_tok_per_s``: new tokens / the trainer's ``gen_s`` (its rollout generation, ``HFBackend``);
  ``backend_tok_per_s``: the best of ``--repeats`` calls of ``HFBackend.generate_from_ids`` on the
  same rows with the trainer's generation config, after the run (warm);
* ``hf_generate_tok_per_s``: the best of ``--repeats`` plain ``model.generate`` calls on the same
  rows, left-padded, KV cache on, the same sampling (do_sample, T=1, top_p=1, top_k=0) and
  ``min_new_tokens = max_new_tokens`` (EOS cannot end a row), on the same model object;
* ``train_s``: the trainer's update phase (``train_s`` of its metrics: the minibatch forward and
  backward passes with the PPO losses, gradient clipping and the optimiser step);
* ``fwd_bwd_floor_s``: the best of ``--repeats`` bare forward+backward passes of the policy (its
  decoder, the LM head at the response positions, log-probs via ``target_logprobs``) and of the
  critic over the same rollout rows in the same micro-batches, with the sum of the outputs as the
  loss (no PPO bookkeeping, no optimiser step), times the number of updates (``ppo_epochs``; the
  minibatches partition the rows);
* ``update_minor_faults`` / ``update_sys_s``: the minor page faults and the system CPU seconds of the
  process during the measured update (``getrusage``);
* ``update_best_s``: the trainer's update run again on the same rollout, best of ``--repeats`` (timed as
  the floor is: the measured iteration's ``train_s`` is one measurement), ``update_best_over_floor``, and
  ``update_step_s`` / ``update_step_share``: the time in the guarded step (gradient clipping, the fused
  AdamW step over every trained parameter, zero_grad), which the floor leaves out;
* ``train_over_floor = train_s / fwd_bwd_floor_s`` (goal ≤ 1.3), and the fraction of this CPU's
  fp32 matmul throughput (a 2048³ matmul, measured here, side by side) that the floor reaches:
  FLOPs ≈ 6 × parameters × tokens for training, with the decoder's non-embedding parameters over
  all real tokens plus the LM head over the response tokens (the policy) and the decoder over all
  real tokens (the critic; its head is negligible); ``crude_flops`` is the brief's 6 × all
  parameters × tokens, policy and critic.

Usage::

    .venv/bin/python benchmarks/ppo_profile.py --quick
    .venv/bin/python benchmarks/ppo_profile.py

The last line of stdout is one JSON object (``bench``, ``gen_tok_per_s``, ``hf_generate_tok_per_s``,
``train_s``, ``fwd_bwd_floor_s``, ``train_over_floor``, then extra keys).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    DEFAULT_DATA,
    cpu_s,
    first_turn_prompts,
    machine_line,
    matmul_gflops,
    peak_rss_mb,
    run_json_script,
    untrained_reward_model,
)


def run_iteration(args, prompts: Path, rm: Path, out: Path) -> tuple[dict, dict]:
    """``args.warmup`` + 1 PPO iterations; returns ``(metrics row, captured)`` of the last: the trainer,
    its rollout and module, and the update's wall and CPU seconds."""
    import alignforge.trainers.common as common
    import alignforge.trainers.ppo as ppo
    from alignforge.config import load_config

    captured: dict = {}
    real_update = ppo._Trainer.update

    def update(self, it, ro, module, optimizer, scheduler, guard):
        captured.update(trainer=self, ro=ro, module=module, it=it, step_parts=(optimizer, scheduler, guard))
        r0, t, c = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), cpu_s()
        res = real_update(self, it, ro, module, optimizer, scheduler, guard)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        captured["update_cpu_s"] = cpu_s() - c
        captured["update_wall_s"] = time.perf_counter() - t
        captured["update_minor_faults"] = r1.ru_minflt - r0.ru_minflt
        captured["update_sys_s"] = r1.ru_stime - r0.ru_stime
        return res

    ppo._Trainer.update = update
    captured["real_update"] = real_update
    ppo._Trainer._save_policy = lambda self, unwrapped, tmp: Path(tmp).mkdir(parents=True)  # not timed, not needed
    common.save_checkpoint = lambda acc, output_dir, step, state, keep_last: Path(output_dir) / f"step-{step}"
    cfg = load_config(
        ppo.PPOConfig,
        None,
        [
            "model.name_or_path=embedded",
            f"ppo.reward_model={rm}",
            f"data.train_files=[{prompts}]",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.save_every=0",
            f"train.seed={args.seed}",
            "train.precision=fp32",
            "lora.enabled=false",
            "model.gradient_checkpointing=false",
            "ppo.advantage=gae",
            f"ppo.iterations={args.warmup + 1}",
            f"ppo.prompts_per_iteration={args.prompts}",
            f"ppo.gen_batch_prompts={args.prompts}",
            "ppo.samples_per_prompt=1",
            f"ppo.max_new_tokens={args.tokens}",
            "ppo.ignore_eos=true",
            "ppo.ppo_epochs=1",
            "ppo.minibatches=1",
            f"ppo.forward_batch_size={args.prompts}",
            f"ppo.score_batch_size={args.prompts}",
            "ppo.sample_every=0",
            f"train.keep_freed_memory={args.keep_freed_memory}",
        ],
    )
    summary = ppo.train_ppo(cfg)
    return summary["history"][-1], captured


def time_generation(captured: dict, args) -> dict:
    """Ours (``HFBackend`` as the trainer calls it) and plain ``model.generate``, alternating, best of N."""
    import torch

    from alignforge.data.collate import pad_batch
    from alignforge.inference.generate import HFBackend
    from alignforge.trainers.ppo import _gen_cfg

    tr, ro = captured["trainer"], captured["ro"]
    policy = captured["module"].policy
    rows = [list(p) for p in ro["prompt_ids"]]
    backend = HFBackend(policy, tr.tok)
    gcfg = _gen_cfg(tr.p, 1234, len(rows))
    b = pad_batch(rows, backend.pad_id, side="left")
    n_new = len(rows) * args.tokens
    ours, plain = [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        gens = backend.generate_from_ids(rows, gcfg)
        ours.append(time.perf_counter() - t)
        assert all(len(g.response_ids) == args.tokens for g in gens)
        policy.eval()
        torch.manual_seed(1234 + r)
        t = time.perf_counter()
        with torch.no_grad():
            out = policy.generate(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                pad_token_id=backend.pad_id,
                use_cache=True,
            )
        plain.append(time.perf_counter() - t)
        policy.train()
        assert out.shape[1] - b["input_ids"].shape[1] == args.tokens
    return {
        "backend_tok_per_s": n_new / min(ours),
        "hf_generate_tok_per_s": n_new / min(plain),
        "backend_gen_s": ours,
        "hf_generate_s": plain,
    }


def time_update(captured: dict, args) -> dict:
    """The trainer's update on the same rollout again, best of ``--repeats`` (as the floor is timed), and
    the share of it spent in the guarded step (gradient clipping, the fused AdamW step, zero_grad).

    Each repeat takes a real optimiser step, so the weights move; the work per repeat is the same."""
    real_update = captured["real_update"]
    it, ro, module, tr = captured["it"], captured["ro"], captured["module"], captured["trainer"]
    optimizer, scheduler, guard = captured["step_parts"]
    step_s: list[float] = []
    real_call = type(guard).__call__

    def timed(self, loss, where):
        t = time.perf_counter()
        out = real_call(self, loss, where)
        step_s.append(time.perf_counter() - t)
        return out

    runs = []
    type(guard).__call__ = timed
    try:
        for _ in range(args.repeats):
            del step_s[:]
            t, c = time.perf_counter(), cpu_s()
            real_update(tr, it, ro, module, optimizer, scheduler, guard)
            runs.append((time.perf_counter() - t, cpu_s() - c, sum(step_s)))
    finally:
        type(guard).__call__ = real_call
    best = min(runs)
    return {"update_best_s": best[0], "update_best_cpu_s": best[1], "step_s": best[2], "update_runs": runs}


def time_floor(captured: dict, args) -> dict:
    """Bare forward+backward of policy and critic over the rollout rows, in the trainer's micro-batches."""
    import torch

    from alignforge.models.logprobs import target_logprobs
    from alignforge.trainers.ppo import right_pad

    tr, ro, module = captured["trainer"], captured["ro"], captured["module"]
    p = tr.p
    policy, critic = module.policy, module.critic
    n = len(ro["responses"])
    chunks = [list(range(s, min(n, s + p.forward_batch_size))) for s in range(0, n, p.forward_batch_size)]
    batches = []
    for ch in chunks:
        b = right_pad([ro["prompt_ids"][r] for r in ch], [ro["responses"][r] for r in ch], tr.pad_id)
        target = torch.zeros_like(b["attention_mask"], dtype=torch.bool)
        rows = torch.arange(len(ch))[:, None].expand_as(b["resp_pos"])
        valid = b["resp_mask"].bool()
        target[rows[valid], b["resp_pos"][valid]] = True
        batches.append((b, target))

    def once() -> tuple[float, float]:
        module.zero_grad(set_to_none=True)
        t, c = time.perf_counter(), cpu_s()
        for b, target in batches:
            loss = target_logprobs(policy, b["input_ids"], b["attention_mask"], target).sum()
            if critic is not None:
                loss = loss + critic(b["input_ids"], b["attention_mask"]).sum()
            loss.backward()
        return time.perf_counter() - t, cpu_s() - c

    runs = [once() for _ in range(args.repeats)]
    module.zero_grad(set_to_none=True)
    wall = min(r[0] for r in runs)
    real = sum(int(b["attention_mask"].sum()) for b, _ in batches)
    resp = sum(int(b["resp_mask"].sum()) for b, _ in batches)
    padded = sum(b["input_ids"].numel() for b, _ in batches)

    def n_params(m, skip_embeddings: bool) -> int:
        emb = m.get_input_embeddings().weight if skip_embeddings else None
        return sum(q.numel() for q in m.parameters() if q is not emb)

    from alignforge.models.lora import unwrap_base

    base = unwrap_base(policy)
    head = base.get_output_embeddings().weight.numel()
    dec_p = n_params(base, True) - (0 if base.config.tie_word_embeddings else head)
    flops = 6 * (dec_p * real + head * resp)
    crude = 6 * n_params(base, False) * real
    if critic is not None:
        cbase = unwrap_base(critic.model)
        flops += 6 * n_params(cbase, True) * real
        crude += 6 * n_params(cbase, False) * real
    return {
        "floor_one_pass_s": wall,
        "floor_runs_wall_cpu_s": runs,
        "fwd_bwd_floor_s": wall * p.ppo_epochs,
        "real_tokens": real,
        "response_tokens": resp,
        "padded_tokens": padded,
        "policy_decoder_params": dec_p,
        "head_params": head,
        "floor_flops": flops * p.ppo_epochs,
        "crude_flops": crude * p.ppo_epochs,
    }


def compare_keep() -> None:
    """``--compare-keep``: this script without, then with ``train.keep_freed_memory``, each in its own process."""
    argv = [a for a in sys.argv[1:] if a != "--compare-keep"]
    runs = {}
    for keep in ("false", "true"):
        cmd = [sys.executable, __file__, *argv, "--keep-freed-memory", keep]
        lines, runs[keep] = run_json_script(cmd, f"the keep_freed_memory={keep} run")
        print("\n".join(lines), flush=True)
    off, on = runs["false"], runs["true"]
    keys = (
        "train_s",
        "update_best_s",
        "fwd_bwd_floor_s",
        "train_over_floor",
        "update_best_over_floor",
        "update_minor_faults",
        "update_sys_s",
        "peak_rss_mb",
    )
    on["without_keep"] = {k: off[k] for k in keys}
    on["train_s_without_over_with_keep"] = round(off["train_s"] / on["train_s"], 3)
    on["floor_without_over_with_keep"] = round(off["fwd_bwd_floor_s"] / on["fwd_bwd_floor_s"], 3)
    print(json.dumps(on), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 prompts, 16 new tokens")
    ap.add_argument("--prompts", type=int, default=None, help="default 8 (4 with --quick)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per answer; default 64 (16 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="PPO iterations before the measured one")
    ap.add_argument(
        "--keep-freed-memory",
        choices=["true", "false"],
        default="true",
        help="train.keep_freed_memory (process-wide: compare the two in separate runs)",
    )
    ap.add_argument(
        "--compare-keep",
        action="store_true",
        help="run this benchmark twice, in two fresh processes one after the other (keep_freed_memory false, then "
        "true), and print the second's JSON with the first's times and the ratios added",
    )
    ap.add_argument("--repeats", type=int, default=2, help="generation and floor timings: best of this many")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default=None, help="default: $ALIGNFORGE_CACHE/bench (the RM is kept there)")
    args = ap.parse_args()
    if args.compare_keep:
        return compare_keep()
    args.prompts = args.prompts or (4 if args.quick else 8)
    args.tokens = args.tokens or (16 if args.quick else 64)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from alignforge.models.loading import cache_dir

    work = Path(args.workdir) if args.workdir else cache_dir() / "bench"
    t0 = time.perf_counter()
    prompts = first_turn_prompts(args.data, args.prompts, work / f"ppo_profile-{args.prompts}")
    rm = untrained_reward_model(work)
    machine_line({"prompts": args.prompts, "tokens": args.tokens, "rm": str(rm)})
    with tempfile.TemporaryDirectory(prefix="ppo_profile-", dir=work) as out:
        row, cap = run_iteration(args, prompts, rm, Path(out) / "run")
    n_new = args.prompts * args.tokens
    assert int(cap["ro"]["lens"].sum()) == n_new, "EOS was not ignored"
    gen = time_generation(cap, args)
    upd = time_update(cap, args)
    floor = time_floor(cap, args)
    gflops = matmul_gflops()
    train_s = row["train_s"]
    res = {
        "bench": "ppo_profile",
        "gen_tok_per_s": round(n_new / row["gen_s"], 2),
        "hf_generate_tok_per_s": round(gen["hf_generate_tok_per_s"], 2),
        "train_s": round(train_s, 3),
        "fwd_bwd_floor_s": round(floor["fwd_bwd_floor_s"], 3),
        "train_over_floor": round(train_s / floor["fwd_bwd_floor_s"], 3),
        "update_minor_faults": cap["update_minor_faults"],
        "update_sys_s": round(cap["update_sys_s"], 3),
        "update_best_s": round(upd["update_best_s"], 3),
        "update_best_over_floor": round(upd["update_best_s"] / floor["fwd_bwd_floor_s"], 3),
        "update_step_s": round(upd["step_s"], 3),
        "update_step_share": round(upd["step_s"] / upd["update_best_s"], 3),
        "gen_over_hf": round(n_new / row["gen_s"] / gen["hf_generate_tok_per_s"], 3),
        "backend_tok_per_s": round(gen["backend_tok_per_s"], 2),
        "backend_over_hf": round(gen["backend_tok_per_s"] / gen["hf_generate_tok_per_s"], 3),
        "gen_s": round(row["gen_s"], 3),
        "score_s": round(row["score_s"], 3),
        "update_cpu_s": round(cap["update_cpu_s"], 3),
        "floor_cpu_s": round(min(r[1] for r in floor["floor_runs_wall_cpu_s"]) * cap["trainer"].p.ppo_epochs, 3),
        "train_over_floor_cpu": round(
            cap["update_cpu_s"] / (min(r[1] for r in floor["floor_runs_wall_cpu_s"]) * cap["trainer"].p.ppo_epochs), 3
        ),
        "floor_gflop_per_s": round(floor["floor_flops"] / floor["fwd_bwd_floor_s"] / 1e9, 1),
        "train_gflop_per_s": round(floor["floor_flops"] / train_s / 1e9, 1),
        "matmul_gflop_per_s": round(gflops, 1),
        "floor_share_of_matmul": round(floor["floor_flops"] / floor["fwd_bwd_floor_s"] / 1e9 / gflops, 3),
        "train_share_of_matmul": round(floor["floor_flops"] / train_s / 1e9 / gflops, 3),
        "crude_flops": floor["crude_flops"],
        "floor_flops": floor["floor_flops"],
        **{k: floor[k] for k in ("real_tokens", "response_tokens", "padded_tokens")},
        "prompts": args.prompts,
        "new_tokens": args.tokens,
        "setting": "gae+critic(rm), full fine-tuning, fp32, 1 epoch x 1 minibatch",
        "keep_freed_memory": args.keep_freed_memory,
        "warmup_iterations": args.warmup,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({"detail": {**gen, **upd, **floor}}), flush=True)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
