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

import pytest
from safetensors.torch import load_file

from .test_sft import _config, _run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``alignforge ARGS`` under ``accelerate launch`` with 2 CPU processes (gloo); must succeed."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", ALIGNFORGE_FAULT_AFTER_STEP="", **(env_extra or {}))
    p = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "alignforge.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_two_process_ddp_matches_single_process(tmp_path, tiny_model_dir):
    single = _config(tmp_path, tiny_model_dir, "single")
    _run(["sft", str(single), "train.grad_accum=2", "train.epochs=1"])

    ddp = _config(tmp_path, tiny_model_dir, "ddp")
    p = _launch_two(["sft", str(ddp), "train.grad_accum=1", "train.epochs=1"])
    assert "done: 5 steps" in p.stdout
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |single - ddp| = {worst:.3g}")
    assert worst < 1e-5, f"max |single - ddp| = {worst}"
    # and training moved the weights well beyond that tolerance
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a if k in init) > 1e-3


@pytest.mark.parametrize("loss", ["ulma", "kto"])
def test_ulma_two_processes_match_grad_accum_two(tmp_path, tiny_model_dir, monkeypatch, loss):
    """ULMA's per-subset normalisers (and KTO's all-reduced z0) come from the global batch, so one process
    with grad_accum=2 and two gloo processes with grad_accum=1 train to the same weights."""
    from .test_dpo import preference_config, write_pairs

    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "pairs.jsonl", 8)  # 16 points: 4 global batches of 4
    section = f"ulma: {{loss: {loss}, beta: 0.5}}"
    single = preference_config(tmp_path, tiny_model_dir, data, "single", section)
    _run(["ulma", str(single), "train.grad_accum=2", "train.epochs=1"])
    ddp = preference_config(tmp_path, tiny_model_dir, data, "ddp", section)
    p = _launch_two(["ulma", str(ddp), "train.grad_accum=1", "train.epochs=1"])
    assert "done: 4 steps" in p.stdout
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |single - ddp| = {worst:.3g}")
    assert worst < 1e-5, f"max |single - ddp| = {worst}"
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a if k in init) > 1e-3
