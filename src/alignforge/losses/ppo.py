"""PPO's pieces as pure functions: KL estimators, GAE, critic-free advantages, clipped losses.

METHODS.md §1c and §5. Notation: per response token ``t``, ``Δ_t = logπ_θ(y_t|·) − logπ_ref(y_t|·)``;
``mask`` marks real response tokens (1) against padding after the end (0). Every function takes
``(B, T)`` tensors for a batch of ``B`` responses of at most ``T`` tokens, unless it says otherwise.

The losses return **per-token** values (0 at masked positions) and leave the reduction to the
trainer, which divides a sum by the token count of the whole global minibatch (so micro-batches
and ranks add up exactly, as in the other trainers).
"""

from __future__ import annotations

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1", clamp: float = 10.0) -> torch.Tensor:
    """Per-token estimate of KL(π_θ‖π_ref) from samples of π_θ (Schulman's k1/k2/k3).

    * k1 = Δ (unbiased, may be negative per token)
    * k2 = ½Δ²
    * k3 = exp(−Δ) − 1 + Δ (non-negative, low variance)

    Args:
        logp, ref_logp: ``(B, T)`` log-probs of the sampled tokens.
        clamp: the result is clamped to ``[−clamp, clamp]`` (OpenRLHF clamps at ±10); ``0`` disables.

    Returns:
        ``(B, T)`` estimates (masking is the caller's).
    """
    d = logp - ref_logp
    if kind == "k1":
        out = d
    elif kind == "k2":
        out = 0.5 * d * d
    elif kind == "k3":
        out = torch.exp(-d) - 1 + d
    else:
        raise ValueError(f"unknown KL estimator {kind!r} (k1, k2 or k3)")
    return out.clamp(-clamp, clamp) if clamp > 0 else out


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last real token of each row of a right-padded ``(B, T)`` mask (0 if empty)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO: ``r_t = −β·kl_t``, plus the sequence score at the last real token.

    Args:
        score: ``(B,)`` the (baselined) reward-model score of each response.
        kl: ``(B, T)`` per-token KL estimates; mask: ``(B, T)``.
        kl_coef: β; 0 leaves only the score (KL in the loss instead).

    Returns:
        ``(B, T)`` rewards, 0 at padding.
    """
    m = mask.to(kl.dtype)
    r = -kl_coef * kl * m
    idx = last_token_index(mask)
    rows = torch.arange(r.shape[0], device=r.device)
    has = m.sum(1) > 0
    r[rows[has], idx[has]] += score.to(r.dtype)[has]
    return r


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    ``δ_t = r_t + γ·V_{t+1} − V_t`` (``V`` is 0 past the last real token), ``A_t = δ_t + γλ·A_{t+1}``,
    returns ``R_t = A_t + V_t``.

    Args:
        rewards, values: ``(B, T)``; mask: ``(B, T)`` (1 for real tokens, a prefix of each row).

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and 0 at padding.
    """
    m = mask.to(values.dtype)
    v = values * m
    r = rewards * m
    B, T = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the masked entries; 0 at masked-out ones."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def group_advantages(
    rewards: torch.Tensor, group_size: int, kind: Literal["grpo", "rloo"], norm_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free sequence advantages from ``K = group_size`` samples per prompt.

    * grpo: ``(r_i − mean(r)) / (std(r) + eps)`` (sample std, ddof=1, as DeepSeekMath/TRL);
      ``norm_std=False`` drops the division (Dr. GRPO).
    * rloo: ``r_i − mean_{j≠i} r_j``.

    Args:
        rewards: ``(N·K,)`` with the K samples of each prompt adjacent.

    Returns:
        ``(N·K,)`` advantages (broadcast them to every token of the response).
    """
    K = group_size
    if K < 2 or rewards.numel() % K:
        raise ValueError(
            f"group advantages need K >= 2 samples per prompt, a multiple of K in all; got "
            f"{rewards.numel()} rewards with K={K}"
        )
    g = rewards.view(-1, K)
    mean = g.mean(1, keepdim=True)
    if kind == "grpo":
        adv = g - mean
        if norm_std:
            adv = adv / (g.std(1, keepdim=True) + eps)
    elif kind == "rloo":
        adv = g - (g.sum(1, keepdim=True) - g) / (K - 1)
    else:
        raise ValueError(f"unknown group advantage {kind!r} (grpo or rloo)")
    return adv.reshape(-1)


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: ``−min(ρA, clip(ρ, 1−ε, 1+ε)A)``, ``ρ = exp(logπ − logπ_old)``.

    Args:
        logp: ``(B, T)`` log-probs under the policy being trained (with grad).
        old_logp: ``(B, T)`` log-probs at rollout time; advantages: ``(B, T)``; mask: ``(B, T)``.

    Returns:
        ``(losses (B, T), metrics)``: per-token losses, 0 at padding; metrics (sums over real tokens,
        detached): ``clipped`` (tokens where the clipped branch is taken) and ``approx_kl``
        (k3 estimate of KL(π_old‖π_θ): ``exp(r) − 1 − r`` with ``r = logπ_θ − logπ_old``).
    """
    m = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    losses = torch.maximum(unclipped, clipped) * m
    with torch.no_grad():
        lr = log_ratio.detach()
        metrics = {
            "clipped": ((clipped > unclipped).to(m.dtype) * m).sum(),
            "approx_kl": ((torch.exp(lr) - 1 - lr) * m).sum(),
        }
    return losses, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, per token: ``½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)``.

    ``clip <= 0`` gives the plain ``½(V − R)²``.

    Returns:
        ``(losses (B, T), metrics)``; metrics: ``vf_clipped`` (tokens where the clipped branch is larger).
    """
    m = mask.to(values.dtype)
    plain = (values - returns) ** 2
    if clip > 0:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clip - returns) ** 2
        losses = 0.5 * torch.maximum(plain, clipped) * m
        frac = ((clipped > plain).to(m.dtype) * m).sum().detach()
    else:
        losses = 0.5 * plain * m
        frac = torch.zeros((), dtype=m.dtype, device=m.device)
    return losses, {"vf_clipped": frac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` logits -> ``(...)`` entropy of the softmax distribution (computed in ≥ fp32)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logz = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    return logz - (p * logits).sum(-1)


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al.'s adaptive controller: ``e = clip(KL/target − 1, ±0.2)``, ``β ← β·(1 + e·n/horizon)``."""
    e = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + e * n_steps / horizon)
