"""KV-cache primitives for tree search and judges, on transformers' own ``DynamicCache``.

RAIN, Best-of-N and the local A/B judge need two things beyond ``generate``:

* :func:`extend`: a forward over *new* tokens on top of a cached prefix. Rows of a batch share
  one prefix (batch 1, repeated) and may have different numbers of new tokens: they are
  right-padded, so causal attention keeps every real position exact, and the logits are read at
  each row's last real token. No attention kernel of our own: the model's forward does the work.
* :class:`PrefixKVCache`: KV states keyed by token path. An entry stores only the KV of its own
  tokens, on top of its parent entry (its longest cached proper prefix), plus the next-token
  logits after it; a path is assembled by concatenating the segments root to leaf. The store
  is bounded in MB with LRU eviction; an entry whose ancestor was evicted is dropped on lookup.

A "layers" value is a list (one per decoder layer) of ``(keys, values)`` tensors shaped
``[batch, kv_heads, seq, head_dim]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignforge.errors import ConfigError

Layers = list[tuple[torch.Tensor, torch.Tensor]]

# Work done by :func:`extend` in this process: model calls and token positions run (rows x width,
# padding included). Benchmarks read it to say how much compute a method spends.
FORWARD_STATS = {"calls": 0, "positions": 0}


def reset_forward_stats() -> None:
    FORWARD_STATS.update(calls=0, positions=0)


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def cache_layers(cache: Any) -> Layers:
    """The ``(keys, values)`` tensors of a ``DynamicCache``, one pair per layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(layers: Layers | None) -> Any:
    """A ``DynamicCache`` holding ``layers`` (empty when ``None``)."""
    from transformers import DynamicCache

    if not layers:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


def layers_len(layers: Layers | None) -> int:
    return 0 if not layers else int(layers[0][0].shape[-2])


def layers_nbytes(layers: Layers | None) -> int:
    if not layers:
        return 0
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def slice_layers(layers: Layers, start: int, end: int, row: int | None = None) -> Layers:
    """Positions ``[start, end)`` (of one batch ``row``, kept as batch 1), copied so the
    source batch can be freed."""
    out = []
    for k, v in layers:
        if row is not None:
            k, v = k[row : row + 1], v[row : row + 1]
        out.append((k[..., start:end, :].clone(), v[..., start:end, :].clone()))
    return out


def concat_layers(parts: Sequence[Layers]) -> Layers:
    parts = [p for p in parts if p]
    if len(parts) == 1:
        return parts[0]
    return [
        (torch.cat([p[i][0] for p in parts], dim=-2), torch.cat([p[i][1] for p in parts], dim=-2))
        for i in range(len(parts[0]))
    ]


def repeat_layers(layers: Layers, n: int) -> Layers:
    if n == 1:
        return layers
    return [(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous()) for k, v in layers]


@dataclass
class Extension:
    """Result of :func:`extend`: next-token logits after each row's last real token (``[B, V]``,
    float32, or float64 for a float64 model), the grown cache (right-padded rows hold pad KV past
    their length), and, when asked, the last hidden states ``[B, T, H]`` of the new tokens."""

    logits: torch.Tensor
    cache: Any
    hidden: torch.Tensor | None = None


