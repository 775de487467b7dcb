"""Two processes under `accelerate launch` (gloo on CPU) train to the same weights as one process.

One process with grad_accum=2 and two processes with grad_accum=1 see the same global batches
(the batch plan is a function of the step) and normalise the loss by the same global token
count, so the results must agree up to float summation order.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from .test_sft import _config, _run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path, tiny_model_dir):
    single = _config(tmp_path, tiny_model_dir, "single")
    _run(["sft", str(single), "train.grad_accum=2", "train.epochs=1"])

    ddp = _config(tmp_path, tiny_model_dir, "ddp")
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", ALIGNFORGE_FAULT_AFTER_STEP="")
    p = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "alignforge.cli", "sft", str(ddp), "train.grad_accum=1", "train.epochs=1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "done: 5 steps" in p.stdout
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |single - ddp| = {worst:.3g}")
    assert worst < 1e-5, f"max |single - ddp| = {worst}"
    # and training moved the weights well beyond that tolerance
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a if k in init) > 1e-3
