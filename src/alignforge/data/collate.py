"""The one padding collate: token-id rows into ``(B, T)`` tensors.

Every trainer, the reward model's scoring and generation batch their rows through
:func:`pad_batch`; methods add their own fields (labels, reference log-probs) on top.
This module imports torch, so ``alignforge.data`` does not import it (import it directly).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch


def pad_batch(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: Literal["right", "left"] = "right",
    masks: Mapping[str, Sequence[Sequence[int | bool]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad ``rows`` of token ids to the longest one.

    Args:
        rows: ``B`` lists of token ids.
        pad_id: the id written at padding positions.
        side: ``"right"`` (training, scoring: row ``i`` fills ``[:len_i]``) or ``"left"``
            (generation: row ``i`` fills ``[T - len_i:]``).
        masks: optional per-token masks, each a list of ``B`` rows as long as the matching
            ``rows[i]``; each becomes a ``(B, T)`` bool tensor, ``False`` at padding.

    Returns:
        ``input_ids`` ``(B, T)`` long, ``attention_mask`` ``(B, T)`` long (1 at real tokens), and
        one ``(B, T)`` bool tensor per name in ``masks``.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    B = len(rows)
    T = max((len(r) for r in rows), default=0)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    extra = {name: torch.zeros((B, T), dtype=torch.bool) for name in (masks or {})}
    for i, r in enumerate(rows):
        n = len(r)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, cols] = torch.tensor(list(r), dtype=torch.long)
        att[i, cols] = 1
        for name, m in (masks or {}).items():
            if len(m[i]) != n:
                raise ValueError(f"mask '{name}' row {i} has {len(m[i])} entries for {n} tokens")
            extra[name][i, cols] = torch.tensor(list(m[i]), dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": att, **extra}


def collate_sft(examples: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``TokenizedSFT`` examples: ``input_ids``/``attention_mask``/``target_mask`` ``(B, T)``.

    ``target_mask`` marks the trained (assistant) tokens; column 0 is never a target (no context).
    """
    b = pad_batch([e.input_ids for e in examples], pad_id, masks={"target_mask": [e.loss_mask for e in examples]})
    b["target_mask"][:, 0] = False
    return b
