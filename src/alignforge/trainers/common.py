"""The training loop that every trainer shares: batching, optimiser, checkpoints, logging.

The loop is built from public parts that every trainer stands on:

* :class:`Checkpointer` — atomic checkpoints, keep-last-K, resume that refuses a changed run, the
  final model;
* :class:`GuardedStep` — the NaN/inf guard, clipping and the optimiser/scheduler step;
* :class:`Logger` — progress bar and TensorBoard (with :func:`write_metrics` and :func:`plot_history`);
* :func:`sigint_flag` and :func:`fault_hook` — Ctrl-C at a step boundary, and the test hook below.
* :func:`check_distributed` — refuses DeepSpeed and FSDP (and FSDP asked for on CPU) with the reason.
* :func:`keep_freed_memory` — on CPU, keeps freed memory in the process (``train.keep_freed_memory``).

An offline method (SFT, RM, DPO, ULMA) describes itself as a :class:`Task` (examples, collate,
loss) and calls :func:`run_training`; PPO (``trainers/ppo.py``) drives the same parts from its own
iteration loop. :func:`run_training` is explicit and small:

* **Batching is a pure function of the step.** Epoch ``e`` shuffles the examples with seed
  ``seed + e``; global step ``s`` takes the next ``per_device_batch_size × grad_accum ×
  world_size`` indices of that permutation. So the data position is just the step number and
  a resumed run sees exactly the batches an uninterrupted run would.
* **Exact loss normalisation.** Each task's loss is a *sum* divided by the normaliser of the
  whole global batch (e.g. its number of target tokens), which every rank computes from the
  index plan without communication. One process with ``grad_accum=2`` and two processes with
  ``grad_accum=1`` therefore compute the same gradient.
* **Checkpoints** (``accelerator.save_state``: model, optimiser, scheduler, every rank's RNG,
  plus ``trainer_state.json`` with the step and the metric history) are written into a
  temporary directory and renamed into place; the last ``keep_last`` are kept. ``resume``
  continues from the newest one and ends with the same weights as an uninterrupted run.
* **Resume refuses a changed run.** ``trainer_state.json`` also records what fixes the data order
  (:func:`run_signature`: per-device batch, grad-accum, world size, seed, length grouping, total
  steps, number and digest of the examples); ``resume`` stops with a :class:`ConfigError` naming
  each difference (old → new) unless ``train.resume_force``. Checkpoints written before this check
  have no signature and resume unchecked, with a note.
* A NaN/inf loss or gradient norm stops the run *before* the optimiser step, so the last
  checkpoint stays the last good state. SIGINT finishes the current step, saves, and exits.
* Logging: a rich progress bar (loss, tokens/s, ETA), TensorBoard scalars, ``metrics.jsonl``
  and a PNG of the curves at the end. With ``log_every > 1`` a row holds averages over the steps
  since the previous row: ``loss`` and ``grad_norm`` are means of the per-step values, task metrics
  are the window's metric sums over its items (``lr`` is the last step's). With ``probe_every``
  the policy's own greedy answers to fixed prompts (length, share finished) are logged too
  (``inference/probe.py``).

Test hook: ``ALIGNFORGE_FAULT_AFTER_STEP="N:KILL"`` (or ``N:INT``) makes the process send
itself SIGKILL (SIGINT) right after step N, to test resume on a real killed process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from alignforge.config import TrainConfig, dump_config
from alignforge.errors import ConfigError, TrainingError, TrainingInterrupted

STATE_FILE = "trainer_state.json"


@dataclass
class Task:
    """What a method plugs into the loop.

    Attributes:
        module: the ``nn.Module`` to optimise (its ``forward`` is what ``loss`` calls).
        examples: the training examples (any objects).
        collate: examples -> batch (dict of CPU tensors).
        normalizer: examples -> the loss normaliser of the whole global batch (e.g. number of
            target tokens for SFT, number of pairs for DPO), or a dict of several (it must hold
            ``"items"``, which divides the logged metric sums), e.g. ULMA's positive and negative counts.
        loss: ``(module, batch, normalizer) -> (loss, metric_sums)``; loss must be a sum over
            the batch divided by ``normalizer``. ``metric_sums`` values are summed over micro
            batches and ranks, then divided by the global normaliser for logging.
        save_model: ``(unwrapped module, out_dir) -> None`` writes the final model; with ``fsdp`` it is called
            as ``save_model(unwrapped, out_dir, state_dict=...)`` with the full state dict of ``module``
            (gathered on every rank; plain CPU tensors), which it must save instead of the module's own
            sharded parameters.
        batch_tokens: batch -> number of tokens processed (for tokens/s).
        lengths: example lengths; with ``cfg.group_by_length`` batches hold similar lengths.
        summarize: ``(global metric sums, items) -> logged values``; default: each sum / items.
        probe: ``(unwrapped module, step) -> metrics``, called on the main process before the first
            step and every ``cfg.probe_every`` steps (``inference/probe.py``); ``None``: the method
            has no policy to sample from (a reward model).
        digest: examples -> a string that changes whenever the examples do, for the resume check;
            default :func:`examples_digest` (their token ids).
        fsdp: the method supports FSDP: its ``save_model`` takes ``state_dict`` and runs no collective.
    """

    module: nn.Module
    examples: Sequence[Any]
    collate: Callable[[list], dict]
    normalizer: Callable[[list], float | dict[str, float]]
    loss: Callable[[nn.Module, dict, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    save_model: Callable[[nn.Module, Path], None]
    batch_tokens: Callable[[dict], int] = lambda b: int(b["attention_mask"].sum())
    lengths: Sequence[int] | None = None  # per-example length, for train.group_by_length
    summarize: Callable[[dict[str, float], float], dict[str, float]] | None = None
    probe: Callable[[nn.Module, int], dict[str, float]] | None = None
    digest: Callable[[Sequence[Any]], str] | None = None
    fsdp: bool = False


# --------------------------------------------------------------------------- accelerator & plan


DEEPSPEED_REFUSED = (
    "DeepSpeed is not supported by the alignforge trainers: under DeepSpeed, accelerator.backward() runs the "
    "engine's own optimiser step, gradient clipping and gradient accumulation, so the loop's NaN/inf guard "
    "(which must stop the run before the update) and its global-batch loss normalisation would not hold. "
    "Launch with configs/accelerate/ddp.yaml (data parallel) instead"
)
FSDP_REFUSED = (
    "FSDP is not supported by this trainer yet: its final save (or a step that runs the model on the main process "
    "alone, e.g. the reward model's score statistics or PPO's generation) would need every rank to gather the "
    "sharded parameters, so the run would hang. Only SFT supports FSDP so far; launch this one with "
    "configs/accelerate/ddp.yaml (data parallel) instead"
)
FSDP_TEST_HOOK = "ALIGNFORGE_TEST_FSDP_ON_CPU"


def flag_from_env(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def check_distributed(accelerator, *, fsdp: bool = False) -> None:
    """Refuse the distributed modes the loop does not hold its promises under (a :class:`ConfigError`).

    * DeepSpeed (``distributed_type == DEEPSPEED``): see ``DEEPSPEED_REFUSED``.
    * FSDP (``distributed_type == FSDP``) unless ``fsdp`` (the trainer gathers its final model on every rank,
      see :func:`run_training`; SFT does): see ``FSDP_REFUSED``. FSDP with ``train.probe_every``
      is refused in :func:`run_training` (the probe generates on the main process alone).
    * FSDP asked for (``ACCELERATE_USE_FSDP``, set by ``accelerate launch`` with an FSDP config) but not
      given: accelerate 1.x enables FSDP only on accelerator devices, so on CPU it falls back to plain
      data parallel without a word; say so rather than train something other than what was asked.
      (The tests get a real FSDP2 run on CPU through the hook of :func:`make_accelerator`.)
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(DEEPSPEED_REFUSED)
    if kind == DistributedType.FSDP:
        if not fsdp:
            raise ConfigError(FSDP_REFUSED)
        return
    if flag_from_env("ACCELERATE_USE_FSDP"):
        raise ConfigError(
            f"FSDP was asked for (ACCELERATE_USE_FSDP=true, e.g. configs/accelerate/fsdp.yaml) but accelerate chose "
            f"{kind.value} on device {accelerator.device.type}: it enables FSDP only on GPUs and other accelerators, "
            "not on CPU, so the model would be replicated, not sharded. Launch on GPUs, or with "
            "configs/accelerate/ddp.yaml (data parallel)"
        )


