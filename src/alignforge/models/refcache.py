"""Reference log-probabilities, computed once and cached on disk.

DPO, point-wise DPO, ULMA and KTO need ``logπ_ref(y|x)`` for every training response. The
reference is the *initial* policy (with LoRA: the base with the adapter disabled, which at
initialisation is the same function), so the values are computed once, before training, with the
policy model itself, and stored under ``$ALIGNFORGE_CACHE/reflogps/<key>.pt``. No reference
model is held in memory during training.

The key hashes the reference weights (:func:`~alignforge.models.loading.model_fingerprint`), every
token id of every example (which covers the data, the chat template, truncation and
``max_length``), and the settings that change the numbers (e.g. the reference model's name);
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


def load_or_compute(key: str, compute: Callable[[], dict[str, torch.Tensor]], accelerator=None,
                    echo: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], bool]:
    """Return ``(tensors, was_cached)``. The main process computes and writes (atomically); the other
    ranks wait for it and read the file."""
    path = cache_path(key)
    main = accelerator is None or accelerator.is_main_process
    hit = path.is_file()
    if not hit and main:
        echo(f"computing reference log-probs (cached at {path})")
        values = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(values, tmp)
        os.replace(tmp, path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if hit:
        echo(f"reference log-probs from cache {path}")
    return torch.load(path, map_location="cpu"), hit


@contextlib.contextmanager
def reference_policy(policy: torch.nn.Module, ref_model: str | None = None):
    """The reference model, without a second copy of the policy in memory.

    ``ref_model`` named: that model, loaded for the duration of the block. Otherwise the reference
    is the *initial* policy: with LoRA, the same model with its adapter disabled; without, the
    policy itself, which must not have been trained yet (reference values are computed before the
    first step and cached).
    """
    from alignforge.models.loading import load_model
    from alignforge.models.lora import is_peft, reference_mode

    if ref_model:
        ref = load_model(ref_model)
        try:
            yield ref
        finally:
            del ref
    elif is_peft(policy):
        with reference_mode(policy) as ref:
            yield ref
    else:
        yield policy
