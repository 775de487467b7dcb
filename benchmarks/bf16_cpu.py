"""Benchmark: bf16 against fp32 on this CPU, side by side in one process (``train.precision``).

On an x86 CPU without AVX-512 or AMX (torch's CPU capability ``AVX2``), oneDNN refuses bf16 and
torch runs bf16 matmuls through its scalar reference GEMM, also inside the CPU flash-attention
kernel of ``scaled_dot_product_attention``; on CPUs with AVX-512/AMX bf16 is as fast or faster.
``make_accelerator`` warns when ``train.precision=bf16`` meets the first kind
(``trainers/common.cpu_has_native_bf16``). This measures, best of ``--repeats``, alternating the two:

* ``linear``: ``x @ W.T`` at the embedded model's MLP shape (``--tokens`` rows × 576 → 1536);
* ``attention``: SDPA forward + backward, causal, (batch 4, 9 heads, ``--seq`` 176, head dim 64);
* ``model``: forward + backward of the embedded SmolLM2-135M-Instruct on 4 × ``--seq`` tokens, fp32
  weights and bf16 autocast (as ``train.precision=bf16`` runs) against plain fp32 (``--no-model``
  skips it).

The last line is JSON: ``{"bench":"bf16_cpu","cpu_capability":…,"native_bf16":…,"linear_bf16_over_fp32":…,
"attention_bf16_over_fp32":…,"model_bf16_over_fp32":…}`` (time ratios: above 1 = bf16 is slower).
Run it alone on the machine::

    .venv/bin/python benchmarks/bf16_cpu.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=704, help="rows of the linear (batch × sequence)")
    ap.add_argument("--seq", type=int, default=176)
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    from alignforge.trainers.common import cpu_has_native_bf16

    torch.manual_seed(0)
    res: dict[str, dict[str, float]] = {}

    def linear(dtype):
        x, w = torch.randn(args.tokens, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        return lambda: [x @ w.T for _ in range(5)]

    def attention(dtype):
        q, k, v = (torch.randn(4, 9, args.seq, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    cases = {"linear": linear, "attention": attention}
    if not args.no_model:
        from alignforge.models.loading import load_model

        model = load_model("embedded")
        ids = torch.randint(0, 49152, (4, args.seq))

        def model_step(dtype):
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
                    model(input_ids=ids).logits.float().mean().backward()
                model.zero_grad(set_to_none=True)

            return run

        cases["model"] = model_step
    for name, make in cases.items():
        fns = {str(d).split(".")[-1]: make(d) for d in (torch.float32, torch.bfloat16)}
        times = {k: float("inf") for k in fns}
        for _ in range(args.repeats):  # alternate, so a slower minute of the machine hits both
            for k, fn in fns.items():
                times[k] = min(times[k], best(fn, 1))
        res[name] = times
        print(
            f"{name:10s} fp32 {times['float32'] * 1e3:9.1f} ms   bf16 {times['bfloat16'] * 1e3:9.1f} ms   "
            f"bf16/fp32 {times['bfloat16'] / times['float32']:.2f}x",
            flush=True,
        )
    out = {
        "bench": "bf16_cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
    }
    for name, t in res.items():
        out[f"{name}_bf16_over_fp32"] = round(t["bfloat16"] / t["float32"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
