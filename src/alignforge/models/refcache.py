"""Reference log-probabilities, computed once and cached on disk.

DPO, point-wise DPO, ULMA and KTO need ``logπ_ref(y|x)`` for every training response. By default
the reference is the *initial* policy, the model as loaded (a LoRA adapter dir given as the model:
with that adapter on). With a fresh LoRA adapter, which does not change the function yet, it is the
same model with the adapter disabled. So the values are computed once, before training, with the
policy model itself, and stored under ``$ALIGNFORGE_CACHE/reflogps/<key>.pt``. No reference model
is held in memory during training. ``ref_model=NAME`` names another reference, loaded for the pass.

The pass runs on the device it is given (the accelerator's) and, with several processes, each rank
computes its share of the examples; the shares are all-gathered, so every rank ends with all values
and no rank waits alone at a barrier (:func:`load_or_compute`).

The key hashes the content of the reference weights (:func:`reference_fingerprint`: a named
``ref_model`` by its weights, not its path; a fresh LoRA adapter by its base weights only, not the
random adapter), every token id of every example (which covers the data, the chat template,
truncation and ``max_length``), and the settings that change the numbers (e.g. the precision);
any change gives a new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch


def examples_digest(examples: Iterable, fields: Sequence[str]) -> str:
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        for f in fields:
            h.update(f.encode())
            h.update(json.dumps(list(getattr(ex, f))).encode())
        n += 1
    h.update(str(n).encode())
    return h.hexdigest()


def cache_key(fingerprint: str, digest: str, settings: dict) -> str:
    blob = json.dumps({"model": fingerprint, "examples": digest, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    from alignforge.models.loading import cache_dir

    return cache_dir() / "reflogps" / f"{key}.pt"


def load_or_compute(
    key: str,
    compute: Callable[..., dict[str, torch.Tensor]],
    accelerator=None,
    echo: Callable[[str], None] = print,
    n: int | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Return ``(tensors, was_cached)``; on a miss the values are computed and written atomically.

    With ``n`` (the number of examples), ``compute(indices)`` returns the values of those examples
    (a dict of tensors with one row per index): each process computes one contiguous share of
    ``range(n)`` and the shares are all-gathered, so every process returns all ``n`` rows. Without
    ``n``, ``compute()`` runs on the main process alone and the others wait for its file.
    """
    path = cache_path(key)
    main = accelerator is None or accelerator.is_main_process
    world = 1 if accelerator is None else accelerator.num_processes
    hit = path.is_file()
    if world > 1:  # every rank takes the main process's view, so all compute (and gather) or none
        hit = bool(accelerator.gather(torch.tensor([float(hit)], device=accelerator.device))[0].item())
    if hit:
        echo(f"reference log-probs from cache {path}")
        if accelerator is not None and n is None:
            accelerator.wait_for_everyone()
        return torch.load(path, map_location="cpu"), True
    if n is None:
        values = compute() if main else None
    else:
        echo(f"computing reference log-probs on {world} process(es) (cached at {path})")
        values = _sharded(compute, n, accelerator)
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(values, tmp)
        os.replace(tmp, path)
    if n is None:
        if accelerator is not None:
            accelerator.wait_for_everyone()
        values = torch.load(path, map_location="cpu")
    return values, False


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous share of ``range(n)`` that process ``rank`` of ``world`` computes."""
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def _sharded(compute: Callable[[list[int]], dict[str, torch.Tensor]], n: int, accelerator) -> dict[str, torch.Tensor]:
    world = 1 if accelerator is None else accelerator.num_processes
    if world == 1:
        return {k: v.cpu() for k, v in compute(list(range(n))).items()}
    rank = accelerator.process_index
    mine = list(shard(n, rank, world))
    per = -(-n // world)
    # a rank with no share computes one example and sends none of it, so every rank gathers the same fields
    values = compute(mine or [0])
    print(f"reference log-probs: process {rank}/{world} computed {len(mine)} of {n}", flush=True)
    out = {}
    for k, v in sorted(values.items()):
        v = v[: len(mine)]
        padded = torch.zeros((per, *v.shape[1:]), dtype=v.dtype)
        padded[: len(v)] = v.cpu()
        gathered = accelerator.gather(padded.to(accelerator.device)).cpu().reshape(world, per, *v.shape[1:])
        out[k] = torch.cat([gathered[r, : len(shard(n, r, world))] for r in range(world)])
    return out


def reference_fingerprint(ref: torch.nn.Module) -> str:
    """The fingerprint of the weights that make the reference function: every parameter of ``ref``,
    except the weights of a LoRA adapter that is still a no-op (``lora.adapter_is_identity``), which
    is left out. So a fresh, randomly initialised adapter never changes the key, while a trained
    adapter loaded as the policy does."""
    from alignforge.models.loading import model_fingerprint
    from alignforge.models.lora import adapter_is_identity

    return model_fingerprint(ref, base_only=adapter_is_identity(ref))


@contextlib.contextmanager
def reference_policy(policy: torch.nn.Module, ref_model: str | None = None, device=None):
    """The reference model, in eval mode, without a second copy of the policy in memory.

    ``ref_model`` named: that model, loaded for the duration of the block and moved to ``device``
    (default: the policy's device). Otherwise the reference is the *initial* policy, the model as
    loaded: with a fresh LoRA adapter (a no-op, see ``lora.adapter_is_identity``), the same model
    with the adapter disabled; else the policy itself, adapter on, which must not have been trained
    yet (reference values are computed before the first step and cached).
    """
    from alignforge.models.loading import load_model
    from alignforge.models.lora import adapter_is_identity, reference_mode

    if ref_model:
        ref = load_model(ref_model)
        ref.to(device if device is not None else next(policy.parameters()).device)
        ref.eval()
        try:
            yield ref
        finally:
            del ref
    elif adapter_is_identity(policy):
        with reference_mode(policy) as ref:
            yield ref
    else:
        was = policy.training
        policy.eval()
        try:
            with torch.no_grad():
                yield policy
        finally:
            policy.train(was)
