"""`alignforge sft` end to end on a tiny model, in real subprocesses.

The resume tests kill a real training process (SIGKILL, via the loop's fault hook) mid-epoch and
right at an epoch boundary, resume it, and require the *same weights* as an uninterrupted run.
They fail if any part of the state (weights, optimizer moments, scheduler, data position, RNG)
were not restored: each of those changes the final weights.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

N_EXAMPLES = 20  # batch 2 x accum 2 -> 5 steps per epoch; 2 epochs -> 10 steps


def _write_data(path: Path) -> Path:
    rows = []
    for i in range(N_EXAMPLES):
        msgs = [
            {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
            {"role": "assistant", "content": f"The answer is {2 * i}. Numbers are fun {i}."},
        ]
        if i % 3 == 0:  # some multi-turn
            msgs += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
        rows.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(tmp_path: Path, model_dir: Path, out: str, extra: str = "") -> Path:
    data = _write_data(tmp_path / "sft.jsonl")
    cfg = tmp_path / f"{out}.yaml"
    cfg.write_text(f"""
model: {{name_or_path: {model_dir}}}
data: {{train_files: [{data}], max_length: 256}}
train:
  output_dir: {tmp_path / out}
  epochs: 2
  per_device_batch_size: 2
  grad_accum: 2
  lr: 0.01
  warmup_steps: 2
  seed: 11
  progress: false
{extra}
""")
    return cfg


def _run(args, env_extra=None, check=True):
    env = {**os.environ, "ALIGNFORGE_FAULT_AFTER_STEP": "", **(env_extra or {})}
    p = subprocess.run(
        [sys.executable, "-m", "alignforge.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check and p.returncode != 0:
        raise AssertionError(f"rc={p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, f"weights differ after resume: {diffs}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _config(tmp, tiny_model_dir, "ref", "  save_every: 3")
    p = _run(["sft", str(cfg)])
    assert "done: 10 steps" in p.stdout
    return tmp / "ref"


def test_sft_outputs(reference_run):
    hist = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 10 and hist[-1]["loss"] < hist[0]["loss"]
    assert (reference_run / "final" / "tokenizer_config.json").is_file()
    assert (reference_run / "config.yaml").is_file() and (reference_run / "loss.png").is_file()
    assert "20 examples from 20 records" in (reference_run / "data_report.txt").read_text()


@pytest.mark.parametrize(
    "kill_after,save_every",
    [
        (4, 3),  # mid-epoch: last checkpoint at step 3, step 4 is lost and redone
        (5, 5),  # right at the epoch boundary, checkpoint there
        (6, 5),  # just past the boundary: resume re-enters epoch 2 from its checkpoint at step 5
    ],
)
def test_sigkill_then_resume_gives_identical_weights(tmp_path, tiny_model_dir, reference_run, kill_after, save_every):
    cfg = _config(tmp_path, tiny_model_dir, "run", f"  save_every: {save_every}")
    killed = _run(["sft", str(cfg)], {"ALIGNFORGE_FAULT_AFTER_STEP": f"{kill_after}:KILL"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "run"
    assert not (run / "final").exists()
    ck = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ck[-1] == f"step-{(kill_after // save_every) * save_every:08d}"
    resumed = _run(["sft", str(cfg), "--resume"])
    assert "resumed from" in resumed.stdout
    _assert_same(_weights(reference_run), _weights(run))
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(1, 11))


def test_sigint_saves_checkpoint_and_resumes(tmp_path, tiny_model_dir, reference_run):
    cfg = _config(tmp_path, tiny_model_dir, "run", "  save_every: 0")
    p = _run(["sft", str(cfg)], {"ALIGNFORGE_FAULT_AFTER_STEP": "7:INT"}, check=False)
    assert p.returncode == 130, p.stderr
    assert "interrupted: checkpoint saved" in p.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-00000007").is_dir()
    _run(["sft", str(cfg), "train.resume=true"])
    _assert_same(_weights(reference_run), _weights(tmp_path / "run"))


def test_resume_with_lora(tmp_path, tiny_model_dir):
    extra = "  save_every: 3\nlora: {enabled: true, r: 4, alpha: 8, dropout: 0.0}"
    ref_cfg = _config(tmp_path, tiny_model_dir, "ref", extra)
    _run(["sft", str(ref_cfg)])
    cfg = _config(tmp_path, tiny_model_dir, "run", extra)
    _run(["sft", str(cfg)], {"ALIGNFORGE_FAULT_AFTER_STEP": "4:KILL"}, check=False)
    _run(["sft", str(cfg), "--resume"])
    a = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    _assert_same(a, b)
    # the LoRA adapter really trained (B matrices start at zero)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_bad_data_file_gives_file_line_error(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "bad")
    data = tmp_path / "sft.jsonl"
    lines = data.read_text().splitlines()
    lines[3] = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}'
    data.write_text("\n".join(lines) + "\n")
    p = _run(["sft", str(cfg)], check=False)
    assert p.returncode == 2
    assert f"{data}:4:" in p.stderr and "empty" in p.stderr.lower()
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "bad" / "final").exists()


def test_unknown_config_key_is_an_error(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "x")
    p = _run(["sft", str(cfg), "train.learning_rate=1"], check=False)
    assert p.returncode == 2 and "unknown config key 'train.learning_rate'" in p.stderr and "train.lr" in p.stderr