def force_fsdp_on_cpu(accelerator) -> None:
    """The test hook of :func:`make_accelerator`: turn a MULTI_CPU state that was asked for FSDP into FSDP.

    accelerate 1.x builds the FSDP plugin from the ``FSDP_*`` variables but only switches to FSDP on
    accelerator devices; torch's ``fully_shard`` itself runs on CPU with gloo, so the tests set the
    distributed type and the plugin that accelerate would have set, before anything is prepared.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()
    if state.distributed_type != DistributedType.MULTI_CPU or not flag_from_env("ACCELERATE_USE_FSDP"):
        return
    plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in this process: never trim the heap
    (``mallopt(M_TRIM_THRESHOLD, -1)``) and serve large blocks from the heap instead of fresh
    ``mmap`` s (``mallopt(M_MMAP_MAX, 0)``), as mallopt(3) documents both.

    Why: by default a block above the (dynamic, at most 32 MB) mmap threshold is ``mmap``-ed and
    unmapped again when freed, and a heap whose free top exceeds the trim threshold is given back to
    the kernel; a training step's activations, logits and gradients are such blocks, so every step
    page-faults them in again, zero-filled by the kernel. Measured on one PPO update of the embedded
    model (8 prompts × 64 tokens, full fine-tuning, 2 cores): ~0.6–1.5 M minor faults and 6–16 s of
    system time per update by default; with this, a few thousand, and the update is 1.4–1.8× faster
    (``benchmarks/ppo_profile.py --compare-keep`` reports the faults, system time and wall time of both).

    The cost: the process's RSS stays at its peak (freed memory is reused by the process, not returned
    to the system). Applies to the whole process from the call on. Returns whether it was applied:
    False off Linux or where the C library is not glibc (no ``gnu_get_libc_version``, e.g. musl).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_trim_threshold, -1)) and bool(mallopt(m_mmap_max, 0))


BF16_SLOW_CPU = (
    "train.precision=bf16 on a CPU without native bf16 matrix instructions (torch CPU capability {cap}): "
    "bf16 matmuls and attention run through torch's reference kernels here, several times slower than "
    "fp32 (benchmarks/bf16_cpu.py measures it); train.precision=fp32 is faster on this machine"
)


def cpu_has_native_bf16() -> bool:
    """Whether torch runs bf16 matmuls on this CPU with vector instructions (AVX-512 or AMX on x86).
    An x86 CPU at ``AVX2`` or below has none: oneDNN refuses bf16 there, and torch falls back to its
    scalar reference GEMM (``cpublas``), also inside the CPU flash-attention kernel. Other
    architectures are assumed to have them."""
    import platform

    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return cap.startswith("AVX512") or "AMX" in cap


def make_accelerator(cfg: TrainConfig, *, fsdp: bool = False):
    """An ``Accelerator`` for this run's precision, after :func:`check_distributed`.

    accelerate keeps its state in a process-wide singleton; runs in one process (the demo trains
    an SFT model, then a reward model) may ask for different precisions, so the per-run part of
    that state is reset first. The distributed part (process group, device) is kept.

    DeepSpeed is refused before the ``Accelerator`` is built (``ACCELERATE_USE_DEEPSPEED``, set by
    ``accelerate launch`` with a DeepSpeed config): building it would set up the engine, or fail with
    accelerate's own "DeepSpeed is not installed".

    ``fsdp``: whether the calling trainer supports FSDP (see :func:`check_distributed`). On CPU,
    ``train.keep_freed_memory`` (default on) calls :func:`keep_freed_memory` first, and
    ``train.precision=bf16`` on a CPU without native bf16 (:func:`cpu_has_native_bf16`) warns.

    Test hook: with ``ALIGNFORGE_TEST_FSDP_ON_CPU=1`` and an FSDP launch config on CPU, the state is switched
    to FSDP (:func:`force_fsdp_on_cpu`) instead of refused, so that tests run FSDP2 on CPU with gloo.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(DEEPSPEED_REFUSED + " (ACCELERATE_USE_DEEPSPEED=true, e.g. configs/accelerate/zero2.yaml)")
    AcceleratorState._reset_state(reset_partial_state=False)  # noqa: SLF001
    GradientState._reset_state()  # noqa: SLF001
    use_cpu = not torch.cuda.is_available()
    if use_cpu and cfg.keep_freed_memory:
        keep_freed_memory()
    if use_cpu and cfg.precision == "bf16" and not cpu_has_native_bf16():
        import warnings

        warnings.warn(BF16_SLOW_CPU.format(cap=torch.backends.cpu.get_cpu_capability()), RuntimeWarning, stacklevel=2)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="bf16" if cfg.precision == "bf16" else "no")
    if flag_from_env(FSDP_TEST_HOOK):
        force_fsdp_on_cpu(accelerator)
    check_distributed(accelerator, fsdp=fsdp)
    return accelerator


