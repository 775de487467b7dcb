"""Offline preference losses: pairwise DPO/cDPO/IPO, point-wise DPO, ULMA and KTO.

All are pure functions of log-probabilities (METHODS.md §1d, §3, §4). ``*_logps`` are the
log-probabilities of whole responses under the policy or the frozen reference. The trainers' defaults:
**summed** over response tokens for DPO (DPO paper, TRL) and KTO (KTO paper, TRL), **averaged** per
token for IPO (IPO paper, TRL), ULMA and point-wise DPO (the ULMA code, ``average_log_prob=True``).
Each is a config option; these functions do not care which one they get.

Notation: ``h = logπ_θ(y|x) − logπ_ref(y|x)``; pairwise ``Δ = h_w − h_l``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    margin: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise DPO (``sigmoid``; with ``label_smoothing`` ε > 0 this is cDPO) or IPO.

    * sigmoid: ``-(1-ε)·log σ(βΔ - γ) - ε·log σ(-(βΔ - γ))`` with the target margin ``γ = margin``
      (SimPO's γ, METHODS.md §4; 0 = plain DPO). With per-token mean log-probs this is SimPO's
      length-normalised margin loss, but with the reference kept in ``h``.
    * ipo: ``(Δ - 1/(2β))²`` (Azar et al.; β plays the role of τ, as in TRL); IPO has its own
      target, so ``margin`` must be 0.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(B,)`` sequence log-probs.

    Returns:
        ``(losses (B,), metrics)``; metrics ``(B,)``: ``reward_chosen = β·h_w``,
        ``reward_rejected = β·h_l``, ``reward_margin``, ``reward_accuracy`` (1 if h_w > h_l).
    """
    h_w = policy_chosen - ref_chosen
    h_l = policy_rejected - ref_rejected
    delta = h_w - h_l
    if loss_type == "sigmoid":
        z = beta * delta - margin
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        if margin:
            raise ValueError("IPO has its own target (1/(2β)): margin must be 0")
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    rw, rl = (beta * h_w).detach(), (beta * h_l).detach()
    return losses, {
        "reward_chosen": rw,
        "reward_rejected": rl,
        "reward_margin": rw - rl,
        "reward_accuracy": (rw > rl).to(rw.dtype),
    }


