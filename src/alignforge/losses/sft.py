"""Supervised next-token-prediction loss (SFT, and later PPO's NTP term and DPO+NTP)."""

from __future__ import annotations

import torch


def nll_loss(
    token_logps: torch.Tensor, target_mask: torch.Tensor, normalizer: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked negative log-likelihood.

    Args:
        token_logps: ``(B, T)`` log-probability of each target token (any value where masked out).
        target_mask: ``(B, T)`` 1/True where the token is trained on.
        normalizer: divide the summed NLL by this (e.g. the number of target tokens in the whole
            global batch, so micro-batches and ranks add up exactly). Default: ``target_mask.sum()``.

    Returns:
        ``(loss, metrics)``: loss is a scalar; metrics holds ``nll_sum`` and ``n_tokens`` (detached).
    """
    mask = target_mask.to(token_logps.dtype)
    nll_sum = -(token_logps * mask).sum()
    n = mask.sum()
    if normalizer is None:
        normalizer = n.clamp(min=1.0)
    loss = nll_sum / normalizer
    return loss, {"nll_sum": nll_sum.detach(), "n_tokens": n.detach()}