def sub_state_dict(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix`` (e.g. ``"lm."``), with the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    return max(1, math.ceil(n_examples / global_batch))


MEGABATCH = 16  # length grouping sorts windows of this many global batches


def epoch_order(
    epoch: int, n_examples: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None
) -> list[int]:
    """The order of the examples in ``epoch``: a seeded shuffle, optionally grouped by length.

    With ``lengths``, each window of ``MEGABATCH`` global batches of the shuffle is sorted by
    length (longest first), so a batch holds examples of similar length and little is padding,
    while the order stays random between windows (as HF's ``LengthGroupedSampler`` does).
    """
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n_examples, generator=g).tolist()
    if lengths is None:
        return perm
    w = global_batch * MEGABATCH
    return [i for k in range(0, n_examples, w) for i in sorted(perm[k : k + w], key=lambda i: -lengths[i])]


def step_indices(
    step: int, n_examples: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None
) -> list[int]:
    """Indices of the examples in global step ``step`` (pure function: resume = step number)."""
    spe = steps_per_epoch(n_examples, global_batch)
    epoch, k = divmod(step, spe)
    return epoch_order(epoch, n_examples, global_batch, seed, lengths)[k * global_batch : (k + 1) * global_batch]


def micro_slice(indices: list[int], micro: int, rank: int, world: int, batch: int) -> list[int]:
    start = (micro * world + rank) * batch
    return indices[start : start + batch]


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_optimizer(module: nn.Module, cfg: TrainConfig, total_steps: int):
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    try:  # the fused kernel is several times faster than the default on CPU and GPU
        opt = torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # e.g. a device or dtype without a fused kernel
        opt = torch.optim.AdamW(groups, **kwargs)
    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.scheduler, warmup, total_steps))
    return opt, sched


