"""Scale-out on CPU: two gloo processes under ``accelerate launch`` train RM and DPO to the weights of one
process, and a checkpoint written by two processes (killed mid-run) resumes to them; FSDP and DeepSpeed
are refused at setup with a message that says why.

SFT, ULMA/KTO (``test_distributed.py``) and PPO (``test_ppo.py::test_two_processes_match_one``) have their
own two-process tests. One process with grad_accum=2 and two with grad_accum=1 see the same global batches
and normalise by the same global counts, so the weights agree up to float summation order (< 1e-5).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignforge.config import load_config
from alignforge.errors import ConfigError

from .test_distributed import _free_port
from .test_dpo import preference_config, write_pairs
from .test_sft import _run

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def _launch(args: list[str], *, config_file: Path | None = None, env_extra: dict | None = None):
    """``alignforge ARGS`` under ``accelerate launch`` with 2 CPU processes (gloo); returns the process."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNFORGE_FAULT_AFTER_STEP": "", **(env_extra or {})}
    how = ["--config_file", str(config_file)] if config_file else ["--multi_gpu", "--num_machines", "1"]
    cmd = [str(accelerate), "launch", *how, "--num_processes", "2", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "alignforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _final(run_dir: Path, name: str) -> dict:
    return load_file(str(run_dir / "final" / name))


def _two_processes_killed_then_resumed(tmp_path, command: list[str], cfg: Path, kill_after: int, steps: int):
    """Two processes, SIGKILLed right after step ``kill_after``; then resumed under two processes."""
    killed = _launch([*command, str(cfg)], env_extra={"ALIGNFORGE_FAULT_AFTER_STEP": f"{kill_after}:KILL"})
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert not (tmp_path / "two" / "final").exists()
    resumed = _launch([*command, str(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and f"done: {steps} steps" in resumed.stdout, resumed.stdout


def _assert_close_and_moved(a: dict, b: dict, init: dict, moved: float = 1e-3):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |one process - two processes| = {worst:.3g}")
    assert worst < 1e-5, f"max |one process - two processes| = {worst}"
    shared = [k for k in a if k in init]
    assert shared and max((a[k] - init[k]).abs().max().item() for k in shared) > moved  # training moved them


@pytest.mark.slow
def test_dpo_two_processes_match_one_and_resume_a_two_process_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "pairs.jsonl", 8)  # global batch 4: 2 steps per epoch, 4 in all
    section = "dpo: {beta: 0.5}"
    one = preference_config(tmp_path, tiny_model_dir, data, "one", section)
    two = preference_config(tmp_path, tiny_model_dir, data, "two", section)
    two.write_text(two.read_text().replace("grad_accum: 2", "grad_accum: 1"))
    assert "done: 4 steps" in _run(["dpo", str(one)]).stdout
    _two_processes_killed_then_resumed(tmp_path, ["dpo"], two, kill_after=3, steps=4)  # checkpoint at 2
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    a, b = _final(tmp_path / "one", "model.safetensors"), _final(tmp_path / "two", "model.safetensors")
    _assert_close_and_moved(a, b, init)


def _rm_config(tmp_path: Path, model_dir: Path, out: str, grad_accum: int) -> Path:
    from .test_rm import _write_pairs

    data = _write_pairs(tmp_path / "rm_pairs.jsonl", n=8)
    cfg = tmp_path / f"{out}.yaml"
    cfg.write_text(f"""
model: {{name_or_path: {model_dir}}}
data: {{train_files: [{data}], max_length: 256}}
reward: {{length_balance: false}}
train:
  output_dir: {tmp_path / out}
  epochs: 2
  per_device_batch_size: 2
  grad_accum: {grad_accum}
  group_by_length: false
  lr: 0.01
  warmup_steps: 2
  seed: 7
  progress: false
  save_every: 2
""")
    return cfg


@pytest.mark.slow
def test_rm_two_processes_match_one_and_resume_a_two_process_checkpoint(tmp_path, tiny_model_dir):
    one = _rm_config(tmp_path, tiny_model_dir, "one", grad_accum=2)
    two = _rm_config(tmp_path, tiny_model_dir, "two", grad_accum=1)
    assert "done: 4 steps" in _run(["rm", "train", str(one)]).stdout
    _two_processes_killed_then_resumed(tmp_path, ["rm", "train"], two, kill_after=3, steps=4)
    a, b = _final(tmp_path / "one", "model.safetensors"), _final(tmp_path / "two", "model.safetensors")
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    init = {f"model.{k}" if f"model.{k}" in a else k: v for k, v in init.items()}
    _assert_close_and_moved(a, b, init)


# --------------------------------------------------------------------------- refused modes


TRAINERS = {  # command -> (module, config class, train function)
    "sft": ("alignforge.trainers.sft", "SFTConfig", "train_sft"),
    "rm": ("alignforge.trainers.rm", "RMConfig", "train_rm"),
    "dpo": ("alignforge.trainers.dpo", "DPOConfig", "train_dpo"),
    "ulma": ("alignforge.trainers.ulma", "ULMAConfig", "train_ulma"),
    "ppo": ("alignforge.trainers.ppo", "PPOConfig", "train_ppo"),
}


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_every_trainer_refuses_deepspeed_at_setup(tmp_path, monkeypatch, trainer):
    """``accelerate launch`` with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED=true in every process;
    each trainer stops before building the Accelerator (deepspeed is not even installed here)."""
    import importlib

    mod_name, cls_name, fn_name = TRAINERS[trainer]
    mod = importlib.import_module(mod_name)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = load_config(getattr(mod, cls_name), None, [f"data.train_files=[{tmp_path / 'x.jsonl'}]"])
    with pytest.raises(ConfigError, match="DeepSpeed is not supported") as err:
        getattr(mod, fn_name)(cfg)
    msg = str(err.value)
    assert "NaN/inf guard" in msg and "configs/accelerate/ddp.yaml" in msg and "ACCELERATE_USE_DEEPSPEED" in msg


@pytest.mark.parametrize("kind, message", [("DEEPSPEED", "DeepSpeed is not supported"), ("FSDP", "FSDP is not")])
def test_the_loop_refuses_a_deepspeed_or_fsdp_accelerator(tmp_path, tiny_model_dir, monkeypatch, kind, message):
    """An Accelerator that is in DeepSpeed (or FSDP) mode, however it got there, is refused by run_training
    before any step: the guard would not hold (DeepSpeed) or the final save would hang (FSDP)."""
    from accelerate.utils import DistributedType

    from alignforge.trainers.common import check_distributed, make_accelerator, run_training
    from alignforge.trainers.sft import SFTConfig, train_sft

    cfg = load_config(SFTConfig, None, [f"train.output_dir={tmp_path / 'out'}"])
    accelerator = make_accelerator(cfg.train)  # a plain one: accepted
    check_distributed(accelerator)
    monkeypatch.setattr(type(accelerator), "distributed_type", property(lambda self: DistributedType[kind]))
    with pytest.raises(ConfigError, match=message):
        run_training(None, cfg.train, accelerator)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    if kind == "FSDP":  # SFT, DPO and ULMA support FSDP (tests/trainers/test_fsdp.py)
        return
    # the trainers' own setup refuses it too (make_accelerator checks the accelerator it builds)
    from .test_sft import _config

    sft = load_config(SFTConfig, _config(tmp_path, tiny_model_dir, "sft"), [])
    with pytest.raises(ConfigError, match=message):
        train_sft(sft)


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_with_the_reason(tmp_path, tiny_model_dir):
    """accelerate 1.x turns FSDP on only on GPUs and other accelerators: on CPU it silently falls back to
    MULTI_CPU data parallel. Under configs/accelerate/fsdp.yaml the trainer says so and stops."""
    from .test_sft import _config

    cfg = _config(tmp_path, tiny_model_dir, "fsdp")
    p = _launch(["sft", str(cfg)], config_file=ACCELERATE_CONFIGS / "fsdp.yaml")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "FSDP was asked for (ACCELERATE_USE_FSDP=true" in out and "accelerate chose MULTI_CPU" in out, out
    assert "configs/accelerate/ddp.yaml" in out and not (tmp_path / "fsdp" / "checkpoints").exists()
