"""Per-token log-probabilities, computing the LM head only where they are needed.

The 49k-token vocabulary head of a small model is a large share of its compute and memory.
:class:`TokenLogProbs` runs the decoder once, then applies the output head only at the
positions whose next token is a target (a response or assistant token), never at prompt or
padding positions. It is an ``nn.Module`` wrapping the causal LM so that DDP/FSDP, which
hook ``forward``, see every parameter through one call (``accelerator.prepare(TokenLogProbs(lm))``).
"""

from __future__ import annotations

import torch
from torch import nn


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
):
    """Log-probability of each target token from its logits (the one place this is computed).

    Args:
        logits: ``(N, V)`` next-token logits (any float dtype; computed in float32, or float64 for a
            float64 model).
        targets: ``(N,)`` token ids.
        softcap: the model's ``final_logit_softcapping`` (``tanh(x / c) * c``), if any.
        temperature: the logits are divided by it (after the softcap), as sampling at that temperature does.
        with_entropy: also return the ``(N,)`` entropy of each position's distribution.
        entropy_grad: ``False`` computes the entropy without autograd (a metric only: nothing of its
            ``(N, V)`` softmax is kept for a backward pass).

    Returns:
        ``(N,)`` ``log softmax(logits)[targets]`` (and the entropies), as target logit − logsumexp, not
        ``log_softmax(...).gather(...)``: the same value, but it does not materialise the ``(N, V)``
        log-softmax output, and torch's CPU fp32 log_softmax over a 49k vocabulary is biased by ~1e-5
        per token (it adds up to ~1e-3 over a 100-token response; logsumexp is within ~1e-7 of float64).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if not with_entropy:
        return lp
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return lp, logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def head_logprobs(
    base: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
):
    """The output head on ``hidden`` and :func:`logprobs_from_logits`, laid out as ``mask``.

    Args:
        base: the causal LM (PEFT unwrapped) whose head, and ``final_logit_softcapping``, apply.
        hidden: ``(N, H)`` states that predict ``targets`` ``(N,)``.
        mask: a bool tensor with ``N`` true entries, in the order of ``hidden``.

    Returns:
        log-probs shaped like ``mask`` (0 where it is false); with ``with_entropy``, ``(logps, entropies)``.
    """
    res = logprobs_from_logits(
        base.get_output_embeddings()(hidden),
        targets,
        getattr(base.config, "final_logit_softcapping", None),
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
    )

    def laid_out(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        out[mask] = x
        return out

    if not with_entropy:
        return laid_out(res)
    return laid_out(res[0]), laid_out(res[1])


def target_logprobs(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
):
    """Log-probability of each target token given everything before it.

    Args:
        lm: a causal LM (``PreTrainedModel`` or PEFT model).
        input_ids, attention_mask: ``(B, T)``.
        target_mask: ``(B, T)``; position ``t`` is scored iff ``target_mask[:, t]`` (``t >= 1``).
        position_ids: optional ``(B, T)`` (for packed sequences).
        temperature: log-probs of the distribution sampled at this temperature (PPO recomputes the
            log-probs of its samples this way).
        with_entropy: also return the ``(B, T)`` entropies of those distributions.
        entropy_grad: see :func:`logprobs_from_logits`.

    Returns:
        ``(B, T)`` float32 (float64 for a float64 model): ``out[b, t] = log p(input_ids[b, t] |
        input_ids[b, :t])`` at target positions, 0 elsewhere (column 0 is always 0); with
        ``with_entropy``, ``(logps, entropies)``.
    """
    from alignforge.models.lora import unwrap_base

    base = unwrap_base(lm)
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    tm = target_mask[:, 1:].bool()
    res = head_logprobs(  # (B, T - 1) from the states that predict a target token; column 0 stays 0
        base,
        hidden[:, :-1][tm],
        input_ids[:, 1:][tm],
        tm,
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
    )
    if not with_entropy:
        return torch.nn.functional.pad(res, (1, 0))
    return tuple(torch.nn.functional.pad(x, (1, 0)) for x in res)


class TokenLogProbs(nn.Module):
    """``forward(input_ids, attention_mask, target_mask, position_ids=None) -> (B, T) log-probs``.

    Wraps a causal LM so that a distributed wrapper around *this* module syncs its gradients.
    ``.lm`` is the wrapped model (save it, not the wrapper).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        target_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return target_logprobs(self.lm, input_ids, attention_mask, target_mask, position_ids)