def extend(
    model: Any,
    prefix: Layers | None,
    rows: Sequence[Sequence[int]],
    pad_id: int = 0,
    want_hidden: bool = False,
) -> Extension:
    """Run ``model`` over each row of new tokens on top of ``prefix`` (batch 1 or ``len(rows)``).

    Rows may differ in length (right-padded with ``pad_id``); every row needs at least one
    token. The prefix tensors are never modified in place.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("extend needs at least one new token in every row")
    n = len(rows)
    if prefix and prefix[0][0].shape[0] not in (1, n):
        raise ValueError(f"prefix batch {prefix[0][0].shape[0]} does not match {n} rows")
    if prefix and prefix[0][0].shape[0] == 1:
        prefix = repeat_layers(prefix, n)
    width = max(len(r) for r in rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    device = model_device(model)
    cache = make_cache(prefix)
    lasts = sorted({len(r) - 1 for r in rows})
    where = {p: j for j, p in enumerate(lasts)}
    # The LM head runs only at the positions that are read (each row's last real token).
    keep: int | torch.Tensor = 1 if lasts == [width - 1] else torch.tensor(lasts, device=device)
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            cache=cache,
            use_cache=True,
            output_hidden_states=want_hidden,
            logits_to_keep=keep,
        )
    FORWARD_STATS["calls"] += 1
    FORWARD_STATS["positions"] += n * width
    cols = torch.tensor([where[len(r) - 1] for r in rows], device=out.logits.device)
    logits = out.logits[torch.arange(n, device=cols.device), cols]
    if logits.dtype != torch.float64:  # float32 for bf16/fp16 models; float64 models stay exact
        logits = logits.float()
    hidden = out.hidden_states[-1] if want_hidden else None
    return Extension(logits=logits, cache=out.cache, hidden=hidden)


def option_probs(logits: torch.Tensor, option_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Next-token probabilities of a few options, each option a set of token ids whose
    probabilities are summed (e.g. ``'A'`` and ``' A'``): ``[B, V]`` logits -> ``[B, n_options]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.stack([probs[:, list(ids)].sum(-1) for ids in option_ids], dim=-1)


@dataclass
class KVEntry:
    parent: tuple[int, ...] | None
    layers: Layers  # KV of the tokens after ``parent`` (or of the whole key when parent is None)
    logits: torch.Tensor | None  # [V] next-token logits after the key
    nbytes: int
    pinned: bool = False


class PrefixKVCache:
    """KV states of token paths, bounded in MB, least recently used evicted first.

    ``put(key, layers, logits, parent=...)`` stores the KV of ``key[len(parent):]``;
    ``assemble(key)`` returns the whole path's KV (or ``None`` if it, or an ancestor, is gone).
    Pinned entries (the committed context) are never evicted; if they alone exceed the bound,
    that is a :class:`ConfigError`, since the search cannot hold even one path.
    """

    def __init__(self, max_mb: float):
        if max_mb <= 0:
            raise ConfigError(f"cache max_mb must be > 0, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.entries: OrderedDict[tuple[int, ...], KVEntry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def put(
        self,
        key: tuple[int, ...],
        layers: Layers,
        logits: torch.Tensor | None,
        parent: tuple[int, ...] | None = None,
        pinned: bool = False,
    ) -> None:
        if parent is not None and key[: len(parent)] != parent:
            raise ValueError("parent must be a prefix of key")
        self.drop(key)
        nb = layers_nbytes(layers) + (0 if logits is None else logits.numel() * logits.element_size())
        self.entries[key] = KVEntry(parent, layers, logits, nb, pinned)
        self.nbytes += nb
        self._evict()

    def drop(self, key: tuple[int, ...]) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.nbytes -= e.nbytes

    def retain(self, prefix: tuple[int, ...]) -> None:
        """Drop (and unpin) every entry that does not extend ``prefix``."""
        n = len(prefix)
        for key in [k for k in self.entries if len(k) < n or k[:n] != prefix]:
            self.drop(key)

    def _evict(self) -> None:
        if self.nbytes <= self.max_bytes:
            return
        for key in [k for k, e in self.entries.items() if not e.pinned]:
            if self.nbytes <= self.max_bytes:
                break
            self.drop(key)
            self.evictions += 1
        if self.nbytes > self.max_bytes:
            need = sum(e.nbytes for e in self.entries.values() if e.pinned) / 2**20
            raise ConfigError(
                f"the KV cache bound ({self.max_bytes / 2**20:.1f} MB) is too small for one path: "
                f"the committed context alone needs {need:.1f} MB; raise cache_mb"
            )

    def lookup(self, key: tuple[int, ...]) -> tuple[Layers, torch.Tensor | None] | None:
        """The whole path's KV and the logits after it, touching every entry on the chain;
        counts a hit or a miss."""
        chain: list[tuple[tuple[int, ...], KVEntry]] = []
        k: tuple[int, ...] | None = key
        while k is not None:
            e = self.entries.get(k)
            if e is None:
                for dead, _ in chain:  # an ancestor is gone: the chain is useless
                    self.drop(dead)
                self.misses += 1
                return None
            chain.append((k, e))
            k = e.parent
        for k2, _ in chain:  # leaf first, so ancestors end up most recent
            self.entries.move_to_end(k2)
        self.hits += 1
        layers = concat_layers([e.layers for _, e in reversed(chain)])
        return layers, chain[0][1].logits
