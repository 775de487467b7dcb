"""Reward-model losses: Bradley-Terry with an optional margin and score regulariser."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Regularizer = Literal["none", "gaussian", "center"]


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    regularizer: Regularizer = "gaussian",
    reg_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair Bradley-Terry loss ``-log σ(r_w - r_l - m) + λ·reg``.

    Regularisers (both act on the pair's two scores):

    * ``"gaussian"``: ChatGLM-RLHF's zero-mean Gaussian prior on scores, ``λ·(r_w² + r_l²)``;
      averaged over the batch this is ``λ·mean(r_w² + r_l²)``.
    * ``"center"``: TRL's ``center_rewards_coefficient`` (Eisenstein et al. 2023), ``λ·(r_w + r_l)²``.
    * ``"none"``: plain BT.

    Args:
        r_chosen, r_rejected: ``(B,)`` scalar scores.
        margin: optional ``(B,)`` or scalar margin subtracted inside the sigmoid.
        regularizer, reg_coef: which regulariser and its λ (``reg_coef=0`` disables it).

    Returns:
        ``(losses, metrics)``: ``losses`` is ``(B,)`` (the caller sums/averages it); metrics are
        per-pair ``(B,)`` tensors: ``accuracy`` (1 if r_w > r_l), ``margin`` (r_w - r_l), ``bt`` and ``reg``.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    bt = -F.logsigmoid(diff)
    if regularizer == "gaussian":
        reg = r_chosen.pow(2) + r_rejected.pow(2)
    elif regularizer == "center":
        reg = (r_chosen + r_rejected).pow(2)
    elif regularizer == "none":
        reg = torch.zeros_like(bt)
    else:
        raise ValueError(f"unknown regularizer {regularizer!r}")
    losses = bt + reg_coef * reg
    metrics = {
        "accuracy": (r_chosen > r_rejected).to(r_chosen.dtype).detach(),
        "margin": (r_chosen - r_rejected).detach(),
        "bt": bt.detach(),
        "reg": reg.detach(),
    }
    return losses, metrics