def pointwise_dpo_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    c: float = 0.0,
    continuous: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Point-wise DPO (ULMA §3a): a log-loss (binary z) or a regression (continuous z) on ``βh + c``.

    * binary:     ``-[z·log σ(βh + c) + (1-z)·log σ(-(βh + c))]``
    * continuous: ``(z - βh - c)²``

    ``c`` stands in for ``β log Z(x)`` and is added unscaled, as in the ULMA code (default 0).

    Args:
        policy, ref: ``(B,)`` response log-probs; labels: ``(B,)`` z in [0, 1].

    Returns:
        ``(losses (B,), metrics)``; metrics ``(B,)``: ``sigmoid_reward = σ(βh + c)`` (ULMA's logged
        "reward") and ``h``.
    """
    h = policy - ref
    a = beta * h + c
    z = labels.to(a.dtype)
    if continuous:
        losses = (z - a) ** 2
    else:
        losses = -(z * F.logsigmoid(a) + (1 - z) * F.logsigmoid(-a))
    return losses, {"sigmoid_reward": torch.sigmoid(a).detach(), "h": h.detach()}


def ulma_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.1,
    c: float = 0.0,
    continuous: bool = False,
    n_pos: float | None = None,
    n_neg: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ULMA: SFT (no KL) on positives plus the KL-regularised point-wise term on negatives (§3a).

    ``L = Σ_{z=1} -logπ(y|x) / n_pos  +  Σ_{z≠1} ℓ_neg / n_neg`` with ``ℓ_neg = -log σ(-βh - c)``
    (binary) or ``(z - βh - c)²`` (continuous). Positives are samples with ``z == 1``.

    Each subset is averaged over its own size, as in the ULMA code; pass the global ``n_pos`` /
    ``n_neg`` of a batch split over micro-batches or ranks so the parts add up exactly. An empty
    subset contributes 0 (the ULMA code's NaN pitfall), never NaN.

    Returns:
        ``(loss scalar, metrics)``; metrics are sums over the batch (for logging):
        ``pos_nll``, ``neg_loss``, ``n_pos``, ``n_neg``, ``sigmoid_reward_pos``, ``sigmoid_reward_neg``.
    """
    z = labels.to(policy.dtype)
    pos = z == 1
    neg = ~pos
    h = policy - ref
    a = beta * h + c
    neg_terms = (z - a) ** 2 if continuous else -F.logsigmoid(-a)
    pos_sum = -(policy * pos).sum()
    neg_sum = (neg_terms * neg).sum()
    n_p = float(pos.sum()) if n_pos is None else float(n_pos)
    n_n = float(neg.sum()) if n_neg is None else float(n_neg)
    loss = (pos_sum / n_p if n_p > 0 else pos_sum * 0.0) + (neg_sum / n_n if n_n > 0 else neg_sum * 0.0)
    sig = torch.sigmoid(a).detach()
    return loss, {
        "pos_nll": pos_sum.detach(),
        "neg_loss": neg_sum.detach(),
        "n_pos": pos.sum().detach(),
        "n_neg": neg.sum().detach(),
        "sigmoid_reward_pos": (sig * pos).sum(),
        "sigmoid_reward_neg": (sig * neg).sum(),
    }


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    *,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (Ethayarajh et al.), the unpaired peer baseline: ``λ_y − v(x, y)`` per sample.

    ``v = λ_D·σ(β(h − z0))`` for desirable and ``λ_U·σ(β(z0 − h))`` for undesirable samples, with
    ``z0 = max(0, KL̂)`` detached (KL̂ from mismatched pairs: :func:`kto_reference_point`).

    Args:
        policy, ref: ``(B,)`` response log-probs; desirable: ``(B,)`` bool;
        kl_estimate: scalar KL̂ (clamped at 0 here, and detached).

    Returns:
        ``(losses (B,), metrics)``; metrics ``(B,)``: ``reward = β·h`` and ``z0`` (scalar).
    """
    h = policy - ref
    z0 = torch.as_tensor(kl_estimate, dtype=h.dtype, device=h.device).detach().clamp(min=0)
    d = desirable.bool()
    v = torch.where(d, lambda_d * torch.sigmoid(beta * (h - z0)), lambda_u * torch.sigmoid(beta * (z0 - h)))
    lam = torch.where(d, torch.full_like(h, lambda_d), torch.full_like(h, lambda_u))
    return lam - v, {"reward": (beta * h).detach(), "z0": z0}


def kto_reference_point(
    policy_kl: torch.Tensor,
    ref_kl: torch.Tensor,
    *,
    n_total: int | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, KL̂(π_θ‖π_ref))``, detached (Ethayarajh et al.; TRL).

    ``KL̂ = (1/n) Σ_i [logπ_θ(y'_i|x_i) − logπ_ref(y'_i|x_i)]`` over the ``n`` *mismatched* pairs
    ``(x_i, y'_i)`` of the whole global batch (a prompt with another example's completion). When
    the pairs are split over processes, each passes its share and ``all_reduce`` sums the partial
    sum over processes, so every process gets the same z0.

    Args:
        policy_kl, ref_kl: ``(K,)`` log-probs of this process's share of the mismatched pairs
            (``K`` may be 0).
        n_total: ``n``, the number of mismatched pairs in the global batch (default ``K``).
        all_reduce: sums a tensor over processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``);
            ``None``: this process holds every pair.

    Returns:
        ``()`` tensor: z0 ≥ 0, no grad.
    """
    total = (
        torch.as_tensor(policy_kl, dtype=torch.float64).detach().sum()
        - torch.as_tensor(ref_kl, dtype=torch.float64).detach().sum()
    )
    if all_reduce is not None:
        total = all_reduce(total)
    n = len(policy_kl) if n_total is None else n_total
    if n <= 0:
        raise ValueError("kto_reference_point: no mismatched pairs (n_total must be > 0)")
    return (total / n).clamp(min=0).to(torch.float32)