# --------------------------------------------------------------------------- run signature (resume check)


def _hash_ints(obj: Any, h, name: str = "") -> None:
    """Feed the integer content of ``obj`` (token ids, masks, counts) into ``h``, with field names."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.name != "source":  # where a record came from does not change what is trained
                _hash_ints(getattr(obj, f.name), h, f.name)
    elif hasattr(obj, "tolist") and not isinstance(obj, (int, float)):  # a tensor or numpy array
        _hash_ints(obj.tolist(), h, name)
    elif isinstance(obj, (list, tuple)):
        try:
            a = array("q", obj)
        except (TypeError, OverflowError):  # not all int64: walk the items
            for x in obj:
                _hash_ints(x, h, name)
            return
        if sys.byteorder != "little":
            a.byteswap()
        h.update(f"{name}[{len(a)}]".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            _hash_ints(obj[k], h, f"{name}.{k}")
    elif isinstance(obj, int):  # bool included
        h.update(f"{name}={int(obj)};".encode())


def examples_digest(examples: Sequence[Any]) -> str:
    """SHA-256 (hex) of the integer content of every example, in order: its token ids and masks.

    Walks dataclass fields (except ``source``), lists, tuples and dicts; floats (e.g. reference
    log-probs, which differ in the last bits between machines) and strings are left out. Cheap: one
    pass over the ids as packed int64 arrays. A task whose examples differ in other ways passes its
    own ``Task.digest``.
    """
    h = hashlib.sha256()
    for ex in examples:
        _hash_ints(ex, h)
        h.update(b"|")
    h.update(str(len(examples)).encode())
    return h.hexdigest()


SIGNATURE_LABELS = {  # key -> how the resume message names it
    "per_device_batch_size": "train.per_device_batch_size",
    "grad_accum": "train.grad_accum",
    "world_size": "world size (processes)",
    "seed": "train.seed",
    "group_by_length": "train.group_by_length",
    "total_steps": "total steps (train.epochs / train.max_steps)",
    "n_examples": "number of training examples",
    "examples_digest": "training examples (digest of their token ids)",
}


def run_signature(cfg: TrainConfig, world_size: int, total_steps: int, n_examples: int, digest: str) -> dict:
    """What fixes the data order and the schedule of a run; stored in every checkpoint."""
    return {
        "per_device_batch_size": cfg.per_device_batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": world_size,
        "seed": cfg.seed,
        "group_by_length": cfg.group_by_length,
        "total_steps": total_steps,
        "n_examples": n_examples,
        "examples_digest": digest,
    }


def signature_differences(saved: dict, now: dict) -> list[str]:
    """``"label: old → new"`` for every key of both signatures whose value differs (a method's own
    keys, e.g. PPO's prompts per iteration, are named by their key)."""
    out = []
    keys = list(SIGNATURE_LABELS) + sorted(k for k in now if k not in SIGNATURE_LABELS)
    for key in keys:
        if key in saved and key in now and saved[key] != now[key]:
            old, new = saved[key], now[key]
            if key.endswith("digest"):
                old, new = str(old)[:12], str(new)[:12]
            out.append(f"{SIGNATURE_LABELS.get(key, key)}: {old} → {new}")
    return out


# --------------------------------------------------------------------------- checkpoints


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(out, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ck = list_checkpoints(output_dir)
    return ck[-1] if ck else None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Write a checkpoint for ``step`` atomically (temp dir + rename) and prune old ones."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[: -max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class Checkpointer:
    """A run's checkpoints: atomic writes, keep-last-K, resume from the newest, refusing a changed run.

    ``signature`` (see :func:`run_signature`; a method may add keys) is stored in every checkpoint's
    ``trainer_state.json`` and compared on :meth:`resume`. :meth:`save` takes extra JSON state of the
    method's own (PPO: the KL coefficient and the update count) and :meth:`resume` returns it.
    """

    def __init__(self, accelerator, cfg: TrainConfig, signature: dict, total_steps: int):
        self.acc, self.cfg, self.signature, self.total = accelerator, cfg, signature, total_steps
        self.out = Path(cfg.output_dir)
        self.resumed_from: str | None = None
        self.last_saved: str | None = None

    def resume(self) -> dict | None:
        """Load model, optimiser, scheduler and RNG from the newest checkpoint; return its trainer
        state (``step``, ``history`` and the method's extras), or ``None`` when there is none."""
        ck = latest_checkpoint(self.out)
        if ck is None:
            self.acc.print(f"resume: no checkpoint in {checkpoint_root(self.out)}; starting from scratch")
            return None
        state = json.loads((ck / STATE_FILE).read_text())
        saved_sig = state.get("run")
        if saved_sig is None:
            self.acc.print(
                f"resume: {ck} was written before checkpoints recorded the run's shape; "
                "resuming without checking batch size, seed or data"
            )
        elif diffs := signature_differences(saved_sig, self.signature):
            msg = (
                f"train.resume: {ck} was written by a run with a different data order or schedule, "
                "so resuming would not continue it:\n  " + "\n  ".join(diffs)
            )
            if not self.cfg.resume_force:
                raise ConfigError(
                    msg + "\nRestore those settings, use a new train.output_dir, or set "
                    "train.resume_force=true to resume anyway"
                )
            self.acc.print(msg + "\n(train.resume_force=true: resuming anyway)")
        self.acc.load_state(str(ck))
        self.resumed_from = self.last_saved = str(ck)
        self.acc.print(f"resumed from {ck} (step {state['step']}/{self.total})")
        return state

    def save(self, step: int, history: list[dict], extra: dict | None = None) -> str:
        """Checkpoint ``step`` (atomically, pruning to ``keep_last``); returns its path."""
        state = {"step": step, "total_steps": self.total, "history": history, "run": self.signature, **(extra or {})}
        self.last_saved = str(save_checkpoint(self.acc, self.out, step, state, self.cfg.keep_last))
        return self.last_saved

    def last_good(self) -> str:
        """How an error message names the state that survives it."""
        return f"last good checkpoint: {self.last_saved}" if self.last_saved else "no checkpoint was written yet"

    def save_final(self, write: Callable[[Path], None], history: list[dict], title: str = "training") -> Path:
        """``OUTPUT/final`` written by ``write(tmp_dir)`` on the main process and renamed into place,
        plus ``loss.png``; every rank waits for it."""
        final_dir = self.save_model("final", write)
        if self.acc.is_main_process:
            plot_history(history, self.out / "loss.png", title=title)
        self.acc.wait_for_everyone()
        return final_dir

    def save_model(self, name: str, write: Callable[[Path], None]) -> Path:
        """``OUTPUT/<name>`` (e.g. ``final``, ``snapshots/iter-00000008``) written by ``write(tmp_dir)`` on the
        main process and renamed into place, replacing an older one; every rank waits for it."""
        target = self.out / name
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            write(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        self.acc.wait_for_everyone()
        return target


class GuardedStep:
    """The optimiser step every trainer takes after its backward passes.

    ``step(loss, where)``: a non-finite loss, or gradient norm after clipping, raises
    :class:`TrainingError` *before* the update (naming the last good checkpoint); otherwise clip to
    ``max_grad_norm``, step the optimiser and the scheduler, and zero the gradients. Returns the
    gradient norm; ``last_lr`` is the learning rate the step used.
    """

    def __init__(
        self, accelerator, module: nn.Module, optimizer, scheduler, cfg: TrainConfig, last_good: Callable[[], str]
    ):
        self.acc, self.module, self.opt, self.sched, self.cfg = accelerator, module, optimizer, scheduler, cfg
        self.last_good = last_good
        self.last_lr = float("nan")

    def __call__(self, loss: float, where: str) -> float:
        if not finite(loss):
            raise TrainingError(f"non-finite loss ({loss}) at {where}; stopped before the update, {self.last_good()}")
        if self.cfg.max_grad_norm > 0:
            gnorm = self.acc.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        else:
            grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
            gnorm = torch.stack(grads).norm() if grads else torch.zeros(())
        gnorm = float(gnorm)
        if not finite(gnorm):
            raise TrainingError(
                f"non-finite gradient norm ({gnorm}) at {where}; stopped before the update, {self.last_good()}"
            )
        self.last_lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return gnorm


# --------------------------------------------------------------------------- logging


def write_data_report(accelerator, output_dir: str | Path, text: str) -> None:
    """Print what the data step did and keep it as ``OUTPUT/data_report.txt``."""
    accelerator.print(text)
    if accelerator.is_main_process:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_report.txt").write_text(text + "\n", encoding="utf-8")


class Logger:
    """Progress bar + TensorBoard (+ the history that becomes ``metrics.jsonl``) on the main process;
    silent elsewhere. The bar shows ``loss`` and ``rate_key`` (tokens/s by default)."""

    def __init__(
        self,
        accelerator,
        cfg: TrainConfig,
        total: int,
        start: int,
        history: list[dict],
        *,
        label: str = "train",
        rate_key: str = "tokens_per_s",
        rate_label: str = "tok/s",
        rate_format: str = ".0f",
    ):
        self.main = accelerator.is_main_process
        self.rate_key, self.rate_format = rate_key, rate_format
        self.out = Path(cfg.output_dir)
        self.history = history
        self.tb = None
        self.progress = None
        if not self.main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=start if start else None)
            except ImportError:  # pragma: no cover - tensorboard is a core dependency
                self.tb = None
        if cfg.progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} " + rate_label),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total, completed=start, loss="-", tps="-")

    def log(self, row: dict) -> None:
        self.history.append(row)
        if not self.main:
            return
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.progress is not None:
            loss = f"{row['loss']:.4f}" if "loss" in row else "-"
            self.progress.update(
                self.task, completed=row["step"], loss=loss, tps=format(row.get(self.rate_key, 0), self.rate_format)
            )

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def write_metrics(history: list[dict], output_dir: str | Path) -> None:
    out = Path(output_dir)
    tmp = out / ".metrics.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out / "metrics.jsonl")


def plot_history(history: list[dict], path: str | Path, title: str = "training") -> Path | None:
    """PNG of every logged scalar against the step (loss first)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[-1] if k != "step" and isinstance(history[-1][k], (int, float))]
    keys = ["loss"] + [k for k in keys if k != "loss"]
    n = len(keys)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    steps = [r["step"] for r in history]
    for ax, k in zip(axes.flat, keys, strict=False):
        ax.plot(steps, [r.get(k, float("nan")) for r in history], marker="." if len(steps) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- the loop


def fault_hook(step: int) -> None:
    """The test hook of the module docstring: kill or interrupt this process right after ``step``."""
    spec = os.environ.get("ALIGNFORGE_FAULT_AFTER_STEP")
    if not spec:
        return
    at, _, kind = spec.partition(":")
    if int(at) == step:
        os.kill(os.getpid(), signal.SIGINT if kind.upper() == "INT" else signal.SIGKILL)


@contextlib.contextmanager
def sigint_flag():
    """First SIGINT sets a flag (checked after each step); a second one interrupts at once."""
    flag = {"set": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag["set"]:
            signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
            raise KeyboardInterrupt
        flag["set"] = True

    try:
        signal.signal(signal.SIGINT, handler)
        installed = True
    except ValueError:  # not the main thread
        installed = False
    try:
        yield flag
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)


def finite(x: torch.Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def run_training(
    task: Task, cfg: TrainConfig, accelerator=None, *, run_config: Any = None, title: str = "training"
) -> dict:
    """Train ``task.module`` to the end (or from the newest checkpoint with ``cfg.resume``).

    Returns a summary dict: ``{"step", "final_dir", "history", "resumed_from"}``.
    Raises :class:`TrainingError` on a non-finite loss, :class:`TrainingInterrupted` on SIGINT.
    """
    from accelerate.utils import DistributedType, set_seed

    fsdp_ok = bool(getattr(task, "fsdp", False))
    accelerator = accelerator or make_accelerator(cfg, fsdp=fsdp_ok)
    check_distributed(accelerator, fsdp=fsdp_ok)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if cfg.probe_every > 0 and task.probe is None:
        raise ConfigError("train.probe_every: this trainer has no policy to sample from (set it to 0)")
    if cfg.resume and fsdp:  # measured: a resumed FSDP run ended 0.15 away from the uninterrupted one
        raise ConfigError(
            "train.resume is not supported under FSDP yet: a resumed FSDP run did not restore the checkpoint "
            "exactly (tests/trainers/test_fsdp.py); resume with configs/accelerate/ddp.yaml or start afresh"
        )
    if cfg.probe_every > 0 and fsdp:
        raise ConfigError(
            "train.probe_every: the probe generates on the main process alone, which under FSDP would need every "
            "rank to gather the sharded parameters (the run would hang); set it to 0"
        )
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            dump_config(run_config, out / "config.yaml")
    set_seed(cfg.seed)

    n = len(task.examples)
    if n == 0:
        raise TrainingError("no training examples")
    world = accelerator.num_processes
    rank = accelerator.process_index
    B, A = cfg.per_device_batch_size, cfg.grad_accum
    G = B * A * world
    spe = steps_per_epoch(n, G)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * spe

    optimizer, scheduler = build_optimizer(task.module, cfg, total)
    module, optimizer = accelerator.prepare(task.module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if fsdp:
        from torch.distributed.tensor import DTensor

        params = list(module.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        version = accelerator.state.fsdp_plugin.fsdp_version
        accelerator.print(f"model sharded over {world} processes (FSDP{version}): {sharded}/{len(params)} DTensors")

    signature = run_signature(cfg, world, total, n, (task.digest or examples_digest)(task.examples))
    # the logging window (item 8): sums over the steps since the last logged row; ``carried`` holds
    # already-reduced metric sums restored from a checkpoint written mid-window
    window: dict[str, Any] = {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "items": 0.0, "sums": {}, "carried": {}}
    ckpt = Checkpointer(accelerator, cfg, signature, total)
    step, history = 0, []
    state = ckpt.resume() if cfg.resume else None
    if state is not None:
        step, history = state["step"], state["history"]
        if state.get("log_window"):
            w = state["log_window"]
            window.update({k: w[k] for k in ("steps", "loss", "grad_norm", "items")}, carried=dict(w["sums"]))

    def window_sums() -> dict[str, float]:
        """The window's metric sums over every rank (a collective: every rank calls it)."""
        sums = {k: accelerator.reduce(v, "sum").item() for k, v in window["sums"].items()}
        for k, v in window["carried"].items():
            sums[k] = sums.get(k, 0.0) + v
        return sums

    def save(at: int) -> str:
        extra = {}
        if window["steps"]:  # mid-window: keep it, so a resumed run logs the same rows
            extra["log_window"] = {k: window[k] for k in ("steps", "loss", "grad_norm", "items")}
            extra["log_window"]["sums"] = window_sums()
        return ckpt.save(at, history, extra)

    logger = Logger(accelerator, cfg, total, step, history)
    guarded_step = GuardedStep(accelerator, module, optimizer, scheduler, cfg, ckpt.last_good)
    t0, tokens = time.perf_counter(), 0
    lengths = task.lengths if cfg.group_by_length else None
    if cfg.group_by_length and lengths is None:
        raise TrainingError("train.group_by_length needs example lengths, which this trainer does not provide")
    order: tuple[int, list[int]] = (-1, [])

    probe_s = [0.0]  # time spent in the probe, left out of tokens/s

    def probe(at: int) -> dict[str, float]:
        if task.probe is None or cfg.probe_every <= 0 or not accelerator.is_main_process:
            return {}
        t = time.perf_counter()
        with accelerator.autocast():
            res = task.probe(accelerator.unwrap_model(module), at)
        probe_s[0] += time.perf_counter() - t
        return res

    try:
        if step == 0 and (first := probe(0)):
            logger.log({"step": 0, **first})
        with sigint_flag() as sigint:
            while step < total:
                epoch, k = divmod(step, spe)
                if order[0] != epoch:
                    order = (epoch, epoch_order(epoch, n, G, cfg.seed, lengths))
                idx = order[1][k * G : (k + 1) * G]
                norm = task.normalizer([task.examples[i] for i in idx])
                items = max(float(norm["items"] if isinstance(norm, dict) else norm), 1e-8)
                if not isinstance(norm, dict):
                    norm = items
                loss_sum = torch.zeros((), device=accelerator.device)
                metric_sums: dict[str, torch.Tensor] = {}
                module.train()
                for m in range(A):
                    mine = micro_slice(idx, m, rank, world, B)
                    dummy = not mine  # keep ranks in lock-step on a short last batch
                    batch = task.collate([task.examples[i] for i in (mine or idx[:1])])
                    batch = {key: v.to(accelerator.device) if torch.is_tensor(v) else v for key, v in batch.items()}
                    sync = contextlib.nullcontext() if m == A - 1 else accelerator.no_sync(module)
                    with sync:
                        loss, mets = task.loss(module, batch, norm)
                        if dummy:
                            loss = loss * 0.0
                            mets = {key: v * 0.0 for key, v in mets.items()}
                        accelerator.backward(loss * world)  # DDP averages over ranks
                    loss_sum += loss.detach().float()
                    for key, v in mets.items():
                        metric_sums[key] = metric_sums.get(key, 0.0) + v.detach().float()
                    if not dummy:
                        tokens += task.batch_tokens(batch) * world
                step_loss = accelerator.reduce(loss_sum, "sum").item()
                gnorm = guarded_step(step_loss, f"step {step + 1}")
                lr = guarded_step.last_lr
                step += 1
                window["steps"] += 1
                window["loss"] += step_loss
                window["grad_norm"] += gnorm
                window["items"] += items
                for key, v in metric_sums.items():
                    window["sums"][key] = window["sums"].get(key, 0.0) + v

                probe_due = cfg.probe_every > 0 and (step % cfg.probe_every == 0 or step == total)
                if step % max(1, cfg.log_every) == 0 or step == total or probe_due:
                    n_win = window["steps"]
                    row = {
                        "step": step,
                        "loss": window["loss"] / n_win,
                        "lr": lr,
                        "grad_norm": window["grad_norm"] / n_win,
                        "epoch": round(step / spe, 4),
                        "tokens_per_s": tokens / max(1e-9, time.perf_counter() - t0 - probe_s[0]),
                    }
                    sums, w_items = window_sums(), window["items"]
                    row.update(
                        task.summarize(sums, w_items) if task.summarize else {k: v / w_items for k, v in sums.items()}
                    )  # per-item means over the window
                    window.update(steps=0, loss=0.0, grad_norm=0.0, items=0.0, sums={}, carried={})
                    if probe_due:
                        row.update(probe(step))
                    logger.log(row)
                else:
                    logger.advance(step)

                saved_now = (cfg.save_every > 0 and step % cfg.save_every == 0) or step == total
                if saved_now:
                    save(step)
                fault_hook(step)
                stop = sigint["set"]
                if world > 1:  # every rank stops at the same step
                    flag = torch.tensor(1.0 if stop else 0.0, device=accelerator.device)
                    stop = accelerator.reduce(flag, "sum").item() > 0
                if stop:
                    if not saved_now:
                        save(step)
                    raise TrainingInterrupted(
                        f"interrupted: checkpoint saved at {ckpt.last_saved}; continue with train.resume=true"
                    )
    finally:
        logger.close()
        if accelerator.is_main_process and history:
            write_metrics(history, out)

    if fsdp:  # gathering the sharded parameters is a collective: every rank takes part, the main process saves
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # the full (unsharded) tensors, on CPU, on the main process (torch's own call: accelerate's get_state_dict
        # also decides FSDP1/FSDP2 from its plugin, and falls back to the sharded module.state_dict())
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tied: dict[int, str] = {}  # gathered tied weights are separate copies: make them one tensor again, so
        for name, p in module.named_parameters(remove_duplicate=False):  # save_pretrained drops the alias
            first = tied.setdefault(id(p), name)
            if first != name and name in full and first in full:
                full[name] = full[first]

        def write(tmp: Path) -> None:
            task.save_model(accelerator.unwrap_model(module), tmp, state_dict=full)

    else:

        def write(tmp: Path) -> None:
            task.save_model(accelerator.unwrap_model(module), tmp)

    final_dir = ckpt.save_final(write, history, title)
    return {"step": step, "final_dir": str(final_dir), "history": history, "resumed_from": ckpt.resumed_from}
