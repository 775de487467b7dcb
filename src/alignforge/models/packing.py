"""Pack a preference pair into one sequence: ``[prompt | chosen | rejected]`` with a block mask.

Chosen and rejected share their prompt, so the prompt is computed once per pair. Both responses
attend to the prompt and causally to themselves, never to each other; position ids restart at
``len(prompt)`` for the rejected block, so every response token sees exactly the context (and
rotary positions) it would see in its own unpacked sequence. The additive 4-D mask is passed to
the HF model as a ready-made mask (transformers uses a 4-D mask as is), which works with the
``eager`` and ``sdpa`` attention implementations.

Segment ids: 0 prompt, 1 chosen, 2 rejected, -1 padding.
"""

from __future__ import annotations

from typing import Sequence

import torch

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


def pack_pairs(pairs: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded packed batch from ``TokenizedPair``-like objects.

    Returns ``input_ids``, ``position_ids``, ``segment_ids``, ``attention_mask`` (1 = real token),
    all ``(B, T)``, and ``prompt_last``, ``chosen_last``, ``rejected_last``: ``(B,)`` indices of the
    last token of each block (the response's end-of-turn token is its last token).
    """
    B = len(pairs)
    lens = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    T = max(lens)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), PAD, dtype=torch.long)
    last = {k: torch.zeros(B, dtype=torch.long) for k in ("prompt_last", "chosen_last", "rejected_last")}
    for b, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        if P == 0 or C == 0 or R == 0:
            raise ValueError("a packed pair needs a non-empty prompt and two non-empty responses")
        ids[b, : P + C + R] = torch.tensor(list(p.prompt_ids) + list(p.chosen_ids) + list(p.rejected_ids))
        pos[b, : P + C] = torch.arange(P + C)
        pos[b, P + C : P + C + R] = torch.arange(P, P + R)
        seg[b, :P] = PROMPT
        seg[b, P : P + C] = CHOSEN
        seg[b, P + C : P + C + R] = REJECTED
        last["prompt_last"][b] = P - 1
        last["chosen_last"][b] = P + C - 1
        last["rejected_last"][b] = P + C + R - 1
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "attention_mask": (seg != PAD).long(), **last}


def block_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``(B, 1, T, T)`` mask: 0 where query i may attend key j, ``finfo.min`` elsewhere.

    i attends j iff ``j <= i`` and j is a prompt token or in i's own block. Padding rows attend
    only to themselves (their outputs are never used; this keeps softmax finite).
    """
    B, T = segment_ids.shape
    i = torch.arange(T, device=segment_ids.device)
    causal = i[None, :] <= i[:, None]  # (T, T): key j <= query i
    si = segment_ids[:, :, None]
    sj = segment_ids[:, None, :]
    allowed = causal[None] & (si >= 0) & (sj >= 0) & ((sj == PROMPT) | (sj == si))
    allowed = allowed | (torch.eye(T, dtype=torch.bool, device=segment_ids.device)[None] & (si < 0))
    mask = torch.zeros((B, 1, T, T), dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def packed_hidden_states(decoder: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run a decoder (e.g. ``LlamaModel``) on a packed batch; returns ``(B, T, H)`` hidden states."""
    dtype = next(decoder.parameters()).dtype
    if torch.is_autocast_enabled(batch["input_ids"].device.type):
        dtype = torch.get_autocast_dtype(batch["input_ids"].device.type)
    mask = block_mask(batch["segment_ids"], dtype)
    out = decoder(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
    )
    return out.last_hidden_state


def packed_response_logps(lm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-response log-probabilities of packed pairs, with the LM head only at response tokens.

    Token ``t`` of a response is predicted from position ``t - 1``, except the first rejected token,
    which is predicted from the last prompt token (in the packed sequence the token before it is
    the last chosen token, which rejected must not see).

    Returns ``(B,)`` tensors: ``chosen_logps``/``rejected_logps`` (sums over tokens) and
    ``chosen_tokens``/``rejected_tokens`` (counts), so callers can take sums or per-token means.
    """
    from alignforge.models.logprobs import logprobs_from_logits
    from alignforge.models.lora import unwrap_base

    base = unwrap_base(lm)
    hidden = packed_hidden_states(base.get_decoder(), batch)
    head = base.get_output_embeddings()
    seg = batch["segment_ids"]
    B, T = seg.shape
    is_resp = (seg == CHOSEN) | (seg == REJECTED)
    src = torch.arange(T, device=seg.device).expand(B, T) - 1
    rows = torch.arange(B, device=seg.device)
    first_rej = batch["chosen_last"] + 1
    src = src.clone()
    src[rows, first_rej] = batch["prompt_last"]
    b_idx, t_idx = is_resp.nonzero(as_tuple=True)
    h = hidden[b_idx, src[b_idx, t_idx]]
    lp = logprobs_from_logits(
        head(h), batch["input_ids"][b_idx, t_idx], getattr(base.config, "final_logit_softcapping", None)
    )
    is_chosen = seg[b_idx, t_idx] == CHOSEN
    zeros = torch.zeros(B, dtype=lp.dtype, device=lp.device)
    return {
        "chosen_logps": zeros.index_add(0, b_idx[is_chosen], lp[is_chosen]),
        "rejected_logps": zeros.index_add(0, b_idx[~is_chosen], lp[~is_chosen]),
        "chosen_tokens": zeros.index_add(0, b_idx[is_chosen], torch.ones_like(lp[is_chosen])),
        "rejected_tokens": zeros.index_add(0, b_idx[~is_chosen], torch.ones_like(lp[~is_chosen])),
    }


class PackedPairLogProbs(torch.nn.Module):
    """``forward(packed_batch) -> packed_response_logps(...)``; wraps a causal LM so that a DDP/FSDP
    wrapper around this module sees the whole computation (``.lm`` is the model to save)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return packed_response_logps(self.lm, batch)


def prefix_cached_hidden(
    decoder: torch.nn.Module,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    prefix_index: torch.Tensor,
    suffix_ids: torch.Tensor,
    suffix_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of ``B`` rows that share ``U`` prefixes, each prefix run once.

    Args:
        decoder: the base model's decoder (``get_decoder()``), any cache-capable transformers model.
        prefix_ids, prefix_mask: ``(U, P)`` the distinct prefixes, **left**-padded (every prefix ends in
            column ``P − 1``).
        prefix_index: ``(B,)`` row -> its prefix.
        suffix_ids, suffix_mask: ``(B, S)`` the rest of each row, right-padded.

    Returns:
        ``((B, H), (B, S, H))``: each row's state at its prefix's last token, and at each suffix token.
        The decoder runs over the prefixes with a KV cache, the cache is indexed to the rows
        (``Cache.reorder_cache``) and the suffixes run against it, at the positions they have in the
        whole row; the same states as the whole rows give, up to rounding, and gradients reach the
        prefix positions through the cache.
    """
    pm, idx, sm = prefix_mask, prefix_index, suffix_mask
    first = decoder(
        input_ids=prefix_ids, attention_mask=pm, position_ids=(pm.cumsum(-1) - 1).clamp(min=0), use_cache=True
    )
    cache = first.cache
    cache.reorder_cache(idx)
    pos = pm.sum(-1)[idx][:, None] + torch.arange(sm.shape[1], device=sm.device)[None, :]
    second = decoder(
        input_ids=suffix_ids,
        attention_mask=torch.cat([pm[idx], sm], dim=1),
        position_ids=pos,
        cache=cache,
        use_cache=True,
    ).last_hidden_state
    return first.last_hidden_state[idx, -1], second
